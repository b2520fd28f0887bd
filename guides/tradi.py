"""TRADI's posterior: a Gaussian per weight, read off a Kalman filter that tracked training.

    q(w) = prod_i N(w_i | mu_i, sigma_i^2)

mu and sigma^2 come from ``inference.tradi.WeightTracker`` (Franchi et al., ECCV 2020): the
filtered centre of each weight's SGD/Adam trajectory and the variance accumulated from the
fluctuation of its actual steps. Nothing here is fitted to an ELBO: the guide only samples.
Sites the tracker did not follow (positive noise or prior scales) stay at the trained point.
Because every weight site is a Normal, ``Predictive``, the metrics, ArviZ and the local
reparameterization handler treat this guide like the mean-field one.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from guides.weights import weight_sites


class TradiGuide(PyroModule):
    """``means`` / ``variances``: site name -> tensor of the site's shape (tracked sites);
    ``point``: every site's trained value (used for sites that were not tracked)."""

    def __init__(self, model, means: dict[str, torch.Tensor], variances: dict[str, torch.Tensor],
                 point: dict[str, torch.Tensor], min_variance: float = 1e-12):
        super().__init__()
        self.sites = weight_sites(model)
        self.tracked = [s.name for s in self.sites if s.name in means]
        for site in self.sites:
            if site.name in means:
                self.register_buffer(f"{site.key}_loc", means[site.name].detach().clone())
                self.register_buffer(f"{site.key}_scale",
                                     variances[site.name].detach().clamp(min=min_variance).sqrt())
            else:
                self.register_buffer(f"{site.key}_point", point[site.name].detach().clone())

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        values = {}
        for site in self.sites:
            if site.name in self.tracked:
                q = dist.Normal(getattr(self, f"{site.key}_loc"), getattr(self, f"{site.key}_scale"))
                q = q.to_event(site.event_dim)
            else:
                q = dist.Delta(getattr(self, f"{site.key}_point"), event_dim=site.event_dim)
            values[site.name] = pyro.sample(site.name, q)
        return values
