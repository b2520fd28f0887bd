"""Supervised datasets for the Bayesian neural networks: regression and classification.

A split is a dict ``{"x": float32 (N, *x_shape), "y": ...}`` with ``y`` float32 (N,) for
regression and int64 (N,) class indices for classification. All tensors live on the CPU.

The datasets and where they come from:

``gap``
    A 1-D toy regression with a hole in the training inputs, the picture in which a good
    posterior grows its error bars between the two clusters of data ("in-between uncertainty",
    Foong et al. 2019). Inputs are drawn uniformly from [-1, -0.3] U [0.3, 1] (half on each side);
    targets are y = f(x) + e with f(x) = x^3 + 0.5 sin(2 pi x) (:func:`gap_function`) and e ~
    N(0, 0.1^2) (:data:`GAP_NOISE_SD`). 160 train and 40 valid points come from the two
    intervals; the 200 test points are uniform on [-1, 1], gap included. The data are already
    on the unit scale, so they are *not* standardized (``x_mean = 0``, ``x_std = 1``,
    ``y_mean = 0``, ``y_std = 1``): plots and the learned noise scale read in the units of f,
    and :func:`grid` spans the raw x axis.
``boston``
    Boston housing (Harrison & Rubinfeld 1978, "Hedonic prices and the demand for clean air",
    via the UCI repository), 506 tracts, 13 features (:data:`BOSTON_FEATURES`) and the median
    house value MEDV (in $1000s) as the target, read from the CSV bundled with mlxtend
    (``mlxtend/data/data/boston_housing.csv``, no header). The protocol of Hernandez-Lobato &
    Adams (2015), "Probabilistic backpropagation": 20 random 90/10 train/test splits, chosen by
    ``split`` in 0..19, i.e. 455 / 51 rows. The permutation of split ``i`` comes from NumPy's
    ``RandomState([seed, i])``, whose stream NumPy keeps frozen, so it is the same on every
    machine. The last ``valid_fraction`` (default 10%, rounded down) of the 455 is held out as
    the valid split for early stopping: 410 train / 45 valid / 51 test; ``valid_fraction=0``
    gives the paper's 455 / 0 / 51. x and y are standardized with the *train* statistics;
    ``y_std`` turns a standardized RMSE or log-likelihood back into $1000s. (The feature ``B``
    encodes the proportion of Black residents; scikit-learn removed the dataset over it. It is
    kept only because the benchmark protocol uses all 13 features.)
``digits``, ``mnist5k``, ``mnist``, ``fashion-mnist``, ``cifar10``
    The image datasets of :mod:`inference.data` (see there for sources and split sizes), as
    classification with pixels in [0, 1] (not standardized). ``held_out_classes`` (default
    :data:`DEFAULT_HELD_OUT_CLASSES` = (8, 9)) are removed from all three splits, and the *test*
    images of those classes become ``ood``, the out-of-distribution inputs; the remaining labels
    are re-indexed to 0..C-1 in increasing order and ``labels[k]`` is the original label of
    class k. ``held_out_classes=()`` keeps all ten classes and sets ``ood`` to None. ``x`` is
    flattened to (N, D), or (N, C, H, W) with ``images=True`` for convolutional nets.

``seed`` draws the gap data, picks the family of Boston splits (0: the 20 canonical ones) and
is the ``split_seed`` of the image datasets. Shifted inputs for calibration under dataset shift
(Ovadia et al. 2019): :func:`rotate_images` and :func:`add_noise`.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from bayeszoo.inference.data import DATASETS as IMAGE_DATASETS
from bayeszoo.inference.data import SPLITS, check_batch, load_dataset

REGRESSION = "regression"
CLASSIFICATION = "classification"
TASKS: tuple[str, ...] = (REGRESSION, CLASSIFICATION)

SUPERVISED_DATASETS: tuple[str, ...] = ("gap", "boston", *IMAGE_DATASETS)

GAP_NOISE_SD = 0.1
GAP_SIZES = (160, 40, 200)  # train, valid, test
GAP_INTERVALS = ((-1.0, -0.3), (0.3, 1.0))  # where the train and valid inputs are
GAP_TEST_RANGE = (-1.0, 1.0)

BOSTON_FEATURES: tuple[str, ...] = tuple(
    "CRIM ZN INDUS CHAS NOX RM AGE DIS RAD TAX PTRATIO B LSTAT".split()
)  # the CSV's first 13 columns, in order
BOSTON_TARGET = "MEDV"
BOSTON_NUM_SPLITS = 20
BOSTON_TRAIN_FRACTION = 0.9

DEFAULT_HELD_OUT_CLASSES: tuple[int, ...] = (8, 9)


@dataclass
class SupervisedDataset:
    """Three splits of one supervised dataset, plus what a model and its metrics need."""

    name: str
    task: str
    train: dict[str, torch.Tensor] = field(repr=False)
    valid: dict[str, torch.Tensor] = field(repr=False)
    test: dict[str, torch.Tensor] = field(repr=False)
    x_shape: tuple[int, ...]
    num_classes: int | None = None
    ood: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    labels: tuple[int, ...] | None = None  # original label of each class index
    y_mean: float = 0.0
    y_std: float = 1.0
    x_mean: torch.Tensor | None = field(default=None, repr=False)  # tabular inputs only
    x_std: torch.Tensor | None = field(default=None, repr=False)

    @property
    def x_dim(self) -> int:
        """Number of input features (the product of ``x_shape``)."""
        return math.prod(self.x_shape)

    def split(self, which: str) -> dict[str, torch.Tensor]:
        """The split called ``which`` ("train", "valid" or "test")."""
        if which not in SPLITS:
            raise ValueError(f"unknown split {which!r}; valid choices: {', '.join(SPLITS)}")
        return getattr(self, which)

    def y_original(self, y: torch.Tensor) -> torch.Tensor:
        """Standardized regression targets (or predicted means) back in the data's units."""
        return y * self.y_std + self.y_mean

    def x_original(self, x: torch.Tensor) -> torch.Tensor:
        """Standardized tabular inputs back in the data's units (images: unchanged)."""
        if self.x_mean is None:
            return x
        return x * self.x_std + self.x_mean

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self.split(s)['y'])}" for s in SPLITS)
        ood = "" if self.ood is None else f", ood={len(self.ood['x'])}"
        return (
            f"SupervisedDataset(name={self.name!r}, task={self.task!r}, {sizes}{ood}, "
            f"x_shape={self.x_shape}, num_classes={self.num_classes})"
        )


