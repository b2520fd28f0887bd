"""TRADI's posterior: a Gaussian per weight, read off a Kalman filter that tracked training.

    q(w) = prod_i N(w_i | mu_i, sigma_i^2)

mu and sigma^2 come from ``inference.tradi.WeightTracker`` (Franchi et al., ECCV 2020): the
filtered centre of each weight's SGD/Adam trajectory and the variance accumulated from the
fluctuation of its actual steps. Nothing here is fitted to an ELBO: the guide only samples.
Sites the tracker did not follow (positive noise or prior scales) stay at the trained point.
Because every weight site is a Normal, ``Predictive``, the metrics, ArviZ and the local
reparameterization handler treat this guide like the mean-field one.

Correlated weights within a layer (``rank`` R > 0). The paper points out that weights of one
layer are not independent and builds a low-rank covariance from random features. The
construction here keeps every marginal N(mu_i, sigma_i^2) (the variance exactly in expectation over
the random features, to O(1 / sqrt(R)) for one draw of them) and correlates the weights of one
tensor through a kernel on their tracked means, k(mu_i, mu_j) = exp(-(mu_i - mu_j)^2 / (2 l^2))
with l the tensor's sd of mu, approximated by R random Fourier features (Rahimi & Recht 2007)
phi(mu) = sqrt(2 / R) cos(omega mu + b), omega ~ N(0, 1 / l^2), b ~ U(0, 2 pi):

    z ~ N(0, I_R)                                         (one per tensor, auxiliary)
    w_i | z ~ N(mu_i + sigma_i sqrt(rho) phi(mu_i)^T z,  sigma_i^2 (1 - rho))

so Cov(w_i, w_j) = sigma_i sigma_j [(1 - rho) delta_ij + rho phi(mu_i)^T phi(mu_j)]: weights with
similar means move together, and log q is that of the exact joint of (z, w). This is our
reading of the random-feature idea, not a transcription of the paper's estimator.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from bayeszoo.guides.weights import weight_sites


class TradiGuide(PyroModule):
    """``means`` / ``variances``: site name -> tensor of the site's shape (tracked sites);
    ``point``: every site's trained value (used for sites that were not tracked)."""

    def __init__(self, model, means: dict[str, torch.Tensor], variances: dict[str, torch.Tensor],
                 point: dict[str, torch.Tensor], min_variance: float = 1e-12, rank: int = 0,
                 correlation: float = 0.5):
        super().__init__()
        if rank < 0 or not 0 <= correlation < 1:
            raise ValueError(f"rank must be >= 0 and correlation in [0, 1), got {rank}, {correlation}")
        self.sites = weight_sites(model)
        self.tracked = [s.name for s in self.sites if s.name in means]
        self.rank, self.correlation = rank, correlation
        for site in self.sites:
            if site.name in means:
                self.register_buffer(f"{site.key}_loc", means[site.name].detach().clone())
                self.register_buffer(f"{site.key}_scale",
                                     variances[site.name].detach().clamp(min=min_variance).sqrt())
                if rank > 0:
                    self.register_buffer(f"{site.key}_features", random_features(means[site.name], rank))
            else:
                self.register_buffer(f"{site.key}_point", point[site.name].detach().clone())

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        values = {}
        for site in self.sites:
            if site.name in self.tracked:
                q = self._weight_distribution(site).to_event(site.event_dim)
            else:
                q = dist.Delta(getattr(self, f"{site.key}_point"), event_dim=site.event_dim)
            values[site.name] = pyro.sample(site.name, q)
        return values

    def _weight_distribution(self, site) -> dist.Normal:
        loc, scale = getattr(self, f"{site.key}_loc"), getattr(self, f"{site.key}_scale")
        if self.rank == 0:
            return dist.Normal(loc, scale)
        z = pyro.sample(f"{site.name}.features", dist.Normal(0.0, 1.0).expand([self.rank]).to_event(1),
                        infer={"is_auxiliary": True})
        features = getattr(self, f"{site.key}_features")  # (*shape, R)
        shared = (features * z[(...,) + (None,) * site.event_dim + (slice(None),)]).sum(-1)
        rho = self.correlation
        return dist.Normal(loc + scale * rho ** 0.5 * shared, scale * (1 - rho) ** 0.5)


def random_features(means: torch.Tensor, rank: int) -> torch.Tensor:
    """phi(mu) for every entry of ``means`` (*shape, R): phi(a)^T phi(b) ~ exp(-(a - b)^2 / (2 l^2)),
    with the length scale l the spread of the means (so the kernel compares weights of one tensor
    on their own scale)."""
    length = means.std().clamp(min=1e-8) if means.numel() > 1 else means.new_tensor(1.0)
    omega = torch.randn(rank, dtype=means.dtype) / length
    phase = 2 * math.pi * torch.rand(rank, dtype=means.dtype)
    return math.sqrt(2.0 / rank) * torch.cos(means.detach().unsqueeze(-1) * omega + phase)
