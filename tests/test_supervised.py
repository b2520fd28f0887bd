"""Tests for inference/supervised.py: the gap toy, the Boston splits, image classification with
held-out classes, the batch checks and the shifted-input helpers."""

import math

import numpy as np
import pytest
import torch

from bayeszoo.inference import supervised
from bayeszoo.inference.data import load_dataset
from bayeszoo.inference.supervised import (
    BOSTON_FEATURES,
    DEFAULT_HELD_OUT_CLASSES,
    GAP_NOISE_SD,
    SUPERVISED_DATASETS,
    add_noise,
    check_supervised_batch,
    gap_function,
    grid,
    load_supervised,
    rotate_images,
)

SPLITS = ("train", "valid", "test")


def _sizes(ds):
    return tuple(len(ds.split(s)["y"]) for s in SPLITS)


@pytest.fixture(scope="module")
def digits_source():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def digits_89():
    return load_supervised("digits", held_out_classes=(8, 9))


# ----------------------------------------------------------------------------------------------
# gap


def test_gap_has_a_hole_in_training_inputs_but_not_in_test():
    ds = load_supervised("gap")
    assert ds.task == "regression" and ds.x_shape == (1,) and _sizes(ds) == (160, 40, 200)
    for which in ("train", "valid"):
        x = ds.split(which)["x"][:, 0]
        assert not ((x > -0.3) & (x < 0.3)).any(), f"{which} has inputs inside the gap"
        assert x.min() >= -1 and x.max() <= 1
        assert (x < 0).sum() == (x > 0).sum()  # half on each side
    x_test = ds.test["x"][:, 0]
    assert ((x_test > -0.3) & (x_test < 0.3)).sum() >= 30  # ~60 expected of 200 uniform on [-1, 1]


def test_gap_is_the_stated_function_plus_the_stated_noise():
    ds = load_supervised("gap")
    x = torch.cat([ds.split(s)["x"] for s in SPLITS])[:, 0]
    y = torch.cat([ds.split(s)["y"] for s in SPLITS])
    residual = y - gap_function(x)
    assert abs(float(residual.mean())) < 0.02
    assert GAP_NOISE_SD == 0.1  # the documented value, checked against the data itself below
    assert abs(float(residual.std()) - 0.1) < 0.015  # 400 draws: sd of the sd ~0.0035
    assert ds.y_mean == 0.0 and ds.y_std == 1.0  # documented: not standardized
    assert torch.equal(ds.x_original(ds.train["x"]), ds.train["x"])


def test_gap_is_deterministic_given_the_seed():
    a, b, c = load_supervised("gap"), load_supervised("gap"), load_supervised("gap", seed=1)
    for which in SPLITS:
        assert torch.equal(a.split(which)["x"], b.split(which)["x"])
        assert torch.equal(a.split(which)["y"], b.split(which)["y"])
    assert not torch.equal(a.train["x"], c.train["x"])


def test_grid_spans_beyond_the_training_inputs():
    ds = load_supervised("gap")
    g = grid(ds, num=50, margin=0.5)
    assert g.shape == (50, 1) and g.dtype == torch.float32
    assert torch.all(g[1:] > g[:-1])
    assert g[0, 0] == pytest.approx(float(ds.train["x"].min()) - 0.5)
    assert g[-1, 0] == pytest.approx(float(ds.train["x"].max()) + 0.5)
    with pytest.raises(ValueError, match="1-D inputs"):
        grid(load_supervised("boston"))


# ----------------------------------------------------------------------------------------------
# boston


@pytest.fixture(scope="module")
def boston_raw():
    x, y = supervised._read_boston()
    return x.to(torch.float32), y.to(torch.float32)


def _original_rows(ds, which, raw_x):
    """Index of each row of split ``which`` in the raw table (nearest row after un-scaling)."""
    x = ds.x_original(ds.split(which)["x"])
    distance, index = (x[:, None, :] - raw_x[None, :, :]).abs().amax(dim=-1).min(dim=1)
    assert distance.max() < 1e-3  # float32 round trip of values up to ~700 (TAX)
    return index


