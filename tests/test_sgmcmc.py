"""SGLD and SGHMC sample what they claim to; the recorder and the checkpoints are exact.

The statistical tests run many independent chains at once: one parameter of shape
(CHAINS, 2) whose rows are chains, under the potential U = sum over rows of a 2-D Gaussian's
potential, so each row gets exactly its own gradient. The target is N(MEAN, COV).

Both samplers are linear on a Gaussian target, so the stationary law of the *discretised* chain
is known exactly (a discrete Lyapunov equation): its mean is MEAN and its covariance differs from
COV by an O(lr) discretisation bias that we compute rather than guess. A sample moment must then
be within

    Z * sd(f) / sqrt(ESS(f))  +  |exact discretisation bias|

of the target, for f each coordinate (means) and each centred product (covariance entries);
ESS(f) is estimated from the thinned draws (Geyer's initial positive sequence over the
autocorrelations pooled across chains). Z = 4: with 5 statistics per check, a correct sampler
fails by chance with probability < 5 * 6.3e-5 (and the seeds are fixed, so the tests are
deterministic); every wrong sampler below misses by far more than that.
"""

import io
import math

import pytest
import torch

from bayeszoo.inference.sgmcmc import SGHMC, SGLD, ThinnedSamples, polynomial_decay

MEAN = torch.tensor([1.0, -2.0], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.8], [0.8, 2.0]], dtype=torch.float64)
PRECISION = torch.linalg.inv(COV)
CHAINS = 1000
Z = 4.0


def potential(theta: torch.Tensor) -> torch.Tensor:
    """U(theta) = sum over chains of (theta - MEAN)^T PRECISION (theta - MEAN) / 2."""
    centred = theta - MEAN
    return 0.5 * ((centred @ PRECISION) * centred).sum()


def run_chains(make_sampler, steps: int, burn_in: int, thin: int, groups: int = 1,
               grad_noise_var: float = 0.0, loss_scale: float = 1.0, seed: int = 0) -> list[torch.Tensor]:
    """Run ``groups`` sets of CHAINS chains from the origin, one (CHAINS, 2) tensor each, through
    ``make_sampler(tensors)``; return each set's thinned draws, shaped (draws, CHAINS, 2).

    The loss is U / loss_scale plus, if grad_noise_var > 0, a term xi . theta with fresh
    xi ~ N(0, grad_noise_var / loss_scale^2) each step: a stochastic gradient whose noise has
    variance grad_noise_var per coordinate once multiplied by the sampler's grad_scale.
    """
    torch.manual_seed(seed)
    thetas = [torch.zeros(CHAINS, 2, dtype=torch.float64, requires_grad=True) for _ in range(groups)]
    sampler = make_sampler(thetas)
    recorder = ThinnedSamples(burn_in=burn_in, thin=thin)
    for step in range(steps):
        sampler.zero_grad()
        loss = sum(potential(theta) for theta in thetas)
        if grad_noise_var > 0:
            loss = loss + sum((math.sqrt(grad_noise_var) * torch.randn_like(theta) * theta).sum()
                              for theta in thetas)
        (loss / loss_scale).backward()
        sampler.step()
        recorder.offer(step + 1, {str(index): theta for index, theta in enumerate(thetas)})
    draws = recorder.stacked()
    return [draws[str(index)] for index in range(groups)]


def stationary_covariance(transition: torch.Tensor, noise_cov: torch.Tensor) -> torch.Tensor:
    """S solving S = M S M^T + Q: the stationary covariance of z' = M z + N(0, Q)."""
    n = transition.shape[0]
    kron = torch.kron(transition, transition)
    vec_s = torch.linalg.solve(torch.eye(n * n, dtype=kron.dtype) - kron, noise_cov.reshape(-1))
    return vec_s.reshape(n, n)


def sgld_covariance(lr: float, temperature: float = 1.0) -> torch.Tensor:
    """theta' - MEAN = (I - lr P / 2)(theta - MEAN) + sqrt(lr T) xi."""
    transition = torch.eye(2, dtype=torch.float64) - 0.5 * lr * PRECISION
    return stationary_covariance(transition, lr * temperature * torch.eye(2, dtype=torch.float64))


