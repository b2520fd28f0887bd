"""State-space models: the Deep Kalman Filter (deep Markov model) and its exact oracle,
the linear-Gaussian state-space model.

Both tell the same generative story (Krishnan, Shalit & Sontag 2015, 2017):

    z_1 ~ N(mu_0, Sigma_0)
    z_t ~ p(z_t | z_{t-1}, u_{t-1})      t = 2..T      (transition; u: optional controls)
    x_t ~ p(x_t | z_t)                   t = 1..T      (emission)

and differ only in the three distributions. Each model is a ``PyroModule`` whose
``forward(x=None, mask=None, u=None)`` is that story, with

* one ``pyro.plate("sequences", N, dim=-1)`` over the minibatch, so a particle plate at
  dim -2 (vectorized ELBO particles, importance sampling) broadcasts through it;
* the latent states as sample sites ``z_1, ..., z_T`` inside ``pyro.markov`` over time;
* the emissions of all time steps as one vectorized site ``x`` with event shape (T, D).

Tensors are batch-first: ``x`` is (N, T, D), ``u`` is (N, T, U) and ``mask`` is (N, T),
True where x_t is observed. Variable-length sequences are padded at the end and masked:
a masked step contributes nothing to the joint density (neither its x_t nor its z_t), so
padding never changes a sequence's likelihood. The control u_t drives the transition
from z_t to z_{t+1}, so u_T is only used when forecasting past T.

``LinearGaussianSSM`` adds the exact computations that make it the oracle: the Kalman
filter log-likelihood, the filtered and RTS-smoothed posteriors, and exact forecasts,
all batched over sequences in torch (Kalman 1960; Rauch, Tung & Striebel 1965).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn
from torch.nn.functional import softplus

from bayeszoo.models.nn import mlp

EMISSIONS = ("bernoulli", "gaussian")


# ----------------------------------------------------------------------------------------------
# Input checks shared by the models, the guides and the data code


def check_sequences(x: torch.Tensor | None, mask: torch.Tensor | None = None, u: torch.Tensor | None = None,
                    *, x_dim: int | None = None, u_dim: int = 0) -> torch.Tensor | None:
    """Raise a clear ``ValueError`` unless (x, mask, u) are well-formed sequence batches.

    Returns the mask as a bool tensor (None when no mask and no x were given).
    """
    if x is not None:
        if not torch.is_tensor(x) or x.dim() != 3:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (batch, time, {x_dim or 'D'}), got {shape}")
        if x_dim is not None and x.shape[-1] != x_dim:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected trailing size {x_dim}")
        if not x.is_floating_point():
            raise ValueError(f"x has dtype {x.dtype}; expected a floating-point tensor")
    if mask is not None:
        if not torch.is_tensor(mask) or mask.dim() != 2:
            raise ValueError(f"mask must be a (batch, time) tensor, got {getattr(mask, 'shape', mask)}")
        if x is not None and mask.shape != x.shape[:2]:
            raise ValueError(f"mask has shape {tuple(mask.shape)}; expected {tuple(x.shape[:2])}")
        if mask.dtype != torch.bool:
            if ((mask != 0) & (mask != 1)).any():
                raise ValueError("mask must hold only 0/1 or True/False")
            mask = mask.bool()
    if u_dim > 0:
        if u is None:
            raise ValueError(f"this model has {u_dim}-dimensional controls: pass u (batch, time, {u_dim})")
        if u.dim() != 3 or u.shape[-1] != u_dim or (x is not None and u.shape[:2] != x.shape[:2]):
            raise ValueError(f"u has shape {tuple(u.shape)}; expected (batch, time, {u_dim}) matching x")
    elif u is not None and u.numel() > 0:
        raise ValueError("this model has no control inputs (u_dim=0) but u was given")
    return mask


def sequence_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last observed step + 1 for every sequence (N,), from a (N, T) mask."""
    steps = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.long() * steps).amax(dim=1)


# ----------------------------------------------------------------------------------------------
# The shared generative story