def test_boston_table_and_split_sizes(boston_raw):
    raw_x, raw_y = boston_raw
    assert raw_x.shape == (506, 13) and raw_y.shape == (506,) and len(BOSTON_FEATURES) == 13
    assert float(raw_y.min()) == 5.0 and float(raw_y.max()) == 50.0  # MEDV, $1000s, censored at 50
    ds = load_supervised("boston")
    assert ds.x_shape == (13,) and _sizes(ds) == (410, 45, 51)
    assert _sizes(load_supervised("boston", valid_fraction=0.0)) == (455, 0, 51)


def test_boston_split_is_a_partition_of_the_table(boston_raw):
    raw_x, raw_y = boston_raw
    ds = load_supervised("boston", split=3)
    rows = {which: _original_rows(ds, which, raw_x) for which in SPLITS}
    assert torch.equal(torch.cat(list(rows.values())).sort().values, torch.arange(506))
    for which in SPLITS:
        medv = ds.y_original(ds.split(which)["y"])
        assert torch.allclose(medv, raw_y[rows[which]], atol=1e-3)


def test_boston_splits_are_pinned_reproducible_and_different(boston_raw):
    raw_x, _ = boston_raw
    split0 = load_supervised("boston", split=0)
    # The permutation comes from NumPy's frozen RandomState([seed, split]) stream: these are the
    # same on every machine, so any change to how splits are drawn shows up here.
    assert _original_rows(split0, "train", raw_x)[:4].tolist() == [403, 303, 492, 199]
    split19 = load_supervised("boston", split=19)
    assert _original_rows(split19, "train", raw_x)[:4].tolist() == [451, 488, 364, 300]
    assert torch.equal(load_supervised("boston", split=0).test["x"], split0.test["x"])
    tests = [set(_original_rows(load_supervised("boston", split=i), "test", raw_x).tolist()) for i in (0, 1)]
    assert tests[0] != tests[1]
    assert set(_original_rows(load_supervised("boston", split=0, seed=1), "test", raw_x).tolist()) != tests[0]


def test_boston_is_standardized_with_train_statistics(boston_raw):
    raw_x, raw_y = boston_raw
    ds = load_supervised("boston", split=5)
    assert torch.allclose(ds.train["x"].mean(0), torch.zeros(13), atol=1e-5)
    assert torch.allclose(ds.train["x"].std(0), torch.ones(13), atol=1e-5)
    assert abs(float(ds.train["y"].mean())) < 1e-5 and abs(float(ds.train["y"].std()) - 1) < 1e-5
    train_rows = _original_rows(ds, "train", raw_x)
    assert ds.y_mean == pytest.approx(float(raw_y[train_rows].mean()), rel=1e-5)
    assert ds.y_std == pytest.approx(float(raw_y[train_rows].std()), rel=1e-5)
    assert abs(float(ds.test["y"].mean())) > 1e-4  # test is scaled by train statistics, not its own
    assert ds.train["x"].dtype == torch.float32 and ds.train["y"].dtype == torch.float32


def test_regression_options_are_checked():
    with pytest.raises(ValueError, match="splits 0..19"):
        load_supervised("boston", split=20)
    with pytest.raises(ValueError, match="splits 0..0"):
        load_supervised("gap", split=1)
    with pytest.raises(ValueError, match="regression dataset"):
        load_supervised("boston", held_out_classes=(1,))
    with pytest.raises(ValueError, match="tabular"):
        load_supervised("gap", images=True)
    with pytest.raises(ValueError, match="valid_fraction"):
        load_supervised("boston", valid_fraction=1.0)
    with pytest.raises(ValueError, match="unknown dataset 'housing'.*boston"):
        load_supervised("housing")
    assert {"gap", "boston", "digits", "mnist5k"} <= set(SUPERVISED_DATASETS)


# ----------------------------------------------------------------------------------------------
# Image classification with held-out classes


def test_digits_held_out_classes_leave_train_and_become_ood(digits_89, digits_source):
    ds = digits_89
    assert ds.task == "classification" and ds.num_classes == 8 and ds.labels == tuple(range(8))
    assert ds.x_shape == (64,)
    for which in SPLITS:
        y = ds.split(which)["y"]
        source_y = digits_source.split(which)["y"]
        assert y.dtype == torch.int64 and y.min() >= 0 and y.max() <= 7
        assert len(y) == int((source_y < 8).sum())  # exactly the rows of classes 0..7, none lost
        assert torch.equal(y, source_y[source_y < 8])
    ood_y = ds.ood["original_y"]
    assert len(ood_y) > 0 and set(ood_y.tolist()) == {8, 9}
    test_mask = digits_source.test["y"] >= 8
    assert torch.equal(ds.ood["x"], digits_source.test["x"][test_mask])  # the test images, all of them


