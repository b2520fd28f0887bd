r"""TRADI: track the distribution of every weight along its training trajectory.

Franchi, Bursuc, Aldea, Dubuisson and Bloch, "TRADI: Tracking deep neural network weight
distributions", ECCV 2020 (seed 000, "Kalman Filter with Neural Networks"). Training stays
ordinary (SGD, momentum, Adam, ...); a tracker attached to the optimizer runs, after every step,
one small filter per weight, vectorized over all tensors. The result is a mean and a variance per
weight, from which a guide samples networks.

Notation, per weight (every equation is elementwise). ``w_k`` is the weight after the k-th
tracked optimizer step and ``g_k = w_{k-1} - w_k`` the descent the optimizer *actually* applied,
whatever it was (plain SGD, momentum, Adam, weight decay, clipping). ``g_k`` plays the part of
the seed's ``η ∇f``, which it equals for plain SGD only: the tracker never assumes it.

Running mean of the descent (``β = moment_decay``), bias-corrected as in Adam so that the
first tracked step has weight one and early estimates are not pulled toward zero. It is kept
already debiased, which makes it one pass per step (``b_k = 1 - β^k``)::

    d_k = g_k - E[g]_{k-1}                     (the step's deviation from the mean so far)
    E[g]_k = E[g]_{k-1} + ((1 - β) / b_k) d_k  (= the Adam-style debiased moving average of g)

Mean: a Kalman filter whose state ``μ`` is the centre of the weight's distribution, predicted
with the mean descent (the seed's ``μ_{k+1} = μ_k - E[η ∇f]``) and observed through the weight
with measurement noise ``R``; ``Q`` is the process noise, ``P`` the filter's error variance::

    μ⁻_k = μ_{k-1} - E[g]_k                   P⁻_k = P_{k-1} + Q
    K_k  = P⁻_k / (P⁻_k + R)
    μ_k  = μ⁻_k + K_k (w_k - μ⁻_k)            P_k  = (1 - K_k) P⁻_k

Variance: the seed's ``σ²_{k+1} = σ²_k + η² E[(∇f)²] - η² E²[∇f]`` with ``η ∇f`` replaced by
the actual descent, a fading factor ``γ = variance_decay``, and the step's variance ``E[g²] -
E[g]²`` estimated from the step itself::

    σ²_k = γ σ²_{k-1} + c_k d_k²

``d_k`` deviates from a mean of earlier steps, so ``E[d_k²] = Var[g] (1 + Σ_j a_j²)`` for
uncorrelated steps, where ``a_j`` are the weights of that mean; ``c_k = 1 / (1 + Σ_j a_j²)`` makes
the increment unbiased for Var[g]: ``c_1 = 0`` (one step says nothing of a variance), ``c_2 = 1/2``
(two steps: ``(g_2 - g_1)² / 2``), and ``c_k -> (1 + β) / 2`` later on. One sample per step is
enough because σ² sums hundreds of increments anyway; it saves the running ``E[g²]`` that the
seed's form needs (one number per weight, a fifth of the tracker's memory) and two passes.

Start, at the first tracked step (after ``burn_in_steps``, or when first resumed): ``μ_0 = w_0``
(the weight just before that step), ``P_0 = 0`` (the start is known exactly), ``σ²_0 = σ²_init``
(``initial_variance``, e.g. the initialisation's variance), ``E[g]_0 = 0``.

Where the seed leaves a choice open, this module chose:

1. *Predict with the mean descent E[g], not with the raw g_k.* With the raw step the innovation
   is ``w_k - (μ_{k-1} - g_k) = w_{k-1} - μ_{k-1}``, zero from the start on: μ would copy the
   weight and the filter would do nothing. The seed writes the expectation, and the running mean
   of the actual steps is the one that can be observed along a single trajectory.
2. *Expectations are exponential moving averages over recent steps* (rate ``1 - β``), standing in
   for the seed's expectation over the minibatch noise, which one trajectory cannot observe.
3. *The fading factor γ.* ``γ = 1`` is the seed's recursion literally. It drops the covariance
   term of the exact propagation ``Var[w_k] = Var[w_{k-1}] + Var[g_k] - 2 Cov[w_{k-1}, g_k]``,
   which is positive wherever the loss pulls the weight back, so in a stationary phase σ² grows
   like ``k Var[g]`` without limit. With ``γ < 1`` it converges to ``σ²_∞ = Var_∞[g] / (1 - γ)``
   (up to the small correlation of a step with the steps before it; see tests/test_tradi.py).
   For a linear pull-back ``g = λ (w - w*) + noise`` (SGD on a quadratic of curvature a:
   ``λ = η a``) the iterates have ``Var[g] = 2 λ Var_∞[w]``, so ``γ = 1 - 2λ`` makes σ² the
   stationary variance of the iterates.
4. *P is one number.* With constant Q and R, P_k depends on k only, not on the data, and every
   weight starts at the same step, so one P (and one gain K) serves all weights.
   ``error_variance(name)`` returns it broadcast to the tensor's shape.
5. *Burn-in and pauses do not touch the filter.* The filter starts from the weight as it is at
   the first tracked step. After a pause its state is kept; where the weight moved meanwhile
   enters through the measurement (the innovation), not through E[g].

Only the ratio Q/R shapes μ (it sets the steady-state gain); P scales with R. The defaults give
``Q/R = 1e-2``, a steady-state gain of about 0.1: μ averages the trajectory over ~10 steps.

Extra state, per tracked weight, in the weight's dtype: μ, σ² and E[g] (3 numbers;
``memory_bytes`` counts them exactly). While an optimizer step runs, a copy of the weights from
before the step exists as well (it becomes the deviations d and is released after the filter
step), like the temporaries of the optimizer itself. A guide keeps only μ and σ² (2 numbers)
after training. Every step costs eight elementwise passes over the weights, done with
torch's multi-tensor (``_foreach``) kernels, as torch.optim does, so that small networks do not
pay a Python loop per tensor.

Beyond the paper (issue 5; the seed notes that a uniform initialisation gives non-Gaussian weight
distributions, which a particle filter can follow): ``ParticleTracker`` runs, for a chosen subset
of weights, a bootstrap particle filter on the same state-space model. Its particles move by
``-E[g]`` plus process noise N(0, Q), are reweighted by the measurement likelihood N(w_k; x, R)
and are resampled (systematic resampling) wherever the effective sample size falls below half
the particles. On this linear-Gaussian model it agrees with the Kalman filter (μ, P) up to Monte
Carlo error; from a non-Gaussian start (``initial_sampler``) it can keep a non-Gaussian shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["ParticleTracker", "TrackerHandle", "WeightTracker"]

NamedTensors = Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]


def _named_tensors(named_parameters: NamedTensors) -> dict[str, Tensor]:
    """Validate ``{name: tensor}`` or ``(name, tensor)`` pairs (e.g. ``net.named_parameters()``)."""
    items = named_parameters.items() if isinstance(named_parameters, Mapping) else named_parameters
    params: dict[str, Tensor] = {}
    for name, tensor in items:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name!r}: only floating-point tensors can be tracked, got {tensor.dtype}")
        if name in params:
            raise ValueError(f"{name!r} is given twice")
        params[name] = tensor
    if not params:
        raise ValueError("no tensors to track")
    return params


def _check(name: str, value: float, ok: bool, expected: str) -> float:
    if not (math.isfinite(value) and ok):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return float(value)


class TrackerHandle:
    """What ``attach`` returns: ``remove()`` (or leaving a ``with`` block) detaches the tracker."""

    def __init__(self, *handles, on_remove: Callable[[], None]):
        self._handles, self._on_remove = handles, on_remove

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._on_remove()

    def __enter__(self) -> TrackerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class _TrajectoryTracker:
    """Bookkeeping shared by the trackers: hooks, burn-in, pauses, descent moments, checkpoints.

    The per-weight state lives in ``self._state[name][key]``; ``self._lists[key]`` holds the same
    tensors, in parameter order, for the multi-tensor kernels. A subclass adds its own keys
    (``_new_state``) and implements ``_start`` (begin at the current weights) and ``_update``
    (one filter step, once the descent moments are updated).
    """

    def __init__(
        self,
        named_parameters: NamedTensors,
        *,
        process_noise: float,
        measurement_noise: float,
        moment_decay: float,
        initial_variance: float,
        burn_in_steps: int,
    ):
        self._params = _named_tensors(named_parameters)
        self.process_noise = _check("process_noise", process_noise, process_noise >= 0, ">= 0")
        self.measurement_noise = _check("measurement_noise", measurement_noise, measurement_noise > 0, "> 0")
        self.moment_decay = _check("moment_decay", moment_decay, 0 <= moment_decay < 1, "in [0, 1)")
        self.initial_variance = _check("initial_variance", initial_variance, initial_variance >= 0, ">= 0")
        if int(burn_in_steps) != burn_in_steps or burn_in_steps < 0:
            raise ValueError(f"burn_in_steps must be a non-negative integer, got {burn_in_steps}")
        self.burn_in_steps = int(burn_in_steps)
        self._steps_seen = 0  # optimizer steps seen, tracked or not: burn-in counts these
        self._tracked_steps = 0  # k in the module docstring
        self._paused = False
        self._pending: bool | None = None  # set by before_step: whether this step is tracked
        self._attached = False
        # The state is allocated up front, so memory_bytes() is the footprint from step one.
        self._state: dict[str, dict[str, Tensor]] = {}
        for name, param in self._params.items():
            w = param.detach()
            self._state[name] = {"descent_mean": torch.zeros_like(w), **self._new_state(w)}  # E[g], debiased
        # The weights before the step, only while a tracked step is under way (then the deviations d).
        self._before: list[Tensor] | None = None
        keys = next(iter(self._state.values())).keys()
        self._lists = {key: [state[key] for state in self._state.values()] for key in keys}

    # -- what a subclass provides -------------------------------------------------------------
    def _new_state(self, w: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def _start(self, ws: list[Tensor]) -> None:
        raise NotImplementedError

    def _update(self, ws: list[Tensor], deviations: list[Tensor]) -> None:
        """One filter step; ``deviations`` are the d_k (module docstring), E[g] is already updated."""
        raise NotImplementedError

    def _config(self) -> dict[str, float]:
        """Settings that define the filter; a checkpoint must be loaded with the same ones."""
        return {
            "process_noise": self.process_noise,
            "measurement_noise": self.measurement_noise,
            "moment_decay": self.moment_decay,
        }

    def _weights(self) -> list[Tensor]:
        return [param.detach() for param in self._params.values()]

    # -- driving it --------------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self) -> None:
        """Remember each weight before ``optimizer.step()`` (the hook ``attach`` installs)."""
        self._pending = not self._paused and self._steps_seen >= self.burn_in_steps
        if not self._pending:
            return
        ws = self._weights()
        self._before = [w.clone() for w in ws]
        if self._tracked_steps == 0:  # the first tracked step: start from the weights as they are now
            torch._foreach_zero_(self._lists["descent_mean"])
            self._start(ws)

    @torch.no_grad()
    def after_step(self) -> None:
        """Filter with the descent just applied, ``g = w_old - w_new`` (after ``optimizer.step()``)."""
        if self._pending is None:
            raise RuntimeError("after_step() without before_step(): call before_step() before every step")
        tracked, self._pending = self._pending, None
        self._steps_seen += 1
        if not tracked:
            return
        self._tracked_steps += 1
        ws, mean = self._weights(), self._lists["descent_mean"]
        deviation, self._before = self._before, None  # computed in place, then released
        torch._foreach_sub_(deviation, ws)  # g = w_old - w_new
        torch._foreach_sub_(deviation, mean)  # d = g - E[g]_{k-1}
        torch._foreach_add_(mean, deviation, alpha=self._mean_rate())  # E[g]_k
        self._update(ws, deviation)

    def _mean_rate(self) -> float:
        """(1 - β) / (1 - β^k): the debiased moving average's weight on the newest step."""
        beta = self.moment_decay
        return (1.0 - beta) / (1.0 - beta**self._tracked_steps)

    def _variance_weight(self) -> float:
        """c_k = 1 / (1 + Σ_j a_j²), with a_j the weights E[g]_{k-1} gives its k - 1 steps, so that
        c_k d_k² is unbiased for Var[g] (module docstring); 0 at the first step."""
        n, beta = self._tracked_steps - 1, self.moment_decay
        if n == 0:
            return 0.0
        squared_weights = (1.0 - beta) * (1.0 + beta**n) / ((1.0 + beta) * (1.0 - beta**n))
        return 1.0 / (1.0 + squared_weights)

    def attach(self, optimizer: torch.optim.Optimizer) -> TrackerHandle:
        """Run the tracker around every ``optimizer.step()``; ``handle.remove()`` detaches it."""
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self._params.items() if id(p) not in optimized]
        if missing:
            raise ValueError(f"these tracked tensors are not optimized by this optimizer: {missing}")
        if self._attached:  # two hooks would filter every step twice
            raise RuntimeError("this tracker is already attached; remove() its handle first")
        pre = optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.before_step())
        post = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.after_step())
        self._attached = True
        return TrackerHandle(pre, post, on_remove=self._detached)

    def _detached(self) -> None:
        self._attached = False

    def pause(self) -> None:
        """Steps from now on leave the filter untouched (a step already begun is still tracked)."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def tracked_steps(self) -> int:
        """Steps that updated the filter (k in the module docstring)."""
        return self._tracked_steps

    @property
    def steps_seen(self) -> int:
        """All optimizer steps seen, including burn-in and paused ones."""
        return self._steps_seen

    @property
    def names(self) -> list[str]:
        return list(self._params)

    def memory_bytes(self) -> int:
        """Bytes of the tracker's state tensors: the extra memory tracking costs, exactly."""
        return sum(t.numel() * t.element_size() for ts in self._lists.values() for t in ts)

    # -- checkpoints ---------------------------------------------------------------------------
    def _scalars(self) -> dict[str, Tensor]:
        """Tracker-wide numbers to checkpoint besides the counters (a subclass may add some)."""
        return {}

    def _load_scalars(self, state_dict: Mapping[str, Tensor]) -> None:
        pass

    def _filter_tensors(self):
        """(key, tensor) of the per-weight state a checkpoint needs."""
        for name, state in self._state.items():
            for key, t in state.items():
                yield f"{name}/{key}", t

    def _counters(self) -> dict[str, Tensor]:
        return {
            "tracker/steps_seen": torch.tensor(self._steps_seen),
            "tracker/tracked_steps": torch.tensor(self._tracked_steps),
            "tracker/paused": torch.tensor(self._paused),
            **{f"config/{k}": torch.tensor(v, dtype=torch.float64) for k, v in self._config().items()},
            **self._scalars(),
        }

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (``torch.load(weights_only=True)`` and safetensors can read it); copies."""
        return {**{key: t.clone() for key, t in self._filter_tensors()}, **self._counters()}

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Resume from ``state_dict()``: the same names, shapes and filter settings are required."""
        expected = {key for key, _ in self._filter_tensors()} | set(self._counters())
        missing, unexpected = expected - set(state_dict), set(state_dict) - expected
        if missing or unexpected:
            raise KeyError(f"state_dict does not fit: missing {sorted(missing)}, extra {sorted(unexpected)}")
        differing = [k for k, v in self._config().items() if state_dict[f"config/{k}"].item() != v]
        if differing:
            raise ValueError(f"the checkpoint was written with other settings for {differing}")
        for key, t in self._filter_tensors():
            if state_dict[key].shape != t.shape:
                raise ValueError(f"{key}: shape {tuple(state_dict[key].shape)}, expected {tuple(t.shape)}")
        for key, t in self._filter_tensors():
            t.copy_(state_dict[key])
        self._steps_seen = int(state_dict["tracker/steps_seen"])
        self._tracked_steps = int(state_dict["tracker/tracked_steps"])
        self._paused = bool(state_dict["tracker/paused"])
        self._pending, self._before = None, None
        self._load_scalars(state_dict)


