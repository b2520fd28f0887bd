"""Structured inference networks for state-space models (Krishnan, Shalit & Sontag 2017).

The posterior of a state-space model factorizes as

    p(z_{1:T} | x_{1:T}) = p(z_1 | x_{1:T}) prod_{t>=2} p(z_t | z_{t-1}, x_{t:T})

(given z_{t-1}, the past observations carry no more information about z_t). The inference
networks approximate it with a Gaussian q(z_t | ...) per step whose parameters come from
RNNs run over the sequence, and differ in what each factor may condition on:

    name    q(z_{1:T} | x) = prod_t q(z_t | ...)     summary of x          structure
    mf-l    q(z_t | x_{1:t})                          forward RNN           mean-field
    mf-lr   q(z_t | x_{1:T})                          both RNNs             mean-field
    st-l    q(z_t | z_{t-1}, x_{1:t})                 forward RNN           structured, a filter
    st-r    q(z_t | z_{t-1}, x_{t:T})                 backward RNN          structured: the true
            (alias dks, the Deep Kalman Smoother)                            posterior's factorization
    st-lr   q(z_t | z_{t-1}, x_{1:T})                 both RNNs             structured

The combiner function joins z_{t-1} with the RNN states (Krishnan et al. 2017, sec. 4):

    h_t = mean of the available parts among tanh(W_c [z_{t-1}, u_{t-1}] + b_c), h^left_t, h^right_t
    mu_t = W_mu h_t + b_mu,      sigma^2_t = softplus(W_s h_t + b_s)

The first factor q(z_1 | x) has no z_0 to condition on, and the prior it corrects is p(z_1), not
a transition, so it gets its own output layer (W_mu, W_s) applied to the RNN states alone.

With ``linear=True`` the RNNs are linear and tanh is the identity: for a linear-Gaussian model
with a one-dimensional state the structured families then contain the exact posterior (up to
boundary effects near the sequence's end, which a time-invariant linear RNN cannot time), and
the tests check them against the Kalman smoother. Each q(z_t | ...) is a diagonal Gaussian, so
in more dimensions, where p(z_t | z_{t-1}, x_{t:T}) has a full covariance, no family here is exact. With
``num_iafs > 0`` every q(z_t | ...) is followed by that many inverse autoregressive flow steps
(Kingma et al. 2016), shared across time.

The RNNs read [x_t * m_t, u_t, m_t] (m_t the mask bit), so a missing step is visible to them;
the backward RNN starts at each sequence's own last observed step, so padding at the end of
a sequence changes nothing. Guides take what they need from the model (its sizes) and never
import a model class.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import AffineAutoregressive
from pyro.nn import AutoRegressiveNN, PyroModule
from torch import nn
from torch.nn.functional import softplus

from bayeszoo.models.dkf import check_sequences, sequence_lengths

# name -> (uses the forward RNN, uses the backward RNN, conditions on z_{t-1})
STRUCTURES: dict[str, tuple[bool, bool, bool]] = {
    "mf-l": (True, False, False),
    "mf-lr": (True, True, False),
    "st-l": (True, False, True),
    "st-r": (False, True, True),
    "st-lr": (True, True, True),
}
ALIASES = {"dks": "st-r"}
RNN_TYPES = ("gru", "lstm", "rnn")


def structure_names() -> list[str]:
    return [*STRUCTURES, *ALIASES]


class LinearRNN(nn.Module):
    """h_t = W h_{t-1} + U i_t + b: a recurrent network without a nonlinearity."""

    def __init__(self, input_dim: int, hidden_dim: int):
        super().__init__()
        self.drive = nn.Linear(input_dim, hidden_dim)
        self.recurrent = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.h_0 = nn.Parameter(torch.zeros(hidden_dim))
        with torch.no_grad():
            self.recurrent.weight.copy_(0.5 * torch.eye(hidden_dim))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        drive = self.drive(inputs)  # every time step at once
        h = self.h_0.expand(inputs.shape[0], -1)
        states = []
        for t in range(inputs.shape[1]):
            h = self.recurrent(h) + drive[:, t]
            states.append(h)
        return torch.stack(states, dim=1)


class _TorchRNN(nn.Module):
    """A one-layer torch GRU / LSTM / tanh RNN (batch-first) with a learned initial state."""

    def __init__(self, kind: str, input_dim: int, hidden_dim: int):
        super().__init__()
        cls = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[kind]
        self.net = cls(input_dim, hidden_dim, batch_first=True)
        self.kind = kind
        self.h_0 = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        if kind == "lstm":
            self.c_0 = nn.Parameter(torch.zeros(1, 1, hidden_dim))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        h_0 = self.h_0.expand(1, inputs.shape[0], -1).contiguous()
        state = (h_0, self.c_0.expand_as(h_0).contiguous()) if self.kind == "lstm" else h_0
        return self.net(inputs, state)[0]


def reverse_within_lengths(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse every sequence of (N, T, ...) within its own length, leaving the padding
    where it is. Applying it twice gives the input back."""
    T = values.shape[1]
    steps = torch.arange(T, device=values.device).expand(values.shape[0], T)
    index = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)
    index = index.view(*index.shape, *([1] * (values.dim() - 2))).expand_as(values)
    return values.gather(1, index)


