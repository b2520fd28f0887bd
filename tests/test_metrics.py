"""Predictive metrics against hand-worked cases, direct scipy/numpy computations and sklearn."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import scipy.stats
import sklearn.metrics
import torch
from torch import nn

from bayeszoo.guides.map import MAPGuide
from bayeszoo.guides.weight_laplace import WeightLaplaceGuide
from bayeszoo.inference.metrics import (
    aupr,
    auroc,
    classification_metrics,
    expected_calibration_error,
    max_probability,
    memory_bytes,
    mixture_log_likelihood,
    mutual_information,
    ood_metrics,
    predictive_entropy,
    predictive_moments,
    regression_metrics,
    reliability,
)
from bayeszoo.inference.plots import regression_band, reliability_diagram
from bayeszoo.inference.runs import describe
from bayeszoo.models.bnn import BayesianNeuralNetwork

# ----------------------------------------------------------------------------- regression


def test_law_of_total_variance_on_a_hand_case():
    # Two samples at x: means 0 and 2 (mean 1, population variance 1), noise variances 1 and 3
    # (mean 2). Mixture variance by hand: E[y^2] - E[y]^2 = ((1 + 0) + (3 + 4)) / 2 - 1 = 3.
    moments = predictive_moments(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [3.0]]))
    assert moments["mean"].tolist() == [1.0]
    assert moments["aleatoric"].tolist() == [2.0]
    assert moments["epistemic"].tolist() == [1.0]
    assert moments["total"].tolist() == [3.0]


def test_total_variance_is_the_variance_of_the_mixture():
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    variances = torch.rand(7, 5, generator=generator, dtype=torch.float64) + 0.1
    moments = predictive_moments(means, variances)
    mixture_second_moment = (variances + means**2).mean(0)
    torch.testing.assert_close(moments["total"], mixture_second_moment - means.mean(0) ** 2)
    torch.testing.assert_close(moments["epistemic"], means.var(0, unbiased=False))


def test_homoscedastic_noise_broadcasts():
    means = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    moments = predictive_moments(means, torch.tensor(0.25))
    assert moments["aleatoric"].tolist() == [0.25, 0.25]
    assert moments["total"].tolist() == [1.25, 1.25]


def test_mixture_nll_against_scipy_and_its_scaling_to_original_units():
    rng = np.random.default_rng(1)
    means, sds, y = rng.normal(size=(4, 6)), rng.uniform(0.2, 1.5, size=(4, 6)), rng.normal(size=6)
    # The mixture density, computed directly (no logsumexp) from scipy's normal pdf.
    expected_nll = -np.log(scipy.stats.norm.pdf(y, means, sds).mean(0)).mean()
    expected_rmse = np.sqrt(((means.mean(0) - y) ** 2).mean())
    as_tensor = lambda a: torch.tensor(a, dtype=torch.float64)
    metrics = regression_metrics(as_tensor(means), as_tensor(sds**2), as_tensor(y))
    assert metrics["nll"] == pytest.approx(expected_nll, rel=1e-10)
    assert metrics["rmse"] == pytest.approx(expected_rmse, rel=1e-10)
    # Targets standardized by 3: distances grow by 3, densities shrink by 3.
    scaled = regression_metrics(as_tensor(means), as_tensor(sds**2), as_tensor(y), y_scale=3.0)
    assert scaled["rmse"] == pytest.approx(3 * expected_rmse, rel=1e-10)
    assert scaled["nll"] == pytest.approx(expected_nll + math.log(3), rel=1e-10)


def test_mixture_nll_stays_finite_where_every_density_underflows():
    # Each component puts exp(-5000) on y; a naive mean of densities would give log 0 = -inf.
    log_likelihood = mixture_log_likelihood(torch.tensor([[100.0], [100.0]]), torch.tensor(1.0),
                                            torch.tensor([0.0]))
    assert log_likelihood.item() == pytest.approx(-5000 - 0.5 * math.log(2 * math.pi), rel=1e-6)


def test_regression_inputs_are_checked():
    with pytest.raises(ValueError, match="shape"):
        predictive_moments(torch.zeros(5), torch.ones(5))
    with pytest.raises(ValueError, match="positive"):
        predictive_moments(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        regression_metrics(torch.full((2, 3), float("nan")), torch.ones(2, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="y must have shape"):
        regression_metrics(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(4))


# ----------------------------------------------------------------------------- classification


def test_accuracy_nll_brier_on_three_points():
    # Two samples whose average is [[1, 0], [.4, .6], [.2, .8]], labels [0, 1, 0].
    probs = torch.tensor([[[1.0, 0.0], [0.2, 0.8], [0.1, 0.9]],
                          [[1.0, 0.0], [0.6, 0.4], [0.3, 0.7]]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0])
    metrics = classification_metrics(probs, y)
    # argmax of the average: 0, 1, 1 -> two of three right.
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    # -log of the averaged true-class probability: 1, .6, .2 (not the average of -log p_s).
    assert metrics["nll"] == pytest.approx(-(math.log(1) + math.log(0.6) + math.log(0.2)) / 3)
    # Brier summed over classes: 0, (.4^2 + .4^2) = .32, (.8^2 + .8^2) = 1.28 -> 1.6 / 3.
    assert metrics["brier"] == pytest.approx(1.6 / 3)


def _four_point_calibration_case():
    probs_mean = torch.tensor([[0.90, 0.05, 0.05],   # conf .90, predicts 0, y 0: right
                               [0.10, 0.80, 0.10],   # conf .80, predicts 1, y 0: wrong
                               [0.30, 0.30, 0.40],   # conf .40, predicts 2, y 2: right
                               [0.45, 0.35, 0.20]],  # conf .45, predicts 0, y 1: wrong
                              dtype=torch.float64)
    return probs_mean, torch.tensor([0, 0, 2, 1])


def test_ece_with_two_bins_by_hand():
    # Bin (0, .5]: points 3, 4, confidence (.40 + .45) / 2 = .425, accuracy 1/2, gap .075.
    # Bin (.5, 1]: points 1, 2, confidence (.90 + .80) / 2 = .85, accuracy 1/2, gap .35.
    # ECE = 2/4 * .075 + 2/4 * .35 = .2125.
    probs_mean, y = _four_point_calibration_case()
    table = reliability(probs_mean, y, bins=2)
    assert table["count"].tolist() == [2, 2]
    torch.testing.assert_close(table["confidence"], torch.tensor([0.425, 0.85], dtype=torch.float64))
    torch.testing.assert_close(table["accuracy"], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert expected_calibration_error(probs_mean, y, bins=2) == pytest.approx(0.2125)
    assert classification_metrics(probs_mean.unsqueeze(0), y, bins=2)["ece"] == pytest.approx(0.2125)


def test_reliability_bins_are_closed_on_the_right_and_empty_bins_are_nan():
    # Confidence exactly .5 belongs to the bin (0, .5], 1.0 to the last bin.
    probs_mean = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    table = reliability(probs_mean, torch.tensor([0, 0]), bins=4)
    assert table["count"].tolist() == [0, 1, 0, 1]
    assert torch.isnan(table["accuracy"][[0, 2]]).all()
    assert table["edges"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_perfectly_confident_and_right_is_perfectly_calibrated():
    probs = nn.functional.one_hot(torch.tensor([2, 0, 1]), 3).double().unsqueeze(0)
    metrics = classification_metrics(probs, torch.tensor([2, 0, 1]))
    assert metrics == {"accuracy": 1.0, "nll": 0.0, "brier": 0.0, "ece": 0.0}


def test_classification_inputs_are_checked():
    probs = torch.full((2, 3, 4), 0.25)
    with pytest.raises(ValueError, match="softmax"):
        classification_metrics(torch.randn(2, 3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        classification_metrics(probs, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics(probs, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match=r"\(S, N, C\)"):
        classification_metrics(probs[0], torch.tensor([0, 1, 2]))


# ----------------------------------------------------------------------------- uncertainty scores


def test_agreeing_samples_have_no_mutual_information():
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    probs = p.expand(3, 1, 3)  # three samples, one point, all the same
    expected_entropy = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert predictive_entropy(probs).item() == pytest.approx(expected_entropy)
    assert mutual_information(probs).item() == pytest.approx(0.0, abs=1e-12)
    assert max_probability(probs).item() == pytest.approx(0.7)


def test_confident_disagreeing_samples_have_log_two_mutual_information():
    # Each sample is certain (entropy 0), of a different class: all uncertainty is epistemic.
    probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    assert predictive_entropy(probs).item() == pytest.approx(math.log(2))
    assert mutual_information(probs).item() == pytest.approx(math.log(2))
    assert max_probability(probs).item() == pytest.approx(0.5)


# ----------------------------------------------------------------------------- OOD detection


def test_auroc_of_separated_and_tied_scores():
    assert auroc(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([3.0, 4.0])) == 1.0
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0, 2.0])) == 0.0
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])) == 0.5
    # Pairs (out, in): (1, 0) win, (1, 1) tie = 1/2, (2, 0) win, (2, 1) win -> 3.5 / 4.
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])) == 0.875


def test_aupr_by_hand():
    # in [0, 1], out [1, 2]. Threshold 2: 1 of 1 is OOD, recall 1/2, precision 1.
    # Threshold 1: 2 of 3 OOD, recall 1, precision 2/3. Threshold 0 adds no recall.
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert aupr(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])) == pytest.approx(5 / 6)
    assert aupr(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([3.0, 4.0])) == pytest.approx(1.0)


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_and_aupr_agree_with_sklearn(ties):
    rng = np.random.default_rng(2)
    for _ in range(5):
        n_in, n_out = rng.integers(1, 40, size=2)
        scores_in, scores_out = rng.normal(size=n_in), rng.normal(0.7, size=n_out)
        if ties:
            scores_in, scores_out = np.round(scores_in), np.round(scores_out)
        labels = np.r_[np.zeros(n_in), np.ones(n_out)]
        scores = np.r_[scores_in, scores_out]
        as_tensor = lambda a: torch.tensor(a, dtype=torch.float32)
        assert auroc(as_tensor(scores_in), as_tensor(scores_out)) == pytest.approx(
            sklearn.metrics.roc_auc_score(labels, scores.astype(np.float32)), abs=1e-12)
        assert aupr(as_tensor(scores_in), as_tensor(scores_out)) == pytest.approx(
            sklearn.metrics.average_precision_score(labels, scores.astype(np.float32)), abs=1e-12)


def test_ood_scores_point_the_right_way():
    # In distribution: two samples agreeing and confident. OOD: samples confident and disagreeing,
    # so every score (entropy, MI, negated max probability) is higher out of distribution.
    confident = torch.tensor([0.9, 0.1], dtype=torch.float64)
    probs_in = confident.expand(2, 4, 2)
    probs_out = torch.stack([confident.expand(3, 2), confident.flip(0).expand(3, 2)])
    results = ood_metrics(probs_in, probs_out)
    assert set(results) == {"entropy", "mutual_information", "max_probability"}
    for name, scores in results.items():
        assert scores == {"auroc": 1.0, "aupr": 1.0}, name
    # Swapping the roles turns every detector upside down.
    assert ood_metrics(probs_out, probs_in)["max_probability"]["auroc"] == 0.0


def test_ood_inputs_are_checked():
    with pytest.raises(ValueError, match="non-empty"):
        auroc(torch.tensor([]), torch.tensor([1.0]))


# ----------------------------------------------------------------------------- memory


def test_memory_bytes_of_tensors_modules_and_containers():
    assert memory_bytes(torch.zeros(3, 4)) == 48
    assert memory_bytes(torch.zeros(3, 4, dtype=torch.float64)) == 96
    assert memory_bytes(nn.Linear(3, 2)) == (6 + 2) * 4
    # Parameters and buffers: weight, bias, running mean, running var (4 floats each), and a
    # 64-bit counter of batches.
    assert memory_bytes(nn.BatchNorm1d(4)) == 4 * 4 * 4 + 8
    ensemble = [nn.Linear(3, 2) for _ in range(3)]
    assert memory_bytes(ensemble) == 3 * 32
    assert memory_bytes({"mean": torch.zeros(10), "precision": [torch.zeros(10, 10)]}) == 40 + 400


def test_memory_bytes_counts_a_shared_tensor_once():
    net = nn.Linear(3, 2)
    assert memory_bytes({"net": net, "state": net.state_dict()}) == 32
    weight = torch.zeros(5)
    assert memory_bytes([weight, weight]) == 20
    # The halves of one flat vector, or the vector and a view into it, are that vector's memory.
    flat = torch.zeros(10)
    assert memory_bytes([flat[:5], flat[5:]]) == 40
    assert memory_bytes({"flat": flat, "piece": flat[2:7].view(5, 1)}) == 40


def test_memory_bytes_counts_the_storage_a_view_keeps():
    assert memory_bytes(torch.zeros(4, 3)[0]) == 4 * 3 * 4  # a row keeps its matrix alive
    assert memory_bytes(torch.zeros(3).expand(1000, 3)) == 3 * 4  # expanding copies nothing


def test_last_layer_laplace_memory_is_exactly_the_tensors_the_guide_holds():
    torch.manual_seed(0)
    model = BayesianNeuralNetwork(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)), (3,),
                                  "categorical", prior="normal")
    data = {"x": torch.randn(7, 3), "y": torch.randint(0, 4, (7,))}
    guide = WeightLaplaceGuide(model, MAPGuide(model), data, structure="last-layer")
    # Every MAP weight once (3*5 + 5 = 20 in the first layer, 5*4 + 4 = 24 in the last), then the
    # posterior over the last layer: its mean (a flat copy of those 24) and the 24 x 24 Cholesky
    # factor of its covariance. No parameters: nothing is trained after the MAP fit.
    assert list(guide.parameters()) == []
    assert {name: tuple(b.shape) for name, b in guide.named_buffers()} == {
        "net__0__weight_point": (5, 3), "net__0__bias_point": (5,), "net__2__weight_point": (4, 5),
        "net__2__bias_point": (4,), "loc": (24,), "scale_tril": (24, 24)}
    assert memory_bytes(guide) == (20 + 24 + 24 + 24 * 24) * 4
    # An independent count: numel x element size of every tensor the guide holds, none shared.
    held = [*guide.parameters(), *guide.buffers()]
    assert memory_bytes(guide) == sum(t.numel() * t.element_size() for t in held)
    # The CLI's metrics.json figure (inference.runs.describe) is this one.
    assert describe(model, guide, "cpu")["posterior_bytes"] == memory_bytes(guide)
    # The point dict is those buffers: adding it to the guide (as the BNN benchmark once did for
    # the first layer) adds nothing.
    assert memory_bytes({"guide": guide, "point": guide.point}) == memory_bytes(guide)


def test_memory_bytes_refuses_what_is_not_a_tensor():
    with pytest.raises(TypeError, match=r"obj\['scale'\] is a float"):
        memory_bytes({"scale": 1.0})


# ----------------------------------------------------------------------------- figures


def test_reliability_diagram_has_a_panel_per_method_with_its_ece():
    probs_mean, y = _four_point_calibration_case()
    uniform = torch.full((4, 3), 1 / 3, dtype=torch.float64)
    fig = reliability_diagram({"map": (probs_mean, y), "uniform": (uniform, y)}, bins=2)
    try:
        names_and_eces = [ax.get_title().split("\nECE = ") for ax in fig.axes]
        assert [name for name, _ in names_and_eces] == ["map", "uniform"]
        # Titles round to 3 places. .2125 by hand above; uniform: confidence 1/3, accuracy 1/2.
        assert [float(ece) for _, ece in names_and_eces] == pytest.approx([0.2125, 1 / 6], abs=1e-3)
        # Two occupied bins for the first method: two accuracy bars and two gap boxes.
        assert len(fig.axes[0].patches) == 4
    finally:
        plt.close(fig)


def test_regression_band_draws_data_mean_and_two_bands():
    x_grid = torch.linspace(-1, 1, 20)
    mean, epistemic_sd, total_sd = x_grid**2, torch.full((20,), 0.1), torch.full((20,), 0.5)
    fig, ax = plt.subplots()
    try:
        returned = regression_band(ax, torch.randn(8, 1), torch.randn(8), x_grid, mean, epistemic_sd,
                                   total_sd, title="mean field")
        assert returned is ax and ax.get_title() == "mean field"
        # Two filled bands and one scatter of the data; one line for the mean.
        assert len(ax.collections) == 3 and len(ax.lines) == 1
        assert len(ax.collections[2].get_offsets()) == 8
        total_band, epistemic_band = (c.get_paths()[0].vertices[:, 1] for c in ax.collections[:2])
        assert total_band.max() == pytest.approx((mean + 1.0).max().item())
        assert epistemic_band.min() == pytest.approx((mean - 0.2).min().item())
        np.testing.assert_allclose(ax.lines[0].get_ydata(), mean.numpy())
    finally:
        plt.close(fig)
