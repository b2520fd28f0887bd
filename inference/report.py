"""The written forms of runs and comparisons: tables, markdown, CSV, hardware and library versions.

A comparison (``inference.compare``) writes ``compare.md`` (a sentence stating data, budget, K or the
number of weight samples, seed and hardware, then the table and how to read it) and ``compare.csv``
(every key of every row). The columns are the family's (``inference.families``).
"""

from __future__ import annotations

import csv
import math
import platform
from pathlib import Path

import pyro
import torch

from bayeszoo.inference.diagnostics import MIN_PSIS_SAMPLES
from bayeszoo.inference.evaluate import KHAT_THRESHOLD

#: (row key, markdown header); the CSV has every row key.
LATENT_TABLE = (
    ("guide", "guide"),
    ("is_log_likelihood", "IS log-likelihood (K={K})"),
    ("elbo", "test ELBO"),
    ("kl", "KL"),
    ("active_units", "active units"),
    ("khat_mean", "mean k-hat"),
    ("khat_above", f"k-hat > {KHAT_THRESHOLD}"),
    ("seconds_per_epoch", "s / epoch"),
    ("parameters", "parameters"),
    ("status", "status"),
)
#: Sequence models report these per observed time step.
PER_STEP = ("is_log_likelihood", "elbo", "kl")
BNN_REGRESSION_TABLE = (
    ("guide", "guide"),
    ("rmse", "test RMSE"),
    ("nll", "test NLL"),
    ("seconds_per_epoch", "s / epoch"),
    ("train_seconds", "train s"),
    ("posterior_bytes", "posterior bytes"),
    ("status", "status"),
)
BNN_CLASSIFICATION_TABLE = (
    ("guide", "guide"),
    ("accuracy", "accuracy"),
    ("nll", "NLL"),
    ("brier", "Brier"),
    ("ece", "ECE"),
    ("ood_auroc_entropy", "OOD AUROC (entropy)"),
    ("ood_auroc_mi", "OOD AUROC (MI)"),
    ("seconds_per_epoch", "s / epoch"),
    ("train_seconds", "train s"),
    ("posterior_bytes", "posterior bytes"),
    ("status", "status"),
)


def sequence_table():
    """The latent table with per-time-step scores and without active units."""
    return tuple(
        (f"{key}_per_step", header) if key in PER_STEP else (key, header)
        for key, header in LATENT_TABLE
        if key != "active_units"
    )


def library_versions() -> dict[str, str]:
    """The versions a run's numbers depend on."""
    import arviz

    import bayeszoo

    return {
        "bayeszoo": bayeszoo.__version__,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "arviz": arviz.__version__,
    }


def describe_hardware(device: str) -> str:
    """The GPU's name, or the CPU's model and the torch thread count."""
    if str(device).startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} CPU threads"


def _format(key: str, value) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if key in ("active_units", "parameters"):
        return f"{int(value):,}"
    if key == "khat_above":
        return f"{100 * value:.0f}%"
    return f"{value:.2f}"


