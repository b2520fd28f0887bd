"""Probabilistic PCA (Tipping & Bishop 1999): the exact oracle of the latent family.

    z_n ~ N(0, I_k)
    x_n ~ N(W z_n + mu, sigma^2 I_d)

Everything a guide tries to approximate is known in closed form here:

    posterior      p(z | x) = N(M^-1 W^T (x - mu), sigma^2 M^-1),  M = W^T W + sigma^2 I_k
    marginal       p(x)     = N(mu, C),  C = W W^T + sigma^2 I_d
    maximum likelihood W = U_k (L_k - sigma^2 I)^(1/2), sigma^2 = mean of the discarded
                   eigenvalues of the sample covariance (U_k, L_k: top-k eigenpairs).

The exact evaluators (log_marginal, posterior) work with the k x k matrix M and never form or
factor the d x d C (only marginal(), for sampling, does). C's eigenvalues run from sigma^2 (d - k
times) to ||W||_2^2 + sigma^2, so at small sigma its Cholesky factor in float32 loses digits that
M does not. Maximum-likelihood fit on digits (d = 64, k = 10) with
sigma set to 0.01: in float32 the d x d route is off by up to 1.5 nats per image, the k x k route
by 2e-3, no more than rounding the parameters and data to float32 already moves the exact value.
"""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.linalg import cholesky, solve_triangular


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

    def _m(self) -> torch.Tensor:
        """M = W^T W + sigma^2 I_k, the k x k matrix every exact evaluator works with."""
        eye = torch.eye(self.z_dim, dtype=self.W.dtype, device=self.W.device)
        return self.W.T @ self.W + self.sigma**2 * eye

    def _posterior_mean(self, x: torch.Tensor, cholesky_m: torch.Tensor) -> torch.Tensor:
        """E[z | x] = M^-1 W^T (x - mu) for every x[..., :], by two triangular solves (L L^T = M).

        As rows: m = (x - mu) W M^-1 = ((x - mu) W L^-T) L^-1.
        """
        rows = ((x - self.mu) @ self.W).reshape(-1, self.z_dim)
        half = solve_triangular(cholesky_m.mT, rows, upper=True, left=False)
        return solve_triangular(cholesky_m, half, upper=False, left=False).reshape(*x.shape[:-1], -1)

    @staticmethod
    def _lower_factor_of_inverse(matrix: torch.Tensor) -> torch.Tensor:
        """Lower-triangular T with T T^T = A^-1 for a symmetric positive-definite A.

        With J the order reversal and J A J = U U^T (U lower), A = R R^T for R = J U J, which is
        upper-triangular; so A^-1 = R^-T R^-1 and T = R^-T = (R^T)^-1, the inverse of a
        lower-triangular matrix. A^-1 itself is never formed, let alone factored.
        """
        reversed_factor = cholesky(matrix.flip(-2, -1))  # U
        lower = reversed_factor.flip(-2, -1).mT  # R^T
        eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
        return solve_triangular(lower, eye, upper=False)

    def posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """The exact p(z | x) = N(M^-1 W^T (x - mu), sigma^2 M^-1), batched over the rows of x.

        The mean comes from the Cholesky factor of M, the scale_tril sigma T (T T^T = M^-1) from
        the factor of M with its order reversed. The covariance is the same for every x: it is
        factored once and broadcasts over the batch.
        """
        m = self._m()
        mean = self._posterior_mean(x, cholesky(m))
        return dist.MultivariateNormal(mean, scale_tril=self.sigma * self._lower_factor_of_inverse(m))

    def marginal(self) -> dist.MultivariateNormal:
        """p(x) = N(mu, W W^T + sigma^2 I) as a d x d distribution, for sampling.

        For log densities use ``log_marginal``: this object's ``log_prob`` factors the d x d
        covariance and loses precision at small sigma in float32.
        """
        eye = torch.eye(self.x_dim, dtype=self.W.dtype, device=self.W.device)
        return dist.MultivariateNormal(self.mu, self.W @ self.W.T + self.sigma**2 * eye)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) = log N(x; mu, C), C = W W^T + sigma^2 I_d, for every x[..., :].

        With r = x - mu, M = W^T W + sigma^2 I_k = L L^T and m = M^-1 W^T r (the posterior mean):

            log p(x) = -(d log 2 pi + log|C| + r^T C^-1 r) / 2
            log|C|   = (d - k) log sigma^2 + log|M|,  log|M| = 2 sum_i log L_ii
                       (matrix determinant lemma)
            C^-1     = (I_d - W M^-1 W^T) / sigma^2                        (Woodbury identity)
            r^T C^-1 r = (|r|^2 - r^T W M^-1 W^T r) / sigma^2
                       = |r - W m|^2 / sigma^2 + |m|^2.

        The last line is the one evaluated. Expanding it gives the line above it, but it sums two
        non-negative terms instead of subtracting two nearly equal ones (at small sigma, |r|^2 and
        r^T W M^-1 W^T r agree to many digits), and it is the minimum over z of
        |r - W z|^2 / sigma^2 + |z|^2, so a rounding error in m changes it only to second order.
        """
        cholesky_m = cholesky(self._m())
        residual = x - self.mu
        mean = self._posterior_mean(x, cholesky_m)
        variance = self.sigma**2
        mahalanobis = (residual - mean @ self.W.T).pow(2).sum(-1) / variance + mean.pow(2).sum(-1)
        # log sigma^2 = 2 log_sigma: the parameter itself, not log(exp(log_sigma)^2).
        log_det = (self.x_dim - self.z_dim) * 2 * self.log_sigma + 2 * cholesky_m.diagonal().log().sum()
        return -0.5 * (self.x_dim * math.log(2 * math.pi) + log_det + mahalanobis)

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
