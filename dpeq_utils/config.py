"""``RunConfig``: every setting of one training run, in the vocabulary shared by the parameters
cells, the run records and the figure labels. Profiles (``notebooks/profiles/*.yaml``) fill it.

Only settings live here. Values derived from them (noise multiplier, sample rate, steps actually
taken, ε spent) are computed by the trainer and stored in the run record, never set by hand.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .bounds import shown
from .data import DATASETS, MAX_SIZES
from .equivariance import can_halve, parse_group
from .models import MODELS, takes_group
from .models.layers import HEADS
from .per_sample import ENGINES
from .privacy import ACCOUNTANTS
from .profiles import BUDGET_FIELDS, PROFILES, baseline_changes, baseline_entries, bounded_yaml, load_profile, profile_path  # noqa: F401 - re-exported
from .variants import SELECTION_METHODS

MAX_WIDTH = 1024
#: The most logical steps a run may take (the paper: 2,160): more is a typo, and would make the σ
#: calibration, the checkpoints (one batch size per step) and the record grow without bound.
MAX_STEPS = 100_000
#: The largest learning rate or clipping norm taken (the paper: 2 and 2); beyond it a step overflows float32.
MAX_MAGNITUDE = 1e6
#: A profile's label names the folder its records go to (data/runs/<profile>): a plain name, never a path.
PROFILE_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")
FLOAT_FIELDS = ("target_epsilon", "target_delta", "clip_norm", "epochs", "lr", "momentum", "ema_decay",
                "prune_rate", "drop_rate", "modelmix_gap_rate")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value) -> bool:
    return _is_int(value) and value >= 1


def _positive_number(value) -> bool:
    return _is_number(value) and math.isfinite(value) and value > 0


def _in_unit_interval(value) -> bool:
    """In [0, 1)."""
    return _is_number(value) and 0 <= value < 1


def _optional(check):
    return lambda value: value is None or check(value)


#: Each field checked alone: ``field: (check, what it must be)``; the message is
#: "<field> must <what>, got <value>".
FIELD_CHECKS = {
    # capped so that a typo cannot build a model of hundreds of GB before the memory check (the paper: 16/32/64)
    "widths": (lambda v: isinstance(v, tuple) and len(v) == 3 and all(_positive_int(w) and w <= MAX_WIDTH for w in v),
               "be three positive integers of at most 1024"),
    **{name: (_positive_int, "be a positive integer") for name in ("num_groups", "batch_size", "physical_batch_size",
                                                                  "aug_mult")},
    **{name: (_optional(_positive_int), "be a positive integer or None") for name in ("train_size", "test_size")},
    "update_steps": (_optional(lambda v: _positive_int(v) and v <= MAX_STEPS),
                     f"be a positive integer of at most {MAX_STEPS:,} or None"),
    **{name: (_positive_number, "be a positive finite number") for name in ("target_epsilon", "target_delta")},
    **{name: (lambda v: _positive_number(v) and v <= MAX_MAGNITUDE, f"be a positive number of at most {MAX_MAGNITUDE:g}")
       for name in ("clip_norm", "lr")},
    "profile": (lambda v: isinstance(v, str) and PROFILE_LABEL.fullmatch(v) is not None,
                "be a plain name (letters, digits, _ . + -; it names the records' folder data/runs/<profile>), "
                "not a path"),
    **{name: (lambda v: isinstance(v, str), "be a name (a string)") for name in (
        "dataset", "model", "group", "head", "accountant", "per_sample_engine", "prune_method", "drop_method", "device")},
    "epochs": (_optional(_positive_number), "be a positive finite number"),
    "target_delta": (lambda v: _is_number(v) and 0 < v < 1, "lie in (0, 1)"),
    **{name: (_in_unit_interval, "lie in [0, 1)") for name in ("momentum", "ema_decay", "prune_rate", "drop_rate")},
    "ema_horizons": (lambda v: isinstance(v, tuple) and all(isinstance(d, float) and 0 <= d < 1 for d in v),
                     "be a list of decays in [0, 1)"),
    **{name: (lambda v: _is_int(v) and v >= 0, "be an integer >= 0") for name in ("eval_every", "validation_size", "seed")},
    "checkpoint_every": (_optional(lambda v: _is_int(v) and v >= 0), "be an integer >= 0 or None"),
    "modelmix_gap_rate": (lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "be a finite number >= 0"),
    **{name: (lambda v: isinstance(v, bool), "be true or false") for name in ("restrict", "non_private", "modelmix",
                                                                                        "secure_noise", "allow_tf32",
                                                                                        "deterministic")},
}


def _choices() -> dict[str, tuple]:
    """Fields whose value comes from a registry."""
    return {"dataset": DATASETS, "model": MODELS, "head": HEADS, "accountant": ACCOUNTANTS,
            "per_sample_engine": ENGINES, "prune_method": SELECTION_METHODS, "drop_method": SELECTION_METHODS}


#: Roles of a field (``role`` in its metadata). A ``DEFINES`` field is part of what the run computes
#: and of its record key; a ``PERFORMANCE`` field changes only where or how fast it computes (and its
#: float32 rounding: :mod:`dpeq_utils.records`), never a random draw, so it stays out of the key (as
#: jax_privacy keeps such settings apart in its ``PerformanceFlags``); a ``LABEL`` names the run.
DEFINES, PERFORMANCE, LABEL = "defines", "performance", "label"


def setting(default, *, role: str = DEFINES, cost: bool = False, keyed_when_set: bool = False):
    """A ``RunConfig`` field with what it means as metadata, read by :func:`key_fields` and
    :func:`cost_fields` instead of hand-kept lists.

    ``cost``: the field sets the arithmetic of a training step (what a step costs; ε, seed or learning
    rate do not). ``keyed_when_set``: the field was added after records existed, so it enters the key
    only when it is set (truthy): every earlier record keeps its key."""
    return dataclasses.field(default=default, metadata={"role": role, "cost": cost, "keyed_when_set": keyed_when_set})


@dataclass(frozen=True)
class RunConfig:
    """One DP-SGD (or non-private reference) training run. Field names are the ones parameters cells, records and figures use.

    ``RunConfig()`` is the paper's model and privacy recipe (ε = 8, δ = 1e-5, clip 2, D4 restricted,
    widths 16/32/64) at a size that trains in about a minute on a CPU: synthetic data, batch 256,
    one view, 20 steps. The profiles (``notebooks/profiles``) set every field for real runs.
    """

    profile: str = setting("custom", role=LABEL)
    # data
    dataset: str = setting("synthetic", cost=True)
    train_size: int | None = None  # None: the whole training set (synthetic: 5000)
    test_size: int | None = None  # None: the whole test set (synthetic: 1000)
    validation_size: int = setting(0, keyed_when_set=True)  # examples held out of the training set (fixed across seeds) to tune on
    # model
    model: str = setting("eq_resnet9", cost=True)
    group: str = setting("D4", cost=True)
    restrict: bool = setting(True, cost=True)
    widths: tuple[int, int, int] = setting((16, 32, 64), cost=True)
    # GroupNorm groups asked for by the ResNet-9 models (adapted per layer: models.layers.norm_groups);
    # wrn16_4 always asks for 16 (De et al.)
    num_groups: int = setting(8, cost=True)
    head: str = setting("pool2x2", cost=True)
    # privacy
    non_private: bool = setting(False, cost=True)
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    accountant: str = "rdp"
    clip_norm: float = 2.0
    # optimisation
    batch_size: int = setting(256, cost=True)  # logical batch: the *expected* size under Poisson sampling (the paper: 8192)
    physical_batch_size: int = setting(64, role=PERFORMANCE, cost=True)  # examples per forward/backward chunk (memory and speed only)
    per_sample_engine: str = setting("auto", role=PERFORMANCE)  # per-example gradients: hooks, vmap, or auto (hooks where supported)
    aug_mult: int = setting(1, cost=True)  # the paper: 4
    update_steps: int | None = 20  # the paper: 2160
    epochs: float | None = None  # alternative to update_steps: steps = round(epochs * N / batch_size)
    lr: float = 1.0  # the paper: 2.0 (at batch 8192)
    momentum: float = 0.0
    ema_decay: float = 0.999
    # further EMA decays scored at every evaluation (they never change training)
    ema_horizons: tuple[float, ...] = setting((), keyed_when_set=True)
    eval_every: int = 0  # evaluate every this many steps (0: only at the end)
    # write a checkpoint every this many steps (0: only when signalled; None: every few minutes of
    # wall time). Where a run pauses changes nothing it computes (tests/test_checkpoint.py)
    checkpoint_every: int | None = setting(None, role=PERFORMANCE)
    # DP-SGD variants (dpeq_utils.variants): pre-pruning + gradient dropping (Adamczewski et al. 2023)
    prune_rate: float = setting(0.0, cost=True)  # fraction of every parameter tensor removed before training
    prune_method: str = "magnitude"  # random, or magnitude of the initial (seed-only) weights
    drop_rate: float = setting(0.0, cost=True)  # fraction of the remaining coordinates not updated at each step
    drop_method: str = "random"  # random, or magnitude of the current DP iterate
    # ModelMix (Xiao et al. 2022): step from a random mix of the current and previous iterates
    modelmix: bool = setting(False, cost=True)
    modelmix_gap_rate: float = 0.15  # minimum coordinate gap tau = lr * gap_rate
    # reproducibility
    seed: int = 0
    # secure mode: the Poisson sampler, the augmentation and the noise draw from the OS's entropy instead
    # of streams derived from `seed` (seeded ones can be rebuilt by anyone holding the record: every
    # batch's members, then the noise, which could be subtracted), their states are never checkpointed,
    # and the record carries no fingerprint of the training data. Secure runs cannot be repeated bit for
    # bit. Seeded mode (the default) is for reproducible research on public data. (The name predates
    # the sampler and augmentation joining the noise; kept so that records keep their keys.)
    secure_noise: bool = setting(False, keyed_when_set=True)
    device: str = setting("auto", role=PERFORMANCE, cost=True)
    # GPU arithmetic (nothing changes on a CPU). TF32 rounds the inputs of float32 matrix products and
    # convolutions to 10 mantissa bits on Ampere and later GPUs (PyTorch allows it for convolutions by
    # default): off unless asked, so that every layer computes in float32, as on a CPU
    allow_tf32: bool = setting(False, role=PERFORMANCE, cost=True)
    # deterministic algorithms on CUDA (torch.use_deterministic_algorithms, cuDNN's deterministic
    # kernels, a fixed cuBLAS workspace): a GPU run that repeats bit for bit, a little slower
    deterministic: bool = setting(False, role=PERFORMANCE)

    def __post_init__(self):
        if isinstance(self.widths, (list, tuple)):
            object.__setattr__(self, "widths", tuple(self.widths))
        if isinstance(self.ema_horizons, (list, tuple)):
            object.__setattr__(self, "ema_horizons", tuple(float(d) if isinstance(d, int) and not isinstance(d, bool)
                                                           else d for d in self.ema_horizons))
        # one spelling per value, so equal configs hash to equal record keys (8 and 8.0; YAML's "1e-5" string)
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, (int, str)) and not isinstance(value, bool):
                try:
                    object.__setattr__(self, name, float(value))
                except ValueError:
                    pass  # reported by the checks below
        problems = list(self._problems())
        if problems:
            raise ValueError("invalid run config:\n  - " + "\n  - ".join(problems))

    def _problems(self):
        """Every problem of this config, one sentence each: first each field alone
        (:data:`FIELD_CHECKS`, choices), then fields together."""
        wrong_type = set()
        for name, (check, must) in FIELD_CHECKS.items():
            if not check(getattr(self, name)):
                wrong_type.add(name)
                yield f"{name} must {must}, got {shown(getattr(self, name))}"
        for name, options in _choices().items():
            if name not in wrong_type and getattr(self, name) not in options:
                yield f"{name} must be one of {tuple(options)}, got {shown(getattr(self, name))}"
        if "group" not in wrong_type:
            try:
                parse_group(self.group)
            except ValueError as err:
                yield str(err)
        if not wrong_type & {"dataset", "model", "group"}:  # the checks of fields together read these as names
            yield from self._cross_field_problems()

    def _cross_field_problems(self):
        if (self.update_steps is None) == (self.epochs is None):
            yield "set exactly one of update_steps and epochs (the other to None)"
        if _is_int(self.validation_size) and self.validation_size >= 0 and self.dataset in MAX_SIZES:
            max_train, max_test = MAX_SIZES[self.dataset]
            sizes = [v for v in (self.train_size, self.validation_size) if _is_int(v)]
            if sum(sizes) > max_train or (self.dataset == "cifar10" and self.train_size is None
                                           and self.validation_size >= max_train):
                yield (f"train_size + validation_size must be at most {max_train:,} for {self.dataset}, got "
                       f"{self.train_size} + {self.validation_size}")
            if isinstance(self.test_size, int) and self.test_size > max_test:
                yield f"test_size must be at most {max_test:,} for {self.dataset}, got {self.test_size:,}"
        if self.modelmix is True and _is_number(self.prune_rate) and _is_number(self.drop_rate) \
                and (self.prune_rate > 0 or self.drop_rate > 0):
            yield "modelmix cannot be combined with prune_rate/drop_rate (the mix would move pruned weights): choose one"
        if self.restrict is True and self.model in MODELS and takes_group(self.model) and not can_halve(self.group):
            yield f"group {self.group} has no subgroup to restrict to: set restrict=False"

    def replace(self, **changes) -> "RunConfig":
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - set(field_names()))
        if unknown:
            raise ValueError(f"unknown run config field(s) {unknown}; valid fields: {', '.join(field_names())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["widths"] = list(self.widths)
        values["ema_horizons"] = list(self.ema_horizons)
        return values


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(RunConfig))


def _meta(field: dataclasses.Field) -> dict:
    return {"role": DEFINES, "cost": False, "keyed_when_set": False, **field.metadata}


def key_fields(config: RunConfig) -> dict:
    """The fields of ``config`` its record key hashes (:func:`dpeq_utils.records.config_key`): every
    field that defines the run, those marked ``keyed_when_set`` only when set."""
    values = config.to_dict()
    return {f.name: values[f.name] for f in dataclasses.fields(RunConfig)
            if _meta(f)["role"] == DEFINES and (values[f.name] or not _meta(f)["keyed_when_set"])}


def cost_fields() -> tuple[str, ...]:
    """Fields that set the arithmetic of a training step, in declaration order: runs equal in these
    cost the same per step on the same machine (:func:`dpeq_utils.report.step_seconds`)."""
    return tuple(f.name for f in dataclasses.fields(RunConfig) if _meta(f)["cost"])


def cost_key(values: dict, leave_out: tuple[str, ...] = ()) -> tuple:
    """The values of :func:`cost_fields` in ``values`` (a config as a dict; lists as tuples), less
    ``leave_out``: runs with equal keys do the same arithmetic per step (the report's seconds per
    step; the estimate's throughput per example·view, which leaves out what the count already scales by)."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}  # a field newer than the record: its default
    return tuple(tuple(v) if isinstance(v := values.get(f, defaults[f]), list) else v for f in cost_fields()
                 if f not in leave_out)


def performance_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(RunConfig) if _meta(f)["role"] == PERFORMANCE)


