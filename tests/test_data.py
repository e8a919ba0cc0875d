import hashlib
import io
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CodePayload

from dpeq_utils import data
from dpeq_utils.data import DatasetError, augment_views, load_cifar10, load_dataset, make_synthetic, synthetic_glyphs

# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_seed_and_differs_across_seeds():
    a_train, a_test = make_synthetic(64, 32, seed=5)
    b_train, b_test = make_synthetic(64, 32, seed=5)
    c_train, _ = make_synthetic(64, 32, seed=6)
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_train.labels, b_train.labels)
    assert torch.equal(a_test.images, b_test.images)
    assert not torch.equal(a_train.images, c_train.images)
    assert not torch.equal(a_train.images[:32], a_test.images), "train and test must be different draws"


def test_synthetic_shapes_labels_and_normalisation():
    train, test = make_synthetic(400, 100, seed=0)
    assert train.images.shape == (400, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (100, 3, 32, 32)
    assert set(train.labels.tolist()) == set(range(10))
    normalized = train.normalized()
    assert normalized.mean().abs() < 0.05 and (normalized.std() - 1).abs() < 0.05


def test_synthetic_classes_are_distinct_under_rotations_and_reflections():
    glyphs = synthetic_glyphs()
    assert glyphs.shape == (10, 7, 7)
    for i in range(10):
        for j in range(i + 1, 10):
            distances = [int((glyphs[i] != t).sum()) for t in data.synthetic._d4_orbit(glyphs[j])]
            assert min(distances) >= 6, (i, j)


def test_synthetic_orientation_is_random():
    """Images of one class appear at many orientations: their mean is far blurrier than one image."""
    train, _ = make_synthetic(2000, 10, seed=0)
    one_class = train.images[train.labels == 0].float()
    assert one_class.mean(0).std() < 0.6 * one_class[0].std()


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_synthetic_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="train_size"):
        make_synthetic(bad, 10)


def test_load_dataset_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


def test_subset_is_seeded_and_validated():
    train, _ = make_synthetic(100, 10)
    a, b = train.subset(30, seed=1), train.subset(30, seed=1)
    assert len(a) == 30 and torch.equal(a.images, b.images)
    with pytest.raises(ValueError, match="subset size"):
        train.subset(101)


# ---------------------------------------------------------------------------------------------- augmult


def test_augment_views_are_independent_reflect_padded_crops_with_flips():
    images = torch.randn(3, 3, 8, 8)
    views = augment_views(images, 6, torch.Generator().manual_seed(0))
    assert views.shape == (3, 6, 3, 8, 8)
    assert torch.equal(views[:, 0], images)
    padded = F.pad(images, (4, 4, 4, 4), mode="reflect")
    for b in range(3):
        for k in range(1, 6):
            candidates = [padded[b, :, y:y + 8, x:x + 8] for y in range(9) for x in range(9)]
            candidates += [c.flip(-1) for c in candidates]
            assert any(torch.equal(views[b, k], c) for c in candidates), "a view must be a (flipped) crop"
    # views are drawn independently: not all the same
    assert len({views[0, k].sum().item() for k in range(1, 6)}) > 1


def test_augment_views_k1_and_empty_batch():
    images = torch.randn(2, 3, 8, 8)
    assert torch.equal(augment_views(images, 1)[:, 0], images)
    assert augment_views(images[:0], 4).shape == (0, 4, 3, 8, 8)
    with pytest.raises(ValueError, match="aug_mult"):
        augment_views(images, 0)


# ---------------------------------------------------------------------------------------------- CIFAR-10


def _batch(n, seed, key_type=bytes, label_offset=0):
    rng = np.random.default_rng(seed)
    content = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
               "labels": [int(v) + label_offset for v in rng.integers(0, 10, n)],
               "batch_label": "tiny", "filenames": [f"{i}.png" for i in range(n)]}
    return {(k.encode() if key_type is bytes else k): v for k, v in content.items()}


def _tiny_batches(key_type=bytes):
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {name: _batch(4, seed, key_type) for seed, name in enumerate(names)}


