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
mu far off and, in training, the ELBO with it. When every full step is accepted the check costs
nothing extra: log p(x, mu') comes with the terms the next step needs. Finally Lambda =
Lambda(mu_T), the negative Hessian of log p(x, z) at mu_T for a piecewise-linear decoder
(its Gauss-Newton approximation for a smooth one). Gradients flow through every step, so
encoder and decoder learn through the refinement.

J comes from forward-mode autograd (``torch.func.vmap(jacfwd(g))``: the latent dimension
is far smaller than the data dimension) for any differentiable decoder, or, for an
``nn.Sequential`` of ``nn.Linear`` and ``nn.ReLU`` layers, from the closed form
J = W_L D_{L-1} W_{L-1} ... D_1 W_1 (D_l: the 0/1 mask of the active units); for pPCA
J = W.

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


def relu_mlp_jacobian(network: nn.Sequential, inputs: torch.Tensor, z_dim: int):
    """(g(inputs), dg/dz) for an MLP of Linear and ReLU layers whose input starts with z:
    J = W_L D_{L-1} W_{L-1} ... D_1 W_1[:, :z_dim], D_l the 0/1 masks of the active units."""
    a, jac = inputs, None
    for layer in network:
        if isinstance(layer, nn.Linear):
            if jac is None:
                jac = layer.weight[:, :z_dim].expand(*inputs.shape[:-1], -1, -1)
            else:  # W @ J for every row as one matrix product: (out, in) @ (in, rows * k)
                rows = jac.shape[:-2]
                product = layer.weight @ jac.movedim(-2, 0).reshape(jac.shape[-2], -1)
                jac = product.reshape(-1, *rows, jac.shape[-1]).movedim(0, -2)
            a = layer(a)
        elif isinstance(layer, nn.ReLU):
            active = (a > 0).to(a.dtype)
            jac = jac * active.unsqueeze(-1)
            a = torch.relu(a)
    return a, jac


def autograd_jacobian(decode: Callable, z: torch.Tensor, c: torch.Tensor | None):
    """(g(z), dg/dz) per row of z (N, k) by forward-mode autograd, vectorized over rows."""
    from torch.func import jacfwd, vmap

    if c is None:
        jac = vmap(jacfwd(lambda zi: decode(zi[None], None)[0]))(z)
    else:
        jac = vmap(jacfwd(lambda zi, ci: decode(zi[None], ci[None])[0]))(z, c)
    return decode(z, c), jac


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

    def head_size(self, size):
        return size

    def decoder_jacobian(self, z: torch.Tensor, c: torch.Tensor | None = None):
        """(g(z), dg/dz) for every row of z (N, k); J has shape (N, D, k)."""
        if self.use_closed_form:
            return self.local.jacobian(z, c)
        return autograd_jacobian(self.local.decode, z, c)

    def newton_terms(self, mu, x, c=None, x_mask=None) -> NewtonTerms:
        """Lambda(mu) and grad_z log p(x, z) at mu under the decoder linearized at mu, and the
        exact log p(x, mu)."""
        local = self.local
        decoded, jac = self.decoder_jacobian(mu, c)
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
        precision = (jac.transpose(-1, -2) * curvature.unsqueeze(-2)) @ jac
        precision = precision + torch.diag_embed(prior_scale.expand_as(mu) ** -2)
        gradient = (jac.transpose(-1, -2) @ residual.unsqueeze(-1)).squeeze(-1)
        gradient = gradient - (mu - prior_loc) / prior_scale**2
        log_prior = torch.distributions.Normal(prior_loc, prior_scale).log_prob(mu).sum(-1)
        return NewtonTerms(precision, gradient, log_likelihood.sum(-1) + log_prior)

    def refine(self, mu, x, c=None, x_mask=None, terms: NewtonTerms | None = None):
        """One guarded step mu -> mu + a Lambda(mu)^-1 grad log p(x, mu): a = 1 where that raises
        log p(x, z), else the first of 1/2, 1/4, 1/8 that does, else mu stays. Returns mu' and the
        Newton terms at mu' (``terms``: those at mu, if already known). Points are rows; the
        halvings are evaluated for the rows that still need them only."""
        if terms is None:
            terms = self.newton_terms(mu, x, c, x_mask)
        factor = cholesky_with_jitter(terms.precision, self.jitter)
        step = torch.cholesky_solve(terms.gradient.unsqueeze(-1), factor).squeeze(-1)
        # "raises" up to float rounding: near the mode a step is ~0 and the sums of D pixel terms
        # differ only in their last digits, which must not trigger the halvings
        floor = terms.log_joint - ROUNDING * terms.log_joint.abs()
        new_mu, new_terms = mu, terms
        pending = torch.arange(len(mu), device=mu.device)
        for halvings in range(MAX_HALVINGS + 1):
            rows = pending
            proposal = mu[rows] + step[rows] / 2**halvings
            proposed = self.newton_terms(proposal, x[rows], _rows(c, rows), _rows(x_mask, rows))
            better = proposed.log_joint >= floor[rows]
            kept = rows[better]
            new_mu = new_mu.index_copy(0, kept, proposal[better])
            new_terms = NewtonTerms(*(full.index_copy(0, kept, part[better])
                                      for full, part in zip(new_terms, proposed, strict=True)))
            pending = rows[~better]
            if len(pending) == 0:
                break
        return new_mu, new_terms

    def site_distributions(self, x, context=None, x_mask=None) -> dict:
        """q(z | x) = N(mu_T, Lambda(mu_T)^-1) for the model's latent site."""
        mu = self.heads[self.site](self.trunk(self.encoder_input(x, context)))
        terms = self.newton_terms(mu, x, context, x_mask)
        for _ in range(self.steps):
            mu, terms = self.refine(mu, x, context, x_mask, terms)
        return {self.site: PrecisionNormal(mu, cholesky_with_jitter(terms.precision, self.jitter))}

    def forward(self, x, c=None, x_mask=None, **unused):
        posteriors = self.site_distributions(x, c, x_mask)
        with pyro.plate("data", x.shape[0]):
            return {name: pyro.sample(name, q) for name, q in posteriors.items()}
