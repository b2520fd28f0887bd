"""The Laplace guide: the Variational Laplace Autoencoder (Park, Kim & Kim 2019).

    q(z | x) = N(mu_T, Lambda^-1),  full covariance

mu_0 is the encoder's output. Each of T refinement steps linearizes the decoder at the
current mean, g(z) ~ g(mu) + J (z - mu) with J = dg/dz (exact for piecewise-linear ReLU
decoders inside the linear region), and moves mu to the mode of log p(x, z) under that
linearization:

    Lambda(mu) = S_0^-1 + J^T diag(h) J
    mu' = mu + Lambda(mu)^-1 grad_z log p(x, z) |_mu
        = mu + Lambda^-1 [ -S_0^-1 (mu - m_0) + J^T r ]

with the prior N(m_0, S_0) (diagonal), and for the pixel likelihood

    Gaussian  N(x; g(z), sigma^2):   h = 1 / sigma^2,   r = (x - g(mu)) / sigma^2
    Bernoulli (logits g(z)):         h = p (1 - p),      r = x - p,   p = sigmoid(g(mu))

For a Gaussian likelihood the step is the probabilistic-PCA posterior mean of the
linearized model; for a Bernoulli likelihood it is a Newton step. A step must raise the exact
log p(x, z) (with the decoder itself, not its linearization): where the full step does not, it
is halved up to three times, and if none of those raises it either mu stays. The paper's steps
are undamped; unguarded, a step that leaves the region where the linearization holds can throw
mu far off and, in training, the ELBO with it. The check costs one decoder pass per tried
point, and the pass at the accepted mu' is the one the next step linearizes. Finally Lambda =
Lambda(mu_T), the negative Hessian of log p(x, z) at mu_T for a piecewise-linear decoder
(its Gauss-Newton approximation for a smooth one). Gradients flow through every step, so
encoder and decoder learn through the refinement.

J comes from forward-mode autograd (``torch.func.vmap(jacfwd(g))``: the latent dimension
is far smaller than the data dimension) for any differentiable decoder, or, for an
``nn.Sequential`` of ``nn.Linear`` and ``nn.ReLU`` layers, from the closed form
J = W_L D_{L-1} W_{L-1} ... D_1 W_1 (D_l: the 0/1 mask of the active units); for pPCA
J = W.

**Cost.** For a ReLU decoder, J = W_L A with A = D_{L-1} ... W_1 is formed from the masks of
the decoder pass as one (N k, h) x (h, D) matrix product per Newton step and once more for
the final Lambda: these products are the guide's floor. The steps' backward pass does not go
through J: the gradient of s = Lambda^-1 g with respect to J is of rank 2 per point
(``FactoredNewtonStep``), so it costs a few decoder-sized products instead of two J-sized
ones per step; only the final Lambda, whose gradient has full rank, is differentiated
through J (``FactoredPrecision``). The values and gradients are those of autograd through
the equations above, to rounding.

The guide reads what it needs off the model, never its class: one latent site, and
either a ``decoder`` network with a ``likelihood`` (``kind``, and ``log_sigma`` when
Gaussian) and optionally a conditional ``prior(c)`` (the VAE and the conditional VAE), or
a linear map ``W``, ``mu``, ``sigma`` (probabilistic PCA, where one step is exact).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from bayeszoo.guides.amortized import AmortizedGuide

JACOBIANS = ("auto", "autograd", "relu")


MAX_HALVINGS = 3  # a refinement step tries a = 1, 1/2, 1/4, 1/8 of the Newton step
ROUNDING = 1e-4  # relative change of log p(x, z) taken for no change


def _rows(tensor: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if tensor is None else tensor[rows]


class NewtonTerms(NamedTuple):
    precision: torch.Tensor  # Lambda(mu), (N, k, k)
    gradient: torch.Tensor  # grad_z log p(x, z) at mu, (N, k)
    log_joint: torch.Tensor  # log p(x, mu) with the decoder itself, (N,)


class NotPositiveDefiniteError(ValueError):
    """The posterior precision could not be factorized, even with jitter."""


def cholesky_with_jitter(matrix: torch.Tensor, jitter: float = 1e-6, tries: int = 5) -> torch.Tensor:
    """Lower Cholesky factor of a batch of symmetric matrices. Where the plain factorization
    fails, jitter * mean(diag) * 10^i * I (i = 0..tries-1) is added to those matrices only;
    raises NotPositiveDefiniteError naming the batch entries that still fail."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if not bool((info > 0).any()):
        return factor
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    scale = matrix.diagonal(dim1=-2, dim2=-1).mean(-1).abs().clamp_min(1.0)[..., None, None]
    for i in range(tries):
        failed = (info > 0)[..., None, None]
        retry, retry_info = torch.linalg.cholesky_ex(matrix + jitter * 10**i * scale * eye)
        factor = torch.where(failed, retry, factor)
        info = torch.where(info > 0, retry_info, info)
        if not bool((info > 0).any()):
            return factor
    bad = torch.nonzero(info > 0).flatten().tolist()
    raise NotPositiveDefiniteError(
        f"the posterior precision is not positive definite at batch entries {bad[:10]}"
        f"{' ...' if len(bad) > 10 else ''}, even with jitter up to {jitter * 10 ** (tries - 1):g} "
        "times its mean diagonal (non-finite decoder outputs or Jacobians?)")