def latent_markdown(rows: list[dict], setting: dict) -> str:
    """The comparison as markdown: a sentence stating the setting, the table, how to read it."""
    budget, dataset, k = setting["budget"], setting["dataset"], setting["is_samples"]
    images = hasattr(dataset, "image_shape")
    if images:
        noun, unit, table = "images", "Nats per test image", LATENT_TABLE
        binarized = {
            "dynamic": ", dynamically binarized (validation and test sets binarized once)",
            "fixed": ", binarized once",
            None: ", grey levels",
        }[setting["binarize"]]
    else:  # sequences: nats per observed time step, no active units
        noun, unit, binarized = "sequences", "Nats per observed time step", ""
        table = sequence_table()
    options = ", ".join(f"{key}={value}" for key, value in sorted(setting["options"].items()))
    lines = [
        f"# {setting['model']}: guides compared on {setting['data']}",
        "",
        f"`{setting['model']}` on `{setting['data']}` ({len(dataset.train['x']):,} training, "
        f"{len(dataset.test['x']):,} test {noun}{binarized}); every guide trained from the same "
        f"initial model (decoder) weights for {budget['epochs']} epochs (batch {budget['batch_size']}, "
        f"Adam lr {budget['lr']:g}, seed {budget['seed']}) and scored on the test set with "
        f"K = {k} importance samples per {noun[:-1]}; on {setting['hardware']}, torch {torch.__version__}, "
        f"pyro {pyro.__version__}." + (f" Model options: {options}." if options else ""),
        "",
        "| " + " | ".join(header.format(K=k) for _, header in table) + " |",
        "|" + "|".join("---" if key in ("guide", "status") else "---:" for key, _ in table) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_format(key, row.get(key)) for key, _ in table) + " |")
    lines += [
        "",
        f"{unit}. The IS log-likelihood is log (1/K) sum_k p(x, z_k) / q(z_k | x), "
        f"z_k ~ q, with K = {k}: a stochastic lower bound on log p(x) that tightens as K grows; the "
        "ELBO is its K = 1 counterpart, and IS log-likelihood - ELBO estimates KL(q(z | x) || p(z | x)) "
        "from below. k-hat is the Pareto shape fitted to the largest importance weights of each "
        f"test {noun[:-1]} (PSIS, Vehtari et al. 2024, through ArviZ): < 0.5 good, 0.5-0.7 ok, > 0.7 q is "
        "far from the posterior and the IS estimate is unreliable (Yao et al. 2018); the mean is "
        f"over test {noun}, the next column the share of them above 0.7"
        + (f" (a k-hat needs K >= {MIN_PSIS_SAMPLES})" if k < MIN_PSIS_SAMPLES else "")
        + ". Seconds per epoch: training wall-clock time, validation excluded. Parameters: model "
        "and guide together.",
        "",
    ]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path, table) -> None:
    """Every key of every row, one line per guide."""
    keys = [key for key, _ in table]
    for row in rows:
        keys += [key for key in row if key not in keys]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def bnn_markdown(rows: list[dict], setting: dict) -> str:
    dataset, data, fit_options = setting["dataset"], setting["data"], setting["budget"]
    num_samples, table = setting["predictive_samples"], setting["table"]
    lines = [
        f"# bnn: guides compared on {data}",
        "",
        f"A Bayesian MLP on `{data}` ({len(dataset.train['x']):,} training, {len(dataset.test['x']):,} test "
        f"points); every guide from the same initial weights, {fit_options.get('epochs')} epochs, batch "
        f"{fit_options.get('batch_size')}, lr {fit_options.get('lr')}, seed {fit_options.get('seed', 0)}; "
        f"metrics from {num_samples} weight samples (an ensemble: its members; NUTS, SGLD: their draws), "
        f"on {setting['hardware']}, torch {torch.__version__}, pyro {pyro.__version__}.",
        "",
        "| " + " | ".join(header for _, header in table) + " |",
        "|" + "|".join("---" if key in ("guide", "status") else "---:" for key, _ in table) + "|",
    ]
    for row in rows:
        cells = [
            f"{int(row[key]):,}"
            if key == "posterior_bytes" and key in row
            else _format(key, row.get(key))
            if key not in ("rmse", "nll", "brier", "ece")
            else (f"{row[key]:.4f}" if key in row else "—")
            for key, _ in table
        ]
        lines.append("| " + " | ".join(cells) + " |")
    unit = (
        "RMSE and Gaussian NLL (per point, of the predictive mixture) in the data's original units"
        if dataset.task == "regression"
        else "NLL per test point in nats; ECE with 15 bins; OOD: the held-out classes, scored by predictive "
        "entropy or mutual information"
    )
    timing = (
        ". Seconds per epoch: median training wall-clock time; train s: the whole method (MAP "
        "and Laplace, sampling, tracking) including one-off start-up costs in the first row."
    )
    return "\n".join(lines + ["", unit + timing, ""])