def load_supervised(
    name: str,
    *,
    seed: int = 0,
    split: int = 0,
    held_out_classes: Sequence[int] | None = None,
    images: bool = False,
    root: str | os.PathLike = "data",
    download: bool = False,
    valid_fraction: float = 0.1,
) -> SupervisedDataset:
    """Load supervised dataset ``name`` (one of :data:`SUPERVISED_DATASETS`).

    ``split`` picks one of the 20 Boston splits (it must be 0 for the other datasets);
    ``held_out_classes`` and ``images`` apply to the image datasets only, ``root`` and
    ``download`` to the full image datasets (see :func:`inference.data.load_dataset`),
    ``valid_fraction`` to Boston only. Every split is checked with
    :func:`check_supervised_batch` before it is returned.

    Raises ``ValueError`` for an unknown name, an out-of-range split, held-out classes or
    ``images=True`` asked of a regression dataset, or invalid held-out classes.
    """
    if name not in SUPERVISED_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(SUPERVISED_DATASETS)}")
    _check_split_index(name, split)
    if name in ("gap", "boston"):
        _check_regression_options(name, held_out_classes, images)
        ds = _load_gap(seed) if name == "gap" else _load_boston(seed, split, valid_fraction)
    else:
        held_out = DEFAULT_HELD_OUT_CLASSES if held_out_classes is None else tuple(held_out_classes)
        ds = _load_images(name, seed, held_out, images, root, download)
    for which in SPLITS:
        check_supervised_batch(ds.split(which), ds.task, ds.x_shape, ds.num_classes, what=which)
    return ds