def _write_archive(path: Path, batches) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in batches.items():
            raw = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_archive(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    md5 = _write_archive(path, _tiny_batches())
    return path, md5


def test_reads_official_format_archive(tiny_archive):
    path, md5 = tiny_archive
    train, test = load_cifar10(path, md5=md5)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    expected = _batch(4, 0)
    assert torch.equal(train.images[:4].reshape(4, -1), torch.from_numpy(expected[b"data"]))
    assert train.labels[:4].tolist() == expected[b"labels"]
    assert train.mean == data.CIFAR10_MEAN


def test_checksum_mismatch_is_refused(tiny_archive):
    path, _ = tiny_archive
    with pytest.raises(DatasetError, match="MD5 .* expected c58f30108f718f92721af3b95e74349a"):
        load_cifar10(path)  # the official checksum does not match the tiny archive


def test_truncated_archive_is_refused(tiny_archive, tmp_path):
    path, _ = tiny_archive
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError, match="MD5"):
        load_cifar10(cut, md5=hashlib.md5(path.read_bytes()).hexdigest())
    with pytest.raises(DatasetError, match="could not be read|not a readable"):
        data.read_cifar10_archive(cut, md5=None)


def test_extracted_folder_with_str_keys_and_its_errors(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, content in _tiny_batches(key_type=str).items():
        (folder / name).write_bytes(pickle.dumps(content, protocol=4))
    with pytest.raises(DatasetError, match="differ from the official CIFAR-10"):
        load_cifar10(tmp_path)  # tiny made-up batches are not CIFAR-10's content
    train, test = load_cifar10(tmp_path, verify=False)  # the parent folder works too
    assert len(train) == 20 and len(test) == 4 and train.meta["verified"].startswith("not verified")

    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:100])
    with pytest.raises(DatasetError, match="corrupt or incomplete"):
        load_cifar10(folder, verify=False)
    (folder / "test_batch").write_bytes(pickle.dumps(_batch(4, 0, str, label_offset=10)))
    with pytest.raises(DatasetError, match="labels must lie in 0..9"):
        load_cifar10(folder, verify=False)
    (folder / "test_batch").unlink()
    with pytest.raises(DatasetError, match="missing test_batch"):
        load_cifar10(folder, verify=False)
    with pytest.raises(DatasetError, match="no CIFAR-10 copy"):
        load_cifar10(tmp_path / "nowhere")