class WeightTracker(_TrajectoryTracker):
    """TRADI's per-weight Kalman tracker: mean μ, variance σ² and filter error variance P.

    Args:
        named_parameters: ``{name: tensor}`` or ``(name, tensor)`` pairs, e.g.
            ``net.named_parameters()``; the tensors the optimizer updates in place.
        process_noise: Q, variance added to P at every prediction.
        measurement_noise: R, variance of the weight around the tracked centre μ.
        moment_decay: β, rate of the running mean E[g] of the steps (memory ~ 1 / (1 - β) steps).
        variance_decay: γ, fading factor of σ²; 1 is the seed's recursion literally (σ² never
            stops growing); below 1, σ² converges to Var[g] / (1 - γ). See the module docstring.
        initial_variance: σ²_init, σ² at the first tracked step.
        burn_in_steps: optimizer steps to let pass before tracking starts.

    Use: ``handle = tracker.attach(optimizer)``, train as usual, then ``tracker.means()`` and
    ``tracker.variances()``. Without ``attach``, call ``before_step()`` and ``after_step()``
    around every ``optimizer.step()``.
    """

    def __init__(
        self,
        named_parameters: NamedTensors,
        *,
        process_noise: float = 1e-8,
        measurement_noise: float = 1e-6,
        moment_decay: float = 0.99,
        variance_decay: float = 1.0,
        initial_variance: float = 0.0,
        burn_in_steps: int = 0,
    ):
        self.variance_decay = _check("variance_decay", variance_decay, 0 <= variance_decay <= 1, "in [0, 1]")
        self._error_variance = 0.0  # P: one number for every weight (choice 4 in the module docstring)
        super().__init__(
            named_parameters,
            process_noise=process_noise,
            measurement_noise=measurement_noise,
            moment_decay=moment_decay,
            initial_variance=initial_variance,
            burn_in_steps=burn_in_steps,
        )

    def _config(self) -> dict[str, float]:
        return {**super()._config(), "variance_decay": self.variance_decay}

    def _new_state(self, w: Tensor) -> dict[str, Tensor]:
        return {"mu": w.clone(), "sigma2": torch.full_like(w, self.initial_variance)}

    def _start(self, ws: list[Tensor]) -> None:
        torch._foreach_copy_(self._lists["mu"], ws)
        for sigma2 in self._lists["sigma2"]:
            sigma2.fill_(self.initial_variance)
        self._error_variance = 0.0

    def _update(self, ws: list[Tensor], deviations: list[Tensor]) -> None:
        # σ² <- γ σ² + c_k d²
        sigma2 = self._lists["sigma2"]
        if self.variance_decay != 1.0:
            torch._foreach_mul_(sigma2, self.variance_decay)
        weight = self._variance_weight()
        if weight > 0.0:
            torch._foreach_addcmul_(sigma2, deviations, deviations, value=weight)
        # Kalman step for μ; P and K are the same for every weight
        p_pred = self._error_variance + self.process_noise
        gain = p_pred / (p_pred + self.measurement_noise)
        self._error_variance = (1.0 - gain) * p_pred
        torch._foreach_sub_(self._lists["mu"], self._lists["descent_mean"])  # predict: μ⁻ = μ - E[g]
        torch._foreach_lerp_(self._lists["mu"], ws, gain)  # correct: μ⁻ + K (w - μ⁻)

    def _scalars(self) -> dict[str, Tensor]:
        return {"tracker/error_variance": torch.tensor(self._error_variance, dtype=torch.float64)}

    def _load_scalars(self, state_dict: Mapping[str, Tensor]) -> None:
        self._error_variance = float(state_dict["tracker/error_variance"])

    def mean(self, name: str) -> Tensor:
        """Tracked mean μ of ``name`` (a copy)."""
        return self._state[name]["mu"].clone()

    def variance(self, name: str) -> Tensor:
        """Tracked variance σ² of ``name`` (a copy): the guide's per-weight variance."""
        return self._state[name]["sigma2"].clone()

    def error_variance(self, name: str) -> Tensor:
        """The Kalman filter's error variance P of μ, broadcast to the shape of ``name``."""
        mu = self._state[name]["mu"]
        return mu.new_tensor(self._error_variance).expand_as(mu)

    def means(self) -> dict[str, Tensor]:
        return {name: self.mean(name) for name in self._params}

    def variances(self) -> dict[str, Tensor]:
        return {name: self.variance(name) for name in self._params}