def check_supervised_batch(
    batch: Mapping[str, torch.Tensor],
    task: str,
    x_shape: Sequence[int],
    num_classes: int | None = None,
    *,
    what: str = "batch",
) -> None:
    """Raise a clear ``ValueError`` unless ``batch`` is a well-formed supervised minibatch.

    Well-formed: tensors ``x`` float of shape (N, *x_shape) and ``y`` of shape (N,), both
    finite; ``y`` int64 class indices in 0..num_classes-1 for classification, floating point
    for regression. Meant to run once before training, so bad input fails early and plainly.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid choices: {', '.join(TASKS)}")
    if "y" not in batch:
        raise ValueError(f"{what} has no 'y' entry (keys: {sorted(batch)}); a supervised batch needs targets")
    check_batch(batch)  # tensors, a shared batch dimension, float and finite x
    x, y = batch["x"], batch["y"]
    if tuple(x.shape[1:]) != tuple(x_shape):
        raise ValueError(f"{what}['x'] has shape {tuple(x.shape)}; expected (N, {_dims(x_shape)})")
    if y.dim() != 1:
        raise ValueError(f"{what}['y'] has shape {tuple(y.shape)}; expected (N,), one target per row")
    if task == CLASSIFICATION:
        _check_class_labels(y, num_classes, what)
    else:
        _check_regression_targets(y, what)


def grid(dataset: SupervisedDataset, num: int = 200, margin: float = 0.5) -> torch.Tensor:
    """A dense (num, 1) grid of inputs for drawing uncertainty bands of a 1-D regression.

    It spans the training inputs widened by ``margin`` on each side, in the dataset's x units
    (standardized units where the inputs are standardized; for ``gap`` they are not: the grid
    of the default margin runs over about [-1.5, 1.5]).
    """
    if dataset.x_shape != (1,):
        raise ValueError(f"grid needs 1-D inputs; dataset {dataset.name!r} has x_shape {dataset.x_shape}")
    if num < 2 or margin < 0:
        raise ValueError(f"grid needs num >= 2 and margin >= 0, got num={num}, margin={margin}")
    x = dataset.train["x"]
    low, high = float(x.min()) - margin, float(x.max()) + margin
    return torch.linspace(low, high, num, dtype=torch.float32).unsqueeze(-1)


def gap_function(x: torch.Tensor) -> torch.Tensor:
    """The noise-free curve of the ``gap`` data: f(x) = x^3 + 0.5 sin(2 pi x)."""
    return x**3 + 0.5 * torch.sin(2 * math.pi * x)


# ----------------------------------------------------------------------------------------------
# Shifted inputs


def rotate_images(x: torch.Tensor, image_shape: Sequence[int], degrees: float) -> torch.Tensor:
    """Rotate square images counter-clockwise by ``degrees``, keeping ``x``'s layout.

    ``x`` is (N, D) flattened or (N, *image_shape); ``image_shape`` is (H, W) or (C, H, W).
    Multiples of 90 degrees use ``torch.rot90`` and are exact; other angles resample bilinearly
    (corners that come from outside the image are 0, i.e. background).
    """
    shape = _image_chw(image_shape)
    if shape[1] != shape[2]:
        raise ValueError(f"rotate_images needs square images; image_shape is {tuple(image_shape)}")
    images = _as_images(x, shape)
    quarter_turns = degrees / 90.0
    if quarter_turns == round(quarter_turns):
        rotated = torch.rot90(images, int(round(quarter_turns)) % 4, dims=(-2, -1))
    else:
        rotated = _rotate_bilinear(images, degrees)
    return rotated.reshape(x.shape)


def add_noise(
    x: torch.Tensor,
    sd: float,
    generator: torch.Generator | None = None,
    clip: tuple[float, float] | None = (0.0, 1.0),
) -> torch.Tensor:
    """``x`` plus Gaussian noise of standard deviation ``sd``, in the same layout.

    The result is clipped to ``clip`` (default [0, 1], the pixel range the image models
    expect); pass ``clip=None`` for tabular inputs. ``generator`` must live on ``x``'s device.
    """
    if not sd >= 0:
        raise ValueError(f"noise sd must be >= 0, got {sd!r}")
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    noisy = x + sd * noise
    return noisy if clip is None else noisy.clamp(*clip)


def _image_chw(image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 3:
        return shape
    raise ValueError(f"image_shape must be (H, W) or (C, H, W), got {shape}")


def _as_images(x: torch.Tensor, chw: tuple[int, int, int]) -> torch.Tensor:
    """View (N, D) or (N, [C,] H, W) inputs as (N, C, H, W)."""
    if x.dim() < 2 or math.prod(x.shape[1:]) != math.prod(chw):
        raise ValueError(f"x has shape {tuple(x.shape)}, which does not hold images of shape {chw}")
    return x.reshape(len(x), *chw)


def _rotate_bilinear(images: torch.Tensor, degrees: float) -> torch.Tensor:
    # affine_grid maps each output pixel to where it samples the input: for a counter-clockwise
    # turn on screen (x right, y down) that is the clockwise turn of the output coordinates.
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=images.dtype, device=images.device)
    theta = theta.expand(len(images), 2, 3)
    sample_at = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, sample_at, mode="bilinear", padding_mode="zeros", align_corners=False)


# ----------------------------------------------------------------------------------------------
# Argument checks


def _check_split_index(name: str, split: int) -> None:
    count = BOSTON_NUM_SPLITS if name == "boston" else 1
    if not (isinstance(split, int) and 0 <= split < count):
        raise ValueError(f"dataset {name!r} has splits 0..{count - 1}; got split={split!r}")


def _check_regression_options(name: str, held_out_classes, images: bool) -> None:
    if held_out_classes:
        raise ValueError(f"held_out_classes applies to classification; {name!r} is a regression dataset")
    if images:
        raise ValueError(f"images=True applies to image datasets; {name!r} is tabular")


def _check_held_out(held_out: tuple[int, ...], num_classes: int) -> None:
    if any(not isinstance(c, int) or not 0 <= c < num_classes for c in held_out):
        raise ValueError(f"held_out_classes {held_out} must be class labels in 0..{num_classes - 1}")
    if len(set(held_out)) != len(held_out):
        raise ValueError(f"held_out_classes {held_out} names a class twice")
    if num_classes - len(held_out) < 2:
        raise ValueError(f"held_out_classes {held_out} leaves fewer than 2 classes to classify")


def _check_class_labels(y: torch.Tensor, num_classes: int | None, what: str) -> None:
    if y.dtype != torch.int64:
        raise ValueError(f"{what}['y'] has dtype {y.dtype}; classification needs int64 class indices")
    if num_classes is None:
        raise ValueError("classification needs num_classes to check the labels against")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{what}['y'] has labels in [{int(y.min())}, {int(y.max())}]; expected 0..{num_classes - 1}"
        )


def _check_regression_targets(y: torch.Tensor, what: str) -> None:
    if not y.is_floating_point():
        raise ValueError(f"{what}['y'] has dtype {y.dtype}; regression needs floating-point targets")
    if not torch.isfinite(y).all():
        n_nan, n_inf = int(torch.isnan(y).sum()), int(torch.isinf(y).sum())
        raise ValueError(f"{what}['y'] contains {n_nan} NaN and {n_inf} inf values")


def _dims(shape: Sequence[int]) -> str:
    return ", ".join(str(s) for s in shape)


# ----------------------------------------------------------------------------------------------
# gap


def _load_gap(seed: int) -> SupervisedDataset:
    # NumPy's legacy RandomState stream is frozen by NumPy's compatibility policy: the same seed
    # gives the same points on every machine and version.
    rng = np.random.RandomState(seed)
    n_train, n_valid, n_test = GAP_SIZES
    train = _gap_points(_uniform_on_intervals(rng, n_train), rng)
    valid = _gap_points(_uniform_on_intervals(rng, n_valid), rng)
    test = _gap_points(rng.uniform(*GAP_TEST_RANGE, size=n_test), rng)
    # Already on the unit scale: identity standardization keeps the picture in f's units.
    return SupervisedDataset(
        "gap", REGRESSION, train, valid, test, (1,), x_mean=torch.zeros(1), x_std=torch.ones(1)
    )


def _uniform_on_intervals(rng: np.random.RandomState, n: int) -> np.ndarray:
    """``n`` points, half in each interval (the left one takes an odd point), uniform within each."""
    (left_lo, left_hi), (right_lo, right_hi) = GAP_INTERVALS
    n_left = (n + 1) // 2
    left = rng.uniform(left_lo, left_hi, size=n_left)
    return np.concatenate([left, rng.uniform(right_lo, right_hi, size=n - n_left)])


def _gap_points(x: np.ndarray, rng: np.random.RandomState) -> dict[str, torch.Tensor]:
    x = torch.as_tensor(x, dtype=torch.float32).unsqueeze(-1)
    noise = torch.as_tensor(rng.normal(0.0, GAP_NOISE_SD, size=len(x)), dtype=torch.float32)
    return {"x": x, "y": gap_function(x[:, 0]) + noise}


# ----------------------------------------------------------------------------------------------
# boston


@functools.lru_cache(maxsize=1)
def _read_boston() -> tuple[torch.Tensor, torch.Tensor]:
    """The 506 x 13 features and the MEDV targets, float64 (standardized later, then float32)."""
    import mlxtend

    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "boston_housing.csv")
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    expected_columns = len(BOSTON_FEATURES) + 1
    if table.ndim != 2 or table.shape[1] != expected_columns or not np.isfinite(table).all():
        raise ValueError(f"{path}: expected a finite table of {expected_columns} columns, got {table.shape}")
    table = torch.from_numpy(table)
    return table[:, :-1], table[:, -1]


def _boston_permutation(seed: int, split: int, n: int) -> torch.Tensor:
    # Seeded by the pair (seed, split) through NumPy's frozen legacy stream, so split i is the
    # same on every machine, and no two (seed, split) pairs share a permutation by arithmetic.
    return torch.from_numpy(np.random.RandomState([seed, split]).permutation(n))


def _load_boston(seed: int, split: int, valid_fraction: float) -> SupervisedDataset:
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction!r}")
    x, y = _read_boston()
    perm = _boston_permutation(seed, split, len(y))
    n_train_part = round(BOSTON_TRAIN_FRACTION * len(y))  # 455 of 506, as in the paper
    n_valid = int(n_train_part * valid_fraction)
    n_train = n_train_part - n_valid
    blocks = perm[:n_train], perm[n_train:n_train_part], perm[n_train_part:]

    x_mean, x_std = x[blocks[0]].mean(0), _safe_std(x[blocks[0]])
    y_mean, y_std = float(y[blocks[0]].mean()), float(y[blocks[0]].std())
    train, valid, test = (
        {
            "x": ((x[b] - x_mean) / x_std).to(torch.float32),
            "y": ((y[b] - y_mean) / y_std).to(torch.float32),
        }
        for b in blocks
    )
    return SupervisedDataset(
        "boston",
        REGRESSION,
        train,
        valid,
        test,
        (len(BOSTON_FEATURES),),
        y_mean=y_mean,
        y_std=y_std,
        x_mean=x_mean.to(torch.float32),
        x_std=x_std.to(torch.float32),
    )


def _safe_std(x: torch.Tensor) -> torch.Tensor:
    # A feature constant on the train rows (possible for the binary CHAS on a small subset)
    # would divide by zero: leave it unscaled instead.
    std = x.std(0)
    return torch.where(std > 0, std, torch.ones_like(std))


# ----------------------------------------------------------------------------------------------
# Image classification with held-out classes


def _load_images(name, seed, held_out, images, root, download) -> SupervisedDataset:
    source = load_dataset(name, root=root, download=download, split_seed=seed)
    _check_held_out(held_out, source.num_classes)
    labels = tuple(c for c in range(source.num_classes) if c not in held_out)
    x_shape = _image_chw(source.image_shape) if images else (source.x_dim,)
    splits = (_keep_classes(source.split(s), labels, source.num_classes, x_shape) for s in SPLITS)
    train, valid, test = splits
    ood = _ood_split(source.test, held_out, x_shape) if held_out else None
    return SupervisedDataset(
        name, CLASSIFICATION, train, valid, test, x_shape, num_classes=len(labels), ood=ood, labels=labels
    )


def _keep_classes(split: dict, labels: tuple[int, ...], num_classes: int, x_shape) -> dict[str, torch.Tensor]:
    """The rows of ``split`` whose label is in ``labels``, relabelled 0..len(labels)-1."""
    y = split["y"]
    keep = torch.isin(y, torch.tensor(labels))
    new_index = torch.full((num_classes,), -1, dtype=torch.int64)
    new_index[torch.tensor(labels)] = torch.arange(len(labels))
    return {"x": split["x"][keep].reshape(-1, *x_shape), "y": new_index[y[keep]]}


def _ood_split(test: dict, held_out: tuple[int, ...], x_shape) -> dict[str, torch.Tensor]:
    # Only the test images: held-out classes never reach training, and the ood set is the one
    # scored against the in-distribution test split. Their original labels are kept under a name
    # that a training loop will not mistake for class indices.
    mask = torch.isin(test["y"], torch.tensor(held_out))
    return {"x": test["x"][mask].reshape(-1, *x_shape), "original_y": test["y"][mask]}
