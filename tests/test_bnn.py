"""Bayesian neural networks (models/bnn.py) and their weight-space guides.

Layers that broadcast over weight samples against a Python loop; the exact posterior of
Bayesian linear regression as the oracle for the mean-field guide; local reparameterization and
Flipout against explicit weight sampling (moments, correlations, gradient variance); the deep
ensemble's single vectorized step; MC dropout masks; and the minibatch scaling of ``fit``.
"""

import contextlib
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO, TraceMeanField_ELBO
from torch import nn
from torch.distributions import kl_divergence

from bayeszoo.guides.ensemble import EnsembleGuide
from bayeszoo.guides.map import MAPGuide
from bayeszoo.guides.mc_dropout import MCDropoutGuide
from bayeszoo.guides.mean_field import MeanFieldGuide
from bayeszoo.guides.reparameterization import flipout, local_reparameterization
from bayeszoo.inference.svi import fit, scale_global_sites
from bayeszoo.models.bnn import (
    BayesianNeuralNetwork,
    IsotropicNormal,
    batched_conv2d,
    batched_linear,
    bayesian,
    weight_sites,
)
from bayeszoo.models.nn import mlp

# ----------------------------------------------------------------------------------------------
# Helpers


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


def _set_scales(guide: MeanFieldGuide, scale: float) -> None:
    """Give every factor of a mean-field guide the same, sizeable standard deviation."""
    with torch.no_grad():
        for rho in guide.rho.values():
            rho.fill_(_inverse_softplus(scale))


def _vectorized_elbo(particles: int) -> Trace_ELBO:
    return Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)


def _conv_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def _regression_data(n=20, d=2, seed=0):
    x = _randn(n, d, seed=seed)
    return {"x": x, "y": x.sum(-1).sin() + 0.1 * _randn(n, seed=seed + 1)}


# ----------------------------------------------------------------------------------------------
# 1. Layers over batches of weights


def test_batched_linear_with_a_sample_dim_and_a_data_singleton_equals_a_loop():
    """Weights (S, 1, out, in) as vectorized particles lay them out, against shared inputs
    (N, in) and against per-sample inputs (S, N, in) (the second layer of a network)."""
    S, N, I, O = 4, 6, 5, 3
    weight, bias = _randn(S, 1, O, I, seed=1), _randn(S, 1, O, seed=2)
    x = _randn(N, I, seed=3)
    expected = torch.stack([F.linear(x, weight[s, 0], bias[s, 0]) for s in range(S)])
    torch.testing.assert_close(batched_linear(x, weight, bias), expected, atol=1e-5, rtol=1e-5)

    hidden = _randn(S, N, I, seed=4)
    expected = torch.stack([F.linear(hidden[s], weight[s, 0], bias[s, 0]) for s in range(S)])
    torch.testing.assert_close(batched_linear(hidden, weight, bias), expected, atol=1e-5, rtol=1e-5)


def test_batched_linear_with_a_bare_sample_dim_equals_a_loop():
    """Weights (S, out, in): one input per sample (S, in), and inputs (N, 1, in) that
    broadcast against the samples into (N, S, out)."""
    S, N, I, O = 4, 6, 5, 3
    weight, bias = _randn(S, O, I, seed=1), _randn(S, O, seed=2)
    x = _randn(S, I, seed=3)
    expected = torch.stack([F.linear(x[s], weight[s], bias[s]) for s in range(S)])
    torch.testing.assert_close(batched_linear(x, weight, bias), expected, atol=1e-5, rtol=1e-5)

    x = _randn(N, 1, I, seed=4)
    expected = torch.stack([F.linear(x[:, 0], weight[s], bias[s]) for s in range(S)], dim=1)
    torch.testing.assert_close(batched_linear(x, weight, bias), expected, atol=1e-5, rtol=1e-5)


CONV_OPTIONS = {"stride": 2, "padding": 1, "dilation": 1, "groups": 2}