def config_from_profile(profile: str | Path, baseline: str | None = None, **overrides) -> RunConfig:
    """``RunConfig`` from a profile's ``run`` section, then its ``baselines[baseline]`` entry (if
    named), then ``overrides``."""
    content = load_profile(profile)
    entry = {} if baseline is None else baseline_changes(profile, [baseline], equal_budget=False)[baseline]
    values = {**content["run"], **entry, **overrides}
    values.setdefault("profile", Path(profile).stem)
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise ValueError(f"unknown run config field(s) {unknown} in profile {profile!r}; valid: {', '.join(field_names())}")
    return RunConfig(**values)


def parse_assignment(text: str) -> tuple[str, object]:
    """``"key=value"`` with the value read as YAML (numbers, booleans, lists, null).

    >>> parse_assignment("widths=[4, 8, 16]"), parse_assignment("update_steps=null")
    (('widths', [4, 8, 16]), ('update_steps', None))
    """
    if "=" not in text:
        raise ValueError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in field_names():
        raise ValueError(f"unknown run config field {key!r}; valid fields: {', '.join(field_names())}")
    if key == "profile":  # the profile is where the other fields come from, not one of them
        raise ValueError("the profile is chosen with --profile NAME (or a path to a .yaml file), not --set profile=...")
    try:
        return key, bounded_yaml(raw, f"the value of {key}")
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"could not read the value of {key} ({raw!r}): {problem}; values are YAML, "
                         "e.g. widths=[4, 8, 16], update_steps=null, restrict=false") from None