class Dynamics(nn.Module):
    """The three distributions of a state-space model, each with event shape (dim,) and
    broadcasting over any leading dimensions of its inputs:

        initial()               p(z_1)
        transition(z, u)        p(z_t | z_{t-1} = z, u_{t-1} = u)
        emission(z)             p(x_t | z_t = z)

    A plain ``nn.Module``: the model fetches it once per call, so Pyro registers its
    parameters once per trace rather than once per time step.
    """

    x_dim: int
    z_dim: int
    u_dim: int

    def initial(self):
        raise NotImplementedError

    def transition(self, z_prev: torch.Tensor, u_prev: torch.Tensor | None):
        raise NotImplementedError

    def emission(self, z: torch.Tensor):
        raise NotImplementedError


class StateSpaceModel(PyroModule):
    """z_1 ~ p(z_1), z_t ~ p(z_t | z_{t-1}, u_{t-1}), x_t ~ p(x_t | z_t), with the three
    distributions given by ``dynamics`` (see :class:`Dynamics`)."""

    def __init__(self, dynamics: Dynamics):
        super().__init__()
        self.x_dim, self.z_dim, self.u_dim = dynamics.x_dim, dynamics.z_dim, dynamics.u_dim
        self.dynamics = dynamics

    def forward(self, x: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                u: torch.Tensor | None = None, batch_size: int | None = None,
                num_steps: int | None = None, **unused):
        """The generative story. Observed ``x`` is scored; ``x=None`` generates
        ``batch_size`` sequences of ``num_steps`` steps. Returns (z, x), z of shape (N, T, z_dim)."""
        mask = check_sequences(x, mask, u, x_dim=self.x_dim, u_dim=self.u_dim)
        if x is not None:
            batch_size, num_steps = x.shape[:2]
        elif u is not None:
            batch_size, num_steps = u.shape[:2]
        if batch_size is None or num_steps is None:
            raise ValueError("to generate, pass batch_size and num_steps (or controls u)")
        p = self.dynamics
        states = []
        with pyro.plate("sequences", batch_size, dim=-1):
            z = None
            for t in pyro.markov(range(num_steps)):
                prior = p.initial() if t == 0 else p.transition(z, _at(u, t - 1))
                with poutine.mask(mask=True if mask is None else mask[:, t]):
                    z = pyro.sample(f"z_{t + 1}", prior)
                states.append(z)
            z_all = torch.stack(states, dim=-2)
            emission = p.emission(z_all)  # all time steps at once
            if mask is not None:
                emission = emission.mask(mask)
            x = pyro.sample("x", emission.to_event(1), obs=x)
        return z_all, x

    @torch.no_grad()
    def simulate(self, batch_size: int, num_steps: int, u: torch.Tensor | None = None):
        """Draw (z, x) of shapes (N, T, z_dim), (N, T, x_dim) from the model."""
        return self.forward(batch_size=batch_size, num_steps=num_steps, u=u)

    @torch.no_grad()
    def rollout(self, z: torch.Tensor, num_steps: int, u: torch.Tensor | None = None):
        """Roll the transition forward from states ``z`` (..., N, z_dim).

        ``u`` (N, num_steps, u_dim) holds the controls applied at the current and the next
        ``num_steps - 1`` states. Returns sampled future states (..., N, num_steps, z_dim)
        and the emission distribution p(x | z) of each future state (event shape (x_dim,)).
        """
        p = self.dynamics
        future = []
        for k in range(num_steps):
            z = p.transition(z, _at(u, k)).sample()
            future.append(z)
        z_future = torch.stack(future, dim=-2)
        return z_future, p.emission(z_future)


def _at(tensor: torch.Tensor | None, t: int) -> torch.Tensor | None:
    """The time slice t of a batch-first (N, T, ...) tensor, or None."""
    return None if tensor is None else tensor[:, t]


