"""Flow-augmented amortized guides: a diagonal Gaussian pushed through K invertible maps.

    z_0 ~ q_0(z_0 | x) = N(mu(x), diag sigma(x)^2)
    z_k = f_k(z_{k-1}; lambda_k(x)),   k = 1..K
    log q_K(z_K | x) = log q_0(z_0 | x) - sum_k log |det d f_k / d z_{k-1}|

The encoder emits mu, sigma and the parameters lambda_k of every step, one set per data
point (amortized, as in Rezende & Mohamed 2015); for IAF the encoder's last hidden layer h
is the context that the shared autoregressive networks read (Kingma et al. 2016). Five
families of steps:

* ``planar``      f(z) = z + u^ tanh(w^T z + b)                     Rezende & Mohamed (2015)
* ``radial``      f(z) = z + beta (z - z_0) / (alpha + |z - z_0|)   Rezende & Mohamed (2015)
* ``householder`` f(z) = (I - 2 v v^T / |v|^2) z                    Tomczak & Welling (2016)
* ``sylvester``   f(z) = z + Q R tanh(R~ Q^T z + b)                 van den Berg et al. (2018)
* ``iaf``         f(z) = sigma(z, h) * z + (1 - sigma(z, h)) * m(z, h)   Kingma et al. (2016)

Each step's equation, log-determinant and invertibility constraint are in its docstring.

**log q of the guide's own samples.** All five maps are invertible, but planar and
Sylvester steps have no closed-form inverse, so log q(z | x) of an arbitrary z is not
available for them. The ELBO (``Trace_ELBO``, vectorized or not) and importance sampling
only ever ask for log q at the sample the guide has just drawn: ``rsample`` computes
log q_K alongside z_K and keeps the pair, and ``log_prob`` of that very tensor returns it
(the idea of the cache of ``pyro.distributions.transforms``, with cache size 1). For
Householder, radial and IAF the inverse exists in closed form (IAF: k sequential passes),
so ``log_prob`` of any value works there too; for planar and Sylvester a value the guide did
not draw raises a clear ``NotImplementedError``.

``NormalizingFlow.mean`` is exact for Householder flows (affine) and a Monte Carlo average
otherwise, so ``inference.evaluate.active_units`` works with every flow.
"""

from __future__ import annotations

import copy
import functools
import math

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn
from torch.nn import functional as F
from torch.nn.functional import logsigmoid, softplus

from bayeszoo.guides.amortized import AmortizedGuide

