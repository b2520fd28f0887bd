"""Posterior predictive of a Bayesian neural network, and its scores.

``predictive(model, guide, x, num_samples)`` draws S weight samples from the guide (or takes
given posterior samples, e.g. from NUTS) and returns what the likelihood needs for every one of
them: ``mean`` and ``variance`` (S, N) for regression, ``probs`` (S, N, C) for classification.
It is ``pyro.infer.Predictive(parallel=True)`` evaluated in chunks of inputs, so large test
sets fit in memory. A guide with ``linearized`` set (the Laplace guide's GLM predictive) gives
the network outputs itself (``guide.linearized_outputs``); the model's likelihood head turns
them into the same sites. ``score`` turns those into the metrics of ``inference/metrics.py``.
"""

from __future__ import annotations

import pyro
import torch
from pyro.infer import Predictive

from bayeszoo.inference import metrics

REGRESSION_SITES = ("mean", "variance")
CLASSIFICATION_SITES = ("probs",)


def _sites(model) -> tuple[str, ...]:
    return CLASSIFICATION_SITES if model.likelihood in ("categorical", "bernoulli") else REGRESSION_SITES


@torch.no_grad()
def predictive(model, guide=None, x: torch.Tensor | None = None, num_samples: int = 100,
               posterior_samples: dict | None = None, chunk_size: int = 500) -> dict[str, torch.Tensor]:
    """S predictive parameter sets for every input: {"mean", "variance"} or {"probs"}.

    With a guide, each chunk of inputs gets fresh weight samples, so compare points within a
    chunk when their joint behaviour matters; for per-point metrics it makes no difference.
    """
    if posterior_samples is not None:
        num_samples = len(next(iter(posterior_samples.values())))
    sites = _sites(model)
    was_training = model.training
    model.eval()
    try:
        if getattr(guide, "linearized", False) and posterior_samples is None:
            def sampler(inputs):
                return _likelihood_parameters(model, guide.linearized_outputs(model, inputs, num_samples))
        else:
            sampler = Predictive(model, guide=guide, posterior_samples=posterior_samples,
                                 num_samples=num_samples, parallel=True, return_sites=list(sites))
        chunks = [sampler(x[start:start + chunk_size]) for start in range(0, len(x), chunk_size)]
    finally:
        model.train(was_training)
    out = {site: torch.cat([chunk[site] for chunk in chunks], dim=1) for site in sites}
    if model.likelihood == "bernoulli" and model.output_dim == 1:  # two classes, for the metrics
        out["probs"] = torch.stack([1 - out["probs"], out["probs"]], dim=-1)
    return out


def _likelihood_parameters(model, f: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's deterministic likelihood sites for network outputs ``f`` (S, N, out)."""
    noise = model.noise_sd() if model.likelihood == "gaussian" else None
    with pyro.poutine.trace() as tape, pyro.plate("data", f.shape[-2]):
        model.observe(f, None, noise)
    return {site: tape.trace.nodes[site]["value"] for site in _sites(model)}


def score(model, guide, dataset, split: str = "test", num_samples: int = 100,
          posterior_samples: dict | None = None) -> dict:
    """Test metrics of a fitted BNN on a ``SupervisedDataset``.

    Regression: RMSE and Gaussian NLL in the data's original units. Classification: accuracy,
    NLL, Brier, ECE, and OOD detection (AUROC, AUPR) on the dataset's held-out classes.
    """
    data = dataset.split(split)
    draws = predictive(model, guide, data["x"], num_samples, posterior_samples)
    result = {"split": split, "num_samples": num_samples, "num_points": len(data["x"])}
    if dataset.task == "regression":
        result.update(metrics.regression_metrics(draws["mean"], draws["variance"], data["y"],
                                                 y_scale=dataset.y_std))
        return result
    result.update(metrics.classification_metrics(draws["probs"], data["y"]))
    if dataset.ood is not None:
        outside = predictive(model, guide, dataset.ood["x"], num_samples, posterior_samples)
        result["ood"] = metrics.ood_metrics(draws["probs"], outside["probs"])
    return result