def test_held_out_classes_are_reindexed_with_a_label_map(digits_source):
    ds = load_supervised("digits", held_out_classes=(3, 5))
    assert ds.labels == (0, 1, 2, 4, 6, 7, 8, 9) and ds.num_classes == 8
    source_y = digits_source.train["y"]
    kept = (source_y != 3) & (source_y != 5)
    original = torch.tensor(ds.labels)[ds.train["y"]]  # labels[k]: original label of class k
    assert torch.equal(original, source_y[kept])
    assert torch.equal(ds.train["x"], digits_source.train["x"][kept])
    assert set(ds.ood["original_y"].tolist()) == {3, 5}


def test_default_and_empty_held_out(digits_89):
    assert DEFAULT_HELD_OUT_CLASSES == (8, 9)
    default = load_supervised("digits")
    assert default.labels == digits_89.labels and torch.equal(default.ood["x"], digits_89.ood["x"])
    full = load_supervised("digits", held_out_classes=())
    assert full.ood is None and full.num_classes == 10 and _sizes(full) == (1297, 250, 250)


def test_images_layout_matches_the_flat_one(digits_89):
    ds = load_supervised("digits", held_out_classes=(8, 9), images=True)
    assert ds.x_shape == (1, 8, 8) and ds.x_dim == 64
    assert ds.train["x"].shape == (len(ds.train["y"]), 1, 8, 8)
    assert torch.equal(ds.train["x"].reshape(-1, 64), digits_89.train["x"])
    assert ds.ood["x"].shape[1:] == (1, 8, 8)


@pytest.mark.parametrize(
    "held_out, message",
    [((10,), "0..9"), ((2, 2), "twice"), (tuple(range(9)), "fewer than 2"), ((1.5,), "0..9")],
)
def test_bad_held_out_classes(held_out, message):
    with pytest.raises(ValueError, match=message):
        load_supervised("digits", held_out_classes=held_out)


# ----------------------------------------------------------------------------------------------
# Batch checks


def _classification_batch(n=4):
    return {"x": torch.rand(n, 1, 8, 8), "y": torch.tensor([0, 1, 7, 3])[:n]}


def _regression_batch(n=4):
    return {"x": torch.randn(n, 13), "y": torch.randn(n)}


def _with(batch, **changes):
    return {**batch, **changes}


@pytest.mark.parametrize("batch, task, x_shape, num_classes", [
    (_classification_batch(), "classification", (1, 8, 8), 8),
    (_regression_batch(), "regression", (13,), None),
    (_with(_regression_batch(), y=torch.randn(4, dtype=torch.float64)), "regression", (13,), None),
])
def test_good_batches_pass_and_are_left_unchanged(batch, task, x_shape, num_classes):
    before = {key: value.clone() for key, value in batch.items()}
    assert check_supervised_batch(batch, task, x_shape, num_classes) is None
    assert all(torch.equal(batch[key], before[key]) for key in before)


CLASSIFICATION_BAD = [
    (_with(_classification_batch(), y=torch.tensor([0, 1, 2, 3], dtype=torch.int32)), "int64"),
    (_with(_classification_batch(), y=torch.tensor([0.0, 1.0, 2.0, 3.0])), "int64"),
    (_with(_classification_batch(), y=torch.tensor([0, 1, 8, 3])), r"\[0, 8\]; expected 0..7"),
    (_with(_classification_batch(), y=torch.tensor([0, -1, 2, 3])), "expected 0..7"),
    (_with(_classification_batch(), x=torch.rand(4, 64)), r"expected \(N, 1, 8, 8\)"),
    (_with(_classification_batch(), x=torch.full((4, 1, 8, 8), math.nan)), "NaN"),
    (_with(_classification_batch(), y=torch.tensor([0, 1, 2])), "first .batch. dimension"),
    (_with(_classification_batch(), y=torch.zeros(4, 1, dtype=torch.int64)), r"expected \(N,\)"),
    ({"x": torch.rand(4, 1, 8, 8)}, "no 'y' entry"),
    (_with(_classification_batch(), x=torch.ones(4, 1, 8, 8, dtype=torch.uint8)), "floating-point"),
]


