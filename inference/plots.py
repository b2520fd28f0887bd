"""Figures for latent-variable models: reconstructions, samples, latent space, training curves.

Every function takes a fitted model/guide pair and model inputs, returns a matplotlib
Figure, and never calls ``plt.show`` so that scripts, tests and notebooks share it.
The images are read off the model's observation site "x" (its mean), so the same
code draws any model of the family.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from pyro import poutine


@torch.no_grad()
def observation_mean(model, guide=None, **inputs) -> torch.Tensor:
    """E[x | z] with z drawn from the guide (reconstruction) or, without a guide, the prior."""
    if guide is not None:
        guide_trace = poutine.trace(guide).get_trace(**inputs)
        model = poutine.replay(model, trace=guide_trace)
    trace = poutine.trace(model).get_trace(**inputs)
    return trace.nodes["x"]["fn"].mean


def _images(rows: torch.Tensor, image_shape) -> np.ndarray:
    images = rows.detach().cpu().clamp(0, 1).reshape(-1, *image_shape).numpy()
    return images.transpose(0, 2, 3, 1) if len(image_shape) == 3 else images


def image_grid(rows: list[torch.Tensor], image_shape, titles: list[str] | None = None,
               size: float = 1.0):
    """One row of images per tensor in ``rows``; ``titles`` label the rows."""
    columns = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(size * columns, size * len(rows)),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j, image in enumerate(_images(row, image_shape)):
            axes[i, j].imshow(image, cmap="gray", vmin=0, vmax=1)
        for ax in axes[i]:
            ax.set_xticks([]), ax.set_yticks([])
        if titles:
            axes[i, 0].set_ylabel(titles[i], rotation=0, ha="right", va="center")
    fig.tight_layout()
    return fig


def reconstructions(model, guide, inputs: dict, image_shape, count: int = 10):
    """Data (top) and E[x | z], z ~ q(z | x) (bottom)."""
    few = {k: v[:count] for k, v in inputs.items()}
    return image_grid([few["x"], observation_mean(model, guide, **few)], image_shape,
                      ["data", "reconstruction"])


def samples(model, image_shape, count: int = 10, rows: int = 2, **inputs):
    """E[x | z] for z drawn from the prior (pass the context ``c`` for a conditional model)."""
    if "c" in inputs:
        means = observation_mean(model, **inputs)
        return image_grid([means], image_shape, ["samples"])
    means = observation_mean(model, batch_size=count * rows)
    return image_grid(list(means.split(count)), image_shape)


def latent_scatter(means: torch.Tensor, labels: torch.Tensor, title: str = "latent space"):
    """Posterior means coloured by class; the first two principal axes when z has more than 2 dims."""
    points = means.detach().cpu()
    axis_names = ("z1", "z2")
    if points.shape[1] > 2:
        centred = points - points.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        points, axis_names = centred @ v[:2].T, ("PC1 of E[z|x]", "PC2 of E[z|x]")
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels.cpu(), cmap="tab10", s=6)
    fig.colorbar(scatter, ax=ax, label="class")
    ax.set_xlabel(axis_names[0]), ax.set_ylabel(axis_names[1]), ax.set_title(title)
    fig.tight_layout()
    return fig


@torch.no_grad()
def latent_manifold(model, image_shape, steps: int = 15, site: str = "z", span: float = 2.5):
    """Decode a grid over a 2-D latent space, Normal quantiles as in Kingma & Welling (2014)."""
    quantiles = torch.linspace(0.5 / steps, 1 - 0.5 / steps, steps)
    values = torch.distributions.Normal(0, 1).icdf(quantiles).clamp(-span, span)
    grid = torch.stack(torch.meshgrid(values, values.flip(0), indexing="xy"), -1).reshape(-1, 2)
    conditioned = poutine.condition(model, data={site: grid})
    trace = poutine.trace(conditioned).get_trace(batch_size=len(grid))
    images = _images(trace.nodes["x"]["fn"].mean, image_shape)
    height, width = images.shape[1:3]
    canvas = images.reshape(steps, steps, height, width, *images.shape[3:])
    canvas = canvas.swapaxes(1, 2).reshape(steps * height, steps * width, *images.shape[3:])
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([]), ax.set_yticks([]), ax.set_title("decoded latent grid")
    fig.tight_layout()
    return fig


def training_curves(history: list[dict]):
    """Training and validation ELBO per epoch."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    epochs = [row["epoch"] for row in history]
    ax.plot(epochs, [row["train_elbo"] for row in history], label="train ELBO")
    if history and "valid_elbo" in history[0]:
        ax.plot(epochs, [row["valid_elbo"] for row in history], label="validation ELBO")
    ax.set_xlabel("epoch"), ax.set_ylabel("nats per data point"), ax.legend()
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- BNN predictive figures


