"""Maximum a posteriori: a point mass on the weights, q(w) = delta(w - w*).

With a delta guide the ELBO is log p(y | x, w*) + log p(w*): the negative of the usual
regularised training loss (a Gaussian prior is weight decay). This is the plain neural network
in Pyro's language; Laplace, SGLD and TRADI start from it.

Not Pyro's ``AutoDelta``: that guide creates its parameters lazily on a first trace and keys them
by site in the param store, while SGLD, Laplace and TRADI need the unconstrained weights as named
``nn.Parameter``s up front (``named_weights``) and starting at PyTorch's initialisation of the net.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from bayeszoo.guides.weights import PointMass, submodule, weight_sites


class MAPGuide(PyroModule):
    def __init__(self, model):
        super().__init__()
        self.sites = weight_sites(model)
        self.transforms = {s.name: dist.transforms.biject_to(s.support) for s in self.sites}
        # Positive scales are optimised in unconstrained (log) space, so steps cannot leave the support.
        self.loc = nn.ParameterDict({
            s.key: nn.Parameter(self.transforms[s.name].inv(s.initial).clone()) for s in self.sites})
        # Weights and biases live in their own (real) space: no transform to call on them per step.
        self._constrained = {s.name: self.transforms[s.name] for s in self.sites if not s.is_real}

    def point(self) -> dict[str, torch.Tensor]:
        """The point estimate of every site, in its own support."""
        loc = submodule(self, "loc")
        point = {}
        for s in self.sites:
            transform = self._constrained.get(s.name)
            point[s.name] = loc[s.key] if transform is None else transform(loc[s.key])
        return point

    def named_weights(self) -> dict[str, nn.Parameter]:
        """The unconstrained parameters, one per site (what SGLD, Laplace and TRADI work on)."""
        loc = submodule(self, "loc")
        return {s.name: loc[s.key] for s in self.sites}

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        point = self.point()
        return {s.name: pyro.sample(s.name, PointMass(point[s.name], event_dim=s.event_dim))
                for s in self.sites}