def _matmul_columns(matrix: torch.Tensor, vectors: torch.Tensor, fn: Callable) -> torch.Tensor:
    """fn(matrix, columns) for vectors (S..., B..., k) against matrices (B..., k, k): the
    sample dims S go into the columns of one right-hand side, so the matrices are never
    copied once per sample (a leading particle dim of 1000 would otherwise cost 1000 copies)."""
    extra = vectors.dim() - (matrix.dim() - 1)
    batch = vectors.shape[extra:-1]
    columns = vectors.reshape(-1, *vectors.shape[extra:]).movedim(0, -1)  # (B..., k, M)
    result = fn(matrix.expand(*batch, *matrix.shape[-2:]), columns)
    return result.movedim(-1, 0).reshape(vectors.shape)


class PrecisionNormal(dist.TorchDistribution):
    """N(loc, Lambda^-1) given the lower Cholesky factor L of the precision, Lambda = L L^T.

        z = loc + L^-T eps,  eps ~ N(0, I)
        log q(z) = -1/2 |L^T (z - loc)|^2 + sum_i log L_ii - k/2 log 2 pi

    ``expand`` keeps L unexpanded: leading particle dimensions broadcast against it.
    """

    arg_constraints = {"loc": constraints.real_vector, "precision_tril": constraints.lower_cholesky}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, precision_tril: torch.Tensor, validate_args=None):
        batch_shape = torch.broadcast_shapes(loc.shape[:-1], precision_tril.shape[:-2])
        self.loc = loc.expand(batch_shape + loc.shape[-1:])
        self.precision_tril = precision_tril
        super().__init__(batch_shape, loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return PrecisionNormal(self.loc.expand(batch_shape + self.event_shape), self.precision_tril,
                               validate_args=self._validate_args)

    def rsample(self, sample_shape=()):
        eps = torch.randn(self._extended_shape(sample_shape), dtype=self.loc.dtype, device=self.loc.device)
        solve = lambda L, b: torch.linalg.solve_triangular(L.transpose(-1, -2), b, upper=True)
        return self.loc + _matmul_columns(self.precision_tril, eps, solve)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        white = _matmul_columns(self.precision_tril, value - self.loc, lambda L, b: L.transpose(-1, -2) @ b)
        half_log_det = self.precision_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        k = self.event_shape[0]
        return -0.5 * (white**2).sum(-1) + half_log_det - 0.5 * k * math.log(2 * math.pi)

    @property
    def mean(self):
        return self.loc

    @property
    def precision_matrix(self):
        L = self.precision_tril
        return (L @ L.transpose(-1, -2)).expand(self.batch_shape + L.shape[-2:])

    @property
    def covariance_matrix(self):
        return torch.cholesky_inverse(self.precision_tril).expand(self.batch_shape + self.event_shape * 2)

    @property
    def variance(self):
        return self.covariance_matrix.diagonal(dim1=-2, dim2=-1)


@dataclass
class LocalModel:
    """What a Laplace step needs from a model with one latent site z of size k.

    ``decode(z, c)``: g(z), the Gaussian mean or the Bernoulli logits of every pixel;
    ``likelihood``: "gaussian" or "bernoulli"; ``noise()``: sigma; ``prior(c, template)``:
    (m_0, s_0), the prior's mean and standard deviations; ``network``: g as an
    ``nn.Sequential`` of Linear and ReLU layers acting on ``cat(z, c)``, when it is one;
    ``jacobian(z, c)``: (g(z), dg/dz) in closed form, when the model offers one.
    """

    decode: Callable
    likelihood: str
    noise: Callable | None
    prior: Callable
    network: nn.Sequential | None = None
    jacobian: Callable | None = None


def _standard_prior(k: int) -> Callable:
    def prior(c, template):
        zeros = template.new_zeros(*template.shape[:-1], k)
        return zeros, torch.ones_like(zeros)
    return prior


def local_model(model: nn.Module) -> LocalModel:
    """Read the Laplace ingredients off a model by what it has (never by its class)."""
    sites = dict(getattr(model, "latent_sites", {}))
    if len(sites) != 1:
        raise ValueError(f"the Laplace guide needs a model with one latent site, this one has "
                         f"{len(sites)} ({', '.join(sites)}); use another guide for it")
    (k,) = sites.values()
    if hasattr(model, "decoder") and hasattr(model, "likelihood"):
        kind = model.likelihood.kind
        network = model.decoder

        def decode(z, c):
            return network(z if c is None else torch.cat([z, c.expand(*z.shape[:-1], c.shape[-1])], -1))

        noise = (lambda: model.likelihood.log_sigma.exp()) if kind == "gaussian" else None
        if getattr(model, "prior_net", None) is not None:
            def prior(c, template):
                base = model.prior(c).base_dist
                return base.loc, base.scale
        else:
            prior = _standard_prior(k)
        if not _is_relu_mlp(network):
            return LocalModel(decode, kind, noise, prior)

        def jacobian(z, c):
            inputs = z if c is None else torch.cat([z, c], dim=-1)
            return relu_mlp_jacobian(network, inputs, z.shape[-1])

        return LocalModel(decode, kind, noise, prior, network, jacobian)
    if all(hasattr(model, name) for name in ("W", "mu", "sigma")):
        def linear(z, c):
            return z @ model.W.T + model.mu

        return LocalModel(linear, "gaussian", lambda: model.sigma, _standard_prior(k), None,
                          lambda z, c: (linear(z, c), model.W.expand(*z.shape[:-1], -1, -1)))
    raise ValueError("the Laplace guide needs a model with a decoder network and a pixel likelihood "
                     "(VAE, conditional VAE) or a linear Gaussian decoder W, mu, sigma (pPCA)")


def _is_relu_mlp(network) -> bool:
    return isinstance(network, nn.Sequential) and all(
        isinstance(layer, (nn.Linear, nn.ReLU, nn.Identity)) for layer in network) and any(
        isinstance(layer, nn.Linear) for layer in network)


def _relu_forward(network: nn.Sequential, inputs: torch.Tensor):
    """g(inputs) and the 0/1 masks of the active units of every ReLU layer, in order."""
    a, masks = inputs, []
    for layer in network:
        if isinstance(layer, nn.Linear):
            a = layer(a)
        elif isinstance(layer, nn.ReLU):
            masks.append((a > 0).to(a.dtype))
            a = torch.relu(a)
    return a, tuple(masks)


def _last_linear(network: nn.Sequential) -> int:
    return max(i for i, layer in enumerate(network) if isinstance(layer, nn.Linear))


def relu_factor(network: nn.Sequential, masks, z_dim: int):
    """J = W_L A for a ReLU MLP at M points with the given ReLU masks: the last layer's weight
    W_L (D, h) and A = D_{L-1} W_{L-1} ... D_1 W_1[:, :z_dim], stored transposed as F = A^T,
    (M, k, h), so that J^T = F W_L^T is one matrix product (M k, h) @ (h, D). ReLUs after the
    last Linear are not part of A (their masks zero rows of J; ``linearize`` folds them into
    the pixel terms)."""
    last = _last_linear(network)
    rows = masks[0].shape[0] if masks else None
    factor, mask_index, weight = None, 0, None
    for i, layer in enumerate(network):
        if i == last:
            weight = layer.weight if factor is not None else layer.weight[:, :z_dim]
            break
        if isinstance(layer, nn.Linear):
            if factor is None:
                factor = layer.weight[:, :z_dim].T.expand(rows, -1, -1)
            else:
                factor = (factor.reshape(-1, factor.shape[-1]) @ layer.weight.T).view(rows, z_dim, -1)
        elif isinstance(layer, nn.ReLU):
            mask = masks[mask_index]
            mask_index += 1
            if factor is None:  # a ReLU on the inputs themselves: start from the selector of z
                eye = torch.eye(z_dim, mask.shape[-1], dtype=mask.dtype, device=mask.device)
                factor = eye.expand(rows, -1, -1)
            factor = factor * mask.unsqueeze(-2)
    if factor is None:  # one Linear layer: J = W[:, :k] for every point
        factor = torch.eye(z_dim, dtype=weight.dtype, device=weight.device).expand(rows or 1, -1, -1)
    return weight, factor


def _factored_jacobian_t(weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """J^T = F W^T, (M, k, D), one matrix product."""
    return (factor.reshape(-1, factor.shape[-1]) @ weight.T).view(*factor.shape[:-1], weight.shape[0])


def relu_mlp_jacobian(network: nn.Sequential, inputs: torch.Tensor, z_dim: int):
    """(g(inputs), dg/dz) for an MLP of Linear and ReLU layers whose input starts with z:
    J = W_L D_{L-1} W_{L-1} ... D_1 W_1[:, :z_dim], D_l the 0/1 masks of the active units;
    J has shape (*rows, D, k)."""
    rows = inputs.shape[:-1]
    decoded, masks = _relu_forward(network, inputs.reshape(-1, inputs.shape[-1]))
    weight, factor = relu_factor(network, masks, z_dim)
    jac = _factored_jacobian_t(weight, factor.expand(decoded.shape[0], -1, -1)).transpose(-1, -2)
    for mask in masks[_inner_relus(network):]:
        jac = jac * mask.unsqueeze(-1)  # ReLUs after the last Linear zero rows of J
    return decoded.reshape(*rows, -1), jac.reshape(*rows, *jac.shape[-2:])


def _inner_relus(network: nn.Sequential) -> int:
    """How many ReLU layers come before the last Linear."""
    return sum(isinstance(layer, nn.ReLU) for layer in network[:_last_linear(network)])


def autograd_jacobian(decode: Callable, z: torch.Tensor, c: torch.Tensor | None):
    """(g(z), dg/dz) per row of z (N, k) by forward-mode autograd, vectorized over rows."""
    from torch.func import jacfwd, vmap

    if c is None:
        jac = vmap(jacfwd(lambda zi: decode(zi[None], None)[0]))(z)
    else:
        jac = vmap(jacfwd(lambda zi, ci: decode(zi[None], ci[None])[0]))(z, c)
    return decode(z, c), jac


def precision_and_gradient(jac, curvature, residual, prior_precision, prior_gradient):
    """Lambda = J^T diag(h) J + diag(S_0^-1) and g = J^T r + g_0 for J (M, D, k)."""
    precision = jac.transpose(-1, -2) @ (jac * curvature.unsqueeze(-1))
    precision = precision + torch.diag_embed(prior_precision)
    gradient = (jac.transpose(-1, -2) @ residual.unsqueeze(-1)).squeeze(-1) + prior_gradient
    return precision, gradient


def _factored_precision_and_gradient(jac_t, curvature, residual, prior_precision, prior_gradient):
    """Lambda and g from J^T (M, k, D), as one batched product J^T [diag(h) J, r]."""
    k = jac_t.shape[-2]
    right = torch.cat([jac_t * curvature.unsqueeze(-2), residual.unsqueeze(-2)], dim=-2)
    product = jac_t @ right.transpose(-1, -2)  # (M, k, k + 1)
    precision = product[..., :k] + torch.diag_embed(prior_precision)
    return precision, product[..., k] + prior_gradient


def _newton_system(weight, factor, curvature, residual, prior_precision, prior_gradient):
    """Lambda and g as ``_factored_precision_and_gradient`` computes them, outside autograd and
    with one (M, k, D) buffer: g = A^T (W^T r) + g_0 needs no J, and J^T is scaled by sqrt(h) in
    place, Lambda = (J^T H^1/2)(J^T H^1/2)^T + diag(S_0^-1) (h >= 0: p (1 - p), 1 / sigma^2 or 0)."""
    gradient = (factor @ (residual @ weight).unsqueeze(-1)).squeeze(-1) + prior_gradient
    scaled = _factored_jacobian_t(weight, factor).mul_(curvature.sqrt().unsqueeze(-2))
    precision = scaled @ scaled.transpose(-1, -2) + torch.diag_embed(prior_precision)
    return precision, gradient


class FactoredNewtonStep(torch.autograd.Function):
    """The Newton step s = Lambda^-1 g with J = W A (module docstring), and its exact gradient
    without J.

    Forward forms J^T = F W^T (F = A^T; one (M k, h) @ (h, D) product), Lambda and g, and
    solves. The backward needs no J: with u = Lambda^-1 ds (ds the incoming gradient),
    dL/dLambda = -u s^T and dL/dg = u, so

        dL/dJ_n = a_n s_n^T + b_n u_n^T,   a = -h * (J u),   b = r - h * (J s)    (rank 2)
        dL/dW = sum_n dL/dJ_n A_n^T,   dL/dA_n = W^T dL/dJ_n,
        dL/dh = -(J u) * (J s),   dL/dr = J u,   dL/dS_0^-1 = -u * s,   dL/dg_0 = u,

    where J u = W (A u) and J s = W (A s) cost two matrix-vector products per point: three
    (2M, D) x (D, h)-sized products in all, where autograd through J pays two (M k, h) x (h, D)
    products. The jitter that ``cholesky_with_jitter`` adds where Lambda fails to factorize
    counts as a constant here.
    """

    @staticmethod
    def forward(ctx, weight, factor, curvature, residual, prior_precision, prior_gradient, jitter):
        precision, gradient = _newton_system(weight, factor, curvature, residual, prior_precision,
                                             prior_gradient)
        tril = cholesky_with_jitter(precision, jitter)
        step = torch.cholesky_solve(gradient.unsqueeze(-1), tril).squeeze(-1)
        ctx.save_for_backward(weight, factor, curvature, residual, tril, step)
        return step

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_step):
        weight, factor, curvature, residual, tril, step = ctx.saved_tensors
        u = torch.cholesky_solve(grad_step.unsqueeze(-1), tril).squeeze(-1)
        rows = len(u)
        pair = torch.stack([step, u], dim=-1)  # (M, k, 2)
        # A_n s_n and A_n u_n (F_n^T s_n, F_n^T u_n) interleaved as rows 2n, 2n + 1: (2M, h)
        factor_su = (pair.transpose(-1, -2) @ factor).reshape(2 * rows, -1)
        jac_su = (factor_su @ weight.T).view(rows, 2, -1)  # J_n s_n, J_n u_n
        jac_s, jac_u = jac_su[:, 0], jac_su[:, 1]
        ab = torch.stack([-curvature * jac_u, residual - curvature * jac_s], dim=1)  # a_n, b_n
        ab = ab.reshape(2 * rows, -1)
        needs = ctx.needs_input_grad
        grad_weight = ab.T @ factor_su if needs[0] else None  # sum_n a_n (A_n s_n)^T + b_n (A_n u_n)^T
        # dL/dF_n = s_n (W^T a_n)^T + u_n (W^T b_n)^T
        grad_factor = pair @ (ab @ weight).view(rows, 2, -1) if needs[1] else None
        return (grad_weight, grad_factor, -jac_u * jac_s if needs[2] else None,
                jac_u if needs[3] else None, -u * step if needs[4] else None, u, None)


class FactoredPrecision(torch.autograd.Function):
    """Lambda = J^T diag(h) J + diag(S_0^-1) with J^T = F W^T, keeping J^T for the backward:
    with S = G + G^T (G = dL/dLambda), dL/dJ^T = (S J^T) diag(h) and dL/dh = 1/2 diag(J S J^T)
    share the one batched product S J^T, where autograd through the two products of Lambda
    pays two."""

    @staticmethod
    def forward(ctx, weight, factor, curvature, prior_precision):
        jac_t = _factored_jacobian_t(weight, factor)
        ctx.save_for_backward(weight, factor, curvature, jac_t)
        precision = jac_t @ (jac_t * curvature.unsqueeze(-2)).transpose(-1, -2)
        return precision + torch.diag_embed(prior_precision)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_precision):
        weight, factor, curvature, jac_t = ctx.saved_tensors
        s_jac_t = (grad_precision + grad_precision.transpose(-1, -2)) @ jac_t  # (M, k, D)
        needs = ctx.needs_input_grad
        grad_curvature = 0.5 * (s_jac_t * jac_t).sum(-2) if needs[2] else None
        grad_jac_t = s_jac_t.mul_(curvature.unsqueeze(-2)).reshape(-1, weight.shape[0])  # s_jac_t is ours
        grad_weight = grad_jac_t.T @ factor.reshape(-1, factor.shape[-1]) if needs[0] else None
        grad_factor = (grad_jac_t @ weight).view(factor.shape) if needs[1] else None
        grad_prior = grad_precision.diagonal(dim1=-2, dim2=-1) if needs[3] else None
        return grad_weight, grad_factor, grad_curvature, grad_prior