def test_batched_conv2d_with_a_sample_dim_and_a_data_singleton_equals_a_loop():
    S, N, C, O, H = 3, 5, 4, 6, 7
    weight, bias = _randn(S, 1, O, C // 2, 3, 3, seed=1), _randn(S, 1, O, seed=2)
    x = _randn(N, C, H, H, seed=3)
    expected = torch.stack([F.conv2d(x, weight[s, 0], bias[s, 0], **CONV_OPTIONS) for s in range(S)])
    out = batched_conv2d(x, weight, bias, **CONV_OPTIONS)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    hidden = _randn(S, N, C, H, H, seed=4)
    expected = torch.stack([F.conv2d(hidden[s], weight[s, 0], bias[s, 0], **CONV_OPTIONS)
                            for s in range(S)])
    out = batched_conv2d(hidden, weight, bias, **CONV_OPTIONS)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_batched_conv2d_with_a_bare_sample_dim_equals_a_loop():
    S, C, O, H = 3, 4, 6, 7
    weight, bias = _randn(S, O, C // 2, 3, 3, seed=1), _randn(S, O, seed=2)
    x = _randn(S, C, H, H, seed=3)
    expected = torch.stack([F.conv2d(x[s:s + 1], weight[s], bias[s], **CONV_OPTIONS)[0]
                            for s in range(S)])
    out = batched_conv2d(x, weight, bias, **CONV_OPTIONS)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


PREDICTIVE_CASES = [
    # (likelihood, prior, noise, outputs, deterministic sites and their shape after (S, N))
    ("gaussian", "normal", 0.1, 1, {"mean": (), "variance": ()}),
    ("gaussian", "fan_in", "learned", 1, {"mean": (), "variance": ()}),
    ("gaussian", "hierarchical", "prior", 1, {"mean": (), "variance": ()}),
    ("heteroscedastic", "fan_in", "learned", 2, {"mean": (), "variance": ()}),
    ("categorical", "hierarchical", "learned", 3, {"probs": (3,)}),
    ("bernoulli", "normal", "learned", 1, {"probs": ()}),
]


@pytest.mark.parametrize("likelihood, prior, noise, outputs, sites", PREDICTIVE_CASES)
def test_predictive_parallel_and_vectorized_particles(likelihood, prior, noise, outputs, sites):
    S, N, D = 5, 7, 3
    model = BayesianNeuralNetwork(mlp([D, 8, outputs]), (D,), likelihood=likelihood, prior=prior,
                                  noise=noise)
    guide = MeanFieldGuide(model, init_scale=0.1)
    x = _randn(N, D)
    samples = Predictive(model, guide=guide, num_samples=S, parallel=True)(x)
    assert samples["y"].shape == (S, N)
    for name, event in sites.items():
        value = samples[name]
        assert value.shape == (S, N, *event)
        assert torch.isfinite(value).all()
    # every weight sample is its own network: no two samples predict alike
    flat = samples[next(iter(sites))].reshape(S, -1)
    assert (torch.cdist(flat, flat) + torch.eye(S)).min() > 1e-4
    if "probs" in sites and sites["probs"]:
        torch.testing.assert_close(samples["probs"].sum(-1), torch.ones(S, N))

    y = samples["y"][0]
    loss = _vectorized_elbo(4).loss(model, guide, x, y)
    assert math.isfinite(loss)


def test_conv_net_equals_the_torch_network_under_weight_samples():
    """A MAP guide starts at the network's own weights, so every one of S parallel weight
    samples must reproduce the plain torch network (conv, ReLU, max-pool, flatten, linear)."""
    torch.manual_seed(0)
    net = _conv_net()
    model = BayesianNeuralNetwork(net, (1, 8, 8), likelihood="categorical")
    x = _randn(6, 1, 8, 8)
    samples = Predictive(model, guide=MAPGuide(model), num_samples=3, parallel=True)(x)
    with torch.no_grad():
        expected = net(x).softmax(-1)
    assert samples["probs"].shape == (3, 6, 3)
    for probs in samples["probs"]:
        torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
    assert len(weight_sites(model)) == 4  # conv weight and bias, linear weight and bias


def test_conv_net_with_mean_field_samples_and_vectorized_particles():
    torch.manual_seed(0)
    model = BayesianNeuralNetwork(_conv_net(), (1, 8, 8), likelihood="categorical")
    guide = MeanFieldGuide(model, init_scale=0.2)
    x = _randn(6, 1, 8, 8)
    samples = Predictive(model, guide=guide, num_samples=4, parallel=True)(x)
    assert samples["probs"].shape == (4, 6, 3)
    assert (samples["probs"][0] - samples["probs"][1]).abs().max() > 1e-3
    loss = _vectorized_elbo(4).differentiable_loss(model, guide, x, samples["y"][0])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in guide.loc.values())


def test_vectorized_particles_of_a_point_mass_equal_one_particle():
    """With a delta guide every particle is the same network: the vectorized loss must equal
    the single-particle loss (a check of the broadcasting arithmetic, not just of shapes)."""
    model = BayesianNeuralNetwork(mlp([3, 8, 8, 1]), (3,), noise="prior")
    guide = MAPGuide(model)
    data = _regression_data(d=3)
    single = Trace_ELBO(max_plate_nesting=1).loss(model, guide, **data)
    vectorized = _vectorized_elbo(4).loss(model, guide, **data)
    assert vectorized == pytest.approx(single, rel=1e-5)


def test_deterministic_layer_keeps_a_parameter():
    model = BayesianNeuralNetwork(mlp([3, 8, 1]), (3,), deterministic=("0",))
    assert set(weight_sites(model)) == {"net.2.weight", "net.2.bias"}
    parameters = dict(model.named_parameters())
    assert "net.0.weight" in parameters and "net.0.bias" in parameters
    trace = poutine.trace(model).get_trace(torch.zeros(2, 3))
    samples = {name for name, site in trace.nodes.items() if site["type"] == "sample"}
    assert not any(name.startswith("net.0.") for name in samples)
    assert {"net.2.weight", "net.2.bias"} <= samples


@pytest.mark.parametrize("kwargs, message", [
    ({"net": mlp([3, 8, 2]), "likelihood": "gaussian"}, "1 network output"),
    ({"net": mlp([3, 8, 1]), "likelihood": "heteroscedastic"}, "2 network output"),
    ({"net": mlp([3, 8, 1]), "likelihood": "categorical"}, "one network output per class"),
    ({"net": mlp([3, 8, 1]), "likelihood": "poisson"}, "unknown likelihood"),
    ({"net": mlp([3, 8, 1]), "prior": "laplace"}, "unknown prior"),
    ({"net": mlp([3, 8, 1]), "deterministic": ("5",)}, "deterministic"),
    ({"net": mlp([3, 8, 1]), "noise": -1.0}, "noise"),
])
def test_bad_inputs_raise_value_error(kwargs, message):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=message):
        BayesianNeuralNetwork(kwargs.pop("net"), (3,), **kwargs)


