"""Figures for latent-variable models and BNNs: images, latent space, training curves, predictive.

Every function returns a matplotlib Figure (``regression_band`` draws on a given Axes) and
never calls ``plt.show`` so that scripts, tests and notebooks share it. The images are read
off the model's observation site "x" (its mean), so the same code draws any model of the
family. Every figure carries a title, axis labels wherever there are tick labels, and a
legend naming each line and band, placed outside the axes so that it covers no data.
"""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator
from pyro import poutine

# Where a legend goes: just right of the axes, top-aligned, so it never sits on the data.
# tight_layout counts an Axes legend when it shrinks the axes, so the legend stays in the figure.
_OUTSIDE_RIGHT = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0}


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
               size: float = 1.0, title: str | None = None):
    """One row of images per tensor in ``rows``; ``titles`` label the rows, ``title`` the figure."""
    columns = max(len(r) for r in rows)
    width = size * columns
    # Wrap the title to the figure's width (about 9 characters per inch at the default font size)
    # and give each of its lines a third of an inch, so a grid of few images neither cuts the
    # title off nor shrinks its images to make room for it.
    title = textwrap.fill(title, max(20, int(9 * width))) if title is not None else None
    title_height = 0.35 * (title.count("\n") + 1) if title is not None else 0.0
    fig, axes = plt.subplots(len(rows), columns, figsize=(width, size * len(rows) + title_height),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j, image in enumerate(_images(row, image_shape)):
            axes[i, j].imshow(image, cmap="gray", vmin=0, vmax=1)
        for ax in axes[i]:
            ax.set_xticks([]), ax.set_yticks([])
        if titles:
            axes[i, 0].set_ylabel(titles[i], rotation=0, ha="right", va="center")
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def reconstructions(model, guide, inputs: dict, image_shape, count: int = 10):
    """Data (top) and E[x | z], z ~ q(z | x) (bottom)."""
    few = {k: v[:count] for k, v in inputs.items()}
    return image_grid([few["x"], observation_mean(model, guide, **few)], image_shape,
                      ["data", "reconstruction"],
                      title="test images (top) and their reconstructions E[x | z], z ~ q(z | x)")


def samples(model, image_shape, count: int = 10, rows: int = 2, **inputs):
    """E[x | z] for z drawn from the prior (pass the context ``c`` for a conditional model)."""
    if "c" in inputs:
        means = observation_mean(model, **inputs)
        return image_grid([means], image_shape, ["samples"],
                          title="samples given a context c: E[x | z], z ~ p(z | c)")
    means = observation_mean(model, batch_size=count * rows)
    return image_grid(list(means.split(count)), image_shape,
                      title="samples from the model: E[x | z], z ~ p(z)")


def latent_scatter(means: torch.Tensor, labels: torch.Tensor, title: str = "latent space",
                   site: str = "z"):
    """Posterior means E[site | x] coloured by class; the first two principal axes when the site has
    more than 2 dims.

    Up to 10 classes get one tab10 colour and one legend entry each (classes are categories, so
    a colour bar would suggest an order). tab10 has no eleventh colour and a legend of dozens of
    entries is unreadable, so more classes get a continuous colour bar labelled "class".
    """
    points = means.detach().cpu()
    labels = labels.detach().cpu()
    if points.shape[1] > 2:
        centred = points - points.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        points = centred @ v[:2].T
        axis_names = (f"PC1 of E[{site} | x]", f"PC2 of E[{site} | x]")
    else:
        axis_names = (f"E[{site}_1 | x]", f"E[{site}_2 | x]")
    classes = torch.unique(labels).tolist()
    fig, ax = plt.subplots(figsize=(6.0, 4.5))
    if len(classes) <= 10:
        colours = plt.get_cmap("tab10").colors
        for index, value in enumerate(classes):
            chosen = labels == value
            ax.scatter(points[chosen, 0], points[chosen, 1], s=6, color=colours[index],
                       label=f"{value}")
        ax.legend(title="class", markerscale=2.5, **_OUTSIDE_RIGHT)
    else:
        scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="viridis", s=6)
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
    ax.set_xticks([]), ax.set_yticks([])
    # z1 grows left to right and z2 bottom to top (the grid's rows are the flipped quantiles).
    ax.set_xlabel(f"{site}_1 (increasing →)"), ax.set_ylabel(f"{site}_2 (increasing →)")
    ax.set_title(f"decoder mean E[x | {site}] on a {steps}×{steps} grid of N(0, 1) quantiles")
    fig.tight_layout()
    return fig


