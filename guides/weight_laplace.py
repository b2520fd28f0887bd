"""Laplace approximation of a Bayesian neural network's posterior around its MAP weights
(MacKay 1992; Ritter, Botev & Barber 2018; Daxberger et al. 2021, "Laplace Redux").

    q(w) = N(w*, Lambda^-1),    Lambda = sum_n J_n^T H_n J_n + tau I

w* is the MAP point (a trained ``MAPGuide``), J_n = d f(x_n; w) / d w at w* the network's
Jacobian for one input, and H_n the Hessian of -log p(y_n | f) in the network output f: the
generalized Gauss-Newton matrix, positive semi-definite by construction. H_n is 1 / sigma^2
for a Gaussian likelihood, diag(p) - p p^T for a categorical one, p (1 - p) for a Bernoulli.

Structures (``structure=``):

* ``"diag"``: the diagonal of Lambda, for every weight and bias;
* ``"last-layer"``: the full Lambda over the last Bayesian layer, the other weights at w*
  (Kristiadi et al. 2020: most of the benefit at a fraction of the cost);
* ``"full"``: the full Lambda over every weight (small networks only: d x d).

Predictive (``predictive=``): ``"glm"`` (the default) predicts with the network linearized at
w*, f_lin(x, w) = f(x, w*) + J(x) (w - w*), w ~ q: the model the GGN is the exact Hessian of, and
the predictive Laplace Redux recommends (Immer, Korzepa & Bauer 2021), because sampled weights
pushed through the *nonlinear* network leave the region where the quadratic approximation holds
and predict badly. ``"sampled"`` pushes them through the network itself. For ``"last-layer"``
the two agree (the outputs are linear in the last layer's weights).
``inference.predictive.predictive`` asks ``linearized_outputs`` for the S output draws; the guide
itself (``forward``) always samples weights, so ArviZ and the memory counts see the weights.

The prior precision tau replaces the model's prior in Lambda and is chosen by maximising the
Laplace approximation of the marginal likelihood (MacKay's evidence), over a log grid:

    log p(y | x) ~ log p(y | x, w*) - tau/2 |w*|^2 + d/2 log tau - 1/2 log det Lambda(tau) + const

Only the last three terms depend on tau, and with the eigenvalues (or diagonal) g_i of the GGN,
log det Lambda(tau) = sum_i log(g_i + tau), so the whole grid costs one decomposition.
Positive scale sites (noise, hierarchical scales) stay at their MAP values.

Measured on digits (``benchmarks/bnn.py``: 64-100-100-8 ReLU net, N(0, 1) prior on every weight,
30 epochs of Adam; last layer, d = 808; seeds 0-4), the evidence picks tau = 2.5 for every seed
(MacKay's fixed point tau = gamma / |w*|^2, gamma = sum_i g_i / (g_i + tau) ~ 43 effective
parameters, gives 2.7), and the predictive is *underconfident*: test ECE 0.037-0.048 against
the MAP network's 0.015-0.021 (mean confidence 3-4 points below accuracy), NLL +0.025, OOD AUROC
+0.001 to +0.006. That is the method, not an error: the GGN and the evidence agree with autograd
(``tests/test_weight_laplace.py``), 10,000 predictive draws instead of 100 change nothing (seed
0: ECE 0.054), and the MAP network is already calibrated (confidence - accuracy = +0.001), so any
weight uncertainty pushes it below. Trained 300 epochs (nearer a mode: after 30, the last layer's
|grad NLL + w*| is still 8.8 |w*|), the evidence gives tau = 1 and the picture is the same (ECE
0.075 against 0.022). The validation NLL falls monotonically in tau over 1e-2..1e4 for all five
seeds: a tau chosen on it is the grid's upper edge, i.e. the MAP's predictions, so that choice is
not offered. The probit approximation softmax(f / sqrt(1 + pi/8 var f)) of Laplace Redux does
worse here (ECE 0.15): the per-logit variances include the shift of all logits together, which
the softmax ignores and the sampled GLM predictive handles exactly.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch.func import jacrev, jvp, vmap

from bayeszoo.guides.weights import per_sample, sample_batch, weight_sites

STRUCTURES = ("diag", "last-layer", "full")
PREDICTIVES = ("glm", "sampled")
DEFAULT_PRIOR_PRECISIONS = torch.logspace(-4, 4, 81)


class WeightLaplaceGuide(PyroModule):
    def __init__(self, model, map_guide, train: dict, structure: str = "last-layer",
                 prior_precisions: torch.Tensor = DEFAULT_PRIOR_PRECISIONS, batch_size: int = 256,
                 predictive: str = "glm"):
        super().__init__()
        if structure not in STRUCTURES:
            raise ValueError(f"unknown Laplace structure {structure!r}; choose from {', '.join(STRUCTURES)}")
        if predictive not in PREDICTIVES:
            raise ValueError(f"unknown Laplace predictive {predictive!r}; choose from "
                             f"{', '.join(PREDICTIVES)}")
        self.linearized = predictive == "glm"
        if model.likelihood == "heteroscedastic":
            raise ValueError("the Laplace guide supports gaussian, categorical and bernoulli likelihoods")
        self.structure, self.sites = structure, weight_sites(model)
        self.point = {name: value.detach().clone() for name, value in map_guide.point().items()}
        for site in self.sites:  # buffers, so state_dict and memory counts include the fixed weights
            self.register_buffer(f"{site.key}_point", self.point[site.name])
        self.selected = self._select(structure)
        self.sizes = [self.point[name].numel() for name in self.selected]
        ggn = _ggn(model, self.point, self.selected, train, diagonal=structure == "diag",
                   batch_size=batch_size)
        flat = torch.cat([self.point[name].reshape(-1) for name in self.selected])
        self.prior_precision, self.evidence_curve = _choose_prior_precision(ggn, flat, prior_precisions)
        self._set_posterior(ggn, flat)

    def _select(self, structure: str) -> list[str]:
        real = [s.name for s in self.sites if s.is_real]
        if structure != "last-layer":
            return real
        last_layer = real[-1].rsplit(".", 1)[0]
        return [name for name in real if name.rsplit(".", 1)[0] == last_layer]

    def _set_posterior(self, ggn: torch.Tensor, flat: torch.Tensor) -> None:
        self.register_buffer("loc", flat)
        if self.structure == "diag":
            self.register_buffer("scale", (ggn + self.prior_precision).rsqrt())
        else:
            precision = ggn + self.prior_precision * torch.eye(len(flat))
            # Lambda = L L^T  =>  Lambda^-1 = L^-T L^-1: a square root of the covariance.
            covariance = torch.cholesky_inverse(torch.linalg.cholesky(precision))
            self.register_buffer("scale_tril", torch.linalg.cholesky(covariance))

    @property
    def num_parameters(self) -> int:
        return len(self.loc)

    def posterior(self) -> dist.Distribution:
        """q over the flattened selected weights: N(w*, Lambda^-1)."""
        if self.structure == "diag":
            return dist.Normal(self.loc, self.scale).to_event(1)
        return dist.MultivariateNormal(self.loc, scale_tril=self.scale_tril)

    @torch.no_grad()
    def linearized_outputs(self, model, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Network outputs (S, N, out) of the GLM predictive: f(x, w*) + J(x) (w_s - w*), w_s ~ q.

        J (w_s - w*) is one forward-mode Jacobian-vector product per draw (vectorized over the
        draws), so the Jacobian itself is never formed.
        """
        network = _conditioned_network(model, self.point)
        centre = {name: self.point[name] for name in self.selected}
        offsets = self.posterior().sample((num_samples,)) - self.loc
        tangents = {name: piece.reshape(num_samples, *self.point[name].shape)
                    for name, piece in zip(self.selected, offsets.split(self.sizes, dim=-1), strict=True)}
        directional = vmap(lambda tangent: jvp(lambda w: network(w, x), (centre,), (tangent,))[1])
        return network(centre, x) + directional(tangents)

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        # One joint draw of the flattened weights (log q counted here), then split into the sites.
        flat = pyro.sample("laplace_weights", self.posterior(), infer={"is_auxiliary": True})
        pieces = dict(zip(self.selected, flat.split(self.sizes, dim=-1), strict=True))
        batch = sample_batch()
        values = {}
        for site in self.sites:
            if site.name in pieces:
                value = pieces[site.name].reshape(flat.shape[:-1] + site.shape)
            else:
                value = self.point[site.name]
                if batch is not None:
                    value = per_sample(value.expand(batch[0], *site.shape), site, batch[1])
            values[site.name] = pyro.sample(site.name, dist.Delta(value, event_dim=site.event_dim))
        return values


