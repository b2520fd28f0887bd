"""Probabilistic PCA (Tipping & Bishop 1999): the exact oracle of the latent family.

    z_n ~ N(0, I_k)
    x_n ~ N(W z_n + mu, sigma^2 I_d)

Everything a guide tries to approximate is known in closed form here:

    posterior      p(z | x) = N(M^-1 W^T (x - mu), sigma^2 M^-1),  M = W^T W + sigma^2 I_k
    marginal       p(x)     = N(mu, W W^T + sigma^2 I_d)
    maximum likelihood W = U_k (L_k - sigma^2 I)^(1/2), sigma^2 = mean of the discarded
                   eigenvalues of the sample covariance (U_k, L_k: top-k eigenpairs).
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn


class PPCA(PyroModule):
    """Probabilistic PCA as a Pyro model, with its exact posterior and marginal likelihood."""

    def __init__(self, x_dim: int, z_dim: int = 2, sigma: float = 1.0):
        super().__init__()
        self.x_dim, self.z_dim, self.context_dim = x_dim, z_dim, 0
        self.latent_sites = {"z": z_dim}
        self.W = nn.Parameter(0.1 * torch.randn(x_dim, z_dim))
        self.mu = nn.Parameter(torch.zeros(x_dim))
        self.log_sigma = nn.Parameter(torch.tensor(float(sigma)).log())

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    def forward(self, x: torch.Tensor | None = None, batch_size: int | None = None, **unused):
        with pyro.plate("data", x.shape[0] if x is not None else batch_size):
            zeros = self.mu.new_zeros(self.z_dim)
            z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))
            loc = z @ self.W.T + self.mu
            return pyro.sample("x", dist.Normal(loc, self.sigma).to_event(1), obs=x)

    def posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """The exact p(z | x), batched over the rows of x."""
        variance = self.sigma**2
        M = self.W.T @ self.W + variance * torch.eye(self.z_dim, dtype=x.dtype, device=x.device)
        mean = torch.linalg.solve(M, self.W.T @ (x - self.mu).T).T
        # The covariance is the same for every x: factor it once and let it broadcast.
        covariance = variance * torch.linalg.inv(M)
        return dist.MultivariateNormal(mean, scale_tril=torch.linalg.cholesky(covariance))

    def marginal(self) -> dist.MultivariateNormal:
        """The exact p(x) = N(mu, W W^T + sigma^2 I)."""
        eye = torch.eye(self.x_dim, dtype=self.W.dtype, device=self.W.device)
        return dist.MultivariateNormal(self.mu, self.W @ self.W.T + self.sigma**2 * eye)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x_n) for every row of x."""
        return self.marginal().log_prob(x)

    @torch.no_grad()
    def set_maximum_likelihood(self, x: torch.Tensor) -> "PPCA":
        """Set W, mu, sigma to the closed-form maximum-likelihood solution for data x."""
        centred = x - x.mean(0)
        covariance = centred.T @ centred / len(x)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
        variance = eigenvalues[self.z_dim:].mean()
        top = (eigenvalues[: self.z_dim] - variance).clamp_min(0).sqrt()
        self.W.copy_(eigenvectors[:, : self.z_dim] * top)
        self.mu.copy_(x.mean(0))
        self.log_sigma.copy_(variance.sqrt().log())
        return self