def sghmc_covariance(eta: float, alpha: float, temperature: float = 1.0) -> torch.Tensor:
    """Chain of (theta - MEAN, v): v' = (1 - alpha) v - eta P theta + w, theta' = theta + v',
    with total velocity noise w ~ N(0, 2 alpha eta T) (gradient noise plus injected noise)."""
    eye = torch.eye(2, dtype=torch.float64)
    drift = eta * PRECISION
    transition = torch.cat([torch.cat([eye - drift, (1 - alpha) * eye], 1),
                            torch.cat([-drift, (1 - alpha) * eye], 1)], 0)
    noise = 2 * alpha * eta * temperature * torch.ones(2, 2, dtype=torch.float64)
    return stationary_covariance(transition, torch.kron(noise, eye))[:2, :2]


def effective_sample_size(draws: torch.Tensor) -> float:
    """ESS of draws shaped (num_draws, num_chains), Geyer's initial positive sequence estimator."""
    x = (draws - draws.mean()).T  # (chains, n)
    n = x.shape[1]
    spectrum = torch.fft.rfft(x, n=2 * n)
    autocov = torch.fft.irfft(spectrum * spectrum.conj(), n=2 * n)[:, :n].mean(0)
    if autocov[0] <= 0:  # constant draws (a collapsed chain): no autocorrelation to speak of
        return float(x.numel())
    rho = autocov / autocov[0]
    pair_sums = rho[: n - n % 2].reshape(-1, 2).sum(1)
    first_negative = (pair_sums <= 0).nonzero()
    cut = int(first_negative[0]) if len(first_negative) else len(pair_sums)
    # Stan's floor on the autocorrelation time, against absurd ESS from antithetic chains
    autocorrelation_time = max(-1.0 + 2.0 * float(pair_sums[:cut].sum()), 1.0 / math.log10(max(n, 10)))
    return x.numel() / autocorrelation_time