def test_bernoulli_with_several_outputs_scores_each_output():
    model = BayesianNeuralNetwork(mlp([3, 8, 4]), (3,), "bernoulli")
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5, 4)).float()
    trace = pyro.poutine.trace(model).get_trace(x, y)
    trace.compute_log_prob()
    assert trace.nodes["y"]["log_prob"].shape == (5,)  # 4 pixels per point, summed as one event
    assert pyro.poutine.trace(model).get_trace(x).nodes["probs"]["value"].shape == (5, 4)


@pytest.mark.parametrize(("likelihood", "outputs", "sites"), [
    ("gaussian", 1, {"mean", "variance"}), ("heteroscedastic", 2, {"mean", "variance"}),
    ("categorical", 3, {"probs"}), ("bernoulli", 1, {"probs"}), ("bernoulli", 4, {"probs"})])
def test_likelihood_parameters_are_recorded_when_generating_and_left_out_when_y_is_observed(
        likelihood, outputs, sites):
    model = BayesianNeuralNetwork(mlp([3, 8, outputs]), (3,), likelihood)
    x = torch.randn(5, 3)
    generated = pyro.poutine.trace(model).get_trace(x)
    recorded = {name for name, site in generated.nodes.items() if site.get("infer", {}).get("_deterministic")}
    assert recorded == sites
    observed = pyro.poutine.trace(pyro.poutine.replay(model, trace=generated)).get_trace(
        x, generated.nodes["y"]["value"])
    assert not sites & set(observed.nodes)
    assert observed.log_prob_sum().item() == pytest.approx(generated.log_prob_sum().item(), rel=1e-6)


def test_a_bare_layer_becomes_bayesian():
    """A network that is a single nn.Linear / nn.Conv2d (no container) is made Bayesian too."""
    model = BayesianNeuralNetwork(nn.Linear(2, 1), (2,), prior="normal", noise=0.5)
    assert weight_sites(model) == {"net.0.weight": (1, 2), "net.0.bias": (1,)}
    conv = bayesian(nn.Conv2d(1, 2, 3), (1, 5, 5))
    trace = poutine.trace(conv).get_trace(torch.zeros(2, 1, 5, 5))
    assert {"0.weight", "0.bias"} <= set(trace.nodes)


# ----------------------------------------------------------------------------------------------
# 2. The exact oracle: Bayesian linear regression with known noise


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
def test_mean_field_recovers_the_exact_linear_regression_posterior(elbo):
    """y = X w + b + eps, eps ~ N(0, sigma^2), (w, b) ~ N(0, s^2 I): the posterior is Gaussian
    with precision A = Phi^T Phi / sigma^2 + I / s^2 (Phi = [X, 1]) and mean
    A^-1 Phi^T y / sigma^2. The optimal fully factorised Gaussian has the exact means and
    variances 1 / diag(A) (Bishop 2006, sec. 10.1.2): smaller than the marginals diag(A^-1)
    when the inputs are correlated, as they are here (the test tells the two apart).
    """
    N, sigma, s = 20, 0.5, 1.0
    z = _randn(N, 2, seed=1)
    x = torch.stack([z[:, 0], 0.8 * z[:, 0] + 0.6 * z[:, 1]], -1) + 0.5  # correlation 0.8
    y = x @ torch.tensor([1.0, -0.5]) + 0.3 + sigma * _randn(N, seed=2)

    phi = torch.cat([x, torch.ones(N, 1)], -1).double()
    precision = phi.T @ phi / sigma ** 2 + torch.eye(3, dtype=torch.float64) / s ** 2
    exact_mean = torch.linalg.solve(precision, phi.T @ y.double() / sigma ** 2)
    exact_sd = torch.linalg.inv(precision).diagonal().sqrt()
    mean_field_var = 1 / precision.diagonal()
    # the factorised answer is distinct: the weights' marginal variances are 4.8x and 4.6x larger
    assert (exact_sd[:2] ** 2 / mean_field_var[:2]).min() > 3

    model = BayesianNeuralNetwork(nn.Linear(2, 1), (2,), prior="normal", prior_scale=s, noise=sigma)
    guide = MeanFieldGuide(model)
    # Full batch, 8 vectorized particles, Adam with a decaying step (0.05 -> 9e-4) so the end
    # point is not dominated by gradient noise.
    fit(model, guide, {"x": x, "y": y}, epochs=400, batch_size=N, lr=0.05, lr_decay=0.99,
        num_particles=8, elbo=elbo, progress=False)

    (w_loc, w_scale), (b_loc, b_scale) = guide.posterior("net.0.weight"), guide.posterior("net.0.bias")
    loc = torch.cat([w_loc.flatten(), b_loc]).detach().double()
    var = torch.cat([w_scale.flatten(), b_scale]).detach().double() ** 2
    # Measured (seeds 0-4 of fit): |loc - exact| <= 0.023 posterior sd, var / (1 / diag A) in
    # [0.94, 1.06] (with 4 particles: [0.89, 1.07]). Tolerances: 0.2 sd for the means, 15% for
    # the variances; the exact marginal variances are 4.6x larger, so they could not pass.
    assert ((loc - exact_mean) / exact_sd).abs().max() < 0.2
    torch.testing.assert_close(var, mean_field_var, rtol=0.15, atol=0.0)


