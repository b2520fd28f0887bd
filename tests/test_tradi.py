"""TRADI trackers (inference/tradi.py) against closed forms and hand computations.

The equations under test are in the module docstring of inference/tradi.py.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from bayeszoo.inference.tradi import ParticleTracker, WeightTracker

# -- 1. SGD on a quadratic with injected gradient noise: an AR(1) process with known moments ------

ETA, CURVATURE, NOISE_SD, CENTRE = 0.1, 1.0, 1.0, 0.5
RHO = 1 - ETA * CURVATURE  # w_{k+1} - c = ρ (w_k - c) - η ξ_k,  ξ_k ~ N(0, s²)
STATIONARY_VAR = ETA**2 * NOISE_SD**2 / (1 - RHO**2)  # V = η² s² / (1 - (1 - η a)²)
# The descent g_k = w_{k-1} - w_k = (1 - ρ)(w_{k-1} - c) + η ξ_k has Var[g] = 2 (1 - ρ) V:
STEP_VAR = 2 * ETA**2 * NOISE_SD**2 / (2 - ETA * CURVATURE)
BETA = 0.99  # moment_decay


def _increment_factor(beta: float) -> float:
    """E[c d²] / Var[g] in the stationary AR(1): the tracker's mean increment of σ² per step.

    g has autocovariances Var[g] at lag 0 and -V ρ^(h-1) (1 - ρ)² = -Var[g] ρ^(h-1) (1 - ρ) / 2 at
    lag h >= 1. The running mean m = (1 - β) Σ_j β^j g_{k-1-j} of the earlier steps has power
    E[m²] = Var[g] (1 - β)² / ((1 + β)(1 - ρ β)) and covaries with the new step as
    E[g_k m] = -Var[g] (1 - β)(1 - ρ) / (2 (1 - ρ β)), so d = g_k - m has
    E[d²] = Var[g] (1 + (1 - β)² / ((1 + β)(1 - ρ β)) + (1 - β)(1 - ρ) / (1 - ρ β)),
    and the tracker weighs it by c = (1 + β) / 2 (module docstring of inference/tradi.py).
    """
    mean_power = (1 - beta) ** 2 / ((1 + beta) * (1 - RHO * beta))
    cross = (1 - beta) * (1 - RHO) / (1 - RHO * beta)
    return (1 + beta) / 2 * (1 + mean_power + cross)


def _kalman_gain(q: float, r: float) -> float:
    """Steady-state gain: P = (1 - K)(P + Q) with K = (P + Q)/(P + Q + R), i.e. P² + Q P - Q R = 0."""
    p = (-q + math.sqrt(q * q + 4 * q * r)) / 2
    return (p + q) / (p + q + r)


def _stationary_mean_error(gain: float, beta: float) -> float:
    """E[(μ - c)²] in steady state, from the discrete Lyapunov equation of the linear system
    z = (w - c, m, μ - c):  w' = ρ w - η ξ,  m' = β m + (1 - β) g',  μ' = (1 - K)(μ - m') + K w'.
    """
    k, b = gain, beta
    a = torch.tensor(
        [
            [RHO, 0.0, 0.0],
            [(1 - b) * (1 - RHO), b, 0.0],
            [-(1 - k) * (1 - b) * (1 - RHO) + k * RHO, -(1 - k) * b, 1 - k],
        ],
        dtype=torch.float64,
    )
    noise = ETA * NOISE_SD * torch.tensor([-1.0, 1 - b, -(1 - k) * (1 - b) - k], dtype=torch.float64)
    # vec(S) = (I - A ⊗ A)^-1 vec(b bᵀ)
    identity = torch.eye(9, dtype=torch.float64)
    cov = torch.linalg.solve(identity - torch.kron(a, a), torch.outer(noise, noise).flatten())
    return cov.reshape(3, 3)[2, 2].item()


def test_sgd_on_noisy_quadratic_reaches_the_analytic_stationary_moments():
    n, steps, window = 10_000, 600, 200
    torch.manual_seed(0)
    # Start in the stationary law, so every tracked step is a stationary one.
    w = torch.nn.Parameter(CENTRE + math.sqrt(STATIONARY_VAR) * torch.randn(n))
    opt = torch.optim.SGD([w], lr=ETA)
    q, r = 1e-8, 1e-6
    # γ = 1 - 2 η a matches the pull-back of this quadratic: σ² then targets V itself.
    matched = WeightTracker({"w": w}, process_noise=q, measurement_noise=r, moment_decay=BETA,
                            variance_decay=1 - 2 * ETA * CURVATURE)
    literal = WeightTracker({"w": w}, moment_decay=BETA)  # γ = 1: the seed's recursion as written
    matched.attach(opt)
    literal.attach(opt)
    for step in range(steps):
        w.grad = CURVATURE * (w.detach() - CENTRE) + NOISE_SD * torch.randn(n)
        opt.step()
        if step == steps - window - 1:
            literal_before = literal.variance("w").mean().item()

    # σ² fixed point: Var[g] f / (1 - γ) with f = _increment_factor; with γ = 1 - 2ηa that is V f.
    # Tolerance 2%: the average over 10⁴ independent weights has a ~0.3% standard error.
    factor = _increment_factor(BETA)
    target = STATIONARY_VAR * factor
    assert matched.variance("w").mean().item() == pytest.approx(target, rel=0.02)
    # A filter fed η ∇f with the noise-free gradient would see Var[g] = η² a² V instead, 20x less.
    wrong = (ETA * CURVATURE) ** 2 * STATIONARY_VAR / (2 * ETA * CURVATURE)
    assert abs(wrong - target) > 0.5 * target

    # γ = 1 never converges: σ² grows by c d² per step, Var[g] f on average. Tol 2%.
    slope = (literal.variance("w").mean().item() - literal_before) / window
    assert slope == pytest.approx(STEP_VAR * factor, rel=0.02)

    # μ is unbiased for c (4 standard errors of the mean over weights) and its spread around c is
    # the steady state of the filter driven by this AR(1) (Lyapunov equation above). Tol 6%: the
    # mean of 10⁴ squared Gaussians has a 1.4% standard error. Predicting with the raw g would make
    # μ copy w, with spread V: 1.75x larger.
    mu = matched.mean("w")
    mse = _stationary_mean_error(_kalman_gain(q, r), BETA)
    assert abs(mu.mean().item() - CENTRE) < 4 * math.sqrt(mse / n)
    assert (mu - CENTRE).square().mean().item() == pytest.approx(mse, rel=0.06)
    assert mse < 0.7 * STATIONARY_VAR


# -- 2. Adam: the filter predicts with the step Adam actually took ------------------------------


def _adam_by_hand(w0, centre, lr, b1, b2, eps, steps):
    """Adam on 0.5 (w - c)², one scalar at a time, as written in Kingma and Ba (2015)."""
    w, m, v, path = w0, 0.0, 0.0, [w0]
    for t in range(1, steps + 1):
        g = w - centre
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        w = w - lr * m_hat / (math.sqrt(v_hat) + eps)
        path.append(w)
    return path


def _tracker_by_hand(path, q, r, beta, gamma, var0):
    """The tracker's recursions for one scalar, written out step by step (module docstring)."""
    w0, w1, w2 = path
    g1, g2 = w0 - w1, w1 - w2  # the descents actually applied
    # step 1: the debiased mean is the descent itself, c_1 = 0 (no variance from one step), and μ
    # lands on w1
    mean1 = g1
    sigma2 = gamma * var0
    p_pred = 0.0 + q
    k = p_pred / (p_pred + r)
    mu_pred = w0 - mean1
    mu = mu_pred + k * (w1 - mu_pred)
    p = (1 - k) * p_pred
    # step 2: m = β(1-β) g1 + (1-β) g2, debiased by 1 - β²; the variance of two steps, (g2 - g1)² / 2
    mean2 = (beta * (1 - beta) * g1 + (1 - beta) * g2) / (1 - beta**2)
    sigma2 = gamma * sigma2 + (g2 - g1) ** 2 / 2
    p_pred = p + q
    k = p_pred / (p_pred + r)
    mu_pred = mu - mean2
    mu = mu_pred + k * (w2 - mu_pred)
    p = (1 - k) * p_pred
    return mu, p, sigma2


def test_adam_two_steps_match_a_hand_computation():
    w0, centre = [1.0, -2.0], [0.5, 0.0]
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    q, r, beta, gamma, var0 = 0.01, 0.04, 0.5, 0.9, 0.25
    w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = torch.optim.Adam([w], lr=lr, betas=(b1, b2), eps=eps)
    tracker = WeightTracker([("w", w)], process_noise=q, measurement_noise=r, moment_decay=beta,
                            variance_decay=gamma, initial_variance=var0)
    with tracker.attach(opt):
        for _ in range(2):
            w.grad = w.detach() - torch.tensor(centre, dtype=torch.float64)
            opt.step()

    for i in range(2):
        path = _adam_by_hand(w0[i], centre[i], lr, b1, b2, eps, steps=2)
        assert w[i].item() == pytest.approx(path[-1], abs=1e-12)  # the hand-written Adam is torch's
        mu, p, sigma2 = _tracker_by_hand(path, q, r, beta, gamma, var0)
        # exact up to float64 rounding: tolerance 1e-6 absolute
        assert tracker.mean("w")[i].item() == pytest.approx(mu, abs=1e-6)
        assert tracker.error_variance("w")[i].item() == pytest.approx(p, abs=1e-6)
        assert tracker.variance("w")[i].item() == pytest.approx(sigma2, abs=1e-6)
        # An assumed plain-SGD step -lr g would give other numbers: the test can tell them apart.
        sgd_path = [w0[i]]
        for _ in range(2):
            sgd_path.append(sgd_path[-1] - lr * (sgd_path[-1] - centre[i]))
        mu_sgd, _, _ = _tracker_by_hand(sgd_path, q, r, beta, gamma, var0)
        assert abs(mu_sgd - mu) > 1e-2


# -- 3. Burn-in, pauses, checkpoints, memory ----------------------------------------------------


def _quadratic_step(opt, w, centre=0.3):
    w.grad = 2.0 * (w.detach() - centre)  # deterministic: runs can be compared bitwise
    opt.step()


def _filter_state(tracker):
    """Everything but the count of optimizer steps seen and the pause flag."""
    skip = ("tracker/steps_seen", "tracker/paused")
    return {k: v for k, v in tracker.state_dict().items() if k not in skip}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_burn_in_starts_from_the_weight_as_it_is_then():
    w = torch.nn.Parameter(torch.linspace(-1, 1, 7))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    delayed = WeightTracker({"w": w}, burn_in_steps=3, initial_variance=0.5)
    delayed.attach(opt)
    for _ in range(3):
        _quadratic_step(opt, w)
    assert delayed.tracked_steps == 0 and delayed.steps_seen == 3
    fresh = WeightTracker({"w": w}, initial_variance=0.5)  # built now, from the weights as they are
    fresh.attach(opt)
    for _ in range(4):
        _quadratic_step(opt, w)
    assert delayed.tracked_steps == fresh.tracked_steps == 4
    _assert_same_state(_filter_state(delayed), _filter_state(fresh))


def test_paused_steps_leave_the_filter_untouched():
    w = torch.nn.Parameter(torch.linspace(-1, 1, 7))
    opt = torch.optim.Adam([w], lr=0.05)
    tracker = WeightTracker({"w": w})
    tracker.attach(opt)
    for _ in range(3):
        _quadratic_step(opt, w)
    before = _filter_state(tracker)
    tracker.pause()
    assert tracker.paused
    for _ in range(2):
        _quadratic_step(opt, w)
    _assert_same_state(_filter_state(tracker), before)
    assert tracker.tracked_steps == 3 and tracker.steps_seen == 5
    tracker.resume()
    _quadratic_step(opt, w)
    assert tracker.tracked_steps == 4
    assert not torch.equal(tracker.mean("w"), before["w/mu"])


def test_paused_from_the_start_begins_at_the_weight_when_resumed():
    w = torch.nn.Parameter(torch.linspace(-1, 1, 5))
    opt = torch.optim.SGD([w], lr=0.1)
    tracker = WeightTracker({"w": w}, initial_variance=0.5)
    tracker.attach(opt)
    tracker.pause()
    for _ in range(2):
        _quadratic_step(opt, w)
    tracker.resume()
    w_then = w.detach().clone()
    _quadratic_step(opt, w)
    # one tracked step from μ = w_then: E[g] is that descent, so μ lands on the new weight
    assert torch.allclose(tracker.mean("w"), w.detach(), atol=1e-7)
    assert not torch.allclose(w_then, w.detach())
    # σ² = 0.5 + c_1 d² with c_1 = 0: one step says nothing about a variance
    assert torch.equal(tracker.variance("w"), torch.full((5,), 0.5))


def _train(net, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 3, generator=gen)
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("kind", ["kalman", "particle"])
def test_checkpoint_round_trip_resumes_to_identical_results(kind):
    def build():
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        if kind == "kalman":
            tracker = WeightTracker(net.named_parameters(), burn_in_steps=2, variance_decay=0.95)
        else:
            tracker = ParticleTracker(net.named_parameters(), 16, process_noise=1e-4, measurement_noise=1e-3,
                                      generator=torch.Generator().manual_seed(3))
        tracker.attach(opt)
        return net, opt, tracker

    net, opt, tracker = build()
    _train(net, opt, 5, seed=1)
    buffer = io.BytesIO()
    torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "tracker": tracker.state_dict()}, buffer)
    _train(net, opt, 5, seed=2)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # tensors only: no unpickled objects
    net2, opt2, tracker2 = build()
    net2.load_state_dict(saved["net"])
    opt2.load_state_dict(saved["opt"])
    tracker2.load_state_dict(saved["tracker"])
    _train(net2, opt2, 5, seed=2)
    _assert_same_state(tracker2.state_dict(), tracker.state_dict())