class _CachedFlow(dist.TorchDistribution):
    """base followed by flow transforms; rsample also stores log q(z), so the ELBO's
    log_prob of that same sample needs no (sequential) inversion of the flow."""

    has_rsample = True

    def __init__(self, base, transforms, validate_args=None):
        self.base, self.transforms = base, transforms
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    def expand(self, batch_shape, _instance=None):
        return _CachedFlow(self.base.expand(batch_shape), self.transforms)

    def rsample(self, sample_shape=()):
        z = self.base.rsample(sample_shape)
        log_q = self.base.log_prob(z)
        for transform in self.transforms:
            y = transform(z)
            log_q = log_q - transform.log_abs_det_jacobian(z, y)
            z = y
        self._cache = (z, log_q)
        return z

    def log_prob(self, value):
        if self._cache is not None and value is self._cache[0]:
            return self._cache[1]
        flow = dist.TransformedDistribution(self.base, list(self.transforms))
        return flow.log_prob(value)


class InferenceNetworks(nn.Module):
    """The RNNs, the combiner and the heads of one structure (a plain ``nn.Module``: the
    guide fetches it once per call, so Pyro registers its parameters once per trace)."""

    def __init__(self, x_dim: int, z_dim: int, u_dim: int, structure: str, rnn_dim: int, rnn: str,
                 linear: bool, num_iafs: int, iaf_dim: int):
        super().__init__()
        self.x_dim, self.z_dim, self.u_dim = x_dim, z_dim, u_dim
        self.use_left, self.use_right, self.structured = STRUCTURES[structure]
        self.linear = linear
        input_dim = x_dim + u_dim + 1
        make_rnn = (lambda: LinearRNN(input_dim, rnn_dim)) if linear else (
            lambda: _TorchRNN(rnn, input_dim, rnn_dim))
        self.left_rnn = make_rnn() if self.use_left else None
        self.right_rnn = make_rnn() if self.use_right else None
        if self.structured:
            self.z_to_hidden = nn.Linear(z_dim + u_dim, rnn_dim)
        self.loc_head = nn.Linear(rnn_dim, z_dim)
        self.var_head = nn.Linear(rnn_dim, z_dim)
        # q(z_1 | x) has no z_0 to condition on and a different prior: its own output layer.
        self.first_loc_head = nn.Linear(rnn_dim, z_dim)
        self.first_var_head = nn.Linear(rnn_dim, z_dim)
        self.iafs = nn.ModuleList(AffineAutoregressive(AutoRegressiveNN(z_dim, [iaf_dim]))
                                  for _ in range(num_iafs))

    # Pieces ---------------------------------------------------------------------------------

    def summaries(self, x: torch.Tensor, mask: torch.Tensor, u: torch.Tensor | None):
        """The sum of the RNN states that q(z_t | ...) reads, (N, T, rnn_dim), and how many
        RNN states were summed."""
        m = mask.unsqueeze(-1).to(x.dtype)
        parts = [x * m] + ([u] if self.u_dim > 0 else []) + [m]
        inputs = torch.cat(parts, dim=-1)
        total, count = 0.0, 0
        if self.left_rnn is not None:
            total, count = total + self.left_rnn(inputs), count + 1
        if self.right_rnn is not None:
            lengths = sequence_lengths(mask)
            right = self.right_rnn(reverse_within_lengths(inputs, lengths))
            total, count = total + reverse_within_lengths(right, lengths), count + 1
        return total, count

    def conditional(self, z_prev: torch.Tensor | None, u_prev: torch.Tensor | None,
                    summary: torch.Tensor, count: int):
        """q(z_t | z_{t-1}, summary_t); ``z_prev=None`` gives the first factor q(z_1 | summary_1)
        (and mean-field networks ignore z_prev)."""
        if z_prev is None:
            hidden = summary / count
            loc, raw_var = self.first_loc_head(hidden), self.first_var_head(hidden)
        else:
            if self.structured:
                inputs = z_prev
                if self.u_dim > 0:
                    shape = torch.broadcast_shapes(z_prev.shape[:-1], u_prev.shape[:-1])
                    inputs = torch.cat([z_prev.expand(*shape, -1), u_prev.expand(*shape, -1)], dim=-1)
                from_z = self.z_to_hidden(inputs)
                hidden = ((from_z if self.linear else torch.tanh(from_z)) + summary) / (count + 1)
            else:
                hidden = summary / count
            loc, raw_var = self.loc_head(hidden), self.var_head(hidden)
        scale = (softplus(raw_var) + 1e-6).sqrt()
        base = dist.Normal(loc, scale).to_event(1)
        return _CachedFlow(base, self.iafs) if len(self.iafs) else base