def moment_misses(draws: torch.Tensor, bias: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Statistic -> (|sample value - target|, tolerance) for the ones outside their tolerance."""
    centred = draws - MEAN
    statistics = {"mean[0]": (draws[..., 0], MEAN[0], 0.0), "mean[1]": (draws[..., 1], MEAN[1], 0.0)}
    for i, j in [(0, 0), (0, 1), (1, 1)]:
        statistics[f"cov[{i},{j}]"] = (centred[..., i] * centred[..., j], COV[i, j], float(bias[i, j]))
    misses = {}
    for name, (f, target, allowance) in statistics.items():
        standard_error = float(f.std()) / math.sqrt(effective_sample_size(f))
        error, tolerance = abs(float(f.mean() - target)), Z * standard_error + abs(allowance)
        if not error <= tolerance:
            misses[name] = (error, tolerance)
    return misses


# ---------------------------------------------------------------- SGLD on the 2-D Gaussian

SGLD_LR, SGLD_STEPS, SGLD_BURN_IN, SGLD_THIN = 0.1, 1500, 500, 10
# The slowest mode contracts by 1 - lr * 0.409 / 2 = 0.98 a step: after 500 steps of burn-in the
# start (distance ~2.2 from MEAN) is forgotten to 2.2 * 0.98^500 ~ 1e-4. Its integrated
# autocorrelation time is ~(1 + 0.98) / (1 - 0.98) ~ 100 steps, so the ESS of a mean is ~CHAINS * 10
# (measured: 11,000 to 17,000 of the 101,000 draws).
SGLD_TEMPERATURES = {"correct": 1.0, "no-noise": 0.0, "noise-sqrt(2lr)": 2.0}


@pytest.fixture(scope="module")
def sgld_draws() -> dict[str, torch.Tensor]:
    """One run, one param group per sampler variant (param groups keep their own temperature)."""
    def sampler(thetas):
        groups = [{"params": [theta], "temperature": temperature}
                  for theta, temperature in zip(thetas, SGLD_TEMPERATURES.values(), strict=True)]
        return SGLD(groups, lr=SGLD_LR)

    draws = run_chains(sampler, SGLD_STEPS, SGLD_BURN_IN, SGLD_THIN, groups=len(SGLD_TEMPERATURES))
    return dict(zip(SGLD_TEMPERATURES, draws, strict=True))


def test_sgld_samples_the_correlated_gaussian(sgld_draws):
    bias = sgld_covariance(SGLD_LR) - COV
    assert bias.abs().max() < SGLD_LR / 2  # the lr -> 0 limit is the target: bias ~ lr / 4 here
    draws = sgld_draws["correct"]
    assert draws.shape == (101, CHAINS, 2)  # steps 500, 510, ..., 1500
    assert moment_misses(draws, bias) == {}


@pytest.mark.parametrize("variant", ["no-noise", "noise-sqrt(2lr)"])
def test_sgld_check_rejects_a_wrong_noise_scale(sgld_draws, variant):
    """The same check fails for no noise (gradient descent, temperature 0) and for the classic
    convention slip of noise sqrt(2 lr) with drift lr / 2 (which samples at temperature 2)."""
    bias = sgld_covariance(SGLD_LR) - COV
    assert {"cov[0,0]", "cov[1,1]"} <= set(moment_misses(sgld_draws[variant], bias))


# ---------------------------------------------------------------- SGHMC with noisy gradients

# eta = eps^2 with eps = 0.1 and friction c = alpha / eps = 1: the slowest mode (omega^2 = 0.409)
# decays as exp(-t / 2) in time t = eps * steps, so 300 steps of burn-in forget the start.
# The gradient noise eta^2 V = 1e-3 is half the total noise budget 2 alpha eta = 2e-3.
SGHMC_ETA, SGHMC_ALPHA, GRAD_NOISE_VAR = 0.01, 0.1, 10.0
SGHMC_STEPS, SGHMC_BURN_IN, SGHMC_THIN = 1300, 300, 10
SGHMC_NOISE_ESTIMATES = {"correct": GRAD_NOISE_VAR, "ignores-gradient-noise": 0.0}


@pytest.fixture(scope="module")
def sghmc_draws() -> dict[str, torch.Tensor]:
    """One run, one param group per noise_estimate, the same noisy gradients for both."""
    def sampler(thetas):
        groups = [{"params": [theta], "noise_estimate": estimate}
                  for theta, estimate in zip(thetas, SGHMC_NOISE_ESTIMATES.values(), strict=True)]
        return SGHMC(groups, lr=SGHMC_ETA, friction=SGHMC_ALPHA)

    draws = run_chains(sampler, SGHMC_STEPS, SGHMC_BURN_IN, SGHMC_THIN, groups=len(SGHMC_NOISE_ESTIMATES),
                       grad_noise_var=GRAD_NOISE_VAR)
    return dict(zip(SGHMC_NOISE_ESTIMATES, draws, strict=True))


def test_sghmc_samples_the_gaussian_from_noisy_gradients(sghmc_draws):
    bias = sghmc_covariance(SGHMC_ETA, SGHMC_ALPHA) - COV
    assert bias.abs().max() < 0.05  # O(eta) discretisation bias, small next to COV
    assert moment_misses(sghmc_draws["correct"], bias) == {}


def test_sghmc_check_rejects_ignoring_the_gradient_noise(sghmc_draws):
    """noise_estimate = 0 with the same noisy gradients: total noise 1.5 times too large, so the
    covariance is ~1.5 COV, and the check must say so."""
    bias = sghmc_covariance(SGHMC_ETA, SGHMC_ALPHA) - COV
    assert {"cov[0,0]", "cov[1,1]"} <= set(moment_misses(sghmc_draws["ignores-gradient-noise"], bias))


# ---------------------------------------------------------------- the O(lr) bias of SGLD, exactly

def test_sgld_stationary_variance_has_the_predicted_lr_bias():
    """For U = theta^2 / (2 s2) our update is the AR(1) chain theta' = a theta + sqrt(lr T) xi,
    a = 1 - lr / (2 s2), whose stationary variance solves v = a^2 v + lr T:

        v = lr T / (1 - a^2) = T s2 / (1 - lr / (4 s2)).

    With s2 = 2, lr = 0.8: a = 0.8 and v = 2 / 0.9 = 2.2222, 11% above s2. 50,000 chains (the
    elements of one tensor) start at 0; after 100 steps a^200 ~ 4e-20 of the start is left. Eight
    snapshots 25 steps apart give 400,000 draws, independent up to corr(theta_t^2, theta_{t+25}^2)
    = a^50 ~ 1e-5, so the sample variance has standard error v sqrt(2 / 400,000) = 0.0050 (0.22%).
    We ask for 4 standard errors; the unbiased value s2 is ~50 standard errors away."""
    s2, lr, chains = 2.0, 0.8, 50_000
    predicted = s2 / (1 - lr / (4 * s2))
    torch.manual_seed(1)
    theta = torch.zeros(chains, dtype=torch.float64, requires_grad=True)
    sampler = SGLD([theta], lr=lr)
    snapshots = []
    for step in range(1, 100 + 8 * 25):
        sampler.zero_grad()
        (theta.pow(2).sum() / (2 * s2)).backward()
        sampler.step()
        if step >= 100 and (step - 100) % 25 == 0:
            snapshots.append(theta.detach().clone())
    draws = torch.stack(snapshots)
    assert draws.numel() == 400_000
    standard_error = predicted * math.sqrt(2 / draws.numel())
    variance = float(draws.pow(2).mean())  # the true mean 0 is known
    assert abs(variance - predicted) < Z * standard_error
    assert abs(s2 - predicted) > 10 * Z * standard_error  # the test resolves the bias
    assert abs(float(draws.mean())) < Z * math.sqrt(predicted / draws.numel())


# ---------------------------------------------------------------- grad_scale

@pytest.mark.parametrize("make_sampler", [
    lambda params, scale: SGLD(params, lr=0.05, grad_scale=scale),
    lambda params, scale: SGHMC(params, lr=0.01, friction=0.1, grad_scale=scale),
], ids=["SGLD", "SGHMC"])
def test_grad_scale_turns_a_share_of_u_into_u(make_sampler):
    """A loss U / k with grad_scale = k is the same chain as U (same seed): bit for bit when k is a
    power of two (scaling by k is exact in floating point), to rounding for k = 3. With
    grad_scale = 1 the same loss gives a different chain."""
    def run(scale, k):
        return run_chains(lambda params: make_sampler(params, scale), 60, 0, 20, loss_scale=k)[0]

    reference = run(1.0, 1.0)
    assert torch.equal(run(8.0, 8.0), reference)
    torch.testing.assert_close(run(3.0, 3.0), reference, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(run(1.0, 3.0), reference, atol=1e-3)


# ---------------------------------------------------------------- optimizer mechanics

def _one_step_displacement(sampler_class, **hyper) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two param groups and a parameter with no gradient; loss = a.sum() + b.sum() (grad = 1)."""
    a, b, frozen = (torch.zeros(3, requires_grad=True) for _ in range(3))
    sampler = sampler_class([{"params": [a, frozen]}, {"params": [b], "lr": 0.5}], lr=0.1, **hyper)
    (a.sum() + b.sum()).backward()
    sampler.step()
    return a.detach(), b.detach(), frozen.detach()


def test_param_groups_and_params_without_grad():
    a, b, frozen = _one_step_displacement(SGLD, temperature=0.0, grad_scale=2.0)
    assert torch.equal(a, torch.full((3,), -0.1))  # -(lr / 2) * grad_scale * grad
    assert torch.equal(b, torch.full((3,), -0.5))
    assert torch.equal(frozen, torch.zeros(3))
    a, b, frozen = _one_step_displacement(SGHMC, temperature=0.0, friction=0.5)
    assert torch.equal(a, torch.full((3,), -0.1))  # v = -eta * grad from v = 0
    assert torch.equal(b, torch.full((3,), -0.5))
    assert torch.equal(frozen, torch.zeros(3))


def test_polynomial_decay_drives_the_step_size():
    theta = torch.zeros(1, requires_grad=True)
    sampler = SGLD([theta], lr=0.2, temperature=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(sampler, polynomial_decay(decay_steps=10, gamma=1.0))
    for _ in range(10):
        sampler.step()  # no grad yet: skipped, so nothing moves
        schedule.step()
    assert sampler.param_groups[0]["lr"] == pytest.approx(0.2 * (1 + 10 / 10) ** -1.0)
    theta.sum().backward()
    sampler.step()
    assert float(theta.detach()) == pytest.approx(-0.5 * 0.1)
    with pytest.raises(ValueError, match="gamma"):
        polynomial_decay(10, gamma=0.5)


def test_bad_hyper_parameters_are_refused():
    theta = torch.zeros(2, requires_grad=True)
    for bad in [dict(lr=0.0), dict(lr=0.1, temperature=-1.0), dict(lr=0.1, grad_scale=0.0)]:
        with pytest.raises(ValueError):
            SGLD([theta], **bad)
    for bad in [dict(friction=0.0), dict(friction=1.5), dict(noise_estimate=-1.0)]:
        with pytest.raises(ValueError):
            SGHMC([theta], lr=0.1, **bad)
    sampler = SGHMC([theta], lr=0.1, friction=0.1, noise_estimate=3.0)  # eta V = 0.3 > 2 alpha = 0.2
    theta.sum().backward()
    with pytest.raises(ValueError, match="gradient noise"):
        sampler.step()
    assert torch.equal(theta.detach(), torch.zeros(2))  # refused before anything moved


def _checkpoint_roundtrip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as a real checkpoint goes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("make_sampler", [
    lambda params: SGLD(params, lr=0.05),
    lambda params: SGHMC(params, lr=0.01, friction=0.1),
], ids=["SGLD", "SGHMC"])
def test_state_dict_resumes_bit_identically(make_sampler):
    def continue_chain(theta, sampler, steps=20):
        torch.manual_seed(123)
        out = []
        for _ in range(steps):
            sampler.zero_grad()
            potential(theta).backward()
            sampler.step()
            out.append(theta.detach().clone())
        return torch.stack(out)

    torch.manual_seed(0)
    theta = torch.zeros(CHAINS, 2, dtype=torch.float64, requires_grad=True)
    sampler = make_sampler([theta])
    continue_chain(theta, sampler, steps=30)
    checkpoint = _checkpoint_roundtrip({"theta": theta.detach().clone(), "sampler": sampler.state_dict()})
    uninterrupted = continue_chain(theta, sampler)

    resumed_theta = checkpoint["theta"].clone().requires_grad_(True)
    resumed = make_sampler([resumed_theta])
    resumed.load_state_dict(checkpoint["sampler"])
    assert torch.equal(continue_chain(resumed_theta, resumed), uninterrupted)

    if isinstance(sampler, SGHMC):  # the momentum is state that matters: without it, another chain
        fresh_theta = checkpoint["theta"].clone().requires_grad_(True)
        assert not torch.equal(continue_chain(fresh_theta, make_sampler([fresh_theta])), uninterrupted)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sampler_class", [SGLD, SGHMC])
def test_cuda_parameters_stay_on_cuda(sampler_class):
    theta = torch.zeros(4, device="cuda", requires_grad=True)
    sampler = sampler_class([theta], lr=0.01)
    theta.pow(2).sum().backward()
    sampler.step()
    assert theta.device.type == "cuda" and torch.isfinite(theta).all()


# ---------------------------------------------------------------- ThinnedSamples

def _offer_steps(recorder: ThinnedSamples, steps) -> None:
    for step in steps:
        recorder.offer(step, {"w": torch.full((2, 3), float(step)), "b": torch.tensor(float(step))})


def test_thinned_samples_keeps_burn_in_and_thinning():
    recorder = ThinnedSamples(burn_in=5, thin=3)
    _offer_steps(recorder, range(21))
    assert recorder.steps.tolist() == [5, 8, 11, 14, 17, 20]
    assert len(recorder) == 6
    stacked = recorder.stacked()
    assert stacked["w"].shape == (6, 2, 3) and stacked["b"].shape == (6,)
    assert stacked["w"][:, 0, 0].tolist() == [5.0, 8.0, 11.0, 14.0, 17.0, 20.0]


def test_thinned_samples_clones_and_detaches():
    recorder = ThinnedSamples(burn_in=0, thin=1)
    w = torch.zeros(2, requires_grad=True)
    recorder.offer(0, {"w": w})
    with torch.no_grad():
        w.add_(1.0)
    assert recorder.stacked()["w"].tolist() == [[0.0, 0.0]]
    assert not recorder.stacked()["w"].requires_grad


def test_thinned_samples_max_samples_keeps_the_most_recent():
    recorder = ThinnedSamples(burn_in=5, thin=3, max_samples=3)
    _offer_steps(recorder, range(21))
    assert recorder.steps.tolist() == [14, 17, 20]
    assert recorder.stacked()["b"].tolist() == [14.0, 17.0, 20.0]


def test_thinned_samples_state_dict_resumes_exactly():
    """Checkpoint at step 20 (kept so far: 5, 8, ..., 20, the cap of 6 reached), resume to step 29:
    the three newest checkpointed samples must survive into the final window."""
    uninterrupted = ThinnedSamples(burn_in=5, thin=3, max_samples=6)
    _offer_steps(uninterrupted, range(30))

    first_part = ThinnedSamples(burn_in=5, thin=3, max_samples=6)
    _offer_steps(first_part, range(21))
    state = _checkpoint_roundtrip(first_part.state_dict())
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    resumed = ThinnedSamples(burn_in=5, thin=3, max_samples=6)
    resumed.load_state_dict(state)
    assert resumed.steps.tolist() == first_part.steps.tolist() == [5, 8, 11, 14, 17, 20]
    for name, value in first_part.stacked().items():
        assert torch.equal(resumed.stacked()[name], value)

    _offer_steps(resumed, range(21, 30))
    assert resumed.steps.tolist() == uninterrupted.steps.tolist() == [14, 17, 20, 23, 26, 29]
    for name, value in uninterrupted.stacked().items():
        assert torch.equal(resumed.stacked()[name], value)


def test_thinned_samples_record_numbers_steps_across_a_resume():
    """``record`` numbers the steps itself (1, 2, ...); the count is in the state, so a resumed
    recorder keeps the same steps as one that never stopped."""
    def record(recorder, steps):
        for step in steps:
            recorder.record({"w": torch.full((2,), float(step))})

    uninterrupted = ThinnedSamples(burn_in=4, thin=3)
    record(uninterrupted, range(1, 15))
    first_part = ThinnedSamples(burn_in=4, thin=3)
    record(first_part, range(1, 9))
    resumed = ThinnedSamples(burn_in=4, thin=3)
    resumed.load_state_dict(_checkpoint_roundtrip(first_part.state_dict()))
    record(resumed, range(9, 15))
    assert resumed.steps.tolist() == uninterrupted.steps.tolist() == [4, 7, 10, 13]
    assert torch.equal(resumed.stacked()["w"], uninterrupted.stacked()["w"])


def test_thinned_samples_refuses_mismatches():
    recorder = ThinnedSamples(burn_in=0, thin=1)
    _offer_steps(recorder, range(2))
    with pytest.raises(ValueError, match="differ"):
        recorder.offer(2, {"w": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="shape"):
        recorder.offer(2, {"w": torch.zeros(3), "b": torch.tensor(0.0)})
    with pytest.raises(ValueError, match="recorded with"):
        ThinnedSamples(burn_in=0, thin=2).load_state_dict(recorder.state_dict())
    empty = ThinnedSamples(burn_in=0, thin=1)
    empty.load_state_dict(ThinnedSamples(burn_in=0, thin=1).state_dict())
    assert len(empty) == 0 and empty.stacked() == {}
