"""Amortized guides: an encoder network maps each observation to its own q(z | x).

Every guide here reads ``latent_sites`` (name -> size), ``x_dim`` and
``context_dim`` off the model it is built for, and never imports a model class,
so one guide serves the VAE, the conditional VAE, the deep latent Gaussian model
and probabilistic PCA. For several latent sites the posterior factorizes across
them, as in Rezende et al. (2014): q(xi | x) = prod_l q(xi_l | x).

* ``AmortizedNormal``      q(z | x) = N(mu(x), diag sigma^2(x))
* ``AmortizedRank1Normal`` q(z | x) = N(mu(x), C(x)),  C^-1 = D(x) + u(x) u(x)^T
* ``AmortizedDelta``       q(z | x) = delta(z - f(x)): the (denoising) autoencoder as MAP
"""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule
from torch import nn
from torch.nn.functional import softplus

from bayeszoo.models.nn import mlp


class AmortizedGuide(PyroModule):
    """An encoder trunk shared by all latent sites, one linear head per site.

    Subclasses say how many numbers a head emits for a site of size k
    (``head_size``) and which distribution those numbers define (``site_distribution``).
    """

    def __init__(self, model: nn.Module, hidden: tuple[int, ...] = (400,)):
        super().__init__()
        self.latent_sites = dict(model.latent_sites)
        in_dim = model.x_dim + model.context_dim
        # hidden=() gives a linear encoder, exact for linear-Gaussian models such as pPCA.
        self.trunk = mlp([in_dim, *hidden], final_activation=True)
        feature_dim = hidden[-1] if hidden else in_dim
        self.heads = nn.ModuleDict({
            name: nn.Linear(feature_dim, self.head_size(size))
            for name, size in self.latent_sites.items()
        })

    def head_size(self, size: int) -> int:
        raise NotImplementedError

    def site_distribution(self, params: torch.Tensor, size: int):
        raise NotImplementedError

    def encoder_input(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        return x if context is None else torch.cat([x, context], dim=-1)

    def site_distributions(self, x: torch.Tensor, context: torch.Tensor | None = None) -> dict:
        """q(z_site | x, context) for every latent site, batched over the rows of x."""
        features = self.trunk(self.encoder_input(x, context))
        return {
            name: self.site_distribution(self.heads[name](features), size)
            for name, size in self.latent_sites.items()
        }

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None, **unused):
        # c: the conditional VAE's context (named c, as ``context`` clashes with Pyro's handlers)
        posteriors = self.site_distributions(x, c)
        with pyro.plate("data", x.shape[0]):
            return {name: pyro.sample(name, q) for name, q in posteriors.items()}


class AmortizedNormal(AmortizedGuide):
    """q(z | x) = N(mu(x), diag sigma(x)^2), sigma = softplus(.) (Kingma & Welling 2014)."""

    def head_size(self, size):
        return 2 * size

    def site_distribution(self, params, size):
        loc, raw_scale = params.split(size, dim=-1)
        return dist.Normal(loc, softplus(raw_scale) + 1e-5).to_event(1)


class Rank1PrecisionNormal(dist.TorchDistribution):
    """N(loc, C) with precision C^-1 = D + u u^T, D diagonal positive (Rezende et al. 2014, sec. 4.3).

    Everything is O(k): with eta = 1 / (1 + u^T D^-1 u),

        C = R R^T,  R = D^-1/2 - [(1 - sqrt(eta)) / (u^T D^-1 u)] D^-1 u u^T D^-1/2
        log det C = -sum(log D) + log eta
    """

    arg_constraints = {"loc": constraints.real_vector, "diag": constraints.independent(
        constraints.positive, 1), "u": constraints.real_vector}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc, diag, u, validate_args=None):
        self.loc, self.diag, self.u = torch.broadcast_tensors(loc, diag, u)
        super().__init__(self.loc.shape[:-1], self.loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        return Rank1PrecisionNormal(self.loc.expand(shape), self.diag.expand(shape),
                                    self.u.expand(shape))

    def _u_dinv_u(self):
        return (self.u**2 / self.diag).sum(-1, keepdim=True)

    def rsample(self, sample_shape=()):
        eps = torch.randn(self._extended_shape(sample_shape), dtype=self.loc.dtype,
                          device=self.loc.device)
        s = self._u_dinv_u()
        eta = 1.0 / (1.0 + s)
        coefficient = (1.0 - eta.sqrt()) / s
        d_inv_sqrt = self.diag.rsqrt()
        projection = (self.u * d_inv_sqrt * eps).sum(-1, keepdim=True)  # u^T D^-1/2 eps
        return self.loc + d_inv_sqrt * eps - coefficient * (self.u / self.diag) * projection

    def log_prob(self, value):
        delta = value - self.loc
        mahalanobis = (self.diag * delta**2).sum(-1) + ((self.u * delta).sum(-1)) ** 2
        log_det_precision = self.diag.log().sum(-1) + torch.log1p(self._u_dinv_u().squeeze(-1))
        k = self.loc.shape[-1]
        return 0.5 * (log_det_precision - mahalanobis - k * math.log(2 * math.pi))

    @property
    def mean(self):
        return self.loc

    @property
    def covariance_matrix(self):
        d_inv = 1.0 / self.diag
        w = d_inv * self.u
        eta = 1.0 / (1.0 + self._u_dinv_u()).unsqueeze(-1)
        return torch.diag_embed(d_inv) - eta * w.unsqueeze(-1) * w.unsqueeze(-2)


class AmortizedRank1Normal(AmortizedGuide):
    """q(z | x) = N(mu(x), C(x)) with C^-1 = D(x) + u(x) u(x)^T (Rezende et al. 2014).

    One rank-1 term lets q capture the strongest posterior correlation at the cost
    of k extra encoder outputs.
    """

    def head_size(self, size):
        return 3 * size

    def site_distribution(self, params, size):
        loc, raw_diag, u = params.split(size, dim=-1)
        return Rank1PrecisionNormal(loc, softplus(raw_diag) + 1e-5, u)


class AmortizedDelta(AmortizedGuide):
    """q(z | x) = delta(z - f(x)): a deterministic encoder, so the ELBO becomes the
    MAP objective log p(x | f(x)) + log p(f(x)) of a regularized autoencoder.

    With ``masking_noise`` > 0 it is a denoising autoencoder (Vincent et al. 2008):
    while training, each input pixel is set to 0 with that probability, and the
    model must still explain the clean x.
    """

    def __init__(self, model, hidden=(400,), masking_noise: float = 0.0):
        super().__init__(model, hidden)
        if not 0.0 <= masking_noise < 1.0:
            raise ValueError(f"masking_noise must be in [0, 1), got {masking_noise}")
        self.masking_noise = masking_noise

    def head_size(self, size):
        return size

    def site_distribution(self, params, size):
        return dist.Delta(params).to_event(1)

    def encoder_input(self, x, context):
        if self.training and self.masking_noise > 0:
            x = x * (torch.rand_like(x) >= self.masking_noise)
        return super().encoder_input(x, context)
