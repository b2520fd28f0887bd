"""Scores for any model/guide pair of the latent-variable family.

With z_1..z_K drawn from the guide q(z | x), the log importance weights

    log w_k = log p(x, z_k) - log q(z_k | x)

give three estimates per data point (Burda, Grosse & Salakhutdinov 2016):

    importance-sampled log-likelihood  log p(x) ~ logsumexp_k log w_k - log K   (a lower
        bound in expectation that tightens as K grows; exact when q is the true posterior)
    ELBO                               mean_k log w_k
    KL(q(z | x) || p(z))               mean_k [log q(z_k | x) - log p(z_k)]

Samples are drawn in chunks inside a ``pyro.plate("particles")`` to the left of the
model's own plates, so K = 5000 on a 784-dimensional model fits in a few hundred MB.
Log-likelihoods are only ever called log-likelihoods when they are IS estimates, and
the sample count K goes with them.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from bayeszoo.inference.diagnostics import MIN_PSIS_SAMPLES, psis_khat
from bayeszoo.inference.svi import max_plate_nesting

#: k-hat above this: q is far from the posterior and the IS estimate is unreliable (Yao et al. 2018).
KHAT_THRESHOLD = 0.7


def _size(data: dict) -> int:
    return len(next(iter(data.values())))


def _chunks(data: dict, batch_size: int):
    for start in range(0, _size(data), batch_size):
        yield {k: v[start:start + batch_size] for k, v in data.items()}


def log_weight_terms(model, guide, batch: dict, num_samples: int, plate_nesting: int = 1):
    """Draw ``num_samples`` z ~ q(z | x) per data point and split log w into two parts.

    Returns ``(log_likelihood, log_prior_ratio)``, each of shape (num_samples, N):
    log p(x | z_k) summed over observed sites and log p(z_k) - log q(z_k | x) summed
    over latent sites. Assumes local latent variables (one per data point), as in
    the latent-variable family; a global latent would be counted once per point.
    """
    with pyro.plate("particles", num_samples, dim=-(plate_nesting + 1)):
        guide_trace = poutine.trace(guide).get_trace(**batch)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    shape = (num_samples, _size(batch))
    log_likelihood = torch.zeros(shape, device=_device(batch))
    log_prior_ratio = torch.zeros(shape, device=_device(batch))
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            log_likelihood = log_likelihood + site["log_prob"]
        else:
            log_prior_ratio = log_prior_ratio + site["log_prob"] - guide_trace.nodes[name]["log_prob"]
    return log_likelihood, log_prior_ratio


def _device(batch: dict):
    return next(iter(batch.values())).device


def _default_chunk(batch_size: int, point_size: int) -> int:
    # Keep one chunk's decoder output near 2e7 numbers (80 MB in float32).
    return max(1, int(2e7 // max(1, batch_size * point_size)))


@torch.no_grad()
def importance_sampling(model, guide, data: dict, num_samples: int = 1000,
                        batch_size: int = 100, chunk_size: int | None = None,
                        device="cpu", progress: bool = False) -> dict[str, torch.Tensor]:
    """Per-point IS log-likelihood (K = ``num_samples``), ELBO, KL and PSIS k-hat, each a tensor
    (N,) on the CPU, all from one set of K log importance weights per point.

    The k-hat is the Pareto shape fitted to the largest weights of each point (PSIS, through
    ArviZ; ``inference.diagnostics.psis_khat``): NaN when K < ``MIN_PSIS_SAMPLES``.
    """
    from tqdm import tqdm

    model.eval(), guide.eval()
    # One data point's size: D for an image, T * D for a sequence.
    point_size = next(iter(data.values()))[0].numel()
    chunk_size = chunk_size or _default_chunk(batch_size, point_size)
    results = {"log_likelihood": [], "elbo": [], "kl": [], "khat": []}
    batches = list(_chunks(data, batch_size))
    nesting = None
    for batch in tqdm(batches, desc=f"IS (K={num_samples})", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        if nesting is None:
            nesting = max_plate_nesting(model, guide, batch)
        log_ws, kl_sum, drawn = [], 0.0, 0
        while drawn < num_samples:
            k = min(chunk_size, num_samples - drawn)
            log_likelihood, log_prior_ratio = log_weight_terms(model, guide, batch, k, nesting)
            log_ws.append(log_likelihood + log_prior_ratio)
            kl_sum = kl_sum - log_prior_ratio.sum(0)
            drawn += k
        log_w = torch.cat(log_ws)  # (K, batch)
        results["log_likelihood"].append(torch.logsumexp(log_w, dim=0) - math.log(num_samples))
        results["elbo"].append(log_w.sum(0) / num_samples)
        results["kl"].append(kl_sum / num_samples)
        if num_samples >= MIN_PSIS_SAMPLES:
            results["khat"].append(psis_khat(log_w))
        else:
            results["khat"].append(torch.full((log_w.shape[1],), math.nan, dtype=torch.float64))
    return {name: torch.cat([v.cpu() for v in values]) for name, values in results.items()}


@torch.no_grad()
def posterior_means(guide, data: dict, batch_size: int = 500, num_samples: int = 1000,
                    device="cpu") -> dict[str, torch.Tensor]:
    """E_q[z | x] for every latent site: exact when the guide exposes ``site_distributions``,
    otherwise a Monte Carlo average of ``num_samples`` draws."""
    guide.eval()
    means: dict[str, list] = {}
    for batch in _chunks(data, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        if hasattr(guide, "site_distributions"):
            site_means = {name: q.mean for name, q in
                          guide.site_distributions(batch["x"], batch.get("c")).items()}
        else:
            with pyro.plate("particles", num_samples, dim=-2):
                trace = poutine.trace(guide).get_trace(**batch)
            site_means = {name: site["value"].mean(0) for name, site in trace.nodes.items()
                          if site["type"] == "sample" and not site["is_observed"]
                          and not site_is_subsample(site)}
        for name, mean in site_means.items():
            means.setdefault(name, []).append(mean.cpu())
    return {name: torch.cat(values) for name, values in means.items()}


def active_units(guide, data: dict, threshold: float = 0.01, **kwargs) -> dict[str, int]:
    """Latent units whose posterior mean varies across the data: Cov_x(E_q[u | x]) > threshold
    (Burda et al. 2016). A unit whose q ignores x carries no information about it."""
    return {name: int((mean.var(0) > threshold).sum())
            for name, mean in posterior_means(guide, data, **kwargs).items()}


def is_point_mass(guide, batch: dict) -> bool:
    """Whether q(z | x) puts all its mass on one point (the delta and denoising guides): then the
    "ELBO" is the MAP objective log p(x, z*) and importance sampling estimates nothing."""
    with torch.no_grad():
        trace = poutine.trace(guide).get_trace(**batch)
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
            fn = site["fn"]
            while hasattr(fn, "base_dist"):
                fn = fn.base_dist
            if isinstance(fn, dist.Delta):
                return True
    return False


def khat_summary(khat: torch.Tensor) -> dict:
    """``khat_mean`` (over points with a finite k-hat; a point whose weights are all equal has
    k-hat -inf and is left out of the mean but counted below the threshold), ``khat_above`` (the
    share of points above ``KHAT_THRESHOLD``) and ``khat_max``; NaN without k-hats."""
    if khat.isnan().all():
        return {"khat_mean": math.nan, "khat_above": math.nan, "khat_max": math.nan}
    finite = khat[torch.isfinite(khat)]
    return {"khat_mean": finite.mean().item() if len(finite) else khat.max().item(),
            "khat_above": (khat > KHAT_THRESHOLD).double().mean().item(), "khat_max": khat.max().item()}


def evaluate(model, guide, data: dict, num_samples: int = 1000, batch_size: int = 100,
             device="cpu", progress: bool = False, count_active_units: bool = True) -> dict:
    """Summary scores of a fitted pair on ``data`` (means over points, nats per point) from one
    importance-sampling pass: IS log-likelihood, ELBO, KL, the k-hat summary and, for images, the
    active units. Sequences (a ``mask`` in ``data``) also get the first three per observed time
    step (``*_per_step``), as in Krishnan et al. (2017). A point-mass guide has no density: its IS
    log-likelihood and k-hat are NaN (``point_mass`` says so)."""
    per_point = importance_sampling(model, guide, data, num_samples, batch_size,
                                    device=device, progress=progress)
    point_mass = is_point_mass(guide, {k: v[:1].to(device) for k, v in data.items()})
    if point_mass:  # all K samples coincide: no IS estimate and no k-hat
        per_point["log_likelihood"] = torch.full_like(per_point["log_likelihood"], math.nan)
        per_point["khat"] = torch.full_like(per_point["khat"], math.nan)
    units = active_units(guide, data, device=device) if count_active_units else {}
    scores = {
        "is_log_likelihood": per_point["log_likelihood"].mean().item(),
        "is_samples": num_samples,
        "elbo": per_point["elbo"].mean().item(),
        "kl": per_point["kl"].mean().item(),
        "active_units": sum(units.values()) if count_active_units else math.nan,
        "active_units_per_site": units,
        **khat_summary(per_point["khat"]),
        "num_points": _size(data),
        "point_mass": point_mass,
    }
    if "mask" in data:
        points_per_step = scores["num_points"] / float(data["mask"].sum())
        for name in ("is_log_likelihood", "elbo", "kl"):
            scores[f"{name}_per_step"] = scores[name] * points_per_step
    return scores