@pytest.mark.parametrize("hierarchical_scale", [False, True])
def test_closed_form_kl_to_the_isotropic_prior_is_torchs_kl_to_the_expanded_normal(hierarchical_scale):
    """IsotropicNormal is N(0, s^2 I) in one pass; its registered KL must be the KL to the same
    prior written as an expanded Normal, also when s carries sample dimensions (hierarchical)."""
    loc, scale = _randn(5, 3, seed=1), F.softplus(_randn(5, 3, seed=2))
    s = torch.tensor([[0.5], [2.0]]) if hierarchical_scale else torch.tensor(0.7)
    q = dist.Normal(loc, scale).to_event(2).expand(s.shape)
    expanded = dist.Normal(torch.zeros(5, 3), s[..., None, None]).expand(s.shape + (5, 3)).to_event(2)
    closed_form = kl_divergence(q, IsotropicNormal(s, (5, 3)))
    assert closed_form.shape == s.shape
    torch.testing.assert_close(closed_form, kl_divergence(q, expanded))


def test_closed_form_kl_elbo_estimates_the_same_elbo_as_trace_elbo():
    """TraceMeanField_ELBO (what ``inference.bnn.train`` uses for the mean-field methods) swaps
    Trace_ELBO's log q(w) - log p(w) at the sampled weights for the closed-form KL. With the same
    seed both draw the same weights, so their difference is KL - (log q(w) - log p(w)): zero on
    average, and not identically zero unless the closed form silently fell back to sampling."""
    data = _regression_data(n=20, d=2)
    model = BayesianNeuralNetwork(mlp([2, 8, 1]), (2,), prior="normal", noise=0.5)
    guide = MeanFieldGuide(model)
    _set_scales(guide, 0.3)

    def loss(elbo, seed):
        pyro.set_rng_seed(seed)
        return elbo(max_plate_nesting=1).loss(model, guide, **data)

    seeds = range(300)
    differences = torch.tensor([loss(TraceMeanField_ELBO, seed) - loss(Trace_ELBO, seed) for seed in seeds],
                               dtype=torch.float64)
    assert differences.std() > 1.0  # measured 3.8: log q - log p of 33 weights, sampled
    assert differences.mean().abs() < 4 * differences.std() / len(differences) ** 0.5


# ----------------------------------------------------------------------------------------------
# 3. Local reparameterization and Flipout


def _one_layer(d: int) -> BayesianNeuralNetwork:
    """b = w x for one unit, no bias: a shared bias draw would correlate the examples."""
    return BayesianNeuralNetwork(nn.Sequential(nn.Linear(d, 1, bias=False)), (d,), prior="normal",
                                 noise=0.5)


