"""The exact posterior of a linear-Gaussian state-space model, as a guide.

For ``models.dkf.LinearGaussianSSM`` the posterior p(z_{1:T} | x_{1:T}) is Gaussian and Markov,
and the Kalman filter gives it in closed form. This guide draws from it by forward filtering,
backward sampling (Carter & Kohn 1994; Frühwirth-Schnatter 1994):

    z_T ~ N(m_{T|T}, P_{T|T})               (T: the sequence's last observed step)
    z_t | z_{t+1} ~ N(m_{t|t} + J_t (z_{t+1} - m_{t+1|t}),  P_{t|t} - J_t P_{t+1|t} J_t^T),
    J_t = P_{t|t} A^T P_{t+1|t}^{-1}

and scores the model exactly (``scores``): the filter's log p(x) = sum_t log p(x_t | x_{<t}),
less the first ``model.diffuse_steps`` terms where the model starts from an approximately diffuse
prior (Durbin & Koopman's convention: with a very wide Sigma_0 the first term measures only the
arbitrary prior width). It holds no parameters: it is the model's own posterior, so it is the
guide of the pair ``kalman``, whose trainer fits the model by maximum likelihood
(``inference.training.maximum_likelihood``).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

NATURAL_PARAMETERS = ("mu_0", "Sigma_0", "A", "b", "Q", "C", "d", "R")


class KalmanPosterior(nn.Module):
    exact = True  # scored by the exact likelihood, not by importance sampling

    def __init__(self, model):
        super().__init__()
        self._model = (model,)  # a tuple, not a submodule: the parameters are the model's alone

    @property
    def model(self):
        return self._model[0]

    @property
    def diffuse_steps(self) -> int:
        return getattr(self.model, "diffuse_steps", 0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, u: torch.Tensor | None = None,
                **unused):
        """One draw of z_{1:T} from p(z | x) per sequence, at the model's sites z_1..z_T."""
        result = self.model.filter(x, mask, u)
        A, T = self.model.dynamics.A, x.shape[1]
        draws = [None] * T
        # A sequence's backward pass starts at its own last observed step L (z_L ~ N(m_{L|L}, P_{L|L})),
        # so the scored draws z_{1:L} come from p(z_{1:L} | x) exactly. Padded steps after L are
        # drawn from the filter's predictions and, as in the model, not scored.
        observed = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask
        with pyro.plate("sequences", x.shape[0], dim=-1):
            z = None
            for t in range(T - 1, -1, -1):
                mean, cov = result.filtered_means[:, t], result.filtered_covs[:, t]
                if t < T - 1:
                    P_p = result.predicted_covs[:, t + 1]
                    J = torch.linalg.solve(P_p, A @ cov).transpose(-1, -2)  # P_p symmetric
                    shift = (J @ (z - result.predicted_means[:, t + 1]).unsqueeze(-1)).squeeze(-1)
                    after = observed[:, t + 1]
                    mean = torch.where(after[:, None], mean + shift, mean)
                    cov = torch.where(after[:, None, None], cov - J @ P_p @ J.transpose(-1, -2), cov)
                with poutine.mask(mask=observed[:, t]):
                    z = pyro.sample(f"z_{t + 1}", _normal(mean, cov))
                draws[t] = z
        return torch.stack(draws, dim=-2)

    @torch.no_grad()
    def scores(self, data: dict) -> dict:
        """Exact scores on ``data`` (a split of model inputs): log p(x) per sequence (mean over
        sequences) and per scored time step, and the model's fitted natural parameters."""
        device = next(self.model.parameters()).device
        data = {k: v.to(device) for k, v in data.items()}
        mask = data.get("mask")
        skip = self.diffuse_steps
        per_sequence = self.model.log_likelihood(data["x"], mask, data.get("u"), skip_first=skip)
        lengths = mask.sum(-1) if mask is not None else torch.full_like(per_sequence, data["x"].shape[1])
        steps = int((lengths - skip).clamp(min=0).sum())
        return {
            "log_likelihood": per_sequence.mean().item(),
            "log_likelihood_per_step": per_sequence.sum().item() / steps,
            "exact": True,
            "num_points": len(per_sequence),
            "steps_scored": steps,
            "diffuse_steps_left_out": skip,
            "fitted": {name: _plain(getattr(self.model, name)) for name in NATURAL_PARAMETERS},
        }


def _normal(mean: torch.Tensor, cov: torch.Tensor):
    return dist.MultivariateNormal(mean, scale_tril=torch.linalg.cholesky((cov + cov.transpose(-1, -2)) / 2))


def _plain(value: torch.Tensor):
    value = value.detach().cpu()
    return value.item() if value.numel() == 1 else value.tolist()
