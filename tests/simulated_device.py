"""A GPU simulated on the CPU, so that CI exercises dpeq's device path without a GPU.

Tensors on the simulated device are :class:`DeviceTensor`: wrapper subclasses whose ``.device`` is
``meta`` (standing for ``cuda``; dpeq's device path is every path that is not the CPU's) and whose
values live in a CPU tensor inside. Inside :func:`simulated_device`, a dispatch mode runs every aten
op on the values and checks what CUDA would refuse or pay for:

- a device tensor mixed with a CPU tensor of one or more dimensions raises, as CUDA does ("Expected
  all tensors to be on the same device"); CPU scalars (0-d) mix, as they do on CUDA;
- a random draw must use a generator of the device its output lives on (a CPU generator drawing a
  device tensor raises, as does a device generator drawing a CPU tensor);
- host syncs are counted, with their call site: reading a device value on the host (``item``,
  ``tolist``, ``bool``, ``nonzero``, a copy to the CPU) and blocking host→device copies (a copy without
  ``non_blocking``, or indexing a device tensor with CPU indices, which CUDA copies implicitly).

``torch.Generator(device=...)`` on the simulated device gives a CPU generator registered as the
device's (by its seed: dpeq seeds every generator it makes). Nothing here is imported by dpeq.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

SIM = torch.device("meta")
_REAL_GENERATOR = torch.Generator
_DEVICE_SEEDS: set[int] = set()

#: ops that read a device value on the host (each a sync on CUDA)
_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.equal.default", "aten.is_nonzero.default"}
#: ops that take random draws through a ``generator`` argument
_COPY_OPS = {"aten._to_copy.default", "aten.copy_.default", "aten.copy.default"}


class DeviceTensor(torch.Tensor):
    """A tensor on the simulated device: its values in ``self.elem`` (a CPU tensor)."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        assert not isinstance(elem, DeviceTensor) and elem.device.type == "cpu"
        out = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                  storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                  layout=elem.layout, device=SIM, requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    def __repr__(self):
        return f"DeviceTensor({self.elem!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if _ACTIVE is None:
            raise RuntimeError(f"{func} on a simulated-device tensor outside simulated_device()")
        return _ACTIVE.handle(func, args, kwargs or {})


class _SimGenerator(_REAL_GENERATOR):
    """A device generator: a CPU generator whose seeds are registered as the simulated device's."""

    @property
    def device(self):
        return SIM

    def manual_seed(self, seed):
        _DEVICE_SEEDS.add(int(seed))
        return super().manual_seed(seed)

    def seed(self):
        value = super().seed()
        _DEVICE_SEEDS.add(int(value))
        return value


class _GeneratorFactory(_REAL_GENERATOR):
    """What ``torch.Generator`` is inside :func:`simulated_device`: a device generator for the
    simulated device, a real one elsewhere (a class, so that annotations such as ``torch.Generator |
    None`` in modules imported meanwhile still evaluate)."""

    def __new__(cls, device="cpu"):
        if torch.device(device).type == "meta":
            return _SimGenerator()
        return _REAL_GENERATOR(device)


def _is_sim(device) -> bool:
    return device is not None and torch.device(device).type == "meta"


def _call_site() -> str:
    """The innermost frame in dpeq_utils (or opacus) that caused an op."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "dpeq_utils" in frame.filename or "opacus" in frame.filename:
            return f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
    return "elsewhere"


class SimulatedDevice(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs: Counter = Counter()

    def sync(self, what: str) -> None:
        self.syncs[f"{what} at {_call_site()}"] += 1

    @property
    def sync_count(self) -> int:
        return sum(self.syncs.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.handle(func, args, kwargs or {})

    def handle(self, func, args, kwargs):
        name = str(func)
        flat, _ = tree_flatten((args, kwargs))
        if any(isinstance(a, torch.Tensor) and not isinstance(a, DeviceTensor) and a.device.type == "meta" for a in flat):
            # torch.tensor / torch.as_tensor(host data, device=...) bypass the dispatcher's copy: on CUDA a
            # blocking copy, here a tensor without values; build on the CPU and move it with .to(device)
            raise RuntimeError(f"a device tensor made from host data without .to(device) reached {name} at {_call_site()}")
        on_device = any(isinstance(a, DeviceTensor) for a in flat)
        to_device = _is_sim(kwargs.get("device"))
        if name in _COPY_OPS:
            return self._copy(func, name, args, kwargs)
        if on_device:
            if name in ("aten.index.Tensor", "aten.index_put_.default", "aten.index_put.default"):
                if any(isinstance(i, torch.Tensor) and not isinstance(i, DeviceTensor) and i.dim() > 0
                       for i in tree_flatten(args[1])[0]):
                    self.sync("CPU indices into a device tensor")  # CUDA copies them over, blocking
            else:
                for a in flat:
                    if isinstance(a, torch.Tensor) and not isinstance(a, DeviceTensor) and a.dim() > 0:
                        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two "
                                           f"devices, cuda:0 and cpu! ({name} at {_call_site()})")
            if name in _READS:
                self.sync(name.split(".")[1])
        generator = kwargs.get("generator")
        if generator is not None:
            device_generator = generator.initial_seed() in _DEVICE_SEEDS
            if device_generator != (on_device or to_device):
                raise RuntimeError(f"Expected a '{'cpu' if device_generator else 'cuda'}' device type for generator "
                                   f"but found '{'cuda' if device_generator else 'cpu'}' ({name} at {_call_site()})")
        if to_device:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        result = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if on_device or to_device:
            if name in ("aten._local_scalar_dense.default", "aten.equal.default", "aten.is_nonzero.default"):
                return result
            return tree_map(_wrap_output(args), result)
        return result

    def _copy(self, func, name, args, kwargs):
        source = args[1] if name.startswith("aten.copy") else args[0]
        if name == "aten._to_copy.default":
            target_sim = _is_sim(kwargs.get("device")) if "device" in kwargs else isinstance(source, DeviceTensor)
        else:
            target_sim = isinstance(args[0], DeviceTensor)
        source_sim = isinstance(source, DeviceTensor)
        if source_sim and not target_sim:
            self.sync("copy to the host")
        elif target_sim and not source_sim and source.dim() > 0 and not kwargs.get("non_blocking", False):
            self.sync("blocking copy to the device")
        plain = {k: v for k, v in kwargs.items()}
        if name == "aten._to_copy.default" and target_sim:
            plain["device"] = torch.device("cpu")
        result = func(*tree_map(_unwrap, args), **tree_map(_unwrap, plain))
        if name == "aten.copy_.default":
            return args[0]
        return DeviceTensor(result) if target_sim else result


def _unwrap(value):
    return value.elem if isinstance(value, DeviceTensor) else value


def _wrap_output(args):
    def wrap(value):
        if isinstance(value, torch.Tensor) and not isinstance(value, DeviceTensor):
            for a in tree_flatten(args)[0]:  # an in-place op returns its (device) argument
                if isinstance(a, DeviceTensor) and a.elem is value:
                    return a
            return DeviceTensor(value)
        return value
    return wrap


_ACTIVE: SimulatedDevice | None = None


@contextlib.contextmanager
def simulated_device(monkeypatch):
    """Inside: ``torch.device("meta")`` is a simulated GPU (see the module docstring); yields the mode,
    whose ``syncs`` count host syncs by call site."""
    global _ACTIVE
    mode = SimulatedDevice()
    monkeypatch.setattr(torch, "Generator", _GeneratorFactory)
    _ACTIVE = mode
    try:
        with mode:
            yield mode
    finally:
        _ACTIVE = None
