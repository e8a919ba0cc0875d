"""CIFAR-10: the official archive, downloaded and checked against its MD5, or a local copy checked
batch by batch against the official content; read by an unpickler that builds only NumPy arrays.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from ..paths import cache_dir
from .images import DatasetError, ImageDataset, content_digest

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: SHA-256 of each batch's decoded content (uint8 pixels as stored, then int64 little-endian labels), so
#: an extracted folder can be verified whatever pickle protocol wrote it (the archive's MD5 covers only
#: the archive). Computed with :func:`content_digest` from a copy whose pixels, labels and order match
#: the official release (first training row starts 59, 43, 50; labels 6, 9, 9, 4, 1, ...).
CIFAR10_CONTENT_SHA256 = {
    "data_batch_1": "54b2ed21fbd6a52cfc507fb5af63b8610e1938828f3017b159e69e87bb1965db",
    "data_batch_2": "a860ea80505c3e017d336ca80eca64bdc58099bf285ae8650980ed6c846f5e53",
    "data_batch_3": "701e5e97f12252a2ec703b29fe275315471b883e27926ec8e9d3b08ca81b2fab",
    "data_batch_4": "6c9358a56fb97959b9b494683c1c1ef9f0c4f291f3686302835e08a0b0ab2f47",
    "data_batch_5": "c2108fec4d9d07a51c26c680b5886f54ff810c859a3f7ba7efe3a4a82a838293",
    "test_batch": "2c33b053d1cd726af8d86e174a96dd89d7000ba1412add026d68142375b89d51",
}
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: The only callables a CIFAR-10 batch pickle refers to: NumPy's array reconstruction (``numpy._core``
#: in files written by NumPy 2) and, in protocol-2 pickles written by Python 3, ``_codecs.encode``
#: (how they store bytes). Anything else in a batch file is refused before it is called.
CIFAR_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
#: What a batch can hold: the official ones hold 10,000 images each (30,730,000 bytes of pixels, a
#: file of about 31 MB). A bigger file, or more images or labels than this, is not a CIFAR-10 batch and
#: is refused before it is read or built, whatever sizes it declares inside.
MAX_BATCH_IMAGES = 10_000
MAX_BATCH_FILE_BYTES = 48 * 2 ** 20


class _NdarrayType:
    """What ``numpy.ndarray`` unpickles to: the official batches only name it as the type
    ``_reconstruct`` builds (an empty array that the file's own bytes then fill); called directly, it
    would allocate any size a crafted file asks for, so that is refused."""

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("calls numpy.ndarray directly (an allocation of a size the file chooses); "
                                     "a CIFAR-10 batch never does")


def _reconstruct(subtype, shape, dtype):
    """``numpy``'s ``_reconstruct`` as NumPy pickles it, ``(ndarray, (0,), b'b')``, and nothing else:
    the array's real shape and bytes come next from the file (and must fit in it)."""
    if not isinstance(subtype, _NdarrayType) or shape != (0,) or dtype != b"b":
        raise pickle.UnpicklingError(f"reconstructs an array as ({type(subtype).__name__}, {str(shape)[:40]}, "
                                     f"{str(dtype)[:20]}), not as NumPy writes one")
    return np.ndarray.__new__(np.ndarray, (0,), np.int8)


def _numeric_dtype(spec, *args):
    """``numpy.dtype`` for the numeric types a batch holds (pixels, labels): never objects, strings or
    records, whose arrays would hold or expand to other things."""
    kind = np.dtype(spec).kind if isinstance(spec, str) and len(spec) <= 8 else None
    if kind not in ("b", "i", "u", "f"):
        raise pickle.UnpicklingError(f"asks for the NumPy type {str(spec)[:20]!r}; a CIFAR-10 batch holds only numbers")
    return np.dtype(spec, *args[:2])


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what the official batch files contain and nothing else: a crafted "batch" whose
    pickle names any other callable (``os.system``, ...) is refused, never run; so are a direct call of
    ``numpy.ndarray`` and non-numeric NumPy types."""

    def find_class(self, module: str, name: str):
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch never contains it")
        if name == "ndarray":
            return _NdarrayType()
        if name == "_reconstruct":
            return _reconstruct
        if name == "dtype":
            return _numeric_dtype
        return super().find_class(module, name)


def _check_size(size: int, where: str) -> None:
    """Refuse, unread, a batch file larger than any CIFAR-10 batch (``size``: what the file system or
    the archive declares)."""
    if size > MAX_BATCH_FILE_BYTES:
        raise DatasetError(f"{where} is {size / 2 ** 20:.0f} MB, larger than any CIFAR-10 batch "
                           f"({MAX_BATCH_FILE_BYTES / 2 ** 20:.0f} MB at most): the copy is corrupt or not CIFAR-10; "
                           "replace it with a fresh download")


def _labels_array(labels, n: int, where: str) -> np.ndarray:
    """A batch's labels as int64, checked before anything is built from them: a list of ``n`` Python
    integers (the official files) or an integer array of shape ``(n,)``."""
    if isinstance(labels, np.ndarray):
        if labels.dtype.kind not in ("i", "u") or labels.shape != (n,):
            raise DatasetError(f"{where}: 'labels' must be {n} integers, got a {labels.dtype} array of shape "
                               f"{labels.shape}; the copy is corrupt or not CIFAR-10: replace it with a fresh download")
        return labels.astype(np.int64)
    if not isinstance(labels, list) or len(labels) != n or not all(type(v) is int for v in labels):
        what = f"a list of {len(labels)}" if isinstance(labels, list) else f"a {type(labels).__name__}"
        raise DatasetError(f"{where}: 'labels' must be a list of {n} integers, got {what}"
                           f"{' with other things than integers' if isinstance(labels, list) and len(labels) == n else ''}; "
                           "the copy is corrupt or not CIFAR-10: replace it with a fresh download")
    if any(v < -2 ** 63 or v >= 2 ** 63 for v in labels):
        raise DatasetError(f"{where}: labels must lie in 0..9")
    return np.asarray(labels, dtype=np.int64)


def _parse_batch(raw: bytes | io.BufferedReader, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR batch → (uint8 (n, 3, 32, 32), int64 (n,)), validated.

    Accepts both the official Python-2 pickles (``bytes`` keys) and Python-3 ones (``str`` keys),
    through :class:`_CifarUnpickler` (nothing but NumPy arrays of numbers, dicts, lists, strings and
    numbers). What is read is bounded before it is built: the file's size, then the images and labels
    it holds (:data:`MAX_BATCH_IMAGES`).
    """
    _check_size(len(raw) if isinstance(raw, bytes) else os.fstat(raw.fileno()).st_size, where)
    data_bytes = raw if isinstance(raw, bytes) else raw.read(MAX_BATCH_FILE_BYTES + 1)
    _check_size(len(data_bytes), where)  # it grew since
    try:
        batch = _CifarUnpickler(io.BytesIO(data_bytes), encoding="bytes").load()
    except Exception as err:  # truncated or foreign files raise many different errors
        raise DatasetError(f"{where} is not a readable CIFAR-10 batch ({type(err).__name__}: {str(err)[:200]}); "
                           "the copy is corrupt or incomplete: replace it with a fresh download") from err
    if not isinstance(batch, dict):
        raise DatasetError(f"{where} does not hold a CIFAR-10 batch (a dict with 'data' and 'labels')")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DatasetError(f"{where} lacks 'data' or 'labels' (keys: {[str(k)[:40] for k in list(batch)[:8]]})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
        raise DatasetError(f"{where}: 'data' must be a uint8 array of shape (n, 3072), got {got}")
    if data.shape[0] > MAX_BATCH_IMAGES:
        raise DatasetError(f"{where}: {data.shape[0]} images, more than a CIFAR-10 batch holds ({MAX_BATCH_IMAGES})")
    labels = _labels_array(batch["labels"], data.shape[0], where)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{where}: labels must lie in 0..9, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


def _assemble(batches: dict[str, tuple[np.ndarray, np.ndarray]], origin: str,
              verified: str) -> tuple[ImageDataset, ImageDataset]:
    def build(names):
        images = torch.from_numpy(np.concatenate([batches[n][0] for n in names]))
        labels = torch.from_numpy(np.concatenate([batches[n][1] for n in names]))
        return ImageDataset(images, labels, CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, "cifar10",
                            {"origin": origin, "verified": verified})

    return build(CIFAR10_TRAIN_BATCHES), build((CIFAR10_TEST_BATCH,))


def _verify_content(batch: tuple[np.ndarray, np.ndarray], name: str, where: str) -> None:
    actual = content_digest(*batch)
    if actual != CIFAR10_CONTENT_SHA256[name]:
        raise DatasetError(f"{where}: its pixels or labels differ from the official CIFAR-10 (content SHA-256 "
                           f"{actual[:12]}…, expected {CIFAR10_CONTENT_SHA256[name][:12]}…): the copy is corrupt or "
                           "modified. Replace it with a fresh download, or pass verify=False to use it anyway "
                           "(every run record stores the digest of the data it trained on).")


def read_cifar10_folder(folder: str | os.PathLike, verify: bool = True) -> tuple[ImageDataset, ImageDataset]:
    """Read an extracted ``cifar-10-batches-py/`` folder, validating every batch and (``verify``) checking
    its content against :data:`CIFAR10_CONTENT_SHA256`."""
    folder = Path(folder)
    names = CIFAR10_TRAIN_BATCHES + (CIFAR10_TEST_BATCH,)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DatasetError(f"{folder} is not a complete CIFAR-10 folder: missing {', '.join(missing)}. "
                           f"Point at the extracted '{CIFAR10_FOLDER}' folder or at '{CIFAR10_ARCHIVE}'.")
    batches = {}
    for name in names:
        with open(folder / name, "rb") as handle:
            batches[name] = _parse_batch(handle, str(folder / name))
        if verify:
            _verify_content(batches[name], name, str(folder / name))
    return _assemble(batches, str(folder), "content SHA-256 of every batch" if verify else "not verified (verify=False)")


def read_cifar10_archive(archive: str | os.PathLike, md5: str | None = CIFAR10_MD5) -> tuple[ImageDataset, ImageDataset]:
    """Read the official ``.tar.gz`` archive after checking its MD5 (``md5=None`` skips the check)."""
    archive = Path(archive)
    if md5 is not None:
        actual = _md5(archive)
        if actual != md5:
            raise DatasetError(f"{archive} has MD5 {actual}, expected {md5}: the archive is corrupt or incomplete. "
                               "Delete it and download again (dpeq does this itself when the network is reachable).")
    wanted = CIFAR10_TRAIN_BATCHES + (CIFAR10_TEST_BATCH,)
    batches = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted:
                    where = f"{archive}:{member.name}"
                    _check_size(member.size, where)  # the size the archive declares, before inflating it
                    batches[base] = _parse_batch(tar.extractfile(member).read(MAX_BATCH_FILE_BYTES + 1), where)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DatasetError(f"{archive} could not be read as a .tar.gz archive ({err}); "
                           "delete it and download again") from err
    missing = [n for n in wanted if n not in batches]
    if missing:
        raise DatasetError(f"{archive} lacks the CIFAR-10 batches {', '.join(missing)}")
    return _assemble(batches, str(archive), "archive MD5" if md5 is not None else "not verified (md5=None)")


def download_cifar10(destination: Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> Path:
    """Download the archive to ``destination`` (a file path), verified; nothing partial is ever left there.

    The bytes go to a hidden temporary file beside the destination and are moved into place only
    after the MD5 matches, so an interrupted or corrupt download can never pass for a good archive.
    """
    from tqdm import tqdm  # text, not a widget: it renders in static notebooks too

    destination.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part", delete=False)
    partial = Path(handle.name)
    try:
        digest = hashlib.md5()
        with handle, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="CIFAR-10", leave=False) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    handle.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if digest.hexdigest() != md5:
            raise DatasetError(f"the download from {url} has MD5 {digest.hexdigest()}, expected {md5}; "
                               "it was discarded. Try again, or download the archive yourself and pass its path.")
        os.replace(partial, destination)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise DatasetError(
            f"could not download CIFAR-10 from {url} ({err}). Without network access, download "
            f"'{CIFAR10_ARCHIVE}' elsewhere and pass its path (or the extracted '{CIFAR10_FOLDER}' folder) "
            "as source=..., or set DPEQ_CIFAR10 to it.") from err
    finally:
        partial.unlink(missing_ok=True)
    return destination


def cifar10_on_disk(source: str | os.PathLike | None = None) -> bool:
    """Whether :func:`load_cifar10` would find a local copy (``source``, ``$DPEQ_CIFAR10`` or the
    cache) without downloading: a notebook cell that merely illustrates on CIFAR-10 can skip itself
    instead of starting a 170 MB download."""
    explicit = source if source is not None else os.environ.get("DPEQ_CIFAR10")
    if explicit:
        return Path(explicit).expanduser().exists()
    cache = cache_dir()
    return (cache / CIFAR10_FOLDER).is_dir() or (cache / CIFAR10_ARCHIVE).is_file()


def load_cifar10(
    source: str | os.PathLike | None = None,
    *,
    download: bool = True,
    url: str = CIFAR10_URL,
    md5: str = CIFAR10_MD5,
    verify: bool = True,
) -> tuple[ImageDataset, ImageDataset]:
    """CIFAR-10 train (50 000) and test (10 000) splits; an archive is checked by its MD5, an
    extracted folder by the content digest of every batch (``verify=False`` skips the latter).

    Looked for in this order: ``source`` (archive or extracted folder); ``$DPEQ_CIFAR10``; the cache
    (extracted folder, then archive); a download into the cache (unless ``download=False``).
    """
    explicit = source if source is not None else os.environ.get("DPEQ_CIFAR10")
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_dir():
            nested = path / CIFAR10_FOLDER
            return read_cifar10_folder(nested if nested.is_dir() else path, verify)
        if path.is_file():
            return read_cifar10_archive(path, md5)
        raise DatasetError(f"no CIFAR-10 copy at {path}: give the '{CIFAR10_ARCHIVE}' archive "
                           f"or the extracted '{CIFAR10_FOLDER}' folder")
    cache = cache_dir()
    if (cache / CIFAR10_FOLDER).is_dir():
        return read_cifar10_folder(cache / CIFAR10_FOLDER, verify)
    archive = cache / CIFAR10_ARCHIVE
    if not archive.is_file():
        if not download:
            raise DatasetError(f"CIFAR-10 is not in {cache} and downloading is switched off: pass source=... "
                               f"(archive or '{CIFAR10_FOLDER}' folder), set DPEQ_CIFAR10, or allow the download")
        download_cifar10(archive, url, md5)
    return read_cifar10_archive(archive, md5)


# ----------------------------------------------------------------------------------------------
# augmentation multiplicity
