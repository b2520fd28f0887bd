"""Tests for the state-space family: the Kalman filter and RTS smoother against brute-force joint
Gaussians and Pyro's GaussianHMM, the Pyro model against the same densities, masks and padding,
the structured inference networks against the exact posterior of a linear-Gaussian model, forecasting,
the Nile local-level MLE of Durbin & Koopman, and the JSB chorales loader on a tiny file."""

import math
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from bayeszoo.guides.dkf import StructuredInferenceNetwork, reverse_within_lengths, structure_names
from bayeszoo.inference.evaluate import importance_sampling
from bayeszoo.inference.sequences import (
    check_sequence_split,
    krishnan_linear_model,
    linear_gaussian_dataset,
    load_jsb_chorales,
    load_nile,
    load_sequence_dataset,
    pad_sequences,
    pendulum_dataset,
    per_step,
    piano_roll,
)
from bayeszoo.inference.svi import evaluate_elbo, fit
from bayeszoo.models.dkf import DeepMarkovModel, LinearGaussianSSM, local_level_model, sequence_lengths


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)


def _random_cov(k: int, generator: torch.Generator) -> torch.Tensor:
    M = torch.randn(k, k, generator=generator, dtype=torch.float64)
    return M @ M.T + 0.5 * torch.eye(k, dtype=torch.float64)


