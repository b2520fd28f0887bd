"""Models broadcast over sample dimensions; guides define the densities they claim."""

import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO

from bayeszoo.guides.amortized import (
    AmortizedDelta,
    AmortizedNormal,
    AmortizedRank1Normal,
    Rank1PrecisionNormal,
)
from bayeszoo.inference.evaluate import importance_sampling
from bayeszoo.models.ppca import PPCA
from bayeszoo.models.vae import VAE, ConditionalVAE, DeepLatentGaussianModel, label_inputs, quadrant_inputs

D = 16


def _models():
    return {
        "vae": (VAE(D, z_dim=3, hidden=(8,)), lambda x: {"x": x}),
        "vae-gaussian": (VAE(D, z_dim=3, hidden=(8,), likelihood="gaussian"), lambda x: {"x": x}),
        "cvae-label": (ConditionalVAE(D, 10, z_dim=3, hidden=(8,)),
                       lambda x: label_inputs(x, torch.arange(len(x)) % 10, 10)),
        "cvae-quadrant": (ConditionalVAE(D, D, z_dim=3, hidden=(8,)),
                          lambda x: quadrant_inputs(x, (4, 4))),
        "dlgm": (DeepLatentGaussianModel(D, z_dims=(4, 3, 2), hidden=8), lambda x: {"x": x}),
        "ppca": (PPCA(D, 3), lambda x: {"x": x}),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_models_broadcast_over_vectorized_particles(name):
    model, inputs = _models()[name]
    guide = AmortizedNormal(model, hidden=(8,))
    data = inputs(torch.bernoulli(torch.full((5, D), 0.4)))
    vectorized = Trace_ELBO(num_particles=7, vectorize_particles=True, max_plate_nesting=1)
    assert torch.isfinite(torch.as_tensor(vectorized.loss(model, guide, **data)))
    samples = Predictive(model, guide=guide, num_samples=7, parallel=True)(**data)
    for site in model.latent_sites:
        assert samples[site].shape == (7, 5, model.latent_sites[site])
    weights = importance_sampling(model, guide, data, num_samples=6, chunk_size=4)
    assert weights["log_likelihood"].shape == (5,)


def test_dlgm_follows_the_generative_story():
    """h_L = G_L xi_L, h_l = T_l(h_{l+1}) + G_l xi_l, x ~ p(x | T_0(h_1))."""
    model = DeepLatentGaussianModel(D, z_dims=(4, 3), hidden=8)
    xi = {"xi_2": torch.randn(5, 3), "xi_1": torch.randn(5, 4)}
    trace = poutine.trace(poutine.condition(model, data=xi)).get_trace(batch_size=5)
    h2 = model.G[1](xi["xi_2"])
    h1 = model.T[0](h2) + model.G[0](xi["xi_1"])
    expected = torch.sigmoid(model.T0(h1))
    torch.testing.assert_close(trace.nodes["x"]["fn"].mean, expected)
    assert list(model.latent_sites) == ["xi_2", "xi_1"]


def test_quadrant_inputs_hide_three_quadrants():
    x = torch.arange(16.0).reshape(1, 16) / 16
    inputs = quadrant_inputs(x, (4, 4), observed=1)  # top-right
    grid = inputs["c"].reshape(4, 4)
    assert torch.equal(grid[:2, 2:], x.reshape(4, 4)[:2, 2:])
    assert (grid[2:, :] == -1).all() and (grid[:2, :2] == -1).all()
    assert inputs["x_mask"].sum() == 12


def test_masked_likelihood_ignores_observed_pixels():
    model = ConditionalVAE(D, D, z_dim=3, hidden=(8,))
    x = torch.bernoulli(torch.full((4, D), 0.5))
    inputs = quadrant_inputs(x, (4, 4))
    changed = dict(inputs, x=torch.where(inputs["x_mask"], x, 1 - x))  # flip the observed pixels
    z = {"z": torch.randn(4, 3)}
    log_p = [poutine.trace(poutine.condition(model, data=z)).get_trace(**batch)
             .nodes["x"]["fn"].log_prob(batch["x"]) for batch in (inputs, changed)]
    torch.testing.assert_close(log_p[0], log_p[1])


def test_rank1_precision_normal_matches_multivariate_normal():
    torch.manual_seed(0)
    loc, diag, u = torch.randn(3, 4), torch.rand(3, 4) + 0.5, torch.randn(3, 4)
    q = Rank1PrecisionNormal(loc, diag, u)
    precision = torch.diag_embed(diag) + u[..., None] * u[..., None, :]
    reference = dist.MultivariateNormal(loc, precision_matrix=precision)
    z = torch.randn(5, 3, 4)
    torch.testing.assert_close(q.log_prob(z), reference.log_prob(z), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.covariance_matrix, reference.covariance_matrix, atol=1e-5, rtol=1e-5)
    draws = q.rsample((100_000,))
    empirical = torch.einsum("nbi,nbj->bij", draws - loc, draws - loc) / len(draws)
    torch.testing.assert_close(empirical, reference.covariance_matrix, atol=0.03, rtol=0.03)


def test_delta_guide_masks_inputs_only_while_training():
    model = VAE(D, z_dim=3, hidden=(8,))
    guide = AmortizedDelta(model, hidden=(8,), masking_noise=0.5)
    x = torch.ones(200, D)
    guide.train()
    noisy = guide.site_distributions(x)["z"].mean
    guide.eval()
    clean = guide.site_distributions(x)["z"].mean
    assert not torch.allclose(noisy, clean)
    assert torch.equal(clean, guide.site_distributions(x)["z"].mean)
    with pytest.raises(ValueError, match="masking_noise"):
        AmortizedDelta(model, masking_noise=1.0)


def test_rank1_guide_has_its_own_posterior_per_site():
    model = DeepLatentGaussianModel(D, z_dims=(4, 3), hidden=8)
    guide = AmortizedRank1Normal(model, hidden=(8,))
    posteriors = guide.site_distributions(torch.rand(5, D))
    assert {name: q.event_shape[0] for name, q in posteriors.items()} == {"xi_2": 3, "xi_1": 4}
