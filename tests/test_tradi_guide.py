"""The TRADI guide: diagonal and random-feature-correlated Gaussians over the weights."""

import pytest
import torch
from pyro.infer import Predictive

from bayeszoo.guides.map import MAPGuide
from bayeszoo.guides.tradi import TradiGuide, random_features
from bayeszoo.models.bnn import BayesianNeuralNetwork
from bayeszoo.models.nn import mlp

VARIANCE = 0.04


def _guide(rank: int, correlation: float = 0.6):
    model = BayesianNeuralNetwork(mlp((1, 6, 1)), (1,), "gaussian", noise=0.1)
    point = {name: value.detach() for name, value in MAPGuide(model).point().items()}
    variances = {name: torch.full_like(value, VARIANCE) for name, value in point.items()}
    return model, TradiGuide(model, point, variances, point, rank=rank, correlation=correlation)


def _weight_draws(model, guide, num: int) -> torch.Tensor:
    draws = Predictive(model, guide=guide, num_samples=num, parallel=True,
                       return_sites=["net.0.weight"])(torch.zeros(2, 1))["net.0.weight"]
    return draws.reshape(num, -1)


def test_diagonal_guide_has_the_tracked_moments():
    model, guide = _guide(rank=0)
    draws = _weight_draws(model, guide, 20000)
    # 20,000 draws: sd of a variance estimate is VARIANCE * sqrt(2 / 20000) = 4e-4; allow 4 of those.
    assert (draws.var(0) - VARIANCE).abs().max() < 1.6e-3
    assert (draws.T.corrcoef() - torch.eye(6)).abs().max() < 0.05


def test_random_features_correlate_weights_as_constructed():
    model, guide = _guide(rank=200, correlation=0.6)
    draws = _weight_draws(model, guide, 20000)
    phi = guide.net__0__weight_features.reshape(6, -1)
    expected = VARIANCE * (0.4 * torch.eye(6) + 0.6 * phi @ phi.T)
    assert (draws.T.cov() - expected).abs().max() < 1.6e-3
    off_diagonal = expected - torch.diag(expected.diagonal())
    assert off_diagonal.abs().max() > 10 * 1.6e-3  # the correlations are real, not noise


def test_random_features_approximate_the_gaussian_kernel():
    torch.manual_seed(0)
    means = torch.randn(30)
    phi = random_features(means, 4000)
    length = means.std()
    kernel = torch.exp(-(means[:, None] - means[None]) ** 2 / (2 * length**2))
    # Rahimi & Recht: entrywise error O(1 / sqrt(R)) = 0.016 at R = 4000.
    assert (phi @ phi.T - kernel).abs().max() < 0.08


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="correlation"):
        _guide(rank=2, correlation=1.0)