def _preactivations(model, guide, x, draws: int, handler) -> torch.Tensor:
    """(draws, N) outputs of the layer: guide and replayed model in one vectorized plate."""
    with torch.no_grad(), handler, pyro.plate("draws", draws, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    return model_trace.nodes["mean"]["value"]


HANDLERS = {"shared": contextlib.nullcontext, "local": local_reparameterization, "flipout": flipout}


@pytest.mark.parametrize("handler", ["shared", "local", "flipout"])
def test_preactivation_moments_match_weight_sampling(handler):
    D, N, draws = 5, 8, 20_000
    torch.manual_seed(0)
    model = _one_layer(D)
    guide = MeanFieldGuide(model)
    _set_scales(guide, 0.3)
    with torch.no_grad():
        guide.loc["net__0__weight"].normal_()
    x = torch.rand(N, D) + 0.5  # positive inputs: a shared weight draw correlates the examples

    out = _preactivations(model, guide, x, draws, HANDLERS[handler]())
    loc, scale = guide.posterior("net.0.weight")
    mean = (x @ loc.T)[:, 0].detach()
    var = (x ** 2 @ (scale ** 2).T)[:, 0].detach()
    assert out.shape == (draws, N)
    # Monte Carlo error: the sample mean has sd sqrt(var / draws); the sample variance of a
    # Gaussian has relative sd sqrt(2 / draws) = 1%. Measured max |z| over the 8 examples:
    # <= 3.1 for the mean and <= 3.1 for the variance (8 seeds). Tolerance: 5 sd.
    assert ((out.mean(0) - mean) / (var / draws).sqrt()).abs().max() < 5
    assert ((out.var(0) / var - 1) / math.sqrt(2 / draws)).abs().max() < 5

    correlation = torch.corrcoef(out.T)[~torch.eye(N, dtype=torch.bool)]
    if handler == "shared":
        # one weight draw per network: measured mean correlation 0.93, minimum 0.80
        assert correlation.min() > 0.5
    else:
        # fresh noise (local) or random signs (flipout) per example: measured |r| <= 0.03;
        # the MC sd of a zero correlation is 1 / sqrt(draws) = 0.007
        assert correlation.abs().max() < 0.05


def _loc_gradients(model, guide, data, handler, draws: int) -> torch.Tensor:
    """(draws, numel) gradients of the negative ELBO of one minibatch w.r.t. the weight means."""
    elbo, grads = Trace_ELBO(), []
    for _ in range(draws):
        guide.zero_grad()
        with handler():
            elbo.differentiable_loss(model, guide, **data).backward()
        grads.append(torch.cat([p.grad.flatten() for p in guide.loc.values()]))
    return torch.stack(grads)


def test_local_reparameterization_and_flipout_lower_the_gradient_variance():
    D, N, draws = 5, 64, 100
    torch.manual_seed(0)
    model = _one_layer(D)
    guide = MeanFieldGuide(model)
    _set_scales(guide, 0.3)
    x = torch.randn(N, D)
    data = {"x": x, "y": x.sum(-1) + 0.5 * torch.randn(N)}

    grads = {name: _loc_gradients(model, guide, data, handler, draws)
             for name, handler in HANDLERS.items()}
    total_variance = {name: g.var(0).sum().item() for name, g in grads.items()}
    # Measured (100 draws, data seeds 0-3): local / shared = 0.09-0.15, flipout / shared =
    # 0.10-0.15 (one output unit: flipout's sign per example decorrelates as well as fresh
    # noise). Thresholds, with a margin of more than 2.5x: 0.4 for both.
    assert total_variance["local"] / total_variance["shared"] < 0.4
    assert total_variance["flipout"] / total_variance["shared"] < 0.4
    # Both estimators are unbiased: the mean gradients agree within Monte Carlo error (5 sd).
    for name in ("local", "flipout"):
        difference = grads[name].mean(0) - grads["shared"].mean(0)
        standard_error = ((grads[name].var(0) + grads["shared"].var(0)) / draws).sqrt()
        assert (difference.abs() / standard_error).max() < 5


def test_flipout_and_local_reparameterization_lower_the_gradient_variance_of_a_deep_net():
    """Two Bayesian layers with 16 hidden units: the handlers act on every layer."""
    D, N, draws = 5, 64, 60
    torch.manual_seed(0)
    model = BayesianNeuralNetwork(mlp([D, 16, 1]), (D,), prior="normal", noise=0.5)
    guide = MeanFieldGuide(model)
    _set_scales(guide, 0.3)
    x = torch.randn(N, D)
    data = {"x": x, "y": x.sum(-1) + 0.5 * torch.randn(N)}

    first_layer = lambda g: g[:, :16 * D]  # the gradient of the first weight matrix's means
    grads = {name: first_layer(_loc_gradients(model, guide, data, handler, draws))
             for name, handler in HANDLERS.items()}
    total_variance = {name: g.var(0).sum().item() for name, g in grads.items()}
    # Measured (60 draws, data seeds 0-3): local / shared = 0.04-0.06, flipout / shared =
    # 0.18-0.23 (flipout keeps one shared perturbation per network, so it gains less than
    # fresh noise per example). Thresholds with a margin of 2x or more: 0.2 and 0.5.
    assert total_variance["local"] / total_variance["shared"] < 0.2
    assert total_variance["flipout"] / total_variance["shared"] < 0.5


# ----------------------------------------------------------------------------------------------
# 4. Deep ensemble


def _ensemble(members=4, hidden=16, noise=0.1):
    torch.manual_seed(0)
    model = BayesianNeuralNetwork(mlp([1, hidden, hidden, 1]), (1,), noise=noise)
    return model, EnsembleGuide(model, members=members)


def test_ensemble_members_differ_at_init():
    model, guide = _ensemble()
    for name, stack in guide.stacked().items():
        flat = stack.reshape(len(stack), -1)
        distances = torch.cdist(flat, flat) + torch.eye(len(stack))
        assert distances.min() > 1e-3, name


def test_ensemble_gradient_is_each_members_own_map_gradient_in_one_backward():
    """One vectorized loss over M particles, one backward: member m's gradient is the MAP
    gradient at member m's weights, divided by M."""
    members = 4
    model, guide = _ensemble(members)
    data = _regression_data(d=1)
    _vectorized_elbo(members).differentiable_loss(model, guide, **data).backward()

    for m in range(members):
        pyro.clear_param_store()
        single = MAPGuide(model)
        with torch.no_grad():
            for site in single.sites:
                single.loc[site.key].copy_(guide.members[site.key][m])
        Trace_ELBO(max_plate_nesting=1).differentiable_loss(model, single, **data).backward()
        for site in single.sites:
            ensemble_grad = guide.members[site.key].grad[m]
            assert ensemble_grad.abs().sum() > 0, site.name
            torch.testing.assert_close(ensemble_grad * members, single.loc[site.key].grad,
                                       atol=1e-5, rtol=1e-4)


def test_ensemble_fit_trains_every_member_with_one_backward_per_step():
    members, N, batch = 4, 24, 8
    model, guide = _ensemble(members)
    before = {name: value.detach().clone() for name, value in guide.stacked().items()}
    backwards = []
    # a hook on a leaf runs once for every backward pass that reaches it
    key = next(iter(guide.members.keys()))
    guide.members[key].register_hook(lambda grad: backwards.append(grad.shape))
    data = _regression_data(n=N, d=1)
    fit(model, guide, data, epochs=1, batch_size=batch, lr=0.01, num_particles=members,
        progress=False)
    assert len(backwards) == N // batch  # one backward per minibatch, not one per member
    for name, value in guide.stacked().items():
        changed = (value.detach() - before[name]).reshape(members, -1).abs().amax(-1)
        assert (changed > 0).all(), name


def test_trained_ensemble_disagrees_away_from_the_data():
    members = 4
    model, guide = _ensemble(members, hidden=32)
    x = torch.linspace(-1, 1, 20)[:, None]
    fit(model, guide, {"x": x, "y": torch.sin(3 * x[:, 0])}, epochs=300, batch_size=20, lr=0.01,
        num_particles=members, progress=False)
    far = torch.tensor([[-4.0], [-3.0], [3.0], [4.0]])
    predictive = Predictive(model, guide=guide, num_samples=members, parallel=True)
    near_spread = predictive(x)["mean"].std(0).mean()
    far_spread = predictive(far)["mean"].std(0).mean()
    # Measured (fit seeds 0-2): spread of the members' means 0.011-0.039 on the data and
    # 0.81-0.86 at |x| = 3-4 (at least 22x). Thresholds: 10x, and 0.3 in absolute terms.
    assert far_spread > 10 * near_spread
    assert far_spread > 0.3


def test_predictive_returns_every_ensemble_member_once():
    members = 4
    model, guide = _ensemble(members)
    sites = list(guide.stacked())
    samples = Predictive(model, guide=guide, num_samples=members, parallel=True,
                         return_sites=sites)(torch.zeros(3, 1))
    for name, stack in guide.stacked().items():
        assert torch.equal(samples[name].reshape(stack.shape), stack.detach()), name


# ----------------------------------------------------------------------------------------------
# 5. MC dropout


def _dropout_pair(p):
    torch.manual_seed(0)
    model = BayesianNeuralNetwork(mlp([3, 16, 16, 1]), (3,), noise=0.1)
    return model, MCDropoutGuide(model, p=p)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_mc_dropout_predictions_vary_only_with_dropout(p):
    model, guide = _dropout_pair(p)
    mean = Predictive(model, guide=guide, num_samples=20, parallel=True)(_randn(5, 3))["mean"]
    spread = mean.std(0).max()
    if p == 0:
        assert spread == 0
    else:
        assert spread > 1e-3


def test_mc_dropout_zeroes_whole_columns_and_rescales_the_rest():
    p, draws = 0.3, 200
    model, guide = _dropout_pair(p)
    point = {name: value.detach() for name, value in guide.point().items()}
    assert guide.dropped == {"net.2.weight", "net.4.weight"}  # the first layer's inputs are kept
    with torch.no_grad(), pyro.plate("draws", draws, dim=-2):
        values = guide()
    for name, value in values.items():
        value = value.reshape(draws, *point[name].shape)
        if name not in guide.dropped:
            assert torch.equal(value, point[name].expand_as(value)), name
            continue
        kept = (value != 0).all(dim=1)  # (draws, in): a kept column is nonzero in every row
        dropped = (value == 0).all(dim=1)
        assert (kept | dropped).all(), name  # whole input columns, never single entries
        expected = point[name] / (1 - p) * kept[:, None, :]
        torch.testing.assert_close(value, expected)
        # 200 draws x 16 columns: the dropped fraction has sd 0.008 around p
        assert dropped.float().mean().item() == pytest.approx(p, abs=0.04), name
        # different draws drop different columns
        assert (dropped != dropped[:1]).any()


# ----------------------------------------------------------------------------------------------
# 6. Minibatch scaling in fit


@pytest.mark.parametrize("particles", [1, 3])
def test_minibatch_losses_sum_to_the_full_batch_loss(particles):
    """A delta guide makes the loss deterministic: with global sites scaled by B / N, the
    losses of one epoch's minibatches (50 = 16 + 16 + 16 + 2) sum to the full-batch loss."""
    N, B = 50, 16
    torch.manual_seed(0)
    model = BayesianNeuralNetwork(mlp([2, 8, 1]), (2,), prior="hierarchical", noise="prior")
    guide = MAPGuide(model)
    data = _regression_data(n=N)
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=1)
    full = elbo.loss(model, guide, **data)
    parts = []
    for start in range(0, N, B):
        batch = {k: v[start:start + B] for k, v in data.items()}
        with scale_global_sites(len(batch["x"]) / N, plate_nesting=1):
            parts.append(elbo.loss(model, guide, **batch))
    assert sum(parts) == pytest.approx(full, rel=1e-4)
    # without the scaling every minibatch would count the prior in full: a different number
    unscaled = sum(elbo.loss(model, guide, **{k: v[s:s + B] for k, v in data.items()})
                   for s in range(0, N, B))
    assert unscaled != pytest.approx(full, rel=1e-2)