def training_curves(history: list[dict], title: str = "training curve"):
    """Training and (where the history has it) validation ELBO per epoch, in nats per data point."""
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    epochs = [row["epoch"] for row in history]
    ax.plot(epochs, [row["train_elbo"] for row in history], marker=".", label="train")
    if history and "valid_elbo" in history[0]:
        ax.plot(epochs, [row["valid_elbo"] for row in history], marker=".", label="validation")
    # Epochs are whole numbers: without this a short run gets ticks at 1.5, 2.5, ...
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch"), ax.set_ylabel("ELBO (nats per point)"), ax.set_title(title)
    ax.legend(**_OUTSIDE_RIGHT)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- BNN predictive figures


def _to_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def reliability_diagram(results: dict, bins: int = 15, size: float = 3.2,
                        title: str | None = None):
    """Reliability diagrams (Guo et al. 2017), one panel per method, ECE in each title.

    ``results`` maps a method name to ``(probs_mean, y)``: its (N, C) predictive class
    probabilities (averaged over weight samples) and the (N,) labels. Each panel shows, per
    equal-width confidence bin, the accuracy (bars) against the diagonal of perfect
    calibration; the red outline is the gap to the bin's mean confidence, so overconfidence is
    a red box above the bar. ``size`` is the height and width of one panel in inches; the
    legend sits right of the last panel and the figure is at least 6 inches wide.
    """
    from bayeszoo.inference.metrics import expected_calibration_error, reliability

    legend_width = 2.2  # inches right of the panels for the legend
    figure_width = max(size * len(results) + legend_width, 6.0)
    fig, axes = plt.subplots(1, len(results), figsize=(figure_width, size + 0.6), squeeze=False, sharey=True)
    for ax, (name, (probs_mean, y)) in zip(axes[0], results.items(), strict=True):
        table = {key: _to_numpy(value) for key, value in reliability(probs_mean, y, bins).items()}
        edges, occupied = table["edges"], table["count"] > 0
        left, width = edges[:-1][occupied], np.diff(edges)[occupied]
        accuracy, confidence = table["accuracy"][occupied], table["confidence"][occupied]
        ax.bar(left, accuracy, width=width, align="edge", color="tab:blue", edgecolor="black",
               linewidth=0.5, label="accuracy in bin")
        ax.bar(left, confidence - accuracy, bottom=accuracy, width=width, align="edge",
               fill=False, edgecolor="tab:red", hatch="//", linewidth=0.5,
               label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_title(f"{name}\nECE = {expected_calibration_error(probs_mean, y, bins):.3f}")
    axes[0, 0].set_ylabel("accuracy")
    axes[0, -1].legend(fontsize="small", **_OUTSIDE_RIGHT)
    fig.suptitle(title if title is not None else f"reliability: {bins} equal-width confidence bins")
    fig.tight_layout()
    return fig


def regression_band(ax, x_train, y_train, x_grid, mean, epistemic_sd, total_sd, title: str | None = None):
    """Draw a 1-D regression posterior predictive on ``ax`` and return ``ax``.

    The training points, the predictive mean, a +-2 total sd band (epistemic + aleatoric, the
    spread of new observations) and inside it a darker +-2 epistemic sd band (the spread of the
    regression function alone). Build a grid of methods by calling it once per Axes, with
    ``total_sd = predictive_moments(...)["total"].sqrt()`` and the epistemic part likewise; the
    caller sets the axis labels and the legend (``predictive_band`` does both for one panel).
    """
    x_grid, mean = _to_numpy(x_grid).ravel(), _to_numpy(mean).ravel()
    epistemic_sd, total_sd = _to_numpy(epistemic_sd).ravel(), _to_numpy(total_sd).ravel()
    ax.fill_between(x_grid, mean - 2 * total_sd, mean + 2 * total_sd, color="tab:blue", alpha=0.2,
                    linewidth=0, label="±2 sd total (function + noise)")
    ax.fill_between(x_grid, mean - 2 * epistemic_sd, mean + 2 * epistemic_sd, color="tab:blue",
                    alpha=0.4, linewidth=0, label="±2 sd epistemic (function)")
    ax.plot(x_grid, mean, color="tab:blue", linewidth=1.5, label="predictive mean")
    ax.scatter(_to_numpy(x_train).ravel(), _to_numpy(y_train).ravel(), s=8, color="black", zorder=3,
               label="training data")
    if title is not None:
        ax.set_title(title)
    return ax


def predictive_band(x_train, y_train, x_grid, mean, epistemic_sd, total_sd,
                    title: str = "posterior predictive", x_label: str = "x", y_label: str = "y"):
    """One-panel figure of ``regression_band`` with axis labels and a legend right of the axes."""
    fig, ax = plt.subplots(figsize=(8.0, 4.0))
    regression_band(ax, x_train, y_train, x_grid, mean, epistemic_sd, total_sd, title)
    ax.set_xlabel(x_label), ax.set_ylabel(y_label)
    ax.legend(fontsize="small", **_OUTSIDE_RIGHT)
    fig.tight_layout()
    return fig