def _cat_controls(z: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    if u is None:
        return z
    return torch.cat([z, u.expand(*z.shape[:-1], u.shape[-1])], dim=-1)


# ----------------------------------------------------------------------------------------------
# The deep Markov model


class GatedTransition(nn.Module):
    """The gated transition function of Krishnan et al. (2017), eq. for the GTF:

        g_t      = MLP(z_{t-1}, u_{t-1}; ReLU, sigmoid)           gate
        h_t      = MLP(z_{t-1}, u_{t-1}; ReLU, identity)          proposed mean
        mu_t     = (1 - g_t) * (W [z_{t-1}, u_{t-1}] + b) + g_t * h_t
        sigma2_t = softplus(W_s ReLU(h_t) + b_s)

    W starts as the identity on z (and zero on u), so an untrained model drifts slowly.
    """

    def __init__(self, z_dim: int, u_dim: int = 0, hidden: int = 200):
        super().__init__()
        in_dim = z_dim + u_dim
        self.gate = nn.Sequential(mlp([in_dim, hidden, z_dim]), nn.Sigmoid())
        self.proposal = mlp([in_dim, hidden, z_dim])
        self.linear = nn.Linear(in_dim, z_dim)
        self.scale_head = nn.Linear(z_dim, z_dim)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[:, :z_dim].copy_(torch.eye(z_dim))
            self.linear.bias.zero_()

    def forward(self, z_prev: torch.Tensor, u_prev: torch.Tensor | None = None):
        inputs = _cat_controls(z_prev, u_prev)
        gate = self.gate(inputs)
        proposed = self.proposal(inputs)
        loc = (1 - gate) * self.linear(inputs) + gate * proposed
        variance = softplus(self.scale_head(torch.relu(proposed))) + 1e-6
        return loc, variance.sqrt()


class SequenceEmission(nn.Module):
    """p(x_t | z_t) = Pi(F(z_t)), F an MLP: Bernoulli(sigmoid F) for binary data such as
    piano rolls, or N(mu(z_t), diag sigma^2(z_t)) for real-valued data."""

    def __init__(self, z_dim: int, x_dim: int, hidden: tuple[int, ...] = (100, 100), kind: str = "bernoulli"):
        super().__init__()
        if kind not in EMISSIONS:
            raise ValueError(f"unknown emission {kind!r}; choose one of {', '.join(EMISSIONS)}")
        self.kind = kind
        self.net = mlp([z_dim, *hidden, x_dim if kind == "bernoulli" else 2 * x_dim])

    def forward(self, z: torch.Tensor):
        out = self.net(z)
        if self.kind == "bernoulli":
            return dist.Bernoulli(logits=out, validate_args=False).to_event(1)
        loc, raw_scale = out.chunk(2, dim=-1)
        return dist.Normal(loc, softplus(raw_scale) + 1e-3).to_event(1)


class DeepMarkovDynamics(Dynamics):
    """The deep Markov model's distributions: learned N(mu_0, diag sigma_0^2), the gated
    transition, and an MLP emission."""

    def __init__(self, x_dim: int, z_dim: int, u_dim: int, transition_hidden: int,
                 emission_hidden: tuple[int, ...], emission: str):
        super().__init__()
        self.x_dim, self.z_dim, self.u_dim = x_dim, z_dim, u_dim
        self.mu_0 = nn.Parameter(torch.zeros(z_dim))
        self.raw_sigma_0 = nn.Parameter(torch.zeros(z_dim))  # sigma_0 = softplus(raw) + 1e-4 ~ 0.69
        self.gated_transition = GatedTransition(z_dim, u_dim, transition_hidden)
        self.emitter = SequenceEmission(z_dim, x_dim, tuple(emission_hidden), emission)

    def initial(self):
        return dist.Normal(self.mu_0, softplus(self.raw_sigma_0) + 1e-4).to_event(1)

    def transition(self, z_prev, u_prev=None):
        loc, scale = self.gated_transition(z_prev, u_prev)
        return dist.Normal(loc, scale).to_event(1)

    def emission(self, z):
        return self.emitter(z)


class DeepMarkovModel(StateSpaceModel):
    """Deep Kalman Filter / deep Markov model (Krishnan, Shalit & Sontag 2015, 2017).

        z_1 ~ N(mu_0, diag sigma_0^2)                                   (learned)
        z_t ~ N(G(z_{t-1}, u_{t-1}), diag S(z_{t-1}, u_{t-1}))         gated transition
        x_t ~ Pi(F(z_t))                                                Bernoulli or Gaussian

    G and S form the gated transition function; F is an MLP. The paper's JSB chorales
    setting is z_dim=100, transition_hidden=200, emission_hidden=(100, 100).
    """

    def __init__(self, x_dim: int, z_dim: int = 16, u_dim: int = 0, transition_hidden: int = 200,
                 emission_hidden: tuple[int, ...] = (100, 100), emission: str = "bernoulli"):
        super().__init__(DeepMarkovDynamics(x_dim, z_dim, u_dim, transition_hidden,
                                            emission_hidden, emission))
        self.emission_kind = emission


# ----------------------------------------------------------------------------------------------
# The linear-Gaussian state-space model: the exact oracle


class KalmanResult(NamedTuple):
    """Kalman filter output, each (N, T, ...). ``predicted_*`` is p(z_t | x_{<t}),
    ``filtered_*`` is p(z_t | x_{<=t}); ``log_likelihood`` is log p(x) per sequence (N,)."""

    predicted_means: torch.Tensor
    predicted_covs: torch.Tensor
    filtered_means: torch.Tensor
    filtered_covs: torch.Tensor
    log_likelihood: torch.Tensor


class Forecast(NamedTuple):
    """Exact k-step-ahead predictive moments (N, steps, ...) of the states and observations."""

    z_means: torch.Tensor
    z_covs: torch.Tensor
    x_means: torch.Tensor
    x_covs: torch.Tensor


def _tril_from_raw(raw: torch.Tensor) -> torch.Tensor:
    """Lower-triangular Cholesky factor whose diagonal is exp(diag(raw))."""
    return torch.tril(raw, diagonal=-1) + torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())


