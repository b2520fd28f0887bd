"""Small latent-variable models whose exact posterior is non-Gaussian and known: test beds
for guides richer than a Gaussian (flows), and pictures for the course.
"""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule


class Banana(PyroModule):
    """A 2-D latent variable whose posterior is a thin, curved, tilted banana.

        z_n  ~ N(0, I_2)
        x_n1 ~ N(z_n1, s_1^2)
        x_n2 ~ N(z_n2 + a z_n1 + b z_n1^2, s_2^2)

    Given x, z_2 sits close to the parabola x_2 - a z_1 - b z_1^2 (width about s_2), and
    z_1 is pulled towards x_1, so p(z | x) bends along the parabola and leans with its
    slope -a - 2 b z_1: a diagonal Gaussian can match neither, a full-covariance Gaussian
    only the lean.

    The oracle: given z_1 the model is linear-Gaussian in z_2, which integrates out,
    p(x_2 | z_1) = N(x_2; a z_1 + b z_1^2, 1 + s_2^2), so log p(x) is a 1-D integral over
    z_1 that ``log_marginal`` computes by quadrature.
    """

    def __init__(self, curvature: float = 1.0, tilt: float = 0.0, noise: tuple[float, float] = (1.0, 0.2)):
        super().__init__()
        if min(noise) <= 0:
            raise ValueError(f"noise scales must be positive, got {noise}")
        self.x_dim, self.z_dim, self.context_dim = 2, 2, 0
        self.latent_sites = {"z": 2}
        self.curvature, self.tilt = float(curvature), float(tilt)
        self.register_buffer("noise", torch.tensor(noise, dtype=torch.get_default_dtype()))

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z] = (z_1, z_2 + a z_1 + b z_1^2), broadcasting over leading dimensions."""
        z1, z2 = z.unbind(-1)
        return torch.stack([z1, z2 + self._bend(z1)], dim=-1)

    def _bend(self, z1: torch.Tensor) -> torch.Tensor:
        return self.tilt * z1 + self.curvature * z1**2

    def forward(self, x: torch.Tensor | None = None, batch_size: int | None = None, **unused):
        with pyro.plate("data", x.shape[0] if x is not None else batch_size):
            zeros = self.noise.new_zeros(2)
            z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))
            return pyro.sample("x", dist.Normal(self.mean(z), self.noise).to_event(1), obs=x)

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x, z), broadcasting x (..., 2) against z (..., 2)."""
        prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        return prior + dist.Normal(self.mean(z), self.noise).log_prob(x).sum(-1)

    @torch.no_grad()
    def log_marginal(self, x: torch.Tensor, points: int = 4001, limit: float = 8.0) -> torch.Tensor:
        """The exact log p(x_n) for every row of x, by quadrature over z_1 on [-limit, limit]
        (the integrand carries the prior N(z_1; 0, 1), so +-8 leaves out less than 1e-14)."""
        z1 = torch.linspace(-limit, limit, points, dtype=x.dtype, device=x.device)
        s1, s2 = self.noise.to(x.dtype)
        x1, x2 = x[..., :1], x[..., 1:]
        log_integrand = (dist.Normal(0.0, 1.0).log_prob(z1)
                         + dist.Normal(z1, s1).log_prob(x1)
                         + dist.Normal(self._bend(z1), torch.sqrt(1 + s2**2)).log_prob(x2))
        return torch.logsumexp(log_integrand, dim=-1) + math.log(z1[1] - z1[0])