def test_checkpoint_with_other_settings_is_refused():
    w = torch.nn.Parameter(torch.zeros(3))
    saved = WeightTracker({"w": w}, process_noise=1e-3).state_dict()
    with pytest.raises(ValueError, match="process_noise"):
        WeightTracker({"w": w}, process_noise=1e-4).load_state_dict(saved)
    with pytest.raises(KeyError, match="v/mu"):
        WeightTracker({"v": w}, process_noise=1e-3).load_state_dict(saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_memory_bytes_is_the_state_per_weight_exactly(dtype):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(dtype)
    n_weights = sum(p.numel() for p in net.parameters())
    size = torch.finfo(dtype).bits // 8
    # μ, σ² and E[g] per weight (P is one number for the whole tracker)
    assert WeightTracker(net.named_parameters()).memory_bytes() == 3 * n_weights * size
    last = dict(net.named_parameters())
    last = {name: last[name] for name in ("2.weight", "2.bias")}
    n_last = sum(p.numel() for p in last.values())
    # particles and log-weights per particle, plus E[g] per weight
    assert ParticleTracker(last, 50).memory_bytes() == (2 * 50 + 1) * n_last * size


def test_misuse_is_a_clear_error():
    w, other = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    tracker = WeightTracker({"w": w})
    with pytest.raises(RuntimeError, match="before_step"):
        tracker.after_step()
    with pytest.raises(ValueError, match="not optimized"):
        tracker.attach(torch.optim.SGD([other], lr=0.1))
    opt = torch.optim.SGD([w], lr=0.1)
    handle = tracker.attach(opt)
    with pytest.raises(RuntimeError, match="already attached"):
        tracker.attach(opt)
    handle.remove()
    tracker.attach(opt).remove()
    with pytest.raises(TypeError, match="floating-point"):
        WeightTracker({"n": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(ValueError, match="measurement_noise"):
        WeightTracker({"w": w}, measurement_noise=0.0)


# -- 4. The particle filter agrees with the Kalman filter on a linear-Gaussian random walk --------


def test_particle_tracker_matches_kalman_within_monte_carlo_error():
    walks, particles, steps = 100, 1000, 40
    q, r = 0.01, 0.04
    torch.manual_seed(0)
    # Each weight is a scalar random walk with drift, observed with Gaussian noise: the model both
    # trackers assume, so the particle posterior must reproduce the Kalman (μ, P).
    hidden = torch.zeros(walks, dtype=torch.float64)
    w = hidden.clone()
    settings = dict(process_noise=q, measurement_noise=r, moment_decay=0.9)
    kalman = WeightTracker({"w": w}, **settings)
    particle = ParticleTracker({"w": w}, particles, generator=torch.Generator().manual_seed(1), **settings)
    for _ in range(steps):
        kalman.before_step()
        particle.before_step()
        hidden.add_(0.05 + math.sqrt(q) * torch.randn(walks, dtype=torch.float64))
        w.copy_(hidden + math.sqrt(r) * torch.randn(walks, dtype=torch.float64))
        kalman.after_step()
        particle.after_step()

    assert particle.particles("w").shape == (particles, walks)
    assert torch.allclose(particle.weights("w").sum(0), torch.ones(walks, dtype=torch.float64))
    p = kalman.error_variance("w")
    # Means: z = (particle - Kalman) / sqrt(P / N). Resampling inflates the Monte Carlo variance of
    # a bootstrap filter by a small factor (about 1.5 here), so the RMS of z must stay below 2.5.
    z = (particle.mean("w") - kalman.mean("w")) / (p / particles).sqrt()
    assert z.square().mean().sqrt().item() < 2.5
    # Variances: each particle variance has a relative Monte Carlo error of about 5%; averaged
    # over 100 walks about 0.5%, so 2% is four standard errors.
    assert (particle.variance("w") / p).mean().item() == pytest.approx(1.0, abs=0.02)