@pytest.mark.parametrize("batch, message", CLASSIFICATION_BAD)
def test_bad_classification_batches(batch, message):
    with pytest.raises(ValueError, match=message):
        check_supervised_batch(batch, "classification", (1, 8, 8), 8)


REGRESSION_BAD = [
    (_with(_regression_batch(), y=torch.arange(4)), "floating-point targets"),
    (_with(_regression_batch(), y=torch.tensor([0.0, math.nan, 1.0, 2.0])), "1 NaN"),
    (_with(_regression_batch(), y=torch.tensor([0.0, math.inf, 1.0, 2.0])), "1 inf"),
    (_with(_regression_batch(), x=torch.randn(4, 12)), r"expected \(N, 13\)"),
]


@pytest.mark.parametrize("batch, message", REGRESSION_BAD)
def test_bad_regression_batches(batch, message):
    with pytest.raises(ValueError, match=message):
        check_supervised_batch(batch, "regression", (13,))


def test_unknown_task_and_missing_num_classes():
    with pytest.raises(ValueError, match="unknown task 'segmentation'"):
        check_supervised_batch(_regression_batch(), "segmentation", (13,))
    with pytest.raises(ValueError, match="num_classes"):
        check_supervised_batch(_classification_batch(), "classification", (1, 8, 8))


# ----------------------------------------------------------------------------------------------
# Shifted inputs


def test_rotation_by_multiples_of_90_is_exact(digits_89):
    x = digits_89.test["x"][:16]
    assert torch.equal(rotate_images(x, (8, 8), 0), x)
    assert torch.equal(rotate_images(x, (8, 8), 360), x)
    turned = x
    for _ in range(4):
        turned = rotate_images(turned, (8, 8), 90)
        assert turned.shape == x.shape
    assert torch.equal(turned, x)
    assert not torch.equal(rotate_images(x, (8, 8), 90), x)
    assert torch.equal(rotate_images(x, (8, 8), -90), rotate_images(x, (8, 8), 270))


def test_rotation_is_counter_clockwise_on_both_paths():
    image = torch.zeros(1, 1, 5, 5)
    image[0, 0, 0, 4] = 1.0  # top right corner
    assert rotate_images(image, (1, 5, 5), 90)[0, 0, 0, 0] == 1.0  # now top left
    # The bilinear path, used for other angles, turns the same way (exact at 90 for square images).
    x = torch.rand(3, 1, 6, 6)
    assert torch.allclose(supervised._rotate_bilinear(x, 90.0), rotate_images(x, (6, 6), 90), atol=1e-6)


def test_rotation_by_other_angles_keeps_layout_and_range(digits_89):
    flat = digits_89.test["x"][:8]
    rotated = rotate_images(flat, (8, 8), 45)
    assert rotated.shape == flat.shape and rotated.min() >= 0 and rotated.max() <= 1 + 1e-6
    assert not torch.allclose(rotated, flat)
    as_images = rotate_images(flat.reshape(-1, 1, 8, 8), (1, 8, 8), 45)
    assert torch.allclose(as_images.reshape(-1, 64), rotated)
    with pytest.raises(ValueError, match="square"):
        rotate_images(torch.rand(2, 12), (3, 4), 30)
    with pytest.raises(ValueError, match="does not hold images"):
        rotate_images(torch.rand(2, 63), (8, 8), 30)


def test_add_noise_is_seeded_clipped_and_layout_preserving():
    x = torch.rand(64, 1, 8, 8)
    assert torch.equal(add_noise(x, 0.0), x)
    a = add_noise(x, 0.3, torch.Generator().manual_seed(1))
    b = add_noise(x, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    unclipped = add_noise(torch.zeros(20000), 0.3, torch.Generator().manual_seed(2), clip=None)
    assert float(unclipped.std()) == pytest.approx(0.3, rel=0.03)
    with pytest.raises(ValueError, match="sd must be >= 0"):
        add_noise(x, -1.0)


def test_every_loaded_split_passes_its_own_check(digits_89):
    for ds in (load_supervised("gap"), load_supervised("boston"), digits_89):
        for which in SPLITS:
            check_supervised_batch(ds.split(which), ds.task, ds.x_shape, ds.num_classes)
    assert np.isfinite(digits_89.ood["x"].numpy()).all()
