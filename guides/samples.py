"""A posterior given by a set of weight samples: q(w) = (1/M) sum_m delta(w - w_m).

SGLD, SGHMC and NUTS produce such a set; a deep ensemble is one whose members are trained
(``guides/ensemble.py``). Asked for S weight samples at once (``Predictive(parallel=True)``
with ``num_samples=S``), the guide returns every member once when S = M, in order, and S
members drawn uniformly with replacement otherwise; called without a sample plate, it returns
one member drawn uniformly.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from bayeszoo.guides.weights import WeightSite, per_sample, sample_batch, weight_sites


class WeightSamples(PyroModule):
    """``samples``: site name -> (M, *site shape), in each site's support."""

    def __init__(self, model, samples: dict[str, torch.Tensor], learnable: bool = False):
        super().__init__()
        self.sites = weight_sites(model)
        missing = {s.name for s in self.sites} - set(samples)
        if missing:
            raise ValueError(f"samples lack the sites {sorted(missing)}")
        sizes = {len(samples[s.name]) for s in self.sites}
        if len(sizes) != 1:
            raise ValueError(f"every site needs the same number of samples, got sizes {sorted(sizes)}")
        self.num_members = sizes.pop()
        stack = {s.key: samples[s.name].detach().clone() for s in self.sites}
        self.members = nn.ParameterDict({
            k: nn.Parameter(v, requires_grad=learnable) for k, v in stack.items()})

    def stacked(self) -> dict[str, torch.Tensor]:
        return {s.name: self.members[s.key] for s in self.sites}

    def _indices(self, size: int) -> torch.Tensor:
        if size == self.num_members:
            return torch.arange(size)
        return torch.randint(self.num_members, (size,))

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        batch = sample_batch()
        index = self._indices(batch[0] if batch else 1)
        return {site.name: pyro.sample(site.name, self._delta(site, index, batch)) for site in self.sites}

    def _delta(self, site: WeightSite, index: torch.Tensor, batch) -> dist.Delta:
        members = self.members[site.key]
        value = members[index.to(members.device)]
        value = per_sample(value, site, batch[1]) if batch else value[0]
        return dist.Delta(value, event_dim=site.event_dim)
