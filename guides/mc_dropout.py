"""MC dropout as variational inference (Gal & Ghahramani, 2016).

    q(W_l) :  W_l = M_l diag(z_l) / (1 - p),   z_l,j ~ Bernoulli(1 - p)

Each Bayesian layer's weight matrix M_l (a learned point) has its input columns j dropped
with probability p, and kept columns are rescaled by 1 / (1 - p) (inverted dropout, so the
mean network is M_l). Biases are learned points. The first layer's inputs are not dropped.
Gal & Ghahramani show the KL term reduces to L2 weight decay on M_l as the number of units
grows; here the model's Gaussian prior evaluated at the dropped weights plays that part.

Prediction averages over dropout masks: ``Predictive(model, guide=MCDropoutGuide(...))`` with
S samples is MC dropout with S forward passes. One mask is drawn per weight sample, shared
across the minibatch (dropping weight columns, as in the paper's derivation), not per example.
"""

from __future__ import annotations

import pyro
import torch

from bayeszoo.guides.map import MAPGuide
from bayeszoo.guides.weights import PointMass, sample_batch


class MCDropoutGuide(MAPGuide):
    def __init__(self, model, p: float = 0.1):
        super().__init__(model)
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        weights = [s.name for s in self.sites if s.name.endswith(".weight")]
        self.dropped = set(weights[1:])

    def _mask(self, site, batch, device) -> torch.Tensor:
        """Bernoulli(1 - p) / (1 - p) over input columns: dim 1 of (out, in, *kernel)."""
        sample_shape = (batch[0],) + (1,) * (-batch[1] - 1) if batch else ()
        columns = site.shape[1]
        keep = torch.full(sample_shape + (1, columns) + (1,) * (len(site.shape) - 2), 1.0 - self.p,
                          device=device)
        return torch.bernoulli(keep) / (1.0 - self.p)

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        point, batch = self.point(), sample_batch()
        values = {}
        for site in self.sites:
            value = point[site.name]
            if site.name in self.dropped and self.p > 0:
                value = value * self._mask(site, batch, value.device)
            values[site.name] = pyro.sample(site.name, PointMass(value, event_dim=site.event_dim))
        return values