class StructuredInferenceNetwork(PyroModule):
    """q(z_{1:T} | x_{1:T}, u) = prod_t q(z_t | [z_{t-1}], RNN summaries), selected by ``structure``.

    Built from any state-space model with ``x_dim``, ``z_dim`` and ``u_dim`` and latent
    sites ``z_1..z_T``. Paper settings for JSB chorales: rnn_dim=600.
    """

    def __init__(self, model: nn.Module, structure: str = "st-lr", rnn_dim: int = 600, rnn: str = "gru",
                 linear: bool = False, num_iafs: int = 0, iaf_dim: int = 100):
        super().__init__()
        name = ALIASES.get(structure.lower(), structure.lower())
        if name not in STRUCTURES:
            raise ValueError(f"unknown inference network {structure!r}; choose one of "
                             f"{', '.join(structure_names())}")
        if not linear and rnn not in RNN_TYPES:
            raise ValueError(f"unknown rnn {rnn!r}; choose one of {', '.join(RNN_TYPES)}")
        if num_iafs > 0 and model.z_dim < 2:
            raise ValueError("inverse autoregressive flows need z_dim >= 2")
        self.structure = name
        self.x_dim, self.z_dim, self.u_dim = model.x_dim, model.z_dim, getattr(model, "u_dim", 0)
        self.nets = InferenceNetworks(self.x_dim, self.z_dim, self.u_dim, name, rnn_dim, rnn, linear,
                                      num_iafs, iaf_dim)

    # The guide -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, u: torch.Tensor | None = None,
                **unused):
        mask = check_sequences(x, mask, u, x_dim=self.x_dim, u_dim=self.u_dim)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        N, T = x.shape[:2]
        nets = self.nets
        summary, count = nets.summaries(x, mask, u)
        states = []
        with pyro.plate("sequences", N, dim=-1):
            z = None
            for t in pyro.markov(range(T)):
                u_prev = u[:, t - 1] if self.u_dim > 0 and t > 0 else None
                q = nets.conditional(z, u_prev, summary[:, t], count)
                with poutine.mask(mask=mask[:, t]):
                    z = pyro.sample(f"z_{t + 1}", q)
                states.append(z)
        return torch.stack(states, dim=-2)

    # Using the posterior -------------------------------------------------------------------

    @torch.no_grad()
    def sample_states(self, x: torch.Tensor, mask: torch.Tensor | None = None, u: torch.Tensor | None = None,
                      num_samples: int = 100) -> torch.Tensor:
        """``num_samples`` draws of z_{1:T} ~ q(z | x), shape (num_samples, N, T, z_dim)."""
        with pyro.plate("particles", num_samples, dim=-2):
            states = self.forward(x, mask, u)
        return states.expand(num_samples, *states.shape[-3:])

    @torch.no_grad()
    def posterior_moments(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                          u: torch.Tensor | None = None, num_samples: int = 1000):
        """Monte Carlo mean and standard deviation of q(z_t | x), each (N, T, z_dim)."""
        states = self.sample_states(x, mask, u, num_samples)
        return states.mean(0), states.std(0)

    @torch.no_grad()
    def last_state(self, x: torch.Tensor, mask: torch.Tensor | None = None, u: torch.Tensor | None = None,
                   num_samples: int = 100) -> torch.Tensor:
        """Draws of z_L at each sequence's last observed step L, (num_samples, N, z_dim): the
        starting point of a forecast (at L, filtering and smoothing agree)."""
        states = self.sample_states(x, mask, u, num_samples)
        mask = check_sequences(x, mask)
        last = (sequence_lengths(mask) if mask is not None else torch.full((x.shape[0],), x.shape[1])) - 1
        return states[:, torch.arange(x.shape[0]), last.to(states.device)]