def test_fit_reports_the_full_batch_elbo_as_the_sum_of_its_minibatches():
    """lr = 0 leaves the MAP weights in place, so fit's epoch ELBO (per point) must be the
    full-batch ELBO / N, however the data are split."""
    N = 50
    torch.manual_seed(0)
    model = BayesianNeuralNetwork(mlp([2, 8, 1]), (2,), prior="hierarchical", noise="prior")
    guide = MAPGuide(model)
    data = _regression_data(n=N)
    full = Trace_ELBO(max_plate_nesting=1).loss(model, guide, **data)
    result = fit(model, guide, data, epochs=1, batch_size=16, lr=0.0, progress=False)
    assert -result.history[0]["train_elbo"] * N == pytest.approx(full, rel=1e-4)


def test_continual_learning_prior_is_the_previous_posterior():
    model = BayesianNeuralNetwork(mlp([2, 4, 1]), (2,), "gaussian", noise=0.5)
    posterior = {name: (torch.randn(shape), torch.rand(shape) + 0.1)
                 for name, shape in weight_sites(model).items()}
    model.set_gaussian_prior(posterior)
    trace = pyro.poutine.trace(model).get_trace(torch.randn(3, 2))
    for name, (loc, scale) in posterior.items():
        prior = trace.nodes[name]["fn"].base_dist
        assert torch.equal(prior.loc, loc) and torch.equal(prior.scale, scale)
    with pytest.raises(ValueError, match="no weight sites"):
        model.set_gaussian_prior({"net.9.weight": posterior["net.0.weight"]})


