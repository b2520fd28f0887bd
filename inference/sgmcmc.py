"""Stochastic-gradient MCMC as ``torch.optim.Optimizer`` subclasses, and a thinning recorder.

Pyro has no stochastic-gradient Langevin dynamics. Here the samplers are plain torch
optimizers, so they plug into any loop that does ``loss.backward(); opt.step()``: the
parameters *are* the state of the Markov chain, and ``p.grad`` is a (minibatch) gradient.

Conventions shared by both samplers, for a posterior p(theta | data) over N data points:

* The potential is U(theta) = -log p(theta | data) = -log p(theta) - sum_i log p(x_i | theta).
* ``p.grad`` is the gradient of whatever loss the training loop minimises; ``grad_scale``
  turns it into the estimate of grad U used by the update:

      grad U_hat(theta) = grad_scale * p.grad.

  A loss that is the minibatch's share of U, ``-log p(theta) / N - mean_batch log p(x_i | theta)``,
  takes ``grad_scale = N`` ; a loss ``-log p(theta) * B / N - sum_batch log p(x_i | theta)`` for
  a batch of B points takes ``grad_scale = N / B``.
* ``temperature`` T samples the tempered posterior proportional to exp(-U(theta) / T):
  T = 1 is the Bayesian posterior, T < 1 a "cold" posterior, T = 0 turns the sampler into the
  corresponding optimizer (gradient descent, or SGD with momentum).
* The noise is ``torch.randn_like(p)``: no private ``torch.Generator``, so ``torch.manual_seed``
  (``pyro.set_rng_seed``) fixes the chain, on the CPU and on CUDA alike (the noise is drawn on
  the device of the parameter).
* Param groups are respected (each group has its own hyper-parameters) and parameters with no
  gradient are skipped, as in every torch optimizer.

``ThinnedSamples`` records the chain: burn-in, thinning, an optional cap, and a tensors-only
``state_dict`` so a long run can be checkpointed and resumed.

References:
    M. Welling and Y. W. Teh, "Bayesian learning via stochastic gradient Langevin dynamics",
    ICML 2011.
    T. Chen, E. B. Fox and C. Guestrin, "Stochastic gradient Hamiltonian Monte Carlo",
    ICML 2014.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping

import torch
from torch.optim import Optimizer

__all__ = ["SGLD", "SGHMC", "ThinnedSamples", "polynomial_decay"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _dense_grad(p: torch.Tensor, sampler: str) -> torch.Tensor:
    if p.grad.is_sparse:
        raise RuntimeError(f"{sampler} does not support sparse gradients")
    return p.grad


def _closure_loss(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _params_with_grad(group: dict) -> Iterable[torch.Tensor]:
    return (p for p in group["params"] if p.grad is not None)


def polynomial_decay(decay_steps: float, gamma: float = 0.55) -> Callable[[int], float]:
    """The step-size schedule of Welling & Teh (2011) as a multiplier for ``LambdaLR``.

    Welling & Teh decay the step size as eps_t = a (b + t)^(-gamma), gamma in (0.5, 1], so that
    sum_t eps_t = inf (the chain keeps exploring) and sum_t eps_t^2 < inf (the discretisation
    error and the minibatch noise vanish). With the initial ``lr`` = a b^(-gamma), that is

        eps_t = lr * (1 + t / b)^(-gamma),      b = ``decay_steps``,

    and this function returns t -> (1 + t / b)^(-gamma)::

        opt = SGLD(params, lr=1e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, polynomial_decay(1000, 0.55))
        # each step: loss.backward(); opt.step(); schedule.step()
    """
    _require(decay_steps > 0, f"decay_steps must be positive, got {decay_steps}")
    _require(0.5 < gamma <= 1.0, f"gamma must lie in (0.5, 1] (Welling & Teh 2011), got {gamma}")
    return lambda t: (1.0 + t / decay_steps) ** (-gamma)


class SGLD(Optimizer):
    r"""Stochastic gradient Langevin dynamics (Welling & Teh, ICML 2011).

    Each step, for every parameter theta with a gradient:

        theta <- theta - (lr / 2) * grad U_hat(theta) + sqrt(lr * T) * xi,     xi ~ N(0, I),

    with grad U_hat = ``grad_scale`` * ``p.grad`` (see the module docstring) and T the
    ``temperature``. This is the Euler-Maruyama step of the Langevin diffusion
    d theta = -(1/2) grad U dt + sqrt(T) dW with time step ``lr``, whose stationary law is
    proportional to exp(-U / T).

    No Metropolis correction is made, so a constant ``lr`` samples a slightly wrong law: for
    U = theta^2 / (2 sigma^2) the chain is the AR(1) process theta' = (1 - lr / (2 sigma^2)) theta
    + sqrt(lr T) xi, with stationary variance T sigma^2 / (1 - lr / (4 sigma^2)), an O(lr) bias.
    Welling & Teh let the step size decay polynomially, eps_t = a (b + t)^(-gamma) with
    gamma in (0.5, 1], which removes both this bias and the minibatch noise asymptotically;
    ``lr`` is the param group's learning rate, so any torch lr scheduler drives it (see
    ``polynomial_decay``).

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: step size eps (> 0).
        grad_scale: factor turning ``p.grad`` into the estimate of grad U (> 0), e.g. N / B.
        temperature: T >= 0; 1 samples the posterior, 0 is plain gradient descent on U.
    """

    def __init__(self, params, lr: float, grad_scale: float = 1.0, temperature: float = 1.0):
        _require(lr > 0, f"lr must be positive, got {lr}")
        _require(grad_scale > 0, f"grad_scale must be positive, got {grad_scale}")
        _require(temperature >= 0, f"temperature must be non-negative, got {temperature}")
        super().__init__(params, dict(lr=lr, grad_scale=grad_scale, temperature=temperature))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One Langevin step for every parameter with a gradient; returns the closure's loss."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            noise_std = math.sqrt(group["lr"] * group["temperature"])
            drift = -0.5 * group["lr"] * group["grad_scale"]
            for p in _params_with_grad(group):
                self._langevin_step(p, _dense_grad(p, "SGLD"), drift, noise_std)
        return loss

    @staticmethod
    def _langevin_step(p: torch.Tensor, grad: torch.Tensor, drift: float, noise_std: float) -> None:
        p.add_(grad, alpha=drift)
        if noise_std > 0:
            p.add_(torch.randn_like(p), alpha=noise_std)


class SGHMC(Optimizer):
    r"""Stochastic gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin, ICML 2014).

    The "v" parameterisation of Chen et al. (their eq. 15), for every parameter theta with a
    gradient and its momentum buffer v (kept in the optimizer state, initially 0):

        v     <- (1 - alpha) v - eta * grad U_hat(theta) + N(0, 2 eta (alpha T - beta_hat)),
        theta <- theta + v,

    with eta = ``lr`` (= eps^2 / m in the paper's terms), alpha = ``friction`` (= eps c / m),
    grad U_hat = ``grad_scale`` * ``p.grad`` and T the ``temperature``.

    Friction alpha makes the dynamics forget, and the injected noise balances it: in total the
    velocity must receive variance 2 alpha eta T per step (fluctuation-dissipation) so that the
    stationary law of theta is proportional to exp(-U / T) (with v approximately N(0, eta T)). The stochastic
    gradient already contributes eta^2 V_hat, where V_hat = ``noise_estimate`` is the estimated
    per-coordinate variance of grad U_hat (after ``grad_scale``); the sampler injects only the rest,

        beta_hat = eta V_hat / 2,
        injected variance 2 eta (alpha T - beta_hat) = 2 alpha eta T - eta^2 V_hat.

    At T = 1 this is exactly Chen et al.'s N(0, 2 (alpha - beta_hat) eta). (Written as
    2 (alpha - beta') eta T, beta' = beta_hat / T: the gradient noise does not cool with T.)
    ``noise_estimate`` = 0 is the common choice (Chen et al.'s "beta_hat = 0"); the price is
    extra variance eta^2 V per step, small when eta is. The injected variance must be >= 0:
    a step raises ``ValueError`` (before changing anything) when eta V_hat > 2 alpha T.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: eta > 0, the squared step size over the mass.
        friction: alpha in (0, 1], the fraction of the velocity lost per step.
        grad_scale: factor turning ``p.grad`` into the estimate of grad U (> 0), e.g. N / B.
        temperature: T >= 0; 1 samples the posterior, 0 with noise_estimate 0 is SGD with momentum.
        noise_estimate: V_hat >= 0, the variance of the gradient noise, per coordinate.
    """

    def __init__(self, params, lr: float, friction: float = 0.05, grad_scale: float = 1.0,
                 temperature: float = 1.0, noise_estimate: float = 0.0):
        _require(lr > 0, f"lr must be positive, got {lr}")
        _require(0 < friction <= 1, f"friction must lie in (0, 1], got {friction}")
        _require(grad_scale > 0, f"grad_scale must be positive, got {grad_scale}")
        _require(temperature >= 0, f"temperature must be non-negative, got {temperature}")
        _require(noise_estimate >= 0, f"noise_estimate must be non-negative, got {noise_estimate}")
        defaults = dict(lr=lr, friction=friction, grad_scale=grad_scale, temperature=temperature,
                        noise_estimate=noise_estimate)
        super().__init__(params, defaults)

    @staticmethod
    def injected_variance(group: Mapping[str, float]) -> float:
        """2 eta (alpha T - beta_hat), beta_hat = eta V_hat / 2: the variance the sampler adds."""
        eta, alpha = group["lr"], group["friction"]
        return 2 * eta * alpha * group["temperature"] - eta**2 * group["noise_estimate"]

    def _check_noise_budget(self) -> None:
        for index, group in enumerate(self.param_groups):
            if self.injected_variance(group) < 0:
                raise ValueError(
                    f"SGHMC param group {index}: the gradient noise eta^2 V_hat = "
                    f"{group['lr'] ** 2 * group['noise_estimate']:.3g} exceeds the total noise "
                    f"2 alpha eta T = {2 * group['lr'] * group['friction'] * group['temperature']:.3g}"
                    " that friction can balance; lower lr or noise_estimate, or raise friction")

    def momentum(self, p: torch.Tensor) -> torch.Tensor:
        """The velocity buffer v of parameter ``p`` (created as zeros on first use)."""
        state = self.state[p]
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum"]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One SGHMC step for every parameter with a gradient; returns the closure's loss."""
        loss = _closure_loss(closure)
        self._check_noise_budget()
        for group in self.param_groups:
            noise_std = math.sqrt(self.injected_variance(group))
            for p in _params_with_grad(group):
                velocity = self.momentum(p)
                self._velocity_step(velocity, _dense_grad(p, "SGHMC"), group, noise_std)
                p.add_(velocity)
        return loss

    @staticmethod
    def _velocity_step(velocity: torch.Tensor, grad: torch.Tensor, group: Mapping[str, float],
                       noise_std: float) -> None:
        velocity.mul_(1 - group["friction"]).add_(grad, alpha=-group["lr"] * group["grad_scale"])
        if noise_std > 0:
            velocity.add_(torch.randn_like(velocity), alpha=noise_std)


class ThinnedSamples:
    """Records a Markov chain: drops the burn-in, keeps every ``thin``-th step, caps the count.

    ``offer(step, tensors)`` keeps a detached clone of ``tensors`` when

        step >= burn_in   and   (step - burn_in) % thin == 0,

    so with burn_in = 100, thin = 10 the steps kept are 100, 110, 120, ... (steps are numbered by
    the caller, typically the number of sampler updates done so far). Every offer must carry the
    same names with the same shapes.

    With ``max_samples`` set, the recorder keeps the ``max_samples`` most recent samples: an older
    sample is dropped when a new one arrives (a sliding window over the end of the chain, which is
    what a long run wants: the early samples are the least converged).

    ``state_dict()`` holds tensors only (the samples, the steps they came from, and the settings as
    0-d int64 tensors, ``max_samples`` = -1 for None), so it can go into a safetensors file or a
    ``torch.save`` checkpoint read back with ``weights_only=True``.
    """

    _PREFIX = "samples."

    def __init__(self, burn_in: int, thin: int, max_samples: int | None = None):
        _require(burn_in >= 0, f"burn_in must be non-negative, got {burn_in}")
        _require(thin >= 1, f"thin must be at least 1, got {thin}")
        _require(max_samples is None or max_samples >= 1,
                 f"max_samples must be at least 1 or None, got {max_samples}")
        self.burn_in, self.thin, self.max_samples = int(burn_in), int(thin), max_samples
        self._steps: deque[int] = deque(maxlen=max_samples)
        self._samples: dict[str, deque[torch.Tensor]] = {}
        self.seen = 0  # steps counted by ``record``

    def __len__(self) -> int:
        return len(self._steps)

    def keeps(self, step: int) -> bool:
        """Whether ``offer`` at this step records a sample."""
        return step >= self.burn_in and (step - self.burn_in) % self.thin == 0

    def offer(self, step: int, named_tensors: Mapping[str, torch.Tensor]) -> bool:
        """Record detached clones of ``named_tensors`` if ``step`` is kept; returns whether it was."""
        if not self.keeps(step):
            return False
        self._check_names_and_shapes(named_tensors)
        for name, value in named_tensors.items():
            self._samples.setdefault(name, deque(maxlen=self.max_samples)).append(value.detach().clone())
        self._steps.append(int(step))
        return True

    def record(self, named_tensors: Mapping[str, torch.Tensor]) -> bool:
        """Count one more step of the chain (the first is step 1) and ``offer`` it: for a caller
        that does not number its steps, e.g. an optimizer's step hook. The count is part of the
        state, so a resumed chain goes on numbering where it stopped."""
        self.seen += 1
        return self.offer(self.seen, named_tensors)

    def _check_names_and_shapes(self, named_tensors: Mapping[str, torch.Tensor]) -> None:
        _require(len(named_tensors) > 0, "offer needs at least one named tensor")
        if not self._samples:
            return
        _require(set(named_tensors) == set(self._samples),
                 f"offered names {sorted(named_tensors)} differ from the recorded {sorted(self._samples)}")
        for name, value in named_tensors.items():
            recorded = self._samples[name][-1].shape
            _require(value.shape == recorded,
                     f"{name!r} has shape {tuple(value.shape)}, recorded as {tuple(recorded)}")

    @property
    def steps(self) -> torch.Tensor:
        """The steps the kept samples came from, oldest first (int64, shape (num_samples,))."""
        return torch.tensor(list(self._steps), dtype=torch.int64)

    def stacked(self) -> dict[str, torch.Tensor]:
        """name -> tensor of shape (num_samples, *shape), oldest sample first ({} if none yet)."""
        return {name: torch.stack(list(values)) for name, values in self._samples.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only: settings, ``steps``, the ``seen`` count and ``samples.<name>`` (stacked)."""
        state = {
            "burn_in": torch.tensor(self.burn_in),
            "thin": torch.tensor(self.thin),
            "max_samples": torch.tensor(-1 if self.max_samples is None else self.max_samples),
            "steps": self.steps,
            "seen": torch.tensor(self.seen),
        }
        state.update({self._PREFIX + name: values for name, values in self.stacked().items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the samples of ``state_dict()``; the settings must match this recorder's."""
        self._check_settings(state)
        steps = [int(s) for s in state["steps"]]
        samples = {key[len(self._PREFIX):]: value for key, value in state.items()
                   if key.startswith(self._PREFIX)}
        for name, value in samples.items():
            _require(len(value) == len(steps), f"{name!r} has {len(value)} samples for {len(steps)} steps")
        _require(bool(samples) or not steps, f"{len(steps)} steps recorded but no samples")
        self._steps = deque(steps, maxlen=self.max_samples)
        self.seen = int(state["seen"])
        self._samples = {name: deque(value.unbind(0), maxlen=self.max_samples)
                         for name, value in samples.items()}

    def _check_settings(self, state: Mapping[str, torch.Tensor]) -> None:
        theirs = {key: int(state[key]) for key in ("burn_in", "thin", "max_samples")}
        ours = {"burn_in": self.burn_in, "thin": self.thin,
                "max_samples": -1 if self.max_samples is None else self.max_samples}
        _require(theirs == ours, f"state was recorded with {theirs}, this recorder has {ours}")
