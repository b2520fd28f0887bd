"""Benchmark: every Bayesian-neural-network method of ``bayeszoo.inference.training.train``: speed, quality.

Run ``.venv/bin/python benchmarks/bnn.py --threads 1`` (``--quick`` checks the script in about a
minute). For each method (MAP, mean-field = Bayes by Backprop, + local reparameterization, +
Flipout, MC dropout, a 5-member deep ensemble, last-layer Laplace, SGLD, SGHMC, TRADI) it measures:

1. **Speed.** Seconds per training epoch against a plain PyTorch MLP of the same size
   (``nn.Sequential`` of the same layers, starting from the same weights, MSE or cross-entropy,
   no prior) trained with the same optimizer (Adam), learning rate, batch size, minibatch
   order and data, written out by hand below (``train_plain``). One run each; the first epoch is
   a warm-up and is excluded; the median of the rest is reported (wall seconds from each
   epoch's ``history`` row of ``inference.svi.fit``, and CPU seconds of this process, which other
   jobs on the machine disturb less). Measured on the digits net (64-100-100-8) and on the Boston
   net (13-50-1) during their quality runs, and, in the full mode, on a wider net (784-400-400-8,
   mnist5k) where the arithmetic outweighs the per-step overhead. SGLD and SGHMC use their own
   optimizers (not Adam), the ensemble trains its 5 members in each step, Laplace's epochs are
   MAP epochs (its Hessian comes after training and is timed separately). A second reference,
   ``train_handwritten_meanfield``, is Bayes by Backprop written by hand in plain PyTorch (no Pyro)
   in the same loop: its ratio to the plain network is the method's own arithmetic, the library
   mean-field's ratio to it is what Pyro adds (timing only, no quality scores).
2. **Boston housing** (Hernandez-Lobato & Adams 2015: 90/10 splits, a 13-50-1 ReLU net, RMSE
   and Gaussian NLL in the data's units, mean and standard error over ``--splits`` splits).
3. **Digits** (8x8 scikit-learn digits; classes 8 and 9 held out as out-of-distribution
   inputs): accuracy, NLL, ECE (15 bins), and OOD AUROC from the predictive entropy.
4. **Posterior memory**, bytes of the tensors that make up each posterior: the guide's
   parameters and buffers, each tensor once (``inference.metrics.memory_bytes(guide)``, the figure
   the CLI writes to ``metrics.json``; the plain network: its weights).
5. **NUTS** on a small Boston net (13-10-1), split 0: one chain started at the MAP point with
   the potential compiled by TorchScript (``nuts_init="map"``, ``nuts_jit``), 100 warm-up + 100
   draws by default (``--nuts-samples 0`` skips it). Its RMSE/NLL is for split 0 only.

Writes ``results/bnn.json`` and ``results/bnn.md`` (``bnn_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from common import (
    RESULTS,
    EpochClock,
    add_threads_argument,
    after_warmup,
    bayes_by_backprop_step,
    command_line,
    fmt_bytes,
    fmt_mean_se,
    mean_se,
    median_or_nan,
    new_report,
    now,
    read_json,
    set_threads,
    write,
)
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from bayeszoo.guides.samples import WeightSamples
from bayeszoo.inference import metrics
from bayeszoo.inference.distributed import run_tasks
from bayeszoo.inference.metrics import memory_bytes
from bayeszoo.inference.predictive import score
from bayeszoo.inference.supervised import load_supervised
from bayeszoo.inference.training import train
from bayeszoo.models.bnn import BayesianNeuralNetwork
from bayeszoo.models.nn import mlp

pyro.settings.set(module_local_params=True)  # PyroModules keep their parameters, as torch optimizers expect

METHODS = ("map", "meanfield", "lrt", "flipout", "mcdropout", "ensemble", "laplace", "sgld", "sghmc",
           "tradi")
WIDE_METHODS = ("map", "meanfield", "lrt", "flipout", "mcdropout", "ensemble", "sgld", "tradi")
LABELS = {"plain": "plain PyTorch MLP", "map": "MAP", "meanfield": "mean-field (BBB)",
          "lrt": "mean-field + local reparam.", "flipout": "mean-field + Flipout", "mcdropout": "MC dropout",
          "ensemble": "deep ensemble", "laplace": "Laplace", "sgld": "SGLD", "sghmc": "SGHMC",
          "tradi": "TRADI", "nuts": "NUTS", "meanfield_by_hand": "mean-field by hand in PyTorch (no Pyro)"}
BY_HAND = "meanfield_by_hand"  # timing only: train_handwritten_meanfield, in the speed table and ratios
# Mean-field's and MAP's speed targets (issue 15) are timed interleaved by overhead.py, not here.
TARGETS = {"lrt": ("meanfield", 2.0), "flipout": ("meanfield", 2.0)}


@dataclass
class Config:
    splits: int = 20                 # Boston splits (of the protocol's 20)
    boston_hidden: int = 50
    boston_epochs: int = 40
    boston_batch_size: int = 32
    boston_lr: float = 1e-2
    digits_hidden: int = 100         # two hidden layers
    digits_epochs: int = 30
    digits_batch_size: int = 100
    digits_lr: float = 3e-3
    sgld_lr: float = 3e-4            # SGLD step size (the Adam lr is far too large for it)
    sghmc_lr: float = 1e-5           # SGHMC eta; with friction 0.05 its drift per step ~ eta / 0.05
    wide_hidden: int = 400           # timing-only net on mnist5k (two hidden layers); 0 skips it
    wide_epochs: int = 4             # one warm-up epoch + 3 timed
    wide_batch_size: int = 100
    num_samples: int = 100           # predictive weight samples (MAP: 1; sample sets: all members)
    prior: str = "normal"
    prior_scale: float = 1.0
    members: int = 5
    dropout: float = 0.1
    laplace_structure: str = "last-layer"
    nuts_hidden: int = 10
    nuts_warmup: int = 100
    nuts_samples: int = 100          # 0: NUTS skipped
    nuts_chains: int = 1
    devices: int = 1                 # Boston splits trained this many at a time, one process each
    seed: int = 0


QUICK = {"splits": 2, "boston_epochs": 10, "digits_epochs": 6, "num_samples": 20, "wide_hidden": 0,
         "nuts_warmup": 5, "nuts_samples": 5}

NUTS_SKIPPED = (
    "NUTS was skipped (`--nuts-samples 0`). Started from a prior draw and without JIT, Pyro's NUTS "
    "took about 9 s per iteration on this 13-10-1 Boston net (step size adapted down to ~3e-3); from "
    "the MAP point with the compiled potential (the default here) about 1.7 s (a probe of 30 + 30)."
)


# ----------------------------------------------------------------------------------------------
# Timing


def timed_epochs(step, data: dict, epochs: int, batch_size: int, seed: int) -> dict:
    """The loop of the plain references: ``step(index)`` trains on one minibatch and returns its
    summed loss; the minibatch order is the one ``fit`` uses. Returns the timing dict."""
    pyro.set_rng_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    n = len(data["x"])
    wall, cpu, losses = [], [], []
    for _ in range(epochs):
        started, started_cpu, total = time.perf_counter(), time.process_time(), 0.0
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            total += step(order[start:start + batch_size])
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
        losses.append(total / n)
    return {"epoch_wall_seconds": wall, "epoch_cpu_seconds": cpu, "train_loss": losses,
            "seconds_per_epoch": median_or_nan(after_warmup(wall)),
            "cpu_seconds_per_epoch": median_or_nan(after_warmup(cpu)),
            "train_seconds": sum(wall), "load_average": os.getloadavg()}


def train_plain(net: nn.Module, data: dict, task: str, epochs: int, batch_size: int, lr: float,
                seed: int) -> dict:
    """The plain PyTorch loop: Adam, MSE or cross-entropy, the minibatch order ``fit`` uses."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, fused=True)
    x, y = data["x"], data["y"]

    def step(index: torch.Tensor) -> float:
        out = net(x[index])
        loss = F.mse_loss(out[:, 0], y[index]) if task == "regression" else F.cross_entropy(out, y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item() * len(index)

    net.train()
    timing = timed_epochs(step, data, epochs, batch_size, seed)
    net.eval()
    return timing


def train_handwritten_meanfield(net: nn.Module, data: dict, task: str, epochs: int, batch_size: int,
                                lr: float, seed: int, prior_scale: float) -> dict:
    """Bayes by Backprop written by hand in plain PyTorch (no Pyro): a timing reference, not a method.

    It shows how much of mean-field's cost against ``train_plain`` is the method's own arithmetic
    (per weight a normal draw, a softplus, w = mu + sigma * eps, the KL, Adam on twice the
    parameters) and how much is Pyro. Same loop, Adam, lr and minibatches as ``train_plain``;
    mu starts at the net's weights, sigma = softplus(rho) at 0.01 (as ``guides/mean_field.py``);
    loss: summed NLL (unit-variance Gaussian or cross-entropy) + batch/N * KL(q || N(0, prior_scale^2)).
    """
    step = bayes_by_backprop_step(net, data, task, lr, prior_scale)
    return timed_epochs(step, data, epochs, batch_size, seed)


def run_method(model, method: str, data: dict, cfg: Config, epochs: int, batch_size: int, lr: float,
               seed: int) -> tuple[object, dict]:
    """``bayeszoo.inference.training.train`` with the clock attached; returns (guide, timing)."""
    steps = math.ceil(len(data["x"]) / batch_size)
    clock = EpochClock(steps)
    options = {"members": cfg.members, "dropout": cfg.dropout, "laplace_structure": cfg.laplace_structure}
    started = time.perf_counter()
    lr = {"sgld": cfg.sgld_lr, "sghmc": cfg.sghmc_lr}.get(method, lr)
    guide, result = train(model, method, data, None, options=options, epochs=epochs, batch_size=batch_size,
                          lr=lr, progress=False, seed=seed, batch_transform=clock)
    total = time.perf_counter() - started
    wall = [row["seconds"] for row in result.history]
    cpu = clock.cpu_seconds(epochs)
    return guide, {
        "epoch_wall_seconds": wall,
        "epoch_cpu_seconds": cpu,
        "seconds_per_epoch": median_or_nan(after_warmup(wall)),
        "cpu_seconds_per_epoch": median_or_nan(after_warmup(cpu)),
        "train_seconds": total,
        "after_training_seconds": total - sum(wall),  # Laplace's Hessian, guide construction, ...
        "final_train_elbo": result.history[-1]["train_elbo"],
        "load_average": os.getloadavg(),
    }


def with_ratios(timings: dict[str, dict]) -> dict[str, dict]:
    """Add wall and CPU ratios against the plain network to every method's timing."""
    plain = timings["plain"]
    for row in timings.values():
        row["ratio"] = row["seconds_per_epoch"] / plain["seconds_per_epoch"]
        row["cpu_ratio"] = row["cpu_seconds_per_epoch"] / plain["cpu_seconds_per_epoch"]
    return timings


def targets(timings: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for method, (reference, limit) in TARGETS.items():
        if method in timings and reference in timings:
            ratio = timings[method]["seconds_per_epoch"] / timings[reference]["seconds_per_epoch"]
            cpu = timings[method]["cpu_seconds_per_epoch"] / timings[reference]["cpu_seconds_per_epoch"]
            out[method] = {"against": reference, "limit": limit, "ratio": ratio, "cpu_ratio": cpu,
                           "met": ratio <= limit, "met_cpu": cpu <= limit}
    return out


def by_hand_ratios(timings: dict[str, dict]) -> dict:
    """The hand-written mean-field against plain, and the library's mean-field against it."""
    hand, pyro_mf = timings[BY_HAND], timings["meanfield"]
    return {"hand_vs_plain": hand["ratio"], "hand_vs_plain_cpu": hand["cpu_ratio"],
            "meanfield_vs_hand": pyro_mf["seconds_per_epoch"] / hand["seconds_per_epoch"],
            "meanfield_vs_hand_cpu": pyro_mf["cpu_seconds_per_epoch"] / hand["cpu_seconds_per_epoch"]}


# ----------------------------------------------------------------------------------------------
# Models and scores


def sizes(dataset, hidden: tuple[int, ...]) -> list[int]:
    outputs = 1 if dataset.task == "regression" else dataset.num_classes
    return [dataset.x_dim, *hidden, outputs]


def make_pair(dataset, hidden: tuple[int, ...], cfg: Config, seed: int, noise="learned"):
    """A Bayesian net and a plain copy starting from the same weights."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    net = mlp(sizes(dataset, hidden))
    likelihood = "gaussian" if dataset.task == "regression" else "categorical"
    model = BayesianNeuralNetwork(net, dataset.x_shape, likelihood=likelihood, prior=cfg.prior,
                                  prior_scale=cfg.prior_scale, noise=noise)
    return model, net


def predictive_samples(method: str, guide, cfg: Config) -> int:
    if isinstance(guide, WeightSamples):
        return guide.num_members  # ensemble members, SG-MCMC and NUTS draws: each once
    return 1 if method == "map" else cfg.num_samples


def plain_scores(net: nn.Module, dataset) -> dict:
    with torch.no_grad():
        out = net(dataset.test["x"])
        if dataset.task == "regression":
            rmse = (out[:, 0] - dataset.test["y"]).pow(2).mean().sqrt().item() * dataset.y_std
            return {"rmse": rmse, "nll": math.nan}
        probs = out.softmax(-1)[None]
        result = metrics.classification_metrics(probs, dataset.test["y"])
        result["ood"] = metrics.ood_metrics(probs, net(dataset.ood["x"]).softmax(-1)[None])
        return result


# ----------------------------------------------------------------------------------------------
# The experiments


@dataclass
class BostonSplit:
    """Task ``split`` of the Boston protocol for ``distributed.run_tasks``: every method (and the
    plain net) trained from the same initial net on that split and scored; {method: row}."""

    cfg: Config

    def __call__(self, split: int, device, shows_progress: bool) -> dict:
        cfg, hidden = self.cfg, (self.cfg.boston_hidden,)
        data = load_supervised("boston", split=split)
        rows = {}
        for method in ("plain", *METHODS):
            model, net = make_pair(data, hidden, cfg, cfg.seed)
            if method == "plain":
                timing = train_plain(net, data.train, data.task, cfg.boston_epochs, cfg.boston_batch_size,
                                     cfg.boston_lr, cfg.seed)
                scores, memory = plain_scores(net, data), memory_bytes(net)
            else:
                guide, timing = run_method(model, method, data.train, cfg, cfg.boston_epochs,
                                           cfg.boston_batch_size, cfg.boston_lr, cfg.seed)
                scores = score(model, guide, data, num_samples=predictive_samples(method, guide, cfg))
                memory = memory_bytes(guide)
            rows[method] = {"split": split, "rmse": scores["rmse"], "nll": scores["nll"],
                            "memory_bytes": memory, **timing}
        if shows_progress:
            print(f"Boston split {split + 1} of {cfg.splits} done", flush=True)
        return rows


def boston(cfg: Config) -> dict:
    """The splits ``cfg.devices`` at a time, one process each (forked: the CPU benchmark)."""
    hidden = (cfg.boston_hidden,)
    per_split = run_tasks(BostonSplit(cfg), cfg.splits, devices=cfg.devices, strategy="ddp_fork")
    rows = {method: [split_rows[method] for split_rows in per_split] for method in ("plain", *METHODS)}
    summary = {}
    for method, runs in rows.items():
        summary[method] = {
            "rmse": mean_se([r["rmse"] for r in runs]),
            "nll": mean_se([r["nll"] for r in runs]),
            "memory_bytes": runs[0]["memory_bytes"],
            "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
            "timing_split_0": {k: v for k, v in runs[0].items() if k not in ("rmse", "nll", "split")},
        }
    data = load_supervised("boston", split=0)
    hand = train_handwritten_meanfield(make_pair(data, hidden, cfg, cfg.seed)[1], data.train, data.task,
                                       cfg.boston_epochs, cfg.boston_batch_size, cfg.boston_lr, cfg.seed,
                                       cfg.prior_scale)
    speed = with_ratios({"plain": summary["plain"]["timing_split_0"], BY_HAND: hand,
                         **{m: s["timing_split_0"] for m, s in summary.items() if m != "plain"}})
    return {"summary": summary, "runs": rows, "speed": speed, "targets": targets(speed),
            "by_hand": by_hand_ratios(speed),
            "net": f"13-{cfg.boston_hidden}-1", "splits": cfg.splits}


def digits(cfg: Config) -> dict:
    data = load_supervised("digits")
    hidden = (cfg.digits_hidden, cfg.digits_hidden)
    rows = {}
    for method in tqdm(("plain", *METHODS), desc="digits"):
        model, net = make_pair(data, hidden, cfg, cfg.seed)
        if method == "plain":
            timing = train_plain(net, data.train, data.task, cfg.digits_epochs, cfg.digits_batch_size,
                                 cfg.digits_lr, cfg.seed)
            scores, memory, samples = plain_scores(net, data), memory_bytes(net), 1
        else:
            guide, timing = run_method(model, method, data.train, cfg, cfg.digits_epochs,
                                       cfg.digits_batch_size, cfg.digits_lr, cfg.seed)
            samples = predictive_samples(method, guide, cfg)
            scores, memory = score(model, guide, data, num_samples=samples), memory_bytes(guide)
        rows[method] = {"accuracy": scores["accuracy"], "nll": scores["nll"], "brier": scores["brier"],
                        "ece": scores["ece"], "ood_auroc_entropy": scores["ood"]["entropy"]["auroc"],
                        "ood": scores["ood"], "predictive_samples": samples, "memory_bytes": memory,
                        "timing": timing}
    hand = train_handwritten_meanfield(make_pair(data, hidden, cfg, cfg.seed)[1], data.train, data.task,
                                       cfg.digits_epochs, cfg.digits_batch_size, cfg.digits_lr, cfg.seed,
                                       cfg.prior_scale)
    speed = with_ratios({"plain": rows["plain"]["timing"], BY_HAND: hand,
                         **{m: r["timing"] for m, r in rows.items() if m != "plain"}})
    return {"rows": rows, "speed": speed, "targets": targets(speed), "by_hand": by_hand_ratios(speed),
            "net": f"64-{cfg.digits_hidden}-{cfg.digits_hidden}-8",
            "sizes": {s: len(data.split(s)["y"]) for s in ("train", "valid", "test")},
            "ood_size": len(data.ood["x"])}


def wide(cfg: Config) -> dict:
    """Timing only: a wider net on mnist5k, where the arithmetic outweighs the per-step overhead."""
    data = load_supervised("mnist5k")
    hidden = (cfg.wide_hidden, cfg.wide_hidden)
    timings = {}
    for method in tqdm(("plain", BY_HAND, *WIDE_METHODS), desc="wide-net timing"):
        model, net = make_pair(data, hidden, cfg, cfg.seed)
        if method == "plain":
            timings[method] = train_plain(net, data.train, data.task, cfg.wide_epochs, cfg.wide_batch_size,
                                          1e-3, cfg.seed)
        elif method == BY_HAND:
            timings[method] = train_handwritten_meanfield(net, data.train, data.task, cfg.wide_epochs,
                                                          cfg.wide_batch_size, 1e-3, cfg.seed,
                                                          cfg.prior_scale)
        else:
            timings[method] = run_method(model, method, data.train, cfg, cfg.wide_epochs,
                                         cfg.wide_batch_size, 1e-3, cfg.seed)[1]
    speed = with_ratios(timings)
    return {"speed": speed, "targets": targets(speed), "by_hand": by_hand_ratios(speed),
            "net": f"784-{cfg.wide_hidden}-{cfg.wide_hidden}-8", "train_size": len(data.train["y"])}


def nuts(cfg: Config) -> dict:
    data = load_supervised("boston", split=0)
    model, _ = make_pair(data, (cfg.nuts_hidden,), cfg, cfg.seed, noise="prior")
    started = time.perf_counter()
    guide, _ = train(model, "nuts", data.train, None, seed=cfg.seed, progress=True,
                     epochs=cfg.boston_epochs, batch_size=cfg.boston_batch_size, lr=cfg.boston_lr,
                     options={"nuts_warmup": cfg.nuts_warmup, "nuts_samples": cfg.nuts_samples,
                              "chains": cfg.nuts_chains, "nuts_init": "map", "nuts_jit": True})
    seconds = time.perf_counter() - started
    scores = score(model, guide, data, num_samples=guide.num_members)
    iterations = cfg.nuts_chains * (cfg.nuts_warmup + cfg.nuts_samples)
    return {"net": f"13-{cfg.nuts_hidden}-1", "split": 0, "rmse": scores["rmse"], "nll": scores["nll"],
            "seconds": seconds, "seconds_per_iteration": seconds / iterations, "draws": guide.num_members,
            "memory_bytes": memory_bytes(guide), "load_average": os.getloadavg()}


# ----------------------------------------------------------------------------------------------
# Report


def speed_table(report: dict) -> list[str]:
    d, b = report["digits"]["speed"], report["boston"]["speed"]
    w = report.get("wide", {}).get("speed", {})
    wide_net = report["wide"]["net"] if "wide" in report else None
    header = (f"| method | digits {report['digits']['net']}: s/epoch | x plain (wall) | x plain (CPU) | "
              f"load avg | Boston {report['boston']['net']}: x plain (wall / CPU) |")
    if wide_net:
        header += f" mnist5k {wide_net}: s/epoch | x plain (wall / CPU) |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for method in ("plain", BY_HAND, *METHODS):
        if method not in d:  # a report written before the hand-written row existed
            continue
        row = d[method]
        line = (f"| {LABELS[method]} | {row['seconds_per_epoch']:.3f} | {row['ratio']:.1f}x | "
                f"{row['cpu_ratio']:.1f}x | {row['load_average'][0]:.1f} | "
                f"{b[method]['ratio']:.1f}x / {b[method]['cpu_ratio']:.1f}x |")
        if wide_net:
            if method in w:
                line += (f" {w[method]['seconds_per_epoch']:.3f} | {w[method]['ratio']:.1f}x / "
                         f"{w[method]['cpu_ratio']:.1f}x |")
            else:
                line += " | |"
        lines.append(line)
    return lines


def target_lines(report: dict) -> list[str]:
    lines = []
    blocks = [("digits", report["digits"]), ("Boston", report["boston"])]
    if "wide" in report:
        blocks.append(("mnist5k wide", report["wide"]))
    for method, (reference, limit) in TARGETS.items():
        parts = []
        for name, block in blocks:
            t = block["targets"][method]
            parts.append(f"{name} {t['ratio']:.2f}x wall / {t['cpu_ratio']:.2f}x CPU "
                         f"({'met' if t['met'] else 'NOT met'})")
        head = f"* {LABELS[method]} within {limit:g}x of {LABELS[reference]}: "
        lines.append(head + "; ".join(parts) + ".")
    for name, block in blocks:
        if "by_hand" in block:
            r = block["by_hand"]
            lines.append(f"* {name} ({block['net']}): mean-field written by hand in PyTorch "
                         f"{r['hand_vs_plain']:.1f}x plain ({r['hand_vs_plain_cpu']:.1f}x CPU); library "
                         f"(Pyro) mean-field {r['meanfield_vs_hand']:.1f}x the hand-written one "
                         f"({r['meanfield_vs_hand_cpu']:.1f}x CPU).")
    return lines


def memory_note(report: dict) -> list[str]:
    """Where the posterior bytes come from when ``--recompute-memory`` replaced them."""
    if "memory_recomputed" not in report:
        return []
    done = report["memory_recomputed"]
    changed = "; ".join(f"{name} {before:,} -> {now:,}" for name, (before, now) in done["changed"].items())
    return [f"Posterior bytes (both tables; NUTS's excepted) recomputed on {done['date'][:10]} by "
            f"`{done['command']}`: every method retrained with this report's config (digits, Boston "
            "split 0) and weighed by `inference.metrics.memory_bytes(guide)`, the figure the CLI "
            f"writes to `metrics.json`; changed: {changed or 'none'}. The other columns are this run's.", ""]


def markdown(report: dict) -> str:
    cfg, env = report["config"], report["environment"]
    bos, dig = report["boston"], report["digits"]
    lines = [
        "# Bayesian neural networks: every method of `bayeszoo.inference.training.train`",
        "",
        f"`{report['command']}`, {report['date']} to {report['finished']}; {env['cpu']} "
        f"({env['cpu_count']} cores shared with other jobs), torch threads: {env['torch_threads']}, "
        f"torch {env['torch']}, pyro {env['pyro']}, Python {env['python']}. Load average "
        f"{env['load_average_at_start'][0]:.1f} at the start, {report['load_average_at_end'][0]:.1f} at "
        f"the end. Total {report['seconds']:.0f} s.",
        "",
        f"Prior N(0, {cfg['prior_scale']:g}^2) on every weight and bias (`prior=\"{cfg['prior']}\"`); "
        "Gaussian likelihood with a learned noise (Boston), categorical (digits). Adam for every method "
        f"but SGLD and SGHMC (their own samplers: SGLD step size {cfg['sgld_lr']:g}, SGHMC eta "
        f"{cfg['sghmc_lr']:g} with friction 0.05; samples thinned once per epoch after a 1-epoch "
        "burn-in); ensemble of "
        f"{cfg['members']} members trained in one vectorized "
        f"step; MC dropout p = {cfg['dropout']}; Laplace `{cfg['laplace_structure']}` with the prior "
        "precision chosen by the evidence; TRADI with the tracker's defaults (1-epoch burn-in). "
        f"Predictions average {cfg['num_samples']} weight samples (MAP 1; ensemble, SGLD, SGHMC, NUTS: "
        "each member or draw once).",
        "",
        "## Speed: seconds per training epoch against a plain PyTorch MLP",
        "",
        "Same layers and initial weights, Adam, learning rate, batch size, minibatch order and data; "
        "one run each; median over the epochs after the first (wall: `fit`'s per-epoch `seconds`; CPU: "
        "this process's CPU time per epoch). The load average is the 1-minute figure when the method "
        "finished."
        + (" \"Mean-field by hand\" is Bayes by Backprop written out in plain PyTorch "
           "(`train_handwritten_meanfield`: a normal draw, a softplus and w = mu + sigma * eps per weight, "
           "the closed-form KL, Adam on mu and rho; Boston: unit noise variance): a timing reference, "
           "not a method of the library." if BY_HAND in dig["speed"] else ""),
        "",
        *speed_table(report),
        "",
        "Targets, as measured:",
        "",
        *target_lines(report),
        "",
        "These are one run each, so single ratios move by tens of percent between runs. The speed "
        "targets for mean-field (against the hand-written step) and MAP (against the plain MLP) are "
        "timed by `benchmarks/overhead.py`, interleaved over rounds in one process "
        "(`results/overhead.md`).",
        "",
        f"Digits: batch {cfg['digits_batch_size']}, {dig['sizes']['train']} training images "
        f"({math.ceil(dig['sizes']['train'] / cfg['digits_batch_size'])} steps per epoch), "
        f"{cfg['digits_epochs']} epochs. Boston: batch {cfg['boston_batch_size']}, 410 training rows "
        f"(13 steps per epoch), split 0, {cfg['boston_epochs']} epochs"
        + (f", trained beside other splits ({cfg['devices']} at a time, one process each, sharing the "
           "cores)." if cfg.get("devices", 1) > 1 else ".")
        + (f" mnist5k: batch {cfg['wide_batch_size']}, {report['wide']['train_size']} training images, "
           f"{cfg['wide_epochs']} epochs (timing only, lr 1e-3)." if "wide" in report else ""),
        "",
        f"## Boston housing ({bos['splits']} of the 20 splits, {bos['net']} ReLU net)",
        "",
        "| method | test RMSE | test NLL | posterior bytes | train s (mean) |",
        "|---|---|---|---|---|",
    ]
    for method in ("plain", *METHODS):
        s = bos["summary"][method]
        lines.append(f"| {LABELS[method]} | {fmt_mean_se(s['rmse'])} | {fmt_mean_se(s['nll'])} | "
                     f"{fmt_bytes(s['memory_bytes'])} | {s['train_seconds']:.1f} |")
    lines += [
        "",
        f"Mean ± standard error over {bos['splits']} splits (`load_supervised(\"boston\", split=i)`, "
        f"i = 0..{bos['splits'] - 1}: 410 train rows (the 45 validation rows unused), 51 test), RMSE in "
        f"$1000s, NLL in nats per test point in the original units; {cfg['boston_epochs']} epochs, "
        f"batch {cfg['boston_batch_size']}, lr {cfg['boston_lr']:g}, no early stopping. The plain "
        "network has no noise model, hence no NLL.",
        "",
        f"## Digits ({dig['net']} ReLU net; classes 8 and 9 held out as OOD)",
        "",
        "| method | accuracy | NLL | ECE | OOD AUROC (entropy) | posterior bytes | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in ("plain", *METHODS):
        r = dig["rows"][method]
        lines.append(f"| {LABELS[method]} | {r['accuracy']:.4f} | {r['nll']:.3f} | {r['ece']:.4f} | "
                     f"{r['ood_auroc_entropy']:.3f} | {fmt_bytes(r['memory_bytes'])} | "
                     f"{r['timing']['train_seconds']:.1f} |")
    lines += [
        "",
        f"scikit-learn's 8x8 digits, {dig['sizes']['train']} train / {dig['sizes']['test']} test images "
        f"of classes 0-7, {dig['ood_size']} test images of 8 and 9 as OOD inputs; one seed "
        f"({cfg['seed']}), {cfg['digits_epochs']} epochs, batch {cfg['digits_batch_size']}, lr "
        f"{cfg['digits_lr']:g}. ECE with 15 equal-width bins; AUROC of the predictive entropy separating "
        "OOD from in-distribution test images.",
        "",
        *memory_note(report),
        "## NUTS",
        "",
    ]
    if "nuts" in report:
        n = report["nuts"]
        lines.append(f"NUTS on the {n['net']} net, Boston split {n['split']} (noise ~ HalfNormal(1)), "
                     f"{cfg['nuts_chains']} chain(s) x ({cfg['nuts_warmup']} warm-up + {cfg['nuts_samples']} "
                     f"draws), started at the MAP point ({cfg['boston_epochs']} epochs of Adam, included "
                     "in the time), potential compiled with TorchScript: "
                     f"test RMSE {n['rmse']:.2f}, NLL {n['nll']:.2f}, {n['seconds']:.0f} s "
                     f"({n['seconds_per_iteration']:.1f} s per iteration, load average "
                     f"{n['load_average'][0]:.1f}), {fmt_bytes(n['memory_bytes'])} posterior bytes "
                     f"({n['draws']} draws).")
    else:
        lines.append(NUTS_SKIPPED)
    return "\n".join(lines) + "\n"


def posterior_memory(data, hidden: tuple[int, ...], cfg: Config, epochs: int, batch_size: int,
                     lr: float) -> dict[str, int]:
    """``memory_bytes`` of every method's posterior (the plain network: its weights), each method
    trained as in the report's run (the SG-MCMC posteriors keep one draw per epoch after burn-in)."""
    out = {}
    for method in ("plain", *METHODS):
        model, net = make_pair(data, hidden, cfg, cfg.seed)
        if method == "plain":
            out[method] = memory_bytes(net)
        else:
            guide, _ = run_method(model, method, data.train, cfg, epochs, batch_size, lr, cfg.seed)
            out[method] = memory_bytes(guide)
    return out


def recompute_memory(path: Path) -> dict:
    """Retrain every method (not NUTS) with the config saved in ``path`` (digits, and Boston split
    0, whose figure the Boston table shows), store the library's ``memory_bytes`` of each posterior
    in the report and write it and its markdown again. Nothing else in the report changes."""
    report = read_json(path)
    cfg = Config(**report["config"])
    set_threads(1)
    digits_memory = posterior_memory(load_supervised("digits"), (cfg.digits_hidden, cfg.digits_hidden), cfg,
                                     cfg.digits_epochs, cfg.digits_batch_size, cfg.digits_lr)
    boston_memory = posterior_memory(load_supervised("boston", split=0), (cfg.boston_hidden,), cfg,
                                     cfg.boston_epochs, cfg.boston_batch_size, cfg.boston_lr)
    changed = {}
    for method in digits_memory:
        for name, row, figure in (("digits", report["digits"]["rows"][method], digits_memory[method]),
                                  ("boston", report["boston"]["summary"][method], boston_memory[method])):
            if row["memory_bytes"] != figure:
                changed[f"{name} {method}"] = [row["memory_bytes"], figure]
            row["memory_bytes"] = figure
        for run in report["boston"]["runs"][method]:
            run["memory_bytes"] = boston_memory[method]
    report["memory_recomputed"] = {"command": command_line(), "date": now(), "changed": changed}
    write(report, path.with_suffix(""), markdown)
    print("changed (before, now):", changed)
    return report


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", type=int, help="Boston splits, 1..20 (default 20)")
    parser.add_argument("--boston-epochs", type=int, help="default 40")
    parser.add_argument("--digits-epochs", type=int, help="default 30")
    parser.add_argument("--wide-hidden", type=int, help="mnist5k timing net width, 0 skips (default 400)")
    parser.add_argument("--num-samples", type=int, help="predictive weight samples (default 100)")
    parser.add_argument("--nuts-warmup", type=int, help="NUTS warm-up iterations per chain (default 100)")
    parser.add_argument("--nuts-samples", type=int, help="NUTS draws per chain (default 100; 0 skips NUTS)")
    parser.add_argument("--nuts-chains", type=int, help="default 1")
    parser.add_argument("--devices", type=int, help="Boston splits this many at a time, one process each "
                        "(their epoch times then share the cores; default 1)")
    add_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a small configuration to check the script")
    parser.add_argument("--out", type=Path, help="output stem (default results/bnn or results/bnn_quick)")
    parser.add_argument("--recompute-memory", type=Path, metavar="JSON",
                        help="only recompute the posterior bytes of a saved report (see recompute_memory)")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
    cfg = Config(**QUICK) if args.quick else Config()
    for name in ("splits", "boston_epochs", "digits_epochs", "wide_hidden", "num_samples", "nuts_warmup",
                 "nuts_samples", "nuts_chains", "devices"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if not 1 <= cfg.splits <= 20:
        raise SystemExit(f"--splits must be in 1..20, got {cfg.splits}")
    if cfg.nuts_samples and cfg.nuts_warmup < 1:
        cfg.nuts_warmup = cfg.nuts_samples
    cfg.seed = args.seed
    return cfg


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.recompute_memory:
        return recompute_memory(args.recompute_memory)
    set_threads(args.threads)
    cfg = config_from(args)
    started = time.perf_counter()
    report = new_report("bnn", cfg)
    report["digits"] = digits(cfg)
    report["boston"] = boston(cfg)
    if cfg.wide_hidden > 0:
        report["wide"] = wide(cfg)
    if cfg.nuts_samples > 0:
        report["nuts"] = nuts(cfg)
    else:
        report["nuts_skipped"] = NUTS_SKIPPED
    report["finished"] = now()
    report["seconds"] = time.perf_counter() - started
    report["load_average_at_end"] = os.getloadavg()
    write(report, args.out or RESULTS / ("bnn_quick" if args.quick else "bnn"), markdown)
    return report


if __name__ == "__main__":
    main()