@dataclass
class Linearization:
    """log p(x, z) at the rows mu (N, k) and the terms of its Newton step there (module
    docstring): h and r per pixel (masked pixels zeroed), S_0^-1 and g_0 = -S_0^-1 (mu - m_0)
    from the prior, and the ReLU masks from which J is rebuilt (empty for other decoders)."""

    mu: torch.Tensor
    context: torch.Tensor | None
    log_joint: torch.Tensor
    curvature: torch.Tensor
    residual: torch.Tensor
    prior_precision: torch.Tensor
    prior_gradient: torch.Tensor
    masks: tuple[torch.Tensor, ...] = ()

    def with_rows(self, rows: torch.Tensor, other: Linearization, chosen: torch.Tensor) -> Linearization:
        """A copy whose ``rows`` are replaced by the ``chosen`` rows of ``other``."""
        def put(mine, theirs):
            return mine.index_copy(0, rows, theirs[chosen])
        return Linearization(
            put(self.mu, other.mu), self.context, put(self.log_joint, other.log_joint),
            put(self.curvature, other.curvature), put(self.residual, other.residual),
            put(self.prior_precision, other.prior_precision), put(self.prior_gradient, other.prior_gradient),
            tuple(put(mine, theirs) for mine, theirs in zip(self.masks, other.masks, strict=True)))