def _to_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def reliability_diagram(results: dict, bins: int = 15, size: float = 3.2):
    """Reliability diagrams (Guo et al. 2017), one panel per method, ECE in each title.

    ``results`` maps a method name to ``(probs_mean, y)``: its (N, C) predictive class
    probabilities (averaged over weight samples) and the (N,) labels. Each panel shows, per
    equal-width confidence bin, the accuracy (bars) against the diagonal of perfect
    calibration; the red outline is the gap to the bin's mean confidence, so overconfidence is
    a red box above the bar.
    """
    from bayeszoo.inference.metrics import expected_calibration_error, reliability

    fig, axes = plt.subplots(1, len(results), figsize=(size * len(results), size), squeeze=False,
                             sharey=True)
    for ax, (name, (probs_mean, y)) in zip(axes[0], results.items(), strict=True):
        table = {key: _to_numpy(value) for key, value in reliability(probs_mean, y, bins).items()}
        edges, occupied = table["edges"], table["count"] > 0
        left, width = edges[:-1][occupied], np.diff(edges)[occupied]
        accuracy, confidence = table["accuracy"][occupied], table["confidence"][occupied]
        ax.bar(left, accuracy, width=width, align="edge", color="tab:blue", edgecolor="black",
               linewidth=0.5, label="accuracy")
        ax.bar(left, confidence - accuracy, bottom=accuracy, width=width, align="edge",
               fill=False, edgecolor="tab:red", hatch="//", linewidth=0.5, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_title(f"{name}\nECE = {expected_calibration_error(probs_mean, y, bins):.3f}")
    axes[0, 0].set_ylabel("accuracy")
    axes[0, 0].legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return fig


def regression_band(ax, x_train, y_train, x_grid, mean, epistemic_sd, total_sd, title: str | None = None):
    """Draw a 1-D regression posterior predictive on ``ax`` and return ``ax``.

    The training points, the predictive mean, a +-2 total sd band (epistemic + aleatoric, the
    spread of new observations) and inside it a darker +-2 epistemic sd band (the spread of the
    regression function alone). Build a grid of methods by calling it once per Axes, with
    ``total_sd = predictive_moments(...)["total"].sqrt()`` and the epistemic part likewise.
    """
    x_grid, mean = _to_numpy(x_grid).ravel(), _to_numpy(mean).ravel()
    epistemic_sd, total_sd = _to_numpy(epistemic_sd).ravel(), _to_numpy(total_sd).ravel()
    ax.fill_between(x_grid, mean - 2 * total_sd, mean + 2 * total_sd, color="tab:blue", alpha=0.2,
                    linewidth=0, label="±2 sd total")
    ax.fill_between(x_grid, mean - 2 * epistemic_sd, mean + 2 * epistemic_sd, color="tab:blue",
                    alpha=0.4, linewidth=0, label="±2 sd epistemic")
    ax.plot(x_grid, mean, color="tab:blue", linewidth=1.5, label="predictive mean")
    ax.scatter(_to_numpy(x_train).ravel(), _to_numpy(y_train).ravel(), s=8, color="black", zorder=3,
               label="training data")
    if title is not None:
        ax.set_title(title)
    return ax