FLOWS = ("planar", "radial", "householder", "sylvester", "iaf")

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_SHIFT = math.log(math.e - 1)  # softplus(_SHIFT) = 1


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inner product over the last dimension, keeping it (size 1); broadcasts."""
    return (a * b).sum(-1, keepdim=True)


def _matvec(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """(..., k, k) @ (..., k), broadcasting the batch dimensions (a product and a sum: for many
    small matrices several times faster than a batched matrix product, forward and backward)."""
    return (matrix * vector.unsqueeze(-2)).sum(-1)


class FlowStep:
    """One invertible map z -> f(z) whose parameters carry the batch shape (N, ...) of the
    data; ``z`` may have extra leading sample dimensions, which broadcast.

    ``__call__(z)`` returns ``(f(z), log |det df/dz|)``, the latter of shape ``z.shape[:-1]``.
    """

    #: the map is affine in z, so it sends the mean of z to the mean of f(z)
    affine = False

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"the {type(self).__name__} has no closed-form inverse")

    @classmethod
    def stack(cls, params: torch.Tensor, num_steps: int, *args) -> list[FlowStep]:
        """``num_steps`` steps from params (..., num_steps * P), P numbers per step. The
        parameter transforms (constraints, triangular and orthogonal matrices) run once for
        all steps, with the step index as a leading dimension; each step keeps its slice."""
        if num_steps == 0:
            return []
        batched = cls(params.unflatten(-1, (num_steps, -1)).movedim(-2, 0), *args)
        # unbind, not value[l]: the backward of K slices would write K zero-padded full-size
        # gradients, the backward of one unbind stacks the K slices' gradients once
        slices = {name: value.unbind(0) for name, value in vars(batched).items() if torch.is_tensor(value)}
        steps = []
        for l in range(num_steps):
            step = copy.copy(batched)
            step.__dict__.update({name: values[l] for name, values in slices.items()})
            steps.append(step)
        return steps


class PlanarStep(FlowStep):
    """Planar flow (Rezende & Mohamed 2015, eq. 10-12, appendix A.1):

        f(z) = z + u^ h(w^T z + b),  h = tanh
        log |det df/dz| = log |1 + h'(w^T z + b) w^T u^|

    Invertibility: f is invertible iff w^T u^ >= -1 (h' lies in (0, 1]). As in the paper's
    appendix, the raw u from the encoder is replaced by

        u^ = u + [m(w^T u) - w^T u] w / |w|^2,   so that w^T u^ = m(w^T u) > -1,

    with m(a) = -1 + softplus(a + log(e - 1)): the paper's m(a) = -1 + softplus(a) shifted
    so that m(0) = 0. With the paper's m, m(0) = log 2 - 1, and the correction term grows
    like 1 / |w| as w -> 0 (|u^| = 10 at initialization on the banana posterior of the tests,
    and an ELBO 1 nat below the diagonal Gaussian's on one seed in five); with m(0) = 0 it
    stays of the order of |u|. With h' = 1 - t^2, t = tanh(w^T z + b), the determinant is
    written 1 + h' m = t^2 + (1 - t^2) softplus(w^T u + log(e - 1)), a sum of non-negative
    terms, accurate even when w^T u^ is close to -1.

    Not Pyro's ``ConditionalPlanar``: it builds u^ with the paper's unshifted m, so it is a
    different map for the same encoder outputs.
    """

    @staticmethod
    def num_params(k: int) -> int:
        return 2 * k + 1

    def __init__(self, params: torch.Tensor, k: int):
        u, self.w, self.b = params.split([k, k, 1], dim=-1)
        w_u = _dot(self.w, u)
        self.one_plus_w_u_hat = softplus(w_u + _SHIFT)  # 1 + m(w^T u) > 0, kept exactly
        self.w_u_hat = self.one_plus_w_u_hat - 1.0  # m(w^T u) = w^T u^ > -1
        w_norm_sq = _dot(self.w, self.w).clamp_min(torch.finfo(params.dtype).tiny)
        self.u_hat = u + (self.w_u_hat - w_u) * self.w / w_norm_sq

    def __call__(self, z):
        t = torch.tanh(_dot(self.w, z) + self.b)
        y = z + self.u_hat * t
        log_det = torch.log(t**2 + (1 - t**2) * self.one_plus_w_u_hat).squeeze(-1)
        return y, log_det


class RadialStep(FlowStep):
    """Radial flow (Rezende & Mohamed 2015, eq. 14, appendix A.2):

        f(z) = z + beta h(alpha, r) (z - z_0),  r = |z - z_0|,  h = 1 / (alpha + r)
        log |det df/dz| = (k - 1) log(1 + beta h) + log(1 + beta h + beta h'(r) r)
                        = (k - 1) log(1 + beta h) + log(1 + beta alpha h^2)

    Invertibility: alpha > 0 and beta >= -alpha; the encoder's raw outputs become
    alpha = softplus(.) and beta = -alpha + softplus(.). The inverse has a closed form:
    |f(z) - z_0| = r (1 + beta / (alpha + r)) is a quadratic in r with one positive root.

    Not Pyro's ``ConditionalRadial``: the same forward map, but it has no inverse, so it can
    score only the samples it has just drawn, where this step scores any value.
    """

    @staticmethod
    def num_params(k: int) -> int:
        return k + 2

    def __init__(self, params: torch.Tensor, k: int):
        self.z0, raw_alpha, raw_beta = params.split([k, 1, 1], dim=-1)
        self.k = k
        self.alpha = softplus(raw_alpha)
        self.beta = softplus(raw_beta) - self.alpha

    def __call__(self, z):
        diff = z - self.z0
        r = diff.norm(dim=-1, keepdim=True)
        h = 1.0 / (self.alpha + r)
        y = z + self.beta * h * diff
        log_det = (self.k - 1) * torch.log1p(self.beta * h) + torch.log1p(self.beta * self.alpha * h**2)
        return y, log_det.squeeze(-1)

    def inverse(self, y):
        diff_y = y - self.z0
        r_y = diff_y.norm(dim=-1, keepdim=True)
        # r^2 + (alpha + beta - r_y) r - alpha r_y = 0
        c = self.alpha + self.beta - r_y
        r = 0.5 * (-c + torch.sqrt(c**2 + 4 * self.alpha * r_y))
        return self.z0 + diff_y / (1 + self.beta / (self.alpha + r))


def _reflect(z: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """(I - 2 v v^T) z for a unit vector v."""
    return z - 2 * unit * _dot(unit, z)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


class HouseholderStep(FlowStep):
    """Householder flow (Tomczak & Welling 2016):

        f(z) = H z,  H = I - 2 v v^T / |v|^2
        log |det df/dz| = 0                      (H is orthogonal: volume preserving)

    Applied after a diagonal Gaussian, T reflections give q_T = N(U mu, U diag(sigma^2) U^T)
    with U = H_T ... H_1: a full-covariance Gaussian. Tomczak & Welling compute v_t from
    v_{t-1} with a linear layer; a chain of linear maps of the encoder's features is itself
    linear in them, so here each v_t is read straight off the encoder's head. H^-1 = H.

    Not Pyro's ``ConditionalHouseholder``: the same reflections, but it reads its vectors from
    a network of its own rather than from the encoder head that also emits mu and sigma, and
    it lives in a ``TransformedDistribution`` (see ``NormalizingFlow`` for why not that).
    """

    affine = True

    @staticmethod
    def num_params(k: int) -> int:
        return k

    def __init__(self, params: torch.Tensor, k: int):
        self.unit = _unit(params)

    def __call__(self, z):
        return _reflect(z, self.unit), z.new_zeros(()).expand(z.shape[:-1])

    def inverse(self, y):
        return _reflect(y, self.unit)


@functools.cache
def _upper_index(k: int, device: torch.device) -> torch.Tensor:
    """For the k x k matrices of ``SylvesterStep._upper``, flattened: where each entry comes from
    in [strict upper triangle (row by row), diagonal, 0]."""
    strict = k * (k - 1) // 2
    index = torch.full((k * k,), strict + k, dtype=torch.long)
    rows, cols = torch.triu_indices(k, k, offset=1)
    index[rows * k + cols] = torch.arange(strict)
    index[torch.arange(k) * (k + 1)] = strict + torch.arange(k)
    return index.to(device)


class SylvesterStep(FlowStep):
    """Householder Sylvester flow (van den Berg et al. 2018), with M = k and H reflections:

        f(z) = z + Q R h(R~ Q^T z + b),  h = tanh
        log |det df/dz| = sum_i log |1 + h'([R~ Q^T z + b]_i) R~_ii R_ii|

    Q = H_1 ... H_H is a product of Householder reflections (orthogonal by construction, so
    no orthogonalization error enters the log-determinant), R and R~ are upper triangular.
    Sylvester's determinant identity det(I_k + A D B) = det(I_M + D B A) with A = Q R,
    B = R~ Q^T turns the k x k determinant into the triangular det(I + diag(h') R~ R).
    Invertibility (their theorem 2): R_ii R~_ii > -1 / |h'|_inf = -1. The diagonals are
    R_ii = tanh(.) and R~_ii = tanh(.), so |R_ii R~_ii| < 1. The inverse has no closed form.
    Per step the encoder emits H k + k (k - 1) + 3 k numbers (v_1..v_H, the strict upper
    triangles of R and R~, their diagonals, b), so ``reflections`` < k saves outputs for
    large k.

    Not Pyro's ``Sylvester``: its Q, R, R~ and b are global parameters (Pyro has no conditional
    Sylvester flow), where here the encoder emits them for every data point.
    """

    @staticmethod
    def num_params(k: int, reflections: int) -> int:
        return reflections * k + k * (k - 1) + 3 * k

    def __init__(self, params: torch.Tensor, k: int, reflections: int):
        strict = k * (k - 1) // 2
        vs, r_upper, rt_upper, r_diag, rt_diag, self.b = params.split(
            [reflections * k, strict, strict, k, k, k], dim=-1)
        self.Q = self._householder_product(_unit(vs.unflatten(-1, (reflections, k))))
        self.r_diag, self.rt_diag = torch.tanh(r_diag), torch.tanh(rt_diag)
        self.R = self._upper(self.r_diag, r_upper)
        self.R_tilde = self._upper(self.rt_diag, rt_upper)
        self.diag_product = self.r_diag * self.rt_diag  # in (-1, 1)
        self.A = self.Q @ self.R  # k x M, here M = k
        self.B = self.R_tilde @ self.Q.transpose(-1, -2)

    @staticmethod
    def _householder_product(units: torch.Tensor) -> torch.Tensor:
        """Q = H_1 ... H_H for unit vectors v_i, the rows of units (..., H, k), in the compact WY
        form (Schreiber & Van Loan 1989): Q = I - Y T Y^T with Y = [v_1 ... v_H] and T upper
        triangular, T^-1 = striu(Y^T Y) + I / 2 (the strict upper triangle of the Gram matrix;
        Joffrain et al. 2006). One Gram matrix, one triangular solve and one product for all steps
        and points at once, in place of H - 1 sequential products."""
        count, k = units.shape[-2:]
        eye = torch.eye(count, dtype=units.dtype, device=units.device)
        t_inverse = (units @ units.transpose(-1, -2)).triu(1) + 0.5 * eye
        t_y = torch.linalg.solve_triangular(t_inverse, units, upper=True)  # T Y^T, (..., H, k)
        return torch.eye(k, dtype=units.dtype, device=units.device) - units.transpose(-1, -2) @ t_y

    @staticmethod
    def _upper(diag: torch.Tensor, strict: torch.Tensor) -> torch.Tensor:
        """The upper triangular matrix with this diagonal and strict upper triangle (row by row),
        gathered in one index_select from [strict, diag, 0]."""
        k = diag.shape[-1]
        source = torch.cat([strict, diag, diag.new_zeros(*diag.shape[:-1], 1)], dim=-1)
        return source.index_select(-1, _upper_index(k, diag.device)).unflatten(-1, (k, k))

    def __call__(self, z):
        t = torch.tanh(_matvec(self.B, z) + self.b)
        y = z + _matvec(self.A, t)
        log_det = torch.log1p((1 - t**2) * self.diag_product).sum(-1)
        return y, log_det


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x):
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation (Germain et al. 2015) with a context:
    outputs (m, s), each of size k, where m_i and s_i depend on z only through the z_j that
    come before z_i in the ordering, and on the context h without restriction.

    Degrees: inputs 1..k (reversed when ``reverse``), hidden units 1..k-1 cyclically
    (0 when k = 1: such units see only h); a unit of degree d sees inputs of degree <= d,
    and output i (degree d_i) sees hidden units of degree < d_i.

    ``gate_bias`` initializes the bias of s so that sigmoid(s) starts near 1 and the IAF step
    starts near the identity, as Kingma et al. (2016) recommend.
    """

    def __init__(self, k: int, context_dim: int, hidden: tuple[int, ...], reverse: bool = False,
                 gate_bias: float = 2.0):
        super().__init__()
        if not hidden:
            raise ValueError("MADE needs at least one hidden layer")
        self.k = k
        degrees = torch.arange(1, k + 1)
        degrees = degrees.flip(0) if reverse else degrees
        self.register_buffer("degrees", degrees)
        hidden_degrees = [torch.arange(h) % max(k - 1, 1) + 1 if k > 1 else torch.zeros(h, dtype=torch.long)
                          for h in hidden]
        previous = degrees
        self.hidden = nn.ModuleList()
        for size, d in zip(hidden, hidden_degrees, strict=True):
            self.hidden.append(MaskedLinear(len(previous), size, d[:, None] >= previous[None, :]))
            previous = d
        self.context = nn.Linear(context_dim, hidden[0], bias=False)
        out_degrees = torch.cat([degrees, degrees])
        self.out = MaskedLinear(len(previous), 2 * k, out_degrees[:, None] > previous[None, :])
        with torch.no_grad():
            self.out.bias[k:].fill_(gate_bias)

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.hidden[0](z) + self.context(h)
        for layer in self.hidden[1:]:
            a = layer(torch.relu(a))
        m, s = self.out(torch.relu(a)).chunk(2, dim=-1)
        return m, s


class IAFStep(FlowStep):
    """Inverse autoregressive flow step (Kingma et al. 2016), the numerically stable form:

        [m, s] = AutoregressiveNN(z, h),  sigma = sigmoid(s)
        f(z) = sigma * z + (1 - sigma) * m
        log |det df/dz| = sum_i log sigma_i

    m_i and s_i depend on z_{<i} only (in the MADE's ordering), so df/dz is triangular with
    diagonal sigma. h is the encoder's feature vector (the context); successive steps
    alternate the ordering. Inverse: z_i = (y_i - (1 - sigma_i) m_i) / sigma_i, solved in k
    passes, one coordinate per pass in the MADE's ordering.

    Not Pyro's ``ConditionalAffineAutoregressive``: with ``stable=True`` it is this map, but its
    ``ConditionalAutoRegressiveNN`` feeds the context through the input layer with its own
    masks and permutation, so the networks, their initialization and hence the results would
    all change.
    """

    def __init__(self, made: MADE, context: torch.Tensor):
        self.made, self.context = made, context
        self.k, self.degrees = made.k, made.degrees

    def autoregressive(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, s) at z."""
        return self.made(z, self.context)

    def __call__(self, z):
        m, s = self.autoregressive(z)
        sigma = torch.sigmoid(s)
        return sigma * z + (1 - sigma) * m, logsigmoid(s).sum(-1)

    def inverse(self, y):
        # pass d solves the coordinate of degree d; later coordinates stay 0 until their pass,
        # so no not-yet-solved value (which may be huge) reaches the network
        z = torch.zeros_like(y)
        for d in range(1, self.k + 1):
            m, s = self.autoregressive(z)
            solved = (y - (1 - torch.sigmoid(s)) * m) / torch.sigmoid(s)
            z = torch.where(self.degrees == d, solved, z)
        return z


class StackedIAFStep(IAFStep):
    """An ``IAFStep`` whose MADE's masked weights and context term W_c h + b_1 were computed
    for all steps at once (``stacked_iaf_steps``) and are handed in."""

    def __init__(self, k, degrees, projected_context, first_weight, hidden, out_weight, out_bias):
        self.k, self.degrees, self.projected_context = k, degrees, projected_context
        self.first_weight, self.hidden = first_weight, hidden
        self.out_weight, self.out_bias = out_weight, out_bias

    def autoregressive(self, z):
        a = self.projected_context + F.linear(z, self.first_weight)
        for weight, bias in self.hidden:
            a = F.linear(torch.relu(a), weight, bias)
        m, s = F.linear(torch.relu(a), self.out_weight, self.out_bias).chunk(2, dim=-1)
        return m, s


def stacked_iaf_steps(mades: nn.ModuleList, context: torch.Tensor) -> list[StackedIAFStep]:
    """``[IAFStep(made, context) for made in mades]``, computed in fewer operations: the K context
    terms W_c h + b_1 are one matrix product, and each layer's masks multiply the K weights of
    that layer in one operation (the MADEs must have equal sizes). For K = 8 small networks
    on a CPU, these per-operation costs are most of the flow's cost."""
    if len(mades) == 0:
        return []
    first = mades[0]
    projected = F.linear(context, torch.cat([made.context.weight for made in mades]),
                         torch.cat([made.hidden[0].bias for made in mades]))
    projected = projected.unflatten(-1, (len(mades), -1))

    def masked(get):
        weights = torch.stack([get(made).weight for made in mades])
        return weights * torch.stack([get(made).mask for made in mades])

    # unbind, not [l]: the backward of K slices would write K zero-padded full-size gradients
    hidden = [masked(lambda made, i=i: made.hidden[i]).unbind(0) for i in range(len(first.hidden))]
    out = masked(lambda made: made.out).unbind(0)
    projected = projected.unbind(-2)
    return [StackedIAFStep(made.k, made.degrees, projected[l], hidden[0][l],
                           [(weights[l], layer.bias) for weights, layer in zip(hidden[1:], made.hidden[1:],
                                                                                strict=True)],
                           out[l], made.out.bias)
            for l, made in enumerate(mades)]


class NormalizingFlow(dist.TorchDistribution):
    """z_K = f_K o ... o f_1 (z_0), z_0 ~ N(loc, diag scale^2); batch shape loc.shape[:-1].

    ``rsample`` returns z_K and keeps (z_K, log q_K(z_K)); ``log_prob`` of that same tensor
    returns the kept value, of any other value inverts the flow when every step can be
    inverted in closed form and raises ``NotImplementedError`` otherwise. The step
    parameters broadcast against any leading dimensions that ``expand`` or ``sample_shape``
    add, so the distribution works inside vectorized particle plates.

    Not Pyro's ``TransformedDistribution`` with cached transforms: its ``log_prob`` walks the
    steps back through their caches and computes every log-determinant a second time, where
    ``rsample`` here gets log q_K in the same pass as z_K, and it has no exact ``mean`` for
    affine flows.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True
    #: draws behind the Monte Carlo ``mean`` of a non-affine flow
    mean_samples = 1000

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, steps, validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        self.steps = list(steps)
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        super().__init__(self.loc.shape[:-1], self.loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        return NormalizingFlow(self.loc.expand(shape), self.scale.expand(shape), self.steps,
                               validate_args=self._validate_args)

    def flow(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_K, sum_k log |det df_k/dz_{k-1}|) for base points z0 of shape (..., *batch, k)."""
        z, log_det = z0, z0.new_zeros(z0.shape[:-1])
        for step in self.steps:
            z, step_log_det = step(z)
            log_det = log_det + step_log_det
        return z, log_det

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """z_0 = f_1^-1 o ... o f_K^-1 (z_K); raises NotImplementedError for planar and Sylvester."""
        for step in reversed(self.steps):
            z = step.inverse(z)
        return z

    def base_log_prob(self, z0: torch.Tensor) -> torch.Tensor:
        """log q_0(z0) = log N(z0; loc, diag scale^2), summed over the event."""
        eps = (z0 - self.loc) / self.scale
        return (-0.5 * eps**2 - self.scale.log() - _HALF_LOG_2PI).sum(-1)

    def _draw(self, sample_shape, generator=None):
        eps = torch.randn(self._extended_shape(sample_shape), dtype=self.loc.dtype,
                          device=self.loc.device, generator=generator)
        z, log_det = self.flow(self.loc + self.scale * eps)
        log_q0 = (-0.5 * eps**2 - self.scale.log() - _HALF_LOG_2PI).sum(-1)
        return z, log_q0 - log_det

    def rsample(self, sample_shape=()):
        z, log_q = self._draw(sample_shape)
        self._cache = (z, log_q)
        return z

    def sample(self, sample_shape=()):
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value):
        if self._cache is not None and value is self._cache[0]:
            return self._cache[1]
        try:
            z0 = self.inverse(value)
        except NotImplementedError:
            kinds = sorted({type(step).__name__ for step in self.steps if type(step).inverse is
                            FlowStep.inverse})
            raise NotImplementedError(
                f"log q(z | x) is only available at the guide's own samples for flows without a "
                f"closed-form inverse ({', '.join(kinds)}); draw z from this distribution and ask "
                f"for log_prob of that tensor (as Trace_ELBO and importance sampling do)") from None
        _, log_det = self.flow(z0)
        return self.base_log_prob(z0) - log_det

    @property
    def mean(self):
        """Exact for affine flows (Householder); otherwise a Monte Carlo average of
        ``mean_samples`` draws from a fixed seed (q has no closed-form mean), not differentiable."""
        if all(step.affine for step in self.steps):
            return self.flow(self.loc)[0]
        generator = torch.Generator(device=self.loc.device).manual_seed(0)
        total, drawn, chunk = 0.0, 0, 100
        with torch.no_grad():
            while drawn < self.mean_samples:
                n = min(chunk, self.mean_samples - drawn)
                total = total + self._draw((n,), generator)[0].sum(0)
                drawn += n
        return total / self.mean_samples


class AmortizedFlow(AmortizedGuide):
    """q_K(z | x): an amortized diagonal Gaussian followed by ``flow_length`` flow steps
    whose parameters the encoder emits for each data point.

        z_0 ~ N(mu(x), diag sigma(x)^2),   z_k = f_k(z_{k-1}; lambda_k(x))
        log q_K(z_K | x) = log q_0(z_0 | x) - sum_k log |det d f_k / d z_{k-1}|

    Args:
        model: any model exposing ``latent_sites``, ``x_dim`` and ``context_dim``; every site
            gets its own flow (the posterior factorizes across sites).
        hidden: the encoder trunk's hidden sizes (``()``: linear encoder).
        flow: one of ``FLOWS``.
        flow_length: K, the number of steps (0 gives the diagonal Gaussian).
        reflections: Householder reflections per Sylvester step (default: the site size k).
        made_hidden: hidden sizes of each IAF step's MADE (default: ``(max(32, 4 k),)``).
    """

    def __init__(self, model: nn.Module, hidden: tuple[int, ...] = (400,), flow: str = "planar",
                 flow_length: int = 8, reflections: int | None = None,
                 made_hidden: tuple[int, ...] | None = None):
        if flow not in FLOWS:
            raise ValueError(f"unknown flow {flow!r}; choose one of {', '.join(FLOWS)}")
        if int(flow_length) != flow_length or flow_length < 0:
            raise ValueError(f"flow_length must be a non-negative integer, got {flow_length}")
        if reflections is not None and reflections < 1:
            raise ValueError(f"reflections must be positive, got {reflections}")
        # read by head_size, which the base class calls while building the heads
        self.flow, self.flow_length, self.reflections = flow, int(flow_length), reflections
        super().__init__(model, hidden)
        if flow == "iaf":
            feature_dim = hidden[-1] if hidden else model.x_dim + model.context_dim
            self.mades = nn.ModuleDict({
                name: nn.ModuleList(
                    MADE(size, feature_dim, tuple(made_hidden or (max(32, 4 * size),)),
                         reverse=step % 2 == 1)
                    for step in range(self.flow_length))
                for name, size in self.latent_sites.items()})

    def _reflections(self, size: int) -> int:
        return self.reflections or size

    def step_size(self, size: int) -> int:
        """Encoder outputs per flow step for a site of size k."""
        if self.flow == "planar":
            return PlanarStep.num_params(size)
        if self.flow == "radial":
            return RadialStep.num_params(size)
        if self.flow == "householder":
            return HouseholderStep.num_params(size)
        if self.flow == "sylvester":
            return SylvesterStep.num_params(size, self._reflections(size))
        return 0  # iaf: the MADEs read the encoder's features

    def head_size(self, size):
        return 2 * size + self.flow_length * self.step_size(size)

    def steps(self, name: str, step_params: torch.Tensor, features: torch.Tensor, size: int) -> list:
        if self.flow == "iaf":
            return stacked_iaf_steps(self.mades[name], features)
        if self.flow == "sylvester":
            return SylvesterStep.stack(step_params, self.flow_length, size, self._reflections(size))
        step = {"planar": PlanarStep, "radial": RadialStep, "householder": HouseholderStep}[self.flow]
        return step.stack(step_params, self.flow_length, size)

    def site_distributions(self, x: torch.Tensor, context: torch.Tensor | None = None) -> dict:
        """q_K(z_site | x, context) for every latent site, batched over the rows of x."""
        features = self.trunk(self.encoder_input(x, context))
        posteriors = {}
        for name, size in self.latent_sites.items():
            loc, raw_scale, step_params = self.heads[name](features).split(
                [size, size, self.flow_length * self.step_size(size)], dim=-1)
            posteriors[name] = NormalizingFlow(loc, softplus(raw_scale) + 1e-5,
                                               self.steps(name, step_params, features, size))
        return posteriors