class VLAEGuide(AmortizedGuide):
    """The Variational Laplace Autoencoder's q(z | x) = N(mu_T, Lambda(mu_T)^-1) (module
    docstring for the equations).

    Args:
        model: a model with one latent site (VAE, conditional VAE, pPCA).
        hidden: the encoder trunk's hidden sizes (``()``: linear encoder).
        steps: T, the refinement steps (0: the encoder's mean with the Laplace precision).
        jacobian: "relu" (closed form, needs an MLP of Linear and ReLU layers), "autograd"
            (forward mode, any differentiable decoder) or "auto" (a closed form when there is
            one: ReLU MLPs, and pPCA's constant J = W).
        jitter: relative jitter tried when a precision matrix fails to factorize.
    """

    def __init__(self, model: nn.Module, hidden: tuple[int, ...] = (400,), steps: int = 4,
                 jacobian: str = "auto", jitter: float = 1e-6):
        if int(steps) != steps or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps}")
        if jacobian not in JACOBIANS:
            raise ValueError(f"unknown jacobian {jacobian!r}; choose one of {', '.join(JACOBIANS)}")
        local = local_model(model)  # fails early, with the reason, for models it cannot serve
        if jacobian == "relu" and local.network is None:
            raise ValueError("jacobian='relu' needs a decoder made of nn.Linear and nn.ReLU layers")
        super().__init__(model, hidden)
        self.steps, self.jitter = int(steps), jitter
        self.use_closed_form = local.jacobian is not None and jacobian != "autograd"
        self.site, self.z_dim = next(iter(self.latent_sites.items()))
        self.local = local  # reads the model's networks live; they stay the model's parameters

    @property
    def factored(self) -> bool:
        """J = W_L A from the ReLU masks (``relu_factor``), rather than J itself."""
        return self.use_closed_form and self.local.network is not None

    def head_size(self, size):
        return size

    def decoder_jacobian(self, z: torch.Tensor, c: torch.Tensor | None = None):
        """(g(z), dg/dz) for every row of z (N, k); J has shape (N, D, k)."""
        if self.use_closed_form:
            return self.local.jacobian(z, c)
        return autograd_jacobian(self.local.decode, z, c)

    def linearize(self, mu, x, c=None, x_mask=None) -> Linearization:
        """log p(x, mu) with the decoder itself, and h, r and the prior's terms at mu. Costs one
        decoder pass: J is only formed when a step or the precision asks for it."""
        local = self.local
        if self.factored:
            network = local.network
            decoded, masks = _relu_forward(network, mu if c is None else torch.cat([mu, c], dim=-1))
        else:
            decoded, masks = local.decode(mu, c), ()
        prior_loc, prior_scale = local.prior(c, mu)
        if local.likelihood == "gaussian":
            curvature = torch.ones_like(decoded) / local.noise() ** 2
            residual = (x - decoded) * curvature
            log_likelihood = torch.distributions.Normal(decoded, local.noise()).log_prob(x)
        else:
            p = torch.sigmoid(decoded)
            curvature, residual = p * (1 - p), x - p
            log_likelihood = -F.binary_cross_entropy_with_logits(decoded, x, reduction="none")
        if x_mask is not None:
            weight = x_mask.to(decoded.dtype)
            curvature, residual = curvature * weight, residual * weight
            log_likelihood = log_likelihood * weight
        if self.factored:
            for mask in masks[_inner_relus(network):]:  # a ReLU after the last Linear zeroes those rows of J
                curvature, residual = curvature * mask, residual * mask
        log_prior = torch.distributions.Normal(prior_loc, prior_scale).log_prob(mu).sum(-1)
        return Linearization(mu, c, log_likelihood.sum(-1) + log_prior, curvature, residual,
                             prior_scale.expand_as(mu) ** -2, -((mu - prior_loc) / prior_scale**2), masks)

    def _jacobian_parts(self, point: Linearization):
        """(W_L, F) for a ReLU decoder (``relu_factor``), else (None, J) with J (N, D, k)."""
        if self.factored:
            weight, factor = relu_factor(self.local.network, point.masks, self.z_dim)
            return weight, factor.expand(len(point.mu), -1, -1)
        return None, self.decoder_jacobian(point.mu, point.context)[1]

    def precision_and_gradient(self, point: Linearization):
        """Lambda(mu) and grad_z log p(x, z) at mu under the decoder linearized at mu."""
        weight, jac = self._jacobian_parts(point)
        if weight is not None:
            return _factored_precision_and_gradient(_factored_jacobian_t(weight, jac), point.curvature,
                                                    point.residual, point.prior_precision,
                                                    point.prior_gradient)
        return precision_and_gradient(jac, point.curvature, point.residual, point.prior_precision,
                                      point.prior_gradient)

    def precision(self, point: Linearization) -> torch.Tensor:
        """Lambda(mu), the precision of q at the last point."""
        if self.factored:
            weight, factor = self._jacobian_parts(point)
            return FactoredPrecision.apply(weight, factor, point.curvature, point.prior_precision)
        return self.precision_and_gradient(point)[0]

    def newton_step(self, point: Linearization) -> torch.Tensor:
        """Lambda(mu)^-1 grad_z log p(x, z) at mu."""
        if self.factored:
            weight, factor = self._jacobian_parts(point)
            return FactoredNewtonStep.apply(weight, factor, point.curvature, point.residual,
                                            point.prior_precision, point.prior_gradient, self.jitter)
        precision, gradient = self.precision_and_gradient(point)
        tril = cholesky_with_jitter(precision, self.jitter)
        return torch.cholesky_solve(gradient.unsqueeze(-1), tril).squeeze(-1)

    def newton_terms(self, mu, x, c=None, x_mask=None) -> NewtonTerms:
        """Lambda(mu) and grad_z log p(x, z) at mu under the decoder linearized at mu, and the
        exact log p(x, mu)."""
        point = self.linearize(mu, x, c, x_mask)
        return NewtonTerms(*self.precision_and_gradient(point), point.log_joint)

    def refine(self, mu, x, c=None, x_mask=None, point: Linearization | None = None):
        """One guarded step mu -> mu + a Lambda(mu)^-1 grad log p(x, mu): a = 1 where that raises
        log p(x, z), else the first of 1/2, 1/4, 1/8 that does, else mu stays. Returns mu' and the
        linearization at mu' (``point``: the one at mu, if already known). Points are rows; the
        halvings are evaluated for the rows that still need them only, each with one decoder
        pass (the guard needs log p(x, z) alone; J is formed at the accepted points only, by
        the next step)."""
        if point is None:
            point = self.linearize(mu, x, c, x_mask)
        step = self.newton_step(point)
        # "raises" up to float rounding: near the mode a step is ~0 and the sums of D pixel terms
        # differ only in their last digits, which must not trigger the halvings
        floor = point.log_joint - ROUNDING * point.log_joint.abs()
        proposed = self.linearize(mu + step, x, c, x_mask)
        better = proposed.log_joint >= floor
        if bool(better.all()):  # the common case: every full step is taken, nothing to merge
            return proposed.mu, proposed
        everything = torch.arange(len(mu), device=mu.device)
        new_point = point.with_rows(everything[better], proposed, better)
        pending = everything[~better]
        for halvings in range(1, MAX_HALVINGS + 1):
            rows = pending
            proposal = mu[rows] + step[rows] / 2**halvings
            proposed = self.linearize(proposal, x[rows], _rows(c, rows), _rows(x_mask, rows))
            better = proposed.log_joint >= floor[rows]
            new_point = new_point.with_rows(rows[better], proposed, better)
            pending = rows[~better]
            if len(pending) == 0:
                break
        return new_point.mu, new_point

    def site_distributions(self, x, context=None, x_mask=None) -> dict:
        """q(z | x) = N(mu_T, Lambda(mu_T)^-1) for the model's latent site."""
        mu = self.heads[self.site](self.trunk(self.encoder_input(x, context)))
        point = self.linearize(mu, x, context, x_mask)
        for _ in range(self.steps):
            mu, point = self.refine(mu, x, context, x_mask, point)
        return {self.site: PrecisionNormal(mu, cholesky_with_jitter(self.precision(point), self.jitter))}

    def forward(self, x, c=None, x_mask=None, **unused):
        posteriors = self.site_distributions(x, c, x_mask)
        with pyro.plate("data", x.shape[0]):
            return {name: pyro.sample(name, q) for name, q in posteriors.items()}
