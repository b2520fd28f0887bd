"""The weight-space Laplace guide (``guides/weight_laplace.py``) against autograd, in float64:
its GGN is the exact Hessian where the outputs are linear in the weights (the last layer of a
classifier), over every training point in the order the guide flattens the weights, and its
evidence over the prior precision is the Laplace formula computed directly."""

import math

import pyro
import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian

from bayeszoo.guides.map import MAPGuide
from bayeszoo.guides.weight_laplace import WeightLaplaceGuide, _ggn
from bayeszoo.inference.svi import fit
from bayeszoo.models.bnn import BayesianNeuralNetwork

N, D, H, C = 11, 3, 5, 4  # N is not a multiple of the batch sizes below


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _classifier(seed=0, n=N):
    torch.manual_seed(seed)
    model = BayesianNeuralNetwork(nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)), (D,),
                                  "categorical", prior="normal")
    x = torch.randn(n, D)
    return model, MAPGuide(model), {"x": x, "y": torch.randint(0, C, (n,))}


def _last_layer_nll(model, point: dict, data: dict):
    """theta = [W.flatten() (row-major), b] of the last layer -> sum_n -log p(y_n | x_n, theta)."""
    weight, bias = point["net.2.weight"], point["net.2.bias"]

    def nll(theta):
        values = {"net.2.weight": theta[:weight.numel()].reshape(weight.shape),
                  "net.2.bias": theta[weight.numel():]}
        with pyro.poutine.block(), pyro.poutine.condition(data={**point, **values}):
            logits = model.net(data["x"])
        return -logits.log_softmax(-1).gather(-1, data["y"][:, None]).sum()

    return nll, torch.cat([weight.reshape(-1), bias])


def test_last_layer_ggn_is_the_exact_hessian_of_the_training_nll(float64):
    model, map_guide, data = _classifier()
    laplace = WeightLaplaceGuide(model, map_guide, data, structure="last-layer", batch_size=4,
                           prior_precisions=torch.tensor([0.7]))
    nll, theta = _last_layer_nll(model, laplace.point, data)
    exact = hessian(nll, theta)  # (H C + C)^2, over all N points
    assert laplace.selected == ["net.2.weight", "net.2.bias"]
    assert torch.equal(laplace.loc, theta)  # weight (row-major), then bias
    ggn = _ggn(model, laplace.point, laplace.selected, data, diagonal=False, batch_size=4)
    assert torch.allclose(ggn, exact, atol=1e-10)
    covariance = laplace.scale_tril @ laplace.scale_tril.T
    assert torch.allclose(torch.linalg.inv(covariance), exact + 0.7 * torch.eye(len(theta)), atol=1e-8)
    # Not a per-point average, nor the first minibatch only: the Hessian of the *sum* over all N.
    first = hessian(_last_layer_nll(model, laplace.point, {k: v[:4] for k, v in data.items()})[0], theta)
    assert (ggn - first).abs().max() > 0.1 and (ggn - exact / N).abs().max() > 0.1


def test_diagonal_structure_keeps_the_diagonal_of_the_full_ggn(float64):
    model, map_guide, data = _classifier(seed=1)
    full = WeightLaplaceGuide(model, map_guide, data, structure="full", batch_size=4,
                        prior_precisions=torch.tensor([2.0]))
    diagonal = WeightLaplaceGuide(model, map_guide, data, structure="diag", batch_size=3,
                            prior_precisions=torch.tensor([2.0]))
    precision = torch.linalg.inv(full.scale_tril @ full.scale_tril.T)
    assert torch.equal(full.loc, diagonal.loc)
    assert torch.allclose(diagonal.scale**-2, precision.diagonal(), atol=1e-8)
    # The last-layer block of the full GGN is the last-layer GGN.
    last = WeightLaplaceGuide(model, map_guide, data, structure="last-layer",
                              prior_precisions=torch.tensor([2.0]))
    block = precision[-last.num_parameters:, -last.num_parameters:]
    assert torch.allclose(torch.linalg.inv(last.scale_tril @ last.scale_tril.T), block, atol=1e-8)


def _direct_log_evidence(model, point: dict, data: dict, tau: float) -> float:
    """log p(y | x, w*) + log N(w* | 0, tau^-1 I) + d/2 log 2 pi - 1/2 log det(H + tau I), H the
    exact Hessian of the training NLL in the last layer."""
    nll, theta = _last_layer_nll(model, point, data)
    d = len(theta)
    log_prior = torch.distributions.Normal(0.0, tau**-0.5).log_prob(theta).sum()
    log_det = torch.logdet(hessian(nll, theta) + tau * torch.eye(d))
    return float(-nll(theta) + log_prior + d / 2 * math.log(2 * math.pi) - 0.5 * log_det)


def test_log_evidence_is_the_laplace_formula_up_to_a_constant(float64):
    model, map_guide, data = _classifier(seed=2)
    with torch.no_grad():  # a point away from zero, so -tau/2 |w*|^2 matters
        for parameter in map_guide.parameters():
            parameter.mul_(3.0)
    taus = torch.tensor([0.05, 0.8, 30.0])
    laplace = WeightLaplaceGuide(model, map_guide, data, structure="last-layer", prior_precisions=taus,
                           batch_size=4)
    curve = laplace.evidence_curve["log_evidence"]
    direct = torch.tensor([_direct_log_evidence(model, laplace.point, data, t) for t in taus.tolist()])
    assert torch.allclose(curve - curve[0], direct - direct[0], atol=1e-8)
    assert (direct - direct[0]).abs().max() > 1.0  # the taus really differ in evidence
    assert laplace.prior_precision == float(taus[direct.argmax()])


def test_the_map_objective_is_the_full_data_log_joint_whose_hessian_laplace_takes(float64):
    """``fit`` trains the MAP on minibatches with the prior scaled by batch / N, so one epoch of
    plain SGD with a tiny step eta moves the weights by -eta grad U, U(w) = sum_n -log p(y_n | w)
    + tau0 |w|^2 / 2 over *all* N points, tau0 = 1 (the N(0, 1) prior): the same sum over N and
    the same prior as the guide's Lambda = GGN + tau I. Deterministic, unlike a converged fit."""
    model, map_guide, data = _classifier(seed=3, n=N)
    start = {name: value.detach().clone() for name, value in map_guide.point().items()}
    nll, theta = _last_layer_nll(model, start, data)
    theta = theta.requires_grad_()
    nll_gradient = torch.autograd.grad(nll(theta), theta)[0]
    eta = 1e-6
    fit(model, map_guide, data, epochs=1, batch_size=4, lr=eta, optimizer=torch.optim.SGD, progress=False)
    laplace = WeightLaplaceGuide(model, map_guide, data, structure="last-layer",
                           prior_precisions=torch.tensor([1.0]))
    step = (laplace.loc - theta.detach()) / -eta
    assert torch.allclose(step, nll_gradient + theta.detach(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(step, nll_gradient + N / 4 * theta.detach(), rtol=0.1)  # prior per batch
    assert not torch.allclose(step, nll_gradient / N + theta.detach(), rtol=0.1)  # mean likelihood