def test_a_flipped_pixel_in_an_extracted_folder_is_caught(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    digests = {}
    for name, content in _tiny_batches(key_type=str).items():
        (folder / name).write_bytes(pickle.dumps(content, protocol=4))
        with open(folder / name, "rb") as handle:
            digests[name] = data.content_digest(*data.cifar10._parse_batch(handle, name))
    monkeypatch.setattr(data.cifar10, "CIFAR10_CONTENT_SHA256", digests)  # as if these were the official batches
    train, _ = load_cifar10(folder)
    assert train.meta["verified"] == "content SHA-256 of every batch"
    batch = pickle.loads((folder / "data_batch_3").read_bytes())
    batch["data"][0, 17] ^= 1  # one bit of one pixel
    (folder / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(DatasetError, match="data_batch_3: its pixels or labels differ"):
        load_cifar10(folder)


def test_download_is_verified_and_cached(tiny_archive, tmp_path):
    path, md5 = tiny_archive
    train, _ = load_cifar10(url=path.as_uri(), md5=md5)
    cached = data.cifar10.cache_dir() / data.CIFAR10_ARCHIVE
    assert cached.is_file() and len(train) == 20
    assert [p.name for p in cached.parent.iterdir()] == [cached.name], "no temporary file may remain"
    # a second load reads the cache, no network needed
    train2, _ = load_cifar10(url="http://127.0.0.1:9/unreachable", md5=md5)
    assert torch.equal(train.images, train2.images)


def test_corrupt_download_leaves_nothing_behind(tiny_archive):
    path, _ = tiny_archive
    with pytest.raises(DatasetError, match="discarded"):
        load_cifar10(url=path.as_uri(), md5="0" * 32)
    cache = data.cifar10.cache_dir()
    assert not cache.exists() or list(cache.iterdir()) == []


def test_offline_without_copy_says_what_to_do():
    with pytest.raises(DatasetError, match="downloading is switched off.*source="):
        load_cifar10(download=False)
    with pytest.raises(DatasetError, match="could not download CIFAR-10.*DPEQ_CIFAR10"):
        load_cifar10(url="http://127.0.0.1:9/cifar-10-python.tar.gz")
    cache = data.cifar10.cache_dir()
    assert not cache.exists() or list(cache.iterdir()) == []


def test_environment_variable_points_at_local_copy(tiny_archive, monkeypatch):
    path, md5 = tiny_archive
    monkeypatch.setenv("DPEQ_CIFAR10", str(path))
    train, _ = load_cifar10(md5=md5, download=False)
    assert len(train) == 20


#: A real CIFAR-10 copy (archive or extracted folder) to test against, if the environment names one.
REAL_CIFAR = Path(os.environ.get("DPEQ_TEST_CIFAR10", "/nonexistent")).expanduser()


@pytest.mark.skipif(not REAL_CIFAR.exists(), reason="set DPEQ_TEST_CIFAR10 to a local CIFAR-10 copy to run this")
def test_real_cifar10_copy():
    train, test = load_cifar10(REAL_CIFAR)  # a folder is checked against CIFAR10_CONTENT_SHA256
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert train.images[0, 0, 0, :3].tolist() == [59, 43, 50]
    mean = (train.images.float() / 255).mean((0, 2, 3))
    assert torch.allclose(mean, torch.tensor(data.CIFAR10_MEAN), atol=1e-4)


def test_synthetic_normalisation_is_fixed_not_learned_from_the_training_split():
    """The constants are the statistics of a generated stream no run trains on (seed 987654)."""
    import numpy as np

    stream = int(np.random.SeedSequence([data.SYNTHETIC_STATS_SEED, 0]).generate_state(1, np.uint64)[0]) >> 1
    images, _ = data.synthetic._render_synthetic(4000, torch.Generator().manual_seed(stream))
    pixels = images.float() / 255
    assert torch.allclose(pixels.mean((0, 2, 3)), torch.tensor(data.SYNTHETIC_MEAN), atol=3e-3)
    assert torch.allclose(pixels.std((0, 2, 3)), torch.tensor(data.SYNTHETIC_STD), atol=3e-3)
    a, _ = make_synthetic(64, 8, seed=1)
    b, _ = make_synthetic(256, 8, seed=2)
    assert a.mean == b.mean == data.SYNTHETIC_MEAN, "the same constants whatever the training split"



def test_a_crafted_cifar_batch_runs_no_code_and_is_named(tmp_path):
    """A CIFAR-10 folder whose first batch is a pickle that would run code: refused before anything
    in it is called, and the message names the file."""
    from dpeq_utils.data import read_cifar10_folder

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "payload-ran"
    for name in data.CIFAR10_TRAIN_BATCHES + (data.CIFAR10_TEST_BATCH,):
        batch = _batch(4, 0)
        if name == data.CIFAR10_TRAIN_BATCHES[0]:
            batch[b"labels"] = CodePayload(marker)
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetError, match=re.escape(str(folder / data.CIFAR10_TRAIN_BATCHES[0])) + ".*refused"):
        read_cifar10_folder(folder, verify=False)
    assert not marker.exists()


def test_a_cell_can_ask_whether_a_dataset_is_on_disk(tmp_path, monkeypatch):
    """Notebook cells that only illustrate on CIFAR-10 skip themselves rather than start a download."""
    from dpeq_utils.data import on_disk

    monkeypatch.setenv("DPEQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DPEQ_CIFAR10", str(tmp_path / "nowhere"))
    assert on_disk("synthetic") and not on_disk("cifar10")
    monkeypatch.delenv("DPEQ_CIFAR10")
    assert not on_disk("cifar10")
    (tmp_path / "cache" / "cifar-10-batches-py").mkdir(parents=True)
    assert on_disk("cifar10")


def _nested(levels: int = 8, fan: int = 10) -> list:
    """A list of ``fan`` times the same list, ``levels`` deep: a few hundred bytes pickled (one memo
    slot repeated), ``fan ** levels`` elements once expanded."""
    value: list = [5]
    for _ in range(levels):
        value = [value] * fan
    return value


#: A hand-written 127-byte batch: {'data': numpy.ndarray((300000, 3072), dtype('u1')), 'labels': ndarray((300000,), ...)}
_NDARRAY_CALL = (b"\x80\x02}(X\x04\x00\x00\x00data" + b"cnumpy\nndarray\n((J\xe0\x93\x04\x00J\x00\x0c\x00\x00tcnumpy\ndtype\n"
                 b"(X\x02\x00\x00\x00u1tRtRX\x06\x00\x00\x00labels" + b"cnumpy\nndarray\n((J\xe0\x93\x04\x00t"
                 b"cnumpy\ndtype\n(X\x02\x00\x00\x00i8tRtRu.")


@pytest.mark.parametrize("craft", ["numpy.ndarray called directly", "memo-repeated lists as labels",
                                   "memo-repeated lists as data", "object labels", "string labels",
                                   "a file larger than any batch", "an archive member larger than any batch"])
def test_crafted_small_batches_are_refused_before_anything_big_is_built(craft, tmp_path, monkeypatch):
    """Small files that would make the reader allocate, hash or expand gigabytes: each is refused
    within a second or two and well under 200 MB of allocations, with a sentence naming the file.
    Files larger than a batch are refused by their declared size, unread (here the bound is lowered
    to 1 MB rather than writing 48 MB)."""
    import time
    import tracemalloc

    from dpeq_utils.data import read_cifar10_archive, read_cifar10_folder

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in data.CIFAR10_TRAIN_BATCHES + (data.CIFAR10_TEST_BATCH,):
        (folder / name).write_bytes(pickle.dumps(_batch(4, 0), protocol=2))
    bad = folder / data.CIFAR10_TRAIN_BATCHES[0]
    batch = _batch(4, 0)
    source = folder
    if craft == "numpy.ndarray called directly":
        bad.write_bytes(_NDARRAY_CALL)
        import pickletools

        pickletools.dis(_NDARRAY_CALL, out=io.StringIO())  # a well-formed pickle of 127 bytes
    elif craft == "memo-repeated lists as labels":
        batch[b"labels"] = _nested()
    elif craft == "memo-repeated lists as data":
        batch[b"data"] = _nested()
    elif craft == "object labels":
        batch[b"labels"] = np.array(["a", "b", "c", "d"], dtype=object)
    elif craft == "string labels":
        batch[b"labels"] = ["a", "b", "c", "d"]
    elif craft.endswith("larger than any batch"):
        monkeypatch.setattr(data.cifar10, "MAX_BATCH_FILE_BYTES", 2 ** 20, raising=False)
        batch = _batch(400, 0)  # 1.2 MB: valid, but over the lowered bound
        for name in data.CIFAR10_TRAIN_BATCHES + (data.CIFAR10_TEST_BATCH,):
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    if craft.startswith(("memo", "object", "string")):
        bad.write_bytes(pickle.dumps(batch, protocol=2))
        assert len(pickle.dumps(_nested())) < 1024
    if craft == "an archive member larger than any batch":
        source = tmp_path / "cifar-10-python.tar.gz"
        _write_archive(source, {name: batch for name in data.CIFAR10_TRAIN_BATCHES + (data.CIFAR10_TEST_BATCH,)})
        monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda *a: pytest.fail("inflated a member over the bound"))
    started = time.perf_counter()
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError) as caught:
            read_cifar10_folder(source, verify=False) if source == folder else read_cifar10_archive(source, md5=None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 2 and peak < 200 * 2 ** 20, (time.perf_counter() - started, peak)
    message = str(caught.value)
    assert (str(bad) if source == folder else str(source)) in message and "\n" not in message
