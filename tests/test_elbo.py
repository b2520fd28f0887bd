"""ClosedFormKL_ELBO is TraceMeanField_ELBO's estimator: the same losses and gradients, bit for bit,
for every pair the mean-field trainers build, with less computed."""

import contextlib

import pyro
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from bayeszoo.guides.mean_field import MeanFieldGuide
from bayeszoo.guides.reparameterization import flipout, local_reparameterization
from bayeszoo.inference.elbo import ClosedFormKL_ELBO
from bayeszoo.inference.svi import scale_global_sites
from bayeszoo.models.bnn import BayesianNeuralNetwork
from bayeszoo.models.nn import mlp


def _data(n=30, d=3, classes=None):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=generator)
    y = torch.randint(classes, (n,), generator=generator) if classes else x.sum(-1).sin()
    return {"x": x, "y": y}


def _pair(classification: bool, prior: str, noise):
    torch.manual_seed(0)
    if classification:
        model = BayesianNeuralNetwork(mlp([3, 8, 4]), (3,), likelihood="categorical", prior=prior)
    else:
        model = BayesianNeuralNetwork(mlp([3, 8, 1]), (3,), prior=prior, noise=noise)
    guide = MeanFieldGuide(model, init_scale=0.2)
    return model, guide


def _loss_and_gradients(elbo, model, guide, data, handler, seed, validate=False):
    pyro.set_rng_seed(seed)
    for p in guide.parameters():
        p.grad = None
    with pyro.validation_enabled(validate), handler(), scale_global_sites(0.5, 1):
        loss = elbo.differentiable_loss(model, guide, **data)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in guide.parameters()]


PAIRS = [  # (classification, prior, noise): the last two have sites with no closed-form KL
    (True, "normal", None),
    (False, "fan_in", 0.3),
    (False, "normal", "prior"),        # the noise scale: a HalfNormal, its guide a pushed-forward Normal
    (True, "hierarchical", None),      # a HalfNormal scale per layer
]


@pytest.mark.parametrize("handler", [contextlib.nullcontext, local_reparameterization, flipout],
                         ids=["meanfield", "lrt", "flipout"])
@pytest.mark.parametrize("classification, prior, noise", PAIRS)
@pytest.mark.parametrize("particles", [1, 3])
def test_same_loss_and_gradients_as_trace_mean_field_elbo(handler, classification, prior, noise, particles):
    data = _data(classes=4 if classification else None)
    model, guide = _pair(classification, prior, noise)
    options = {"num_particles": particles, "vectorize_particles": particles > 1, "max_plate_nesting": 1}
    for seed in range(3):
        expected = _loss_and_gradients(TraceMeanField_ELBO(**options), model, guide, data, handler, seed)
        got = _loss_and_gradients(ClosedFormKL_ELBO(**options), model, guide, data, handler, seed)
        assert torch.equal(got[0], expected[0])
        assert all(torch.equal(a, b) for a, b in zip(got[1], expected[1], strict=True))


def test_with_validation_on_it_is_still_the_same_and_checks_shapes():
    data = _data()
    model, guide = _pair(False, "normal", "prior")
    expected = _loss_and_gradients(TraceMeanField_ELBO(max_plate_nesting=1), model, guide, data,
                                   contextlib.nullcontext, 0, validate=True)
    got = _loss_and_gradients(ClosedFormKL_ELBO(max_plate_nesting=1), model, guide, data,
                              contextlib.nullcontext, 0, validate=True)
    assert torch.equal(got[0], expected[0])
    bad = {"x": data["x"], "y": data["y"][:-1]}  # one label short: Pyro's checks must still see it
    with pytest.raises(ValueError), pyro.validation_enabled(True):
        ClosedFormKL_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, **bad)


def test_it_computes_no_density_the_closed_form_kl_replaces():
    data = _data()
    model, guide = _pair(False, "normal", "prior")
    elbo = ClosedFormKL_ELBO(max_plate_nesting=1)
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(False):
        model_trace, guide_trace = elbo._get_trace(model, guide, (), data)
        elbo._differentiable_loss_particle(model_trace, guide_trace)
    computed = {name for name, site in model_trace.nodes.items()
                if site["type"] == "sample" and "log_prob_sum" in site}
    latent = {name for name, site in model_trace.nodes.items()
              if site["type"] == "sample" and not site["is_observed"]}
    observed = {name for name, site in model_trace.nodes.items() if site["type"] == "sample"} - latent
    assert {"y", "net.0.weight", "noise_scale"} <= observed | latent
    # the likelihood (and deterministic sites), and the one latent site without a closed-form KL
    assert computed == observed | {"noise_scale"}
    scored = {name for name, site in guide_trace.nodes.items() if "score_parts" in site}
    assert scored == {"noise_scale"}
