"""Mean-field Gaussian over the weights: Bayes by Backprop (Blundell et al., 2015).

    q(w) = prod_i N(w_i | mu_i, sigma_i^2),   sigma_i = softplus(rho_i)

Every global site of the model gets its own independent Gaussian; a site with a constrained
support (a positive prior or noise scale) gets the Gaussian in unconstrained space pushed
through Pyro's bijection to that support. The means start at PyTorch's initialisation of the
network and the scales at ``init_scale``: small enough that the first steps train the network
almost as a point estimate, which avoids the known failure of mean-field BNNs that start at
the prior and never leave it (the "variance collapse" of Blundell et al. and Osawa et al.).

Local reparameterization and Flipout (``guides/reparameterization.py``) work with this guide as
effect handlers: they read its loc and scale.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

from bayeszoo.guides.weights import weight_sites


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class MeanFieldGuide(PyroModule):
    def __init__(self, model, init_scale: float = 0.01):
        super().__init__()
        self.sites = weight_sites(model)
        self.transforms = {s.name: dist.transforms.biject_to(s.support) for s in self.sites}
        self.loc = nn.ParameterDict({
            s.key: nn.Parameter(self.transforms[s.name].inv(s.initial).clone()) for s in self.sites})
        self.rho = nn.ParameterDict({
            s.key: nn.Parameter(torch.full(s.shape, _inverse_softplus(init_scale))) for s in self.sites})

    def posterior(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of a site, in unconstrained space."""
        key = name.replace(".", "__")
        return self.loc[key], F.softplus(self.rho[key])

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        # Each read of ``self.loc`` is a pyro.module statement over all its parameters: read once.
        locs, rhos = self.loc, self.rho
        values = {}
        for site in self.sites:
            loc, scale = locs[site.key], F.softplus(rhos[site.key])
            q = dist.Normal(loc, scale).to_event(site.event_dim)
            if not site.is_real:
                q = dist.TransformedDistribution(q, self.transforms[site.name])
            values[site.name] = pyro.sample(site.name, q)
        return values
