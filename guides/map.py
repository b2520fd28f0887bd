"""Maximum a posteriori: a point mass on the weights, q(w) = delta(w - w*).

With a delta guide the ELBO is log p(y | x, w*) + log p(w*): the negative of the usual
regularised training loss (a Gaussian prior is weight decay). This is the plain neural network
in Pyro's language; Laplace, SGLD and TRADI start from it.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from bayeszoo.guides.weights import weight_sites


class MAPGuide(PyroModule):
    def __init__(self, model):
        super().__init__()
        self.sites = weight_sites(model)
        self.transforms = {s.name: dist.transforms.biject_to(s.support) for s in self.sites}
        # Positive scales are optimised in unconstrained (log) space, so steps cannot leave the support.
        self.loc = nn.ParameterDict({
            s.key: nn.Parameter(self.transforms[s.name].inv(s.initial).clone()) for s in self.sites})

    def point(self) -> dict[str, torch.Tensor]:
        """The point estimate of every site, in its own support."""
        loc = self.loc  # one attribute read: PyroModule issues a pyro.module statement for each
        return {s.name: self.transforms[s.name](loc[s.key]) for s in self.sites}

    def named_weights(self) -> dict[str, nn.Parameter]:
        """The unconstrained parameters, one per site (what SGLD, Laplace and TRADI work on)."""
        loc = self.loc
        return {s.name: loc[s.key] for s in self.sites}

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        point = self.point()
        return {s.name: pyro.sample(s.name, dist.Delta(point[s.name], event_dim=s.event_dim))
                for s in self.sites}