def _conditioned_network(model, point: dict):
    """(weights, x) -> the network's outputs with ``weights`` (some sites) and ``point`` (the rest)."""
    def network(weights: dict, x: torch.Tensor) -> torch.Tensor:
        with pyro.poutine.block(), pyro.poutine.condition(data={**point, **weights}):
            return model.net(x)
    return network


def _ggn(model, point: dict, selected: list[str], train: dict, diagonal: bool, batch_size: int):
    """sum_n J_n^T H_n J_n over the selected sites (flattened), or its diagonal."""
    network = _conditioned_network(model, point)

    def outputs(weights: dict, x: torch.Tensor) -> torch.Tensor:
        return network(weights, x.unsqueeze(0)).squeeze(0)

    chosen = {name: point[name] for name in selected}
    total = None
    for start in range(0, len(train["x"]), batch_size):
        x = train["x"][start:start + batch_size]
        jac = vmap(jacrev(outputs), in_dims=(None, 0))(chosen, x)  # name -> (B, out, *shape)
        jac = torch.cat([jac[name].reshape(len(x), jac[name].shape[1], -1) for name in selected], -1)
        with torch.no_grad():
            f = vmap(outputs, in_dims=(None, 0))(chosen, x)
        hessian = _output_hessian(model, f)  # (B, out, out)
        if diagonal:
            part = torch.einsum("bod,bop,bpd->d", jac, hessian, jac)
        else:
            part = torch.einsum("bod,bop,bpe->de", jac, hessian, jac)
        total = part if total is None else total + part
    return total.detach()


