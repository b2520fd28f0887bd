"""Deep ensemble (Lakshminarayanan et al., 2017) as a guide: M point estimates trained together.

    q(w) = (1/M) sum_m delta(w - w_m)

Each member starts from its own draw of PyTorch's initialisation and minimises its own MAP
loss. Training is one vectorized step for all members: with ``num_particles = M`` vectorized
ELBO particles, particle m is member m (``guides/samples.py``), and because every layer of
``models/bnn.py`` broadcasts over a leading weight-sample dimension, the M networks run as one
batched computation. The loss is the members' average, so each member's gradient is its own
MAP gradient divided by M (Adam does not notice the constant).
"""

from __future__ import annotations

import torch

from bayeszoo.guides.samples import WeightSamples
from bayeszoo.guides.weights import weight_sites


class EnsembleGuide(WeightSamples):
    def __init__(self, model, members: int = 5):
        if members < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {members}")
        constrained = [s.name for s in weight_sites(model) if not s.is_real]
        if constrained:
            raise ValueError(f"an ensemble trains unconstrained weights only, but {constrained} are "
                             "scales; use a non-hierarchical prior and noise='learned' or a number")
        draws = [model.initial_values(fresh=True) for _ in range(members)]
        samples = {name: torch.stack([draw[name] for draw in draws]) for name in draws[0]}
        super().__init__(model, samples, learnable=True)

    @classmethod
    def of_members(cls, model, samples: dict[str, torch.Tensor]) -> EnsembleGuide:
        """An ensemble whose members are ``samples`` (site name -> (m, *site shape)), copied."""
        ensemble = cls.__new__(cls)
        WeightSamples.__init__(ensemble, model, samples, learnable=True)
        return ensemble

    @property
    def num_particles(self) -> int:
        """The ELBO particles that train every member once per step."""
        return self.num_members