def random_lgssm(x_dim=3, z_dim=2, u_dim=1, seed=0) -> LinearGaussianSSM:
    """A float64 linear-Gaussian SSM with every parameter random (controls and offsets included)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    model = LinearGaussianSSM(x_dim, z_dim, u_dim).double()
    return model.set_parameters(A=0.5 * r(z_dim, z_dim), B=r(z_dim, u_dim), b=r(z_dim), C=r(x_dim, z_dim),
                                d=r(x_dim), mu_0=r(z_dim), Sigma_0=_random_cov(z_dim, g),
                                Q=_random_cov(z_dim, g), R=_random_cov(x_dim, g))


def joint_gaussian(model: LinearGaussianSSM, num_steps: int, u: torch.Tensor | None):
    """Brute force: the mean and covariance of the stacked (z_1..z_T) and (x_1..x_T), built
    from z = M w + c with w the stacked noises (z_1 - mu_0, process noise), per sequence."""
    Z, N = model.z_dim, u.shape[0]
    n = num_steps * Z
    M = torch.zeros(N, n, n, dtype=torch.float64)
    c = torch.zeros(N, n, dtype=torch.float64)
    for t in range(num_steps):
        now = slice(t * Z, (t + 1) * Z)
        if t == 0:
            M[:, now, now] = torch.eye(Z, dtype=torch.float64)
            c[:, now] = model.mu_0
        else:
            before = slice((t - 1) * Z, t * Z)
            M[:, now] = model.A @ M[:, before]
            M[:, now, now] += torch.eye(Z, dtype=torch.float64)
            c[:, now] = c[:, before] @ model.A.T + model.b + u[:, t - 1] @ model.B.T
    noise = torch.block_diag(model.Sigma_0, *[model.Q] * (num_steps - 1))
    z_cov = M @ noise @ M.transpose(-1, -2)
    C = torch.block_diag(*[model.C] * num_steps)
    x_mean = c @ C.T + model.d.repeat(num_steps)
    x_cov = C @ z_cov @ C.T + torch.block_diag(*[model.R] * num_steps)
    return c, z_cov, x_mean, x_cov, C


# ----------------------------------------------------------------------------------------------
# The exact oracle: Kalman filter and RTS smoother


@torch.no_grad()
def test_kalman_log_likelihood_matches_brute_force_joint_gaussian():
    model = random_lgssm()
    u = torch.randn(4, 5, 1, dtype=torch.float64)
    _, x = model.simulate(4, 5, u=u)
    _, _, x_mean, x_cov, _ = joint_gaussian(model, 5, u)
    exact = dist.MultivariateNormal(x_mean, x_cov).log_prob(x.reshape(4, -1))
    assert torch.allclose(model.log_likelihood(x, u=u), exact, atol=1e-9, rtol=0)


@torch.no_grad()
def test_kalman_log_likelihood_matches_pyro_gaussian_hmm():
    """GaussianHMM's initial distribution is over z_0 and its first observation comes from z_1, so
    the first transition is given a zero matrix and the noise N(mu_0, Sigma_0): z_1 ~ N(mu_0, Sigma_0)."""
    model = random_lgssm(u_dim=0, seed=1)
    T, Z = 6, model.z_dim
    _, x = model.simulate(3, T)
    transition_matrix = torch.cat([torch.zeros(1, Z, Z, dtype=torch.float64), model.A.T.expand(T - 1, Z, Z)])
    transition_dist = dist.MultivariateNormal(torch.cat([model.mu_0[None], model.b.expand(T - 1, Z)]),
                                              torch.cat([model.Sigma_0[None], model.Q.expand(T - 1, Z, Z)]))
    eye = torch.eye(Z, dtype=torch.float64)
    initial_dist = dist.MultivariateNormal(torch.zeros(Z, dtype=torch.float64), eye)  # integrated out
    hmm = dist.GaussianHMM(initial_dist, transition_matrix, transition_dist, model.C.T,
                           dist.MultivariateNormal(model.d, model.R))
    assert torch.allclose(model.log_likelihood(x), hmm.log_prob(x), atol=1e-9, rtol=0)


@torch.no_grad()
def test_rts_smoother_matches_brute_force_posterior():
    model = random_lgssm(seed=2)
    N, T, Z = 3, 5, model.z_dim
    u = torch.randn(N, T, 1, dtype=torch.float64)
    _, x = model.simulate(N, T, u=u)
    z_mean, z_cov, x_mean, x_cov, C = joint_gaussian(model, T, u)
    gain = z_cov @ C.T @ torch.linalg.inv(x_cov)
    post_mean = z_mean + (gain @ (x.reshape(N, -1) - x_mean).unsqueeze(-1)).squeeze(-1)
    post_cov = z_cov - gain @ C @ z_cov
    means, covs = model.smooth(x, u=u)
    assert torch.allclose(means.reshape(N, -1), post_mean, atol=1e-9)
    for t in range(T):
        block = slice(t * Z, (t + 1) * Z)
        assert torch.allclose(covs[:, t], post_cov[:, block, block], atol=1e-9)
    # The filter at the last step is the smoother there; at step t it conditions on x_{1:t} only.
    result = model.filter(x, u=u)
    assert torch.allclose(result.filtered_means[:, -1], means[:, -1])
    _, z_cov2, x_mean2, x_cov2, C2 = joint_gaussian(model, 2, u)
    gain2 = z_cov2 @ C2.T @ torch.linalg.inv(x_cov2)
    filtered_2 = (z_mean[:, :2 * Z] + (gain2 @ (x[:, :2].reshape(N, -1) - x_mean2).unsqueeze(-1)).squeeze(-1))
    assert torch.allclose(result.filtered_means[:, 1], filtered_2[:, Z:], atol=1e-9)


@torch.no_grad()
def test_padding_and_missing_steps():
    """Padding at the end (with any values) never changes a sequence's log-likelihood or its
    posterior; a masked step in the middle is a missing observation: the likelihood is the
    marginal of the observed steps."""
    model = random_lgssm(seed=3)
    u = torch.randn(3, 7, 1, dtype=torch.float64)
    _, x = model.simulate(3, 7, u=u)
    lengths = [7, 4, 2]
    mask = torch.arange(7) < torch.tensor(lengths)[:, None]
    garbage = torch.where(mask[..., None], x, 1e3 * torch.randn_like(x))
    padded = model.log_likelihood(garbage, mask, u)
    means, _ = model.smooth(garbage, mask, u)
    for i, L in enumerate(lengths):
        alone = model.log_likelihood(x[i:i + 1, :L], u=u[i:i + 1, :L])
        assert torch.allclose(padded[i], alone[0], atol=1e-9)
        assert torch.allclose(means[i, :L], model.smooth(x[i:i + 1, :L], u=u[i:i + 1, :L])[0][0], atol=1e-9)
    holes = torch.ones(3, 7, dtype=torch.bool)
    holes[:, [1, 4]] = False
    _, _, x_mean, x_cov, _ = joint_gaussian(model, 7, u)
    keep = holes[0].repeat_interleave(model.x_dim)
    marginal = dist.MultivariateNormal(x_mean[:, keep], x_cov[:, keep][:, :, keep])
    assert torch.allclose(model.log_likelihood(x, holes, u), marginal.log_prob(x.reshape(3, -1)[:, keep]),
                          atol=1e-9)


@torch.no_grad()
def test_pyro_model_is_the_same_joint_density():
    """log p(x, z) from the Pyro model's trace equals log p(x) (Kalman) + log p(z | x) (brute force),
    masked steps included: they contribute neither their x_t nor their z_t."""
    model = random_lgssm(seed=4)
    N, T = 2, 4
    u = torch.randn(N, T, 1, dtype=torch.float64)
    z, x = model.simulate(N, T, u=u)
    z_mean, z_cov, x_mean, x_cov, C = joint_gaussian(model, T, u)
    gain = z_cov @ C.T @ torch.linalg.inv(x_cov)
    posterior_mean = z_mean + (gain @ (x.reshape(N, -1) - x_mean).unsqueeze(-1)).squeeze(-1)
    posterior = dist.MultivariateNormal(posterior_mean, z_cov - gain @ C @ z_cov)
    states = {f"z_{t + 1}": z[:, t] for t in range(T)}
    trace = poutine.trace(poutine.condition(model, data=states)).get_trace(x=x, u=u)
    assert torch.allclose(trace.log_prob_sum(), (model.log_likelihood(x, u=u) + posterior.log_prob(
        z.reshape(N, -1))).sum(), atol=1e-9)
    mask = torch.tensor([[True] * T, [True, True, False, False]])
    masked = poutine.trace(poutine.condition(model, data=states)).get_trace(x=x, mask=mask, u=u)
    first_two = {f"z_{t + 1}": z[1:, t] for t in range(2)}
    short = poutine.trace(poutine.condition(model, data=first_two)).get_trace(x=x[1:, :2], u=u[1:, :2])
    masked.compute_log_prob()
    assert torch.allclose(sum(site["log_prob"][1] for site in masked.nodes.values()
                              if site["type"] == "sample" and site["name"] not in ("sequences",)),
                          short.log_prob_sum(), atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Forecasting


@torch.no_grad()
def test_exact_forecast_matches_rollouts_and_respects_lengths():
    model = random_lgssm(seed=5)
    N, T, K = 3, 6, 4
    u = torch.randn(N, T + K, 1, dtype=torch.float64)
    _, x = model.simulate(N, T, u=u[:, :T])
    mask = torch.arange(T) < torch.tensor([6, 4, 5])[:, None]
    forecast = model.forecast(x, mask, u, num_steps=K)
    assert forecast.x_means.shape == (N, K, model.x_dim) and forecast.z_covs.shape == (N, K, 2, 2)
    # the second sequence forecasts from its own last step (4): as if it were never padded
    alone = model.forecast(x[1:2, :4], u=u[1:2, :4 + K], num_steps=K)
    assert torch.allclose(forecast.x_means[1], alone.x_means[0]) and torch.allclose(forecast.x_covs[1],
                                                                                    alone.x_covs[0])
    # Monte Carlo: sample z_L from the exact filter, roll the model forward, compare the moments.
    mean, cov = model.last_state(x, mask, u[:, :T])
    z_last = dist.MultivariateNormal(mean, cov).sample((20000,))
    lengths = sequence_lengths(mask)
    u_future = torch.stack([u[i, lengths[i] - 1:lengths[i] - 1 + K] for i in range(N)])
    _, emissions = model.rollout(z_last, K, u_future)
    x_samples = emissions.sample()
    assert torch.allclose(x_samples.mean(0), forecast.x_means, atol=0.1 * forecast.x_covs.diagonal(
        dim1=-2, dim2=-1).sqrt().max().item())
    sample_var = x_samples.var(0)
    assert torch.allclose(sample_var, forecast.x_covs.diagonal(dim1=-2, dim2=-1), rtol=0.06)


def test_deep_markov_model_generates_scores_and_rolls_out():
    model = DeepMarkovModel(x_dim=5, z_dim=3, u_dim=2, transition_hidden=8, emission_hidden=(8,))
    u = torch.randn(4, 6, 2)
    z, x = model.simulate(4, 6, u=u)
    assert z.shape == (4, 6, 3) and x.shape == (4, 6, 5) and set(x.unique().tolist()) <= {0.0, 1.0}
    trace = poutine.trace(model).get_trace(x=x, u=u)
    assert [name for name in trace.nodes if name.startswith("z_")] == [f"z_{t}" for t in range(1, 7)]
    assert trace.nodes["x"]["fn"].event_shape == (6, 5)
    future, emissions = model.rollout(z[:, -1].expand(10, 4, 3), num_steps=3, u=torch.randn(4, 3, 2))
    assert future.shape == (10, 4, 3, 3) and emissions.batch_shape == (10, 4, 3)
    gaussian = DeepMarkovModel(x_dim=2, z_dim=2, emission="gaussian", transition_hidden=8,
                               emission_hidden=(8,))
    assert gaussian.simulate(3, 4)[1].dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Guides: structure, masks, particles


def _tiny_dmm_batch():
    model = DeepMarkovModel(x_dim=4, z_dim=2, u_dim=1, transition_hidden=8, emission_hidden=(8,))
    u = torch.randn(3, 6, 1)
    _, x = model.simulate(3, 6, u=u)
    mask = torch.arange(6) < torch.tensor([6, 3, 5])[:, None]
    return model, x, mask, u


@pytest.mark.parametrize("structure", structure_names())
def test_every_guide_runs_with_particles_masks_controls(structure):
    model, x, mask, u = _tiny_dmm_batch()
    guide = StructuredInferenceNetwork(model, structure, rnn_dim=8, num_iafs=1 if structure == "st-lr" else 0,
                                       iaf_dim=8)
    scores = importance_sampling(model, guide, {"x": x, "mask": mask, "u": u}, num_samples=7)
    for name in ("log_likelihood", "elbo", "kl"):
        assert scores[name].shape == (3,) and torch.isfinite(scores[name]).all()
    assert scores["khat"].isnan().all()  # K = 7 is too few for a Pareto fit
    assert guide.sample_states(x, mask, u, num_samples=5).shape == (5, 3, 6, 2)
    assert guide.last_state(x, mask, u, num_samples=5).shape == (5, 3, 2)


@pytest.mark.parametrize("structure", structure_names())
def test_padding_does_not_change_the_guide(structure):
    """A sequence padded at the end (with any values) gets the RNN summaries, and under the same
    random numbers the draws, of the unpadded sequence: the backward RNN starts at its own end."""
    model, x, mask, u = _tiny_dmm_batch()
    guide = StructuredInferenceNetwork(model, structure, rnn_dim=8)
    garbage = torch.where(mask[..., None], x, torch.rand_like(x))
    summaries = guide.nets.summaries(garbage, mask, u)[0]
    for i, L in enumerate(sequence_lengths(mask).tolist()):
        one = slice(i, i + 1)
        alone = guide.nets.summaries(x[one, :L], torch.ones(1, L, dtype=torch.bool), u[one, :L])[0]
        assert torch.allclose(summaries[i, :L], alone[0], atol=1e-5)
        torch.manual_seed(1)
        padded_draws = guide.sample_states(garbage[one], mask[one], u[one], num_samples=4)
        torch.manual_seed(1)
        alone_draws = guide.sample_states(x[one, :L], None, u[one, :L], num_samples=4)
        assert torch.allclose(padded_draws[:, :, :L], alone_draws, atol=1e-5)


@pytest.mark.parametrize("structure,filters", [("mf-l", True), ("st-l", True), ("st-r", False),
                                               ("mf-lr", False), ("st-lr", False)])
def test_filter_guides_ignore_the_future(structure, filters):
    """q(z_1..z_t) of MF-L and ST-L depends on x_{1:t} only: changing x_{t+1:T} leaves the
    draws for steps <= t unchanged under the same random numbers (the others do look ahead)."""
    model, x, _, u = _tiny_dmm_batch()
    guide = StructuredInferenceNetwork(model, structure, rnn_dim=8)
    changed = x.clone()
    changed[:, 3:] = 1 - changed[:, 3:]
    torch.manual_seed(2)
    before = guide.sample_states(x, None, u, num_samples=3)
    torch.manual_seed(2)
    after = guide.sample_states(changed, None, u, num_samples=3)
    assert torch.allclose(before[:, :, :3], after[:, :, :3]) == filters


def test_reverse_within_lengths_is_an_involution():
    values = torch.arange(12.0).view(2, 6, 1)
    lengths = torch.tensor([6, 4])
    flipped = reverse_within_lengths(values, lengths)
    assert flipped[1, :, 0].tolist() == [9.0, 8.0, 7.0, 6.0, 10.0, 11.0]
    assert torch.equal(reverse_within_lengths(flipped, lengths), values)


def test_iaf_log_prob_is_that_of_the_flow():
    model, x, mask, u = _tiny_dmm_batch()
    guide = StructuredInferenceNetwork(model, "dks", rnn_dim=8, num_iafs=2, iaf_dim=8)
    summary, count = guide.nets.summaries(x, mask, u)
    q = guide.nets.conditional(torch.randn(3, 2), u[:, 0], summary[:, 1], count)
    z = q.rsample()
    flow = dist.TransformedDistribution(q.base, list(q.transforms))
    assert torch.allclose(q.log_prob(z), flow.log_prob(z), atol=1e-4)


def test_bad_inputs_fail_clearly():
    model = DeepMarkovModel(x_dim=4, z_dim=2, transition_hidden=8, emission_hidden=(8,))
    with pytest.raises(ValueError, match="unknown inference network"):
        StructuredInferenceNetwork(model, "st-x")
    with pytest.raises(ValueError, match="shape"):
        model(x=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="trailing size 4"):
        model(x=torch.zeros(3, 5, 2))
    with pytest.raises(ValueError, match="mask"):
        model(x=torch.zeros(3, 5, 4), mask=torch.ones(3, 4))
    with pytest.raises(ValueError, match="no control inputs"):
        model(x=torch.zeros(3, 5, 4), u=torch.zeros(3, 5, 1))
    with pytest.raises(ValueError, match="prefix"):
        check_sequence_split({"x": torch.zeros(2, 3, 4), "mask": torch.tensor([[1, 0, 1], [1, 1, 1]])})
    with pytest.raises(ValueError, match="NaN"):
        check_sequence_split({"x": torch.full((2, 3, 4), float("nan"))})
    with pytest.raises(ValueError, match="unknown parameter"):
        LinearGaussianSSM(1, 1).set_parameters(F=1.0)


# ----------------------------------------------------------------------------------------------
# Learning: linear inference networks against the exact posterior of a fixed linear-Gaussian model


def oracle_model() -> LinearGaussianSSM:
    """A 1-D stationary latent seen through 2 noisy channels. The latent is 1-D because the
    guides' q(z_t | z_{t-1}, ...) are diagonal Gaussians: in 1-D the structured families contain
    the exact conditionals p(z_t | z_{t-1}, x_{t:T}); in more dimensions these have full covariances."""
    model = LinearGaussianSSM(x_dim=2, z_dim=1)
    model.set_parameters(A=0.9, Q=0.19, Sigma_0=1.0, C=torch.tensor([[1.0], [0.5]]), R=0.5)
    return model.requires_grad_(False)


@torch.no_grad()
def optimal_filter_guide_means(model: LinearGaussianSSM, x: torch.Tensor) -> torch.Tensor:
    """E_q[z_t] for the ELBO-optimal ST-L guide q(z_t | z_{t-1}, x_{1:t}) of a linear-Gaussian model.

    The exact conditional is p(z_t | z_{t-1}, x_{t:T}) = N(alpha_t z_{t-1} + sum_{s>=t} gamma_ts x_s, .),
    alpha_t = (Q^-1 + J_t)^-1 Q^-1 A with J_t the information x_{t:T} carries about z_t. The ELBO
    averaged over data wants q's mean to be the regression of that mean on (z_{t-1}, x_{1:t}): the
    future x_s are replaced by their prediction from x_{1:t}. Taking expectations under q and using
    the tower rule for the filter m^f_t = E[z_t | x_{1:t}] gives

        E_q[z_t] - m^f_t = alpha_t (E_q[z_{t-1}] - E[z_{t-1} | x_{1:t}]),      E_q[z_1] = m^f_1,

    so ST-L is a filter (E_q[z_t] depends on x_{1:t} only) but not the Kalman filter: it is off by the
    lag-one smoothing corrections, carried forward by alpha_t.
    """
    model = model.double()
    x = x.double()
    A, Q, C, R = model.A, model.Q, model.C, model.R
    T = x.shape[1]
    observed = C.T @ torch.linalg.inv(R) @ C  # J_T; then J_t = C^T R^-1 C + A^T (Q + J_{t+1}^-1)^-1 A
    info = [observed]
    for _ in range(T - 1):
        info.insert(0, observed + A.T @ torch.linalg.inv(Q + torch.linalg.inv(info[0])) @ A)
    alpha = [torch.linalg.inv(torch.linalg.inv(Q) + J) @ torch.linalg.inv(Q) @ A for J in info]
    filtered = model.filter(x).filtered_means
    means = [filtered[:, 0]]
    for t in range(1, T):
        lag_one = model.smooth(x[:, :t + 1])[0][:, t - 1]
        means.append(filtered[:, t] + (means[-1] - lag_one) @ alpha[t].T)
    model.float()
    return torch.stack(means, 1).float()


def _rmse(a, b) -> float:
    return (a - b).pow(2).mean().sqrt().item()


@pytest.fixture(scope="module")
def trained_linear_guides():
    """ST-LR, ST-L and MF-L with linear networks, trained (only they) by ``fit`` against the fixed model."""
    model = oracle_model()
    T = 8
    with torch.random.fork_rng():
        torch.manual_seed(0)
        train = {"x": model.simulate(1000, T)[1]}
        z_test, x_test = model.simulate(500, T)
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only add contention
    for structure in ("st-lr", "st-l", "mf-l"):
        pyro.set_rng_seed(0)  # the initial weights too: the result must not depend on the tests run before
        guide = StructuredInferenceNetwork(model, structure, rnn_dim=8, linear=True)
        fit(model, guide, train, epochs=40, batch_size=250, lr=0.03, lr_decay=0.93, num_particles=4,
            progress=False, seed=0)
        with torch.random.fork_rng():
            torch.manual_seed(1)
            elbo = evaluate_elbo(model, guide, {"x": x_test}, num_particles=16)
            means, _ = guide.posterior_moments(x_test, num_samples=2000)
        results[structure] = {"elbo": elbo, "means": means}
    torch.set_num_threads(threads)
    with torch.no_grad():
        exact = {"log_likelihood": model.log_likelihood(x_test).mean().item(),
                 "smoothed": model.smooth(x_test)[0], "filtered": model.filter(x_test).filtered_means,
                 "optimal_st_l": optimal_filter_guide_means(model, x_test), "states": z_test}
    return results, exact, T


def test_st_lr_reaches_the_exact_likelihood_and_the_smoother(trained_linear_guides):
    results, exact, T = trained_linear_guides
    gap = exact["log_likelihood"] - results["st-lr"]["elbo"]
    assert 0 <= gap < 0.01 * abs(exact["log_likelihood"]), f"ELBO gap {gap / T:.4f} nats per step"
    # posterior means: much closer to the RTS smoother than the smoother is to the filter
    smoother_to_filter = _rmse(exact["filtered"], exact["smoothed"])
    assert _rmse(results["st-lr"]["means"], exact["smoothed"]) < 0.5 * smoother_to_filter


def test_st_l_is_a_filter_at_the_elbo_optimum(trained_linear_guides):
    results, exact, _ = trained_linear_guides
    means = results["st-l"]["means"]
    to_optimum = _rmse(means, exact["optimal_st_l"])
    assert to_optimum < 0.4 * _rmse(exact["optimal_st_l"], exact["filtered"])
    assert _rmse(means, exact["filtered"]) < _rmse(means, exact["smoothed"])
    # as an estimate of the true states it is close to the Kalman filter, and worse than the smoother
    kf, ks, st_l = (_rmse(m, exact["states"]) for m in (exact["filtered"], exact["smoothed"], means))
    assert ks < kf <= st_l < 1.1 * kf


def test_structure_matters_mean_field_gap_is_larger(trained_linear_guides):
    results, exact, _ = trained_linear_guides
    gaps = {name: exact["log_likelihood"] - r["elbo"] for name, r in results.items()}
    assert gaps["st-lr"] < gaps["st-l"] < gaps["mf-l"]
    assert gaps["mf-l"] > 5 * gaps["st-lr"]


# ----------------------------------------------------------------------------------------------
# Data: the Nile and the JSB chorales


def test_nile_local_level_maximum_likelihood():
    """Durbin & Koopman (2012, sec. 2.10): sigma_eps^2 = 15099, sigma_eta^2 = 1469.1 and, with an
    approximately diffuse alpha_1 (P_1 = 1e7, first observation's term left out), log L = -632.54."""
    nile = load_nile()
    assert nile["flow"].shape == (100,) and nile["flow"].mean().item() == pytest.approx(919.35)
    y = nile["flow"].view(1, 100, 1)
    model = local_level_model(sigma2_eps=10000.0, sigma2_eta=1000.0)
    model.requires_grad_(False)
    raw = [model.dynamics.raw_R, model.dynamics.raw_Q]
    for p in raw:
        p.requires_grad_(True)
    optimizer = torch.optim.LBFGS(raw, max_iter=40, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = -model.log_likelihood(y, skip_first=1).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    assert model.R.item() == pytest.approx(15099, rel=1e-3)
    assert model.Q.item() == pytest.approx(1469.1, rel=1e-3)
    assert model.log_likelihood(y, skip_first=1).item() == pytest.approx(-632.54, abs=0.01)


def test_jsb_loader_reads_a_tiny_file(tmp_path):
    folder = tmp_path / "jsb_chorales"
    folder.mkdir()
    chorales = {"train": [[(60, 64, 67), (62,), ()], [(21, 108)]], "valid": [[(59, 62)]],
                "test": [[(48,), (50, 53)]]}
    with (folder / "JSB Chorales.pickle").open("wb") as handle:
        pickle.dump(chorales, handle, protocol=2)
    data = load_jsb_chorales(tmp_path, download=False)
    assert data.train["x"].shape == (2, 3, 88)
    assert data.train["mask"].tolist() == [[True] * 3, [True, False, False]]
    assert data.train["x"][0, 0].nonzero().flatten().tolist() == [39, 43, 46]
    assert data.train["x"][1, 0].nonzero().flatten().tolist() == [0, 87]
    assert data.train["x"][0, 2].sum() == 0 and data.num_steps("train") == 4
    check_sequence_split(data.train, x_dim=88)
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_jsb_chorales(tmp_path / "elsewhere", download=False)


def test_jsb_loader_refuses_code_in_the_pickle(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "jsb_chorales"
    folder.mkdir()
    with (folder / "JSB Chorales.pickle").open("wb") as handle:
        pickle.dump({"train": [Exploit()], "valid": [], "test": []}, handle)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_jsb_chorales(tmp_path, download=False)


def test_piano_roll_and_padding_helpers():
    with pytest.raises(ValueError, match="off the piano"):
        piano_roll([(20,)])
    x, mask = pad_sequences([torch.ones(3, 2), torch.ones(1, 2)])
    assert x.shape == (2, 3, 2) and mask.sum() == 4 and x[1, 1:].abs().sum() == 0
    assert per_step(torch.tensor([-6.0, -2.0]), mask) == pytest.approx(-2.0)
    model = krishnan_linear_model()
    assert model.Q.item() == pytest.approx(10.0) and model.R.item() == pytest.approx(20.0)
    assert not any(p.requires_grad for p in model.parameters())
    assert math.isfinite(model.log_likelihood(model.simulate(2, 5)[1]).sum().item())


def test_simulated_datasets_are_seeded_and_keep_the_states_apart():
    data = linear_gaussian_dataset(sizes=(6, 2, 3), num_steps=5, seed=3)
    again = linear_gaussian_dataset(sizes=(6, 2, 3), num_steps=5, seed=3)
    assert data.train["x"].shape == (6, 5, 1) and data.test["mask"].all() and set(data.train) == {"x", "mask"}
    assert torch.equal(data.train["x"], again.train["x"]) and data.states["valid"].shape == (2, 5, 1)
    swinging = pendulum_dataset(sizes=(4, 2, 2), num_steps=30, seed=0)
    check_sequence_split(swinging.train, x_dim=2)
    theta = swinging.states["train"][..., 0]
    clean = torch.stack([theta.sin(), theta.cos()], -1)
    assert (swinging.train["x"] - clean).std().item() == pytest.approx(0.1, rel=0.3)
    nile = load_sequence_dataset("nile")  # one series, the same in every split, and it says so
    assert nile.train["x"].shape == (1, 100, 1) and nile.test is nile.train and "in-sample" in nile.note
    assert torch.equal(nile.test["x"].double().flatten(), load_nile()["flow"])  # float32 holds it exactly
    with pytest.raises(ValueError, match="unknown sequence dataset"):
        load_sequence_dataset("mnist")


def test_the_kalman_guide_draws_from_the_exact_posterior():
    """Forward filtering, backward sampling draws from p(z | x) itself, so every importance weight
    p(x, z) / q(z | x) equals p(x): the IS estimate and the ELBO are the exact log-likelihood."""
    from bayeszoo.guides.kalman import KalmanPosterior
    from bayeszoo.inference.evaluate import evaluate

    torch.manual_seed(0)
    model = LinearGaussianSSM(x_dim=2, z_dim=2).double()
    model.set_parameters(A=[[0.9, 0.2], [-0.1, 0.8]], Q=0.3, R=0.5, Sigma_0=2.0)
    _, x = model.simulate(4, 6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False  # a shorter sequence, padded at the end
    data = {"x": x * mask[..., None], "mask": mask}
    exact = model.log_likelihood(**data).mean().item()
    scores = evaluate(model, KalmanPosterior(model), data, num_samples=50, count_active_units=False)
    assert scores["is_log_likelihood"] == pytest.approx(exact, abs=1e-9)
    assert scores["elbo"] == pytest.approx(exact, abs=1e-9)
    assert KalmanPosterior(model).scores(data)["log_likelihood"] == pytest.approx(exact, rel=1e-12)