def _output_hessian(model, f: torch.Tensor) -> torch.Tensor:
    """d^2 (-log p(y | f)) / d f^2, which for these likelihoods does not depend on y."""
    if model.likelihood == "gaussian":
        precision = 1.0 / (model.noise_sd().detach() ** 2)
        return precision * torch.ones(len(f), 1, 1)
    if model.likelihood == "bernoulli":
        p = torch.sigmoid(f)
        return (p * (1 - p)).unsqueeze(-1)
    p = f.softmax(-1)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def _choose_prior_precision(ggn: torch.Tensor, flat: torch.Tensor, grid: torch.Tensor):
    """The tau of ``grid`` with the highest Laplace evidence, and the evidence curve."""
    eigenvalues = ggn if ggn.dim() == 1 else torch.linalg.eigvalsh(ggn)
    eigenvalues = eigenvalues.clamp(min=0)
    d, norm2 = len(flat), float(flat.pow(2).sum())
    grid = grid.to(flat.dtype)
    evidence = torch.stack([-tau / 2 * norm2 + d / 2 * math.log(tau)
                            - 0.5 * torch.log(eigenvalues + tau).sum() for tau in grid.tolist()])
    best = int(evidence.argmax())
    return float(grid[best]), {"prior_precision": grid, "log_evidence": evidence}