# ----------------------------------------------------------------------------------------------
# 7. The per-step fast paths against the plain Pyro computation they replace
#
# The model's priors (IsotropicNormal, built once), the guides' distributions (DiagonalNormal,
# PointMass) and the layers' shortcuts must give the loss and the gradients of the straightforward
# program: every weight ~ Normal(0, s).expand(shape).to_event(k), q = Normal(mu, sigma).to_event(k)
# or Delta, the network evaluated by torch.func.functional_call on the plain net. Same seed, so
# the same weight draws; fit's minibatch share of the global sites applied as in training.


def _reference_model(net: nn.Module, prior: str, prior_scale: float):
    """The BNN written out with Pyro's stock distributions: the slow reference."""
    layers = [(name, layer) for name, layer in net.named_children() if isinstance(layer, nn.Linear)]

    def model(x, y=None):
        weights = {}
        for name, layer in layers:
            std = prior_scale / math.sqrt(layer.in_features) if prior != "normal" else prior_scale
            scale = (pyro.sample(f"net.{name}.prior_scale", dist.HalfNormal(torch.tensor(std)))
                     if prior == "hierarchical" else torch.tensor(std))
            for kind in ("weight", "bias"):
                shape = getattr(layer, kind).shape
                weights[f"{name}.{kind}"] = pyro.sample(
                    f"net.{name}.{kind}", dist.Normal(0.0, scale).expand(shape).to_event(len(shape)))
        f = torch.func.functional_call(net, weights, (x,))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("y", dist.Categorical(logits=f), obs=y)

    return model


def _reference_mean_field(guide: MeanFieldGuide):
    """MeanFieldGuide.forward with stock distributions and attribute reads."""
    def reference(*args, **kwargs):
        for site in guide.sites:
            q = dist.Normal(guide.loc[site.key], F.softplus(guide.rho[site.key])).to_event(site.event_dim)
            if not site.is_real:
                q = dist.TransformedDistribution(q, guide.transforms[site.name])
            pyro.sample(site.name, q)
    return reference


def _reference_map(guide: MAPGuide):
    def reference(*args, **kwargs):
        for site in guide.sites:
            point = guide.transforms[site.name](guide.loc[site.key])
            pyro.sample(site.name, dist.Delta(point, event_dim=site.event_dim))
    return reference


def _seeded_loss_and_grads(elbo, model, guide, params, data, seed=3):
    pyro.set_rng_seed(seed)
    with scale_global_sites(0.25, plate_nesting=1):
        loss = elbo(max_plate_nesting=1).differentiable_loss(model, guide, **data)
    return loss, torch.autograd.grad(loss, params)


def _classification_net(seed=0):
    torch.manual_seed(seed)
    return mlp([4, 6, 5, 3])