class ParticleTracker(_TrajectoryTracker):
    """Bootstrap particle filter per weight, for a chosen subset (e.g. a last layer).

    Same state-space model as ``WeightTracker``'s mean: particles move by ``-E[g]`` plus N(0, Q)
    noise, are reweighted by N(w_k; particle, R) and resampled systematically, per weight,
    wherever the effective sample size ``1 / Σ_i ω_i²`` drops below ``num_particles / 2``.
    Memory per weight: ``2 * num_particles + 1`` numbers (particles, log-weights, E[g]).

    Args:
        initial_variance: particles start at ``w + N(0, initial_variance)``.
        initial_sampler: instead, a function of the shape ``(num_particles, *w.shape)`` returning
            the particles' offsets from ``w`` (e.g. uniform, for a uniform initialisation).
        generator: a ``torch.Generator`` (on the tensors' device) for the filter's noise and
            resampling; its state is checkpointed. Without it, torch's global generator is used.
    """

    def __init__(
        self,
        named_parameters: NamedTensors,
        num_particles: int,
        *,
        process_noise: float = 1e-8,
        measurement_noise: float = 1e-6,
        moment_decay: float = 0.99,
        initial_variance: float = 0.0,
        initial_sampler: Callable[[torch.Size], Tensor] | None = None,
        burn_in_steps: int = 0,
        generator: torch.Generator | None = None,
    ):
        if int(num_particles) != num_particles or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles}")
        self.num_particles = int(num_particles)
        self.initial_sampler = initial_sampler
        self.generator = generator
        super().__init__(
            named_parameters,
            process_noise=process_noise,
            measurement_noise=measurement_noise,
            moment_decay=moment_decay,
            initial_variance=initial_variance,
            burn_in_steps=burn_in_steps,
        )

    def _config(self) -> dict[str, float]:
        return {**super()._config(), "num_particles": float(self.num_particles)}

    def _randn(self, like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype, device=like.device)

    def _new_state(self, w: Tensor) -> dict[str, Tensor]:
        shape = (self.num_particles, *w.shape)
        return {
            "particles": w.expand(shape).clone(),
            "log_weights": w.new_full(shape, -math.log(self.num_particles)),
        }

    def _start(self, ws: list[Tensor]) -> None:
        for w, state in zip(ws, self._state.values(), strict=True):
            particles = state["particles"]
            if self.initial_sampler is not None:
                offsets = self.initial_sampler(particles.shape)
                if offsets.shape != particles.shape:
                    got, expected = tuple(offsets.shape), tuple(particles.shape)
                    raise ValueError(f"initial_sampler returned shape {got}, expected {expected}")
            else:
                offsets = self._randn(particles) * math.sqrt(self.initial_variance)
            particles.copy_(w + offsets)
            state["log_weights"].fill_(-math.log(self.num_particles))

    def _update(self, ws: list[Tensor], deviations: list[Tensor]) -> None:
        for w, state in zip(ws, self._state.values(), strict=True):
            particles, log_weights = state["particles"], state["log_weights"]
            particles.sub_(state["descent_mean"])  # move by -E[g] ...
            if self.process_noise > 0:  # ... plus process noise
                particles.add_(self._randn(particles), alpha=math.sqrt(self.process_noise))
            log_weights.sub_((w - particles).square_().mul_(0.5 / self.measurement_noise))
            log_weights.sub_(log_weights.logsumexp(0))
            self._resample_degenerate(particles, log_weights)

    def _resample_degenerate(self, particles: Tensor, log_weights: Tensor) -> None:
        """Systematic resampling, in place, of the weights whose ESS fell below half the particles."""
        n = self.num_particles
        flat_x, flat_lw = particles.view(n, -1), log_weights.view(n, -1)
        ess = 1.0 / flat_lw.exp().square().sum(0)
        columns = (ess < n / 2).nonzero().squeeze(1)
        if columns.numel() == 0:
            return
        cdf = flat_lw[:, columns].exp().T.cumsum(1)  # (weights to resample, particles)
        cdf[:, -1] = 1.0  # rounding must not leave the last position uncovered
        offset = torch.rand(len(columns), 1, generator=self.generator, dtype=cdf.dtype, device=cdf.device)
        positions = (torch.arange(n, dtype=cdf.dtype, device=cdf.device) + offset) / n
        ancestors = torch.searchsorted(cdf, positions).clamp_max_(n - 1)
        flat_x[:, columns] = flat_x[:, columns].gather(0, ancestors.T)
        flat_lw[:, columns] = -math.log(n)

    def _scalars(self) -> dict[str, Tensor]:
        return {"tracker/rng_state": self.generator.get_state()} if self.generator is not None else {}

    def _load_scalars(self, state_dict: Mapping[str, Tensor]) -> None:
        if self.generator is not None:
            self.generator.set_state(state_dict["tracker/rng_state"])

    def particles(self, name: str) -> Tensor:
        """Particles of ``name``, shape ``(num_particles, *shape)`` (a copy)."""
        return self._state[name]["particles"].clone()

    def weights(self, name: str) -> Tensor:
        """Normalized particle weights of ``name``, shape ``(num_particles, *shape)``."""
        return self._state[name]["log_weights"].exp()

    def mean(self, name: str) -> Tensor:
        """Weighted particle mean (the Monte Carlo counterpart of ``WeightTracker``'s μ)."""
        return (self.weights(name) * self._state[name]["particles"]).sum(0)

    def variance(self, name: str) -> Tensor:
        """Weighted particle variance (the Monte Carlo counterpart of ``WeightTracker``'s P)."""
        particles = self._state[name]["particles"]
        return (self.weights(name) * (particles - self.mean(name)).square()).sum(0)

    def means(self) -> dict[str, Tensor]:
        return {name: self.mean(name) for name in self._params}

    def variances(self) -> dict[str, Tensor]:
        return {name: self.variance(name) for name in self._params}