def _raw_from_cov(cov: torch.Tensor) -> torch.Tensor:
    factor = torch.linalg.cholesky(cov)
    return torch.tril(factor, diagonal=-1) + torch.diag_embed(factor.diagonal(dim1=-2, dim2=-1).log())


def _mv(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    return (matrix @ vector.unsqueeze(-1)).squeeze(-1)


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return 0.5 * (matrix + matrix.transpose(-1, -2))


class LinearGaussianDynamics(Dynamics):
    """z_1 ~ N(mu_0, Sigma_0), z_t ~ N(A z_{t-1} + B u_{t-1} + b, Q), x_t ~ N(C z_t + d, R).

    Covariances are stored as Cholesky factors with log-diagonals, so any real parameter
    values give a valid model.
    """

    def __init__(self, x_dim: int, z_dim: int, u_dim: int = 0):
        super().__init__()
        self.x_dim, self.z_dim, self.u_dim = x_dim, z_dim, u_dim
        self.A = nn.Parameter(0.9 * torch.eye(z_dim))
        self.B = nn.Parameter(torch.zeros(z_dim, u_dim))
        self.b = nn.Parameter(torch.zeros(z_dim))
        self.C = nn.Parameter(torch.eye(x_dim, z_dim))
        self.d = nn.Parameter(torch.zeros(x_dim))
        self.mu_0 = nn.Parameter(torch.zeros(z_dim))
        self.raw_Sigma_0 = nn.Parameter(torch.zeros(z_dim, z_dim))
        self.raw_Q = nn.Parameter(torch.full((z_dim, z_dim), -1.0).tril())
        self.raw_R = nn.Parameter(torch.full((x_dim, x_dim), -1.0).tril())

    @property
    def Sigma_0_tril(self):
        return _tril_from_raw(self.raw_Sigma_0)

    @property
    def Q_tril(self):
        return _tril_from_raw(self.raw_Q)

    @property
    def R_tril(self):
        return _tril_from_raw(self.raw_R)

    @property
    def Sigma_0(self):
        return self.Sigma_0_tril @ self.Sigma_0_tril.T

    @property
    def Q(self):
        return self.Q_tril @ self.Q_tril.T

    @property
    def R(self):
        return self.R_tril @ self.R_tril.T

    def initial(self):
        return dist.MultivariateNormal(self.mu_0, scale_tril=self.Sigma_0_tril)

    def transition(self, z_prev, u_prev=None):
        return dist.MultivariateNormal(self.transition_mean(z_prev, u_prev), scale_tril=self.Q_tril)

    def emission(self, z):
        return dist.MultivariateNormal(_mv(self.C, z) + self.d, scale_tril=self.R_tril)

    def transition_mean(self, z_prev, u_prev=None):
        mean = _mv(self.A, z_prev) + self.b
        if u_prev is not None and self.u_dim > 0:
            mean = mean + _mv(self.B, u_prev)
        return mean

    @torch.no_grad()
    def set_parameters(self, **values) -> LinearGaussianDynamics:
        """Assign any of A, B, b, C, d, mu_0 (as they are) and Sigma_0, Q, R (covariances).

        A scalar means that value times the identity for a matrix (a covariance too) and
        that value in every entry for a vector. Returns self.
        """
        plain = {"A", "B", "b", "C", "d", "mu_0"}
        covariances = {"Sigma_0": "raw_Sigma_0", "Q": "raw_Q", "R": "raw_R"}
        for name, value in values.items():
            if name not in plain and name not in covariances:
                raise ValueError(f"unknown parameter {name!r}; choose from "
                                 f"{', '.join(sorted(plain | set(covariances)))}")
            target = getattr(self, covariances.get(name, name))
            value = torch.as_tensor(value, dtype=target.dtype, device=target.device)
            if value.dim() == 0:  # a scalar: times the identity for a matrix, filled into a vector
                value = value * torch.eye(*target.shape, dtype=target.dtype, device=target.device) \
                    if target.dim() == 2 else value.expand(target.shape)
            if value.shape != target.shape:
                raise ValueError(f"{name} must have shape {tuple(target.shape)}, got {tuple(value.shape)}")
            target.copy_(_raw_from_cov(value) if name in covariances else value)
        return self


class LinearGaussianSSM(StateSpaceModel):
    """Linear-Gaussian state-space model (the Kalman filter's model):

        z_1 ~ N(mu_0, Sigma_0)
        z_t ~ N(A z_{t-1} + B u_{t-1} + b, Q)
        x_t ~ N(C z_t + d, R)

    ``set_parameters`` assigns values in the natural parameterization (the parameters live
    in ``self.dynamics``; ``A``, ``Q``, ... read them); ``requires_grad_(False)`` holds the
    model fixed while a guide is trained. Exact inference: ``log_likelihood``, ``filter``,
    ``smooth``, ``forecast``, batched over sequences; a masked x_t is treated as missing, so
    the filter predicts through it and padding at the end changes nothing.
    """

    def __init__(self, x_dim: int, z_dim: int, u_dim: int = 0):
        super().__init__(LinearGaussianDynamics(x_dim, z_dim, u_dim))

    def set_parameters(self, **values) -> LinearGaussianSSM:
        """See :meth:`LinearGaussianDynamics.set_parameters`. Returns self."""
        self.dynamics.set_parameters(**values)
        return self

    A = property(lambda self: self.dynamics.A)
    B = property(lambda self: self.dynamics.B)
    b = property(lambda self: self.dynamics.b)
    C = property(lambda self: self.dynamics.C)
    d = property(lambda self: self.dynamics.d)
    mu_0 = property(lambda self: self.dynamics.mu_0)
    Sigma_0 = property(lambda self: self.dynamics.Sigma_0)
    Q = property(lambda self: self.dynamics.Q)
    R = property(lambda self: self.dynamics.R)

    # Exact inference -------------------------------------------------------------------

    def filter(self, x: torch.Tensor, mask: torch.Tensor | None = None, u: torch.Tensor | None = None,
               skip_first: int = 0) -> KalmanResult:
        """The Kalman filter, batched over sequences (N, T, D).

        ``log_likelihood`` sums log p(x_t | x_{<t}) over the observed steps; with
        ``skip_first=k`` the terms of the first k time steps are left out (the
        approximate-diffuse convention of Durbin & Koopman: with a very wide Sigma_0, the
        first observation's term measures only the arbitrary prior width).
        """
        mask = check_sequences(x, mask, u, x_dim=self.x_dim, u_dim=self.u_dim)
        N, T, D = x.shape
        p = self.dynamics
        A, Q, C, R, d = p.A, p.Q, p.C, p.R, p.d  # computed once, not once per step
        At, Ct = A.T, C.T
        log_2pi = math.log(2 * math.pi)
        pred_m, pred_P, filt_m, filt_P = [], [], [], []
        log_likelihood = x.new_zeros(N)
        m = P = None
        for t in range(T):
            if t == 0:
                m_pred = p.mu_0.expand(N, self.z_dim)
                P_pred = p.Sigma_0.expand(N, self.z_dim, self.z_dim)
            else:
                m_pred = p.transition_mean(m, _at(u, t - 1))
                P_pred = _symmetric(A @ P @ At + Q)
            # Update with x_t. Innovation v = x_t - C m - d, S = C P C^T + R = L L^T. With
            # W = L^-1 C P and w = L^-1 v:  m <- m + W^T w,  P <- P - W^T W,
            # log p(x_t | x_{<t}) = -|w|^2 / 2 - log det L - D/2 log 2 pi.
            v = x[:, t] - (m_pred @ Ct + d)
            CP = C @ P_pred
            L = torch.linalg.cholesky(CP @ Ct + R)
            Ww = torch.linalg.solve_triangular(L, torch.cat([CP, v.unsqueeze(-1)], dim=-1), upper=False)
            W, w = Ww[..., :-1], Ww[..., -1]
            m_new = m_pred + (W.transpose(-1, -2) @ w.unsqueeze(-1)).squeeze(-1)
            P_new = P_pred - W.transpose(-1, -2) @ W
            log_p = -0.5 * (w.pow(2).sum(-1) + D * log_2pi) - L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            if mask is None:
                m, P = m_new, P_new
                if t >= skip_first:
                    log_likelihood = log_likelihood + log_p
            else:
                observed = mask[:, t]
                m = torch.where(observed[:, None], m_new, m_pred)
                P = torch.where(observed[:, None, None], P_new, P_pred)
                if t >= skip_first:
                    log_likelihood = log_likelihood + torch.where(observed, log_p, torch.zeros_like(log_p))
            pred_m.append(m_pred), pred_P.append(P_pred), filt_m.append(m), filt_P.append(P)
        stack = lambda items: torch.stack(items, dim=1)
        return KalmanResult(stack(pred_m), stack(pred_P), stack(filt_m), stack(filt_P), log_likelihood)

    def log_likelihood(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                       u: torch.Tensor | None = None, skip_first: int = 0) -> torch.Tensor:
        """Exact log p(x) per sequence (N,), summed over observed steps (Kalman filter)."""
        return self.filter(x, mask, u, skip_first).log_likelihood

    def smooth(self, x: torch.Tensor, mask: torch.Tensor | None = None, u: torch.Tensor | None = None):
        """Rauch-Tung-Striebel smoother: means (N, T, z_dim) and covariances (N, T, z_dim, z_dim)
        of p(z_t | x_{1:T}).

            J_t = P_{t|t} A^T P_{t+1|t}^-1
            m_{t|T} = m_{t|t} + J_t (m_{t+1|T} - m_{t+1|t})
            P_{t|T} = P_{t|t} + J_t (P_{t+1|T} - P_{t+1|t}) J_t^T
        """
        result = self.filter(x, mask, u)
        A, T = self.dynamics.A, x.shape[1]
        means, covs = [result.filtered_means[:, -1]], [result.filtered_covs[:, -1]]
        for t in range(T - 2, -1, -1):
            P_f, P_p = result.filtered_covs[:, t], result.predicted_covs[:, t + 1]
            # J = P_f A^T P_p^-1, computed as a solve of the symmetric system P_p J^T = A P_f.
            J = torch.linalg.solve(P_p, A @ P_f).transpose(-1, -2)
            means.append(result.filtered_means[:, t] + _mv(J, means[-1] - result.predicted_means[:, t + 1]))
            covs.append(_symmetric(P_f + J @ (covs[-1] - P_p) @ J.transpose(-1, -2)))
        return torch.stack(means[::-1], dim=1), torch.stack(covs[::-1], dim=1)

    def forecast(self, x: torch.Tensor, mask: torch.Tensor | None = None, u: torch.Tensor | None = None,
                 num_steps: int = 1) -> Forecast:
        """Exact predictive moments of z and x for the ``num_steps`` steps after each
        sequence's last observed step.

        With controls, ``u`` must cover the horizon: shape (N, T + num_steps, u_dim), where
        u[:, s] drives the transition out of step s (0-based).
        """
        if self.u_dim > 0 and (u is None or u.shape[1] < x.shape[1] + num_steps):
            raise ValueError(f"forecasting {num_steps} steps needs u of shape "
                             f"(N, T + {num_steps}, {self.u_dim})")
        u_seen = None if u is None else u[:, :x.shape[1]]
        result = self.filter(x, mask, u_seen)
        mask = check_sequences(x, mask)
        last = (sequence_lengths(mask) if mask is not None else torch.full((x.shape[0],), x.shape[1])) - 1
        rows = torch.arange(x.shape[0])
        m, P = result.filtered_means[rows, last], result.filtered_covs[rows, last]
        p = self.dynamics
        A, Q, C, R = p.A, p.Q, p.C, p.R
        z_means, z_covs = [], []
        for k in range(num_steps):
            u_k = None if u is None else u[rows, last + k]
            m = p.transition_mean(m, u_k)
            P = _symmetric(A @ P @ A.T + Q)
            z_means.append(m), z_covs.append(P)
        z_means, z_covs = torch.stack(z_means, 1), torch.stack(z_covs, 1)
        x_means = _mv(C, z_means) + p.d
        x_covs = _symmetric(C @ z_covs @ C.T + R)
        return Forecast(z_means, z_covs, x_means, x_covs)

    def last_state(self, x: torch.Tensor, mask: torch.Tensor | None = None, u: torch.Tensor | None = None):
        """Exact p(z_L | x_{1:L}) at each sequence's last observed step L: (means, covs)."""
        result = self.filter(x, mask, u)
        mask = check_sequences(x, mask)
        last = (sequence_lengths(mask) if mask is not None else torch.full((x.shape[0],), x.shape[1])) - 1
        rows = torch.arange(x.shape[0])
        return result.filtered_means[rows, last], result.filtered_covs[rows, last]


def local_level_model(sigma2_eps: float, sigma2_eta: float, a_1: float = 0.0, P_1: float = 1e7,
                      dtype=torch.float64) -> LinearGaussianSSM:
    """The local level model of Durbin & Koopman (2012, ch. 2), the Nile example:

        y_t = alpha_t + eps_t,        eps_t ~ N(0, sigma2_eps)
        alpha_{t+1} = alpha_t + eta_t, eta_t ~ N(0, sigma2_eta)
        alpha_1 ~ N(a_1, P_1)          (P_1 = 1e7: approximately diffuse)

    as a 1-D ``LinearGaussianSSM`` in float64 (the flows are ~1000 and P_1 is 1e7).
    """
    model = LinearGaussianSSM(x_dim=1, z_dim=1).to(dtype)
    return model.set_parameters(A=1.0, C=1.0, b=0.0, d=0.0, mu_0=a_1, Sigma_0=P_1,
                                Q=sigma2_eta, R=sigma2_eps)