def _classification_data(n: int) -> dict:
    labels = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(2))
    return {"x": _randn(n, 4, seed=1), "y": labels}


@pytest.mark.parametrize("prior", ["normal", "fan_in", "hierarchical"])
@pytest.mark.parametrize("elbo", [TraceMeanField_ELBO, Trace_ELBO])
@pytest.mark.parametrize("batch", [16, 7])  # a full and a smaller last minibatch
def test_mean_field_step_equals_the_stock_pyro_computation(prior, elbo, batch):
    net = _classification_net()
    model = BayesianNeuralNetwork(net, (4,), likelihood="categorical", prior=prior, prior_scale=0.7)
    guide = MeanFieldGuide(model)
    _set_scales(guide, 0.2)
    data, params = _classification_data(batch), list(guide.parameters())
    fast = _seeded_loss_and_grads(elbo, model, guide, params, data)
    reference = _reference_model(net, prior, 0.7), _reference_mean_field(guide)
    slow = _seeded_loss_and_grads(elbo, *reference, params, data)
    torch.testing.assert_close(fast[0], slow[0])
    for fast_grad, slow_grad in zip(fast[1], slow[1], strict=True):
        torch.testing.assert_close(fast_grad, slow_grad)
    # the seed matters (a sampled loss), so agreeing is not agreeing on a constant
    other = _seeded_loss_and_grads(elbo, model, guide, params, data, seed=4)
    assert not torch.allclose(other[0], fast[0])


@pytest.mark.parametrize("prior", ["normal", "hierarchical"])
def test_map_step_equals_the_stock_pyro_computation(prior):
    net = _classification_net()
    model = BayesianNeuralNetwork(net, (4,), likelihood="categorical", prior=prior, prior_scale=0.7)
    guide = MAPGuide(model)
    data, params = _classification_data(9), list(guide.parameters())
    fast = _seeded_loss_and_grads(Trace_ELBO, model, guide, params, data)
    reference = _reference_model(net, prior, 0.7), _reference_map(guide)
    slow = _seeded_loss_and_grads(Trace_ELBO, *reference, params, data)
    torch.testing.assert_close(fast[0], slow[0])
    for fast_grad, slow_grad in zip(fast[1], slow[1], strict=True):
        torch.testing.assert_close(fast_grad, slow_grad)


def test_fixed_scale_prior_density_and_kl_equal_the_expanded_normal():
    """The fixed-scale path (a Python-number scale: constants in Python) against torch's own
    expanded Normal, also after Pyro expands the prior for two vectorized particles."""
    loc, scale = _randn(5, 3, seed=1), F.softplus(_randn(5, 3, seed=2))
    prior = IsotropicNormal(0.7, (5, 3))
    expanded = dist.Normal(torch.zeros(5, 3), 0.7).to_event(2)
    w = _randn(2, 1, 5, 3, seed=3)
    torch.testing.assert_close(prior.log_prob(w), expanded.log_prob(w))
    torch.testing.assert_close(prior.expand((2, 1)).log_prob(w[:, :, :]), expanded.expand((2, 1)).log_prob(w))
    q = dist.Normal(loc, scale).to_event(2)
    torch.testing.assert_close(kl_divergence(q, prior), kl_divergence(q, expanded))
    assert kl_divergence(q.expand((2, 1)), prior.expand((2, 1))).shape == (2, 1)


def test_diagonal_normal_density_at_its_own_draw_and_elsewhere():
    from bayeszoo.guides.mean_field import DiagonalNormal

    loc, scale = _randn(4, 3, seed=1), F.softplus(_randn(4, 3, seed=2))
    q, stock = DiagonalNormal(dist.Normal(loc, scale), 2), dist.Normal(loc, scale).to_event(2)
    pyro.set_rng_seed(5)
    draw = q.rsample()
    pyro.set_rng_seed(5)
    torch.testing.assert_close(draw, stock.rsample(), rtol=0, atol=0)  # the same random numbers
    torch.testing.assert_close(q.log_prob(draw), stock.log_prob(draw))
    other = draw + 0.5
    torch.testing.assert_close(q.log_prob(other), stock.log_prob(other))
    assert q.rsample((3,)).shape == (3, 4, 3)


def test_point_mass_is_its_own_draw_with_density_one():
    from bayeszoo.guides.weights import PointMass

    v = _randn(4, 3)
    q = PointMass(v, event_dim=2)
    assert q.rsample() is v
    assert q.log_prob(v) == 0
    assert q.log_prob(v + 1) == -math.inf
    assert q.rsample((2,)).shape == (2, 4, 3)


def test_layers_skip_the_effect_stack_only_when_no_handler_listens():
    from bayeszoo.models import bnn

    calls = []

    class Watch(pyro.poutine.messenger.Messenger):
        def _pyro_linear(self, msg):
            calls.append(msg["name"])

    model = BayesianNeuralNetwork(mlp([2, 3, 1]), (2,), noise=0.5)
    x = _randn(4, 2)
    assert not bnn.handled("linear")
    with Watch():
        assert bnn.handled("linear")
        model(x)
    assert calls == ["net.0.weight", "net.2.weight"]
