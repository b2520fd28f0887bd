"""Benchmark: TRADI (a Kalman filter per weight along the training trajectory) against its rivals.

Run ``.venv/bin/python benchmarks/tradi.py --threads 1`` (``--quick``: digits, 2 seeds, in about
a minute). Franchi et al. (ECCV 2020) claim TRADI is competitive with deep ensembles at a fraction
of the memory; this measures, on ``mnist5k`` (classes 8 and 9 held out as out-of-distribution
inputs; ``--dataset digits`` for the small set):

1. **Time overhead of tracking.** (a) Inside bayeszoo: ``train(model, "tradi")`` is the MAP
   training (Adam) with a ``WeightTracker`` hooked on the optimizer, so its epochs are compared
   with ``train(model, "map")`` from the same seed: median seconds per epoch over the tracked
   epochs (after the tracker's 1-epoch burn-in), pooled over the seeds. The two runs take the
   same steps (the tracker only reads the weights), which their identical training ELBOs confirm.
   (b) The tracker's own cost where it is most visible: a plain PyTorch loop (``nn.Sequential``,
   cross-entropy, Adam) with and without ``WeightTracker.attach(optimizer)`` tracking every step,
   alternating over ``--rounds``, the first epoch of every run excluded. Target: at most 1.3x.
2. **Memory.** The TRADI posterior (mu and sigma^2 per weight), the tracker's state during
   training (``WeightTracker.memory_bytes()``), and both against a 5-member deep ensemble's
   posterior; also the whole training-time state (weights, Adam moments, tracker vs the
   members and their Adam moments). Target: at most half of the ensemble.
3. **OOD and calibration**, averaged over ``--seeds`` seeds (mean ± standard error): TRADI, MAP,
   MC dropout, mean-field (Bayes by Backprop) and a 5-member ensemble; accuracy, NLL, ECE (15
   bins), OOD AUROC from the predictive entropy, posterior bytes, training seconds.
4. **How wide sigma must be** (seed 0): the fading horizon of sigma^2 (one epoch, the default;
   five epochs; the seed's recursion literally, gamma = 1, over the whole tracked run) and sigma
   multiplied by 1, 3, 10, 30 afterwards; validation and test NLL and OOD AUROC. Trackers only
   read the weights, so the three horizons watch one training run.

Writes ``results/tradi.json`` and ``results/tradi.md`` (``tradi_quick.*`` with ``--quick``).
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
    fmt_mean_se,
    mean_se,
    median_or_nan,
    new_report,
    now,
    set_threads,
    verdict,
    write,
)
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from bayeszoo.guides.map import MAPGuide
from bayeszoo.guides.tradi import TradiGuide
from bayeszoo.inference.metrics import memory_bytes
from bayeszoo.inference.predictive import score
from bayeszoo.inference.supervised import load_supervised
from bayeszoo.inference.svi import fit
from bayeszoo.inference.tradi import WeightTracker
from bayeszoo.inference.training import train
from bayeszoo.models.bnn import BayesianNeuralNetwork
from bayeszoo.models.nn import mlp

pyro.settings.set(module_local_params=True)  # PyroModules keep their parameters, as torch optimizers expect

METHODS = ("tradi", "map", "mcdropout", "meanfield", "ensemble")
LABELS = {"tradi": "TRADI", "map": "MAP", "mcdropout": "MC dropout", "meanfield": "mean-field (BBB)",
          "ensemble": "deep ensemble"}
TARGET_TIME = 1.3
TARGET_MEMORY = 0.5


@dataclass
class Config:
    dataset: str = "mnist5k"
    hidden: int = 200              # two hidden layers
    epochs: int = 20
    batch_size: int = 100
    lr: float = 1e-3
    seeds: int = 3
    members: int = 5
    dropout: float = 0.1
    num_samples: int = 50          # predictive weight samples (MAP: 1; ensemble: each member once)
    prior: str = "normal"
    prior_scale: float = 1.0
    burn_in_epochs: int = 1        # TRADI tracks from the second epoch on
    overhead_epochs: int = 4       # plain-loop overhead runs: 1 warm-up + 3 timed epochs
    rounds: int = 3                # plain, tracked, plain, tracked, ...


QUICK = {"dataset": "digits", "hidden": 100, "epochs": 5, "seeds": 2, "num_samples": 20,
         "overhead_epochs": 3, "rounds": 2}


# ----------------------------------------------------------------------------------------------
# The plain PyTorch loop, with and without the tracker


def plain_epochs(net: nn.Module, data: dict, cfg: Config, seed: int, tracked: bool) -> dict:
    """Adam + cross-entropy by hand; with ``tracked`` a WeightTracker filters every step."""
    pyro.set_rng_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, fused=True)
    tracker = handle = None
    if tracked:
        tracker = WeightTracker(net.named_parameters())
        handle = tracker.attach(optimizer)
    x, y = data["x"], data["y"]
    wall, cpu, losses = [], [], []
    for _ in range(cfg.overhead_epochs):
        started, started_cpu, total = time.perf_counter(), time.process_time(), 0.0
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), cfg.batch_size):
            index = order[start:start + cfg.batch_size]
            loss = F.cross_entropy(net(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
        losses.append(total / len(x))
    out = {"wall": wall, "cpu": cpu, "train_loss": losses,
           "adam_state_bytes": memory_bytes(optimizer.state), "weight_bytes": memory_bytes(net)}
    if tracked:
        handle.remove()
        out["tracker_bytes"] = tracker.memory_bytes()
        out["tracked_steps"] = tracker.tracked_steps
    return out


def plain_overhead(dataset, cfg: Config) -> dict:
    wall = {"plain": [], "tracked": []}
    cpu = {"plain": [], "tracked": []}
    losses = {"plain": [], "tracked": []}
    last = {}
    for _ in tqdm(range(cfg.rounds), desc="plain loop +- tracker"):
        for name in ("plain", "tracked"):
            torch.manual_seed(0)
            net = mlp(sizes(dataset, cfg))
            run = plain_epochs(net, dataset.train, cfg, 0, tracked=name == "tracked")
            wall[name] += after_warmup(run["wall"])
            cpu[name] += after_warmup(run["cpu"])
            losses[name].append(run["train_loss"])
            last[name] = run
    plain_s, tracked_s = statistics.median(wall["plain"]), statistics.median(wall["tracked"])
    plain_c, tracked_c = statistics.median(cpu["plain"]), statistics.median(cpu["tracked"])
    return {
        "plain_seconds_per_epoch": plain_s, "tracked_seconds_per_epoch": tracked_s,
        "ratio": tracked_s / plain_s, "cpu_ratio": tracked_c / plain_c,
        "plain_cpu_seconds_per_epoch": plain_c, "tracked_cpu_seconds_per_epoch": tracked_c,
        "timed_epochs_each": len(wall["plain"]), "epoch_wall_seconds": wall, "epoch_cpu_seconds": cpu,
        "max_train_loss_gap": max(abs(a - b) for pair in zip(losses["plain"], losses["tracked"], strict=True)
                                  for a, b in zip(*pair, strict=True)),
        "weight_bytes": last["plain"]["weight_bytes"], "adam_state_bytes": last["plain"]["adam_state_bytes"],
        "tracker_bytes": last["tracked"]["tracker_bytes"], "load_average": os.getloadavg(),
    }


# ----------------------------------------------------------------------------------------------
# The Bayesian methods


def sizes(dataset, cfg: Config) -> list[int]:
    return [dataset.x_dim, cfg.hidden, cfg.hidden, dataset.num_classes]


def make_model(dataset, cfg: Config, seed: int) -> BayesianNeuralNetwork:
    pyro.clear_param_store()
    torch.manual_seed(seed)
    return BayesianNeuralNetwork(mlp(sizes(dataset, cfg)), dataset.x_shape, likelihood="categorical",
                                 prior=cfg.prior, prior_scale=cfg.prior_scale)


class CapturedAdam:
    """An optimizer factory for ``fit`` that keeps the Adam it makes (to weigh its state)."""

    def __init__(self):
        self.optimizer = None

    def __call__(self, params, lr):
        self.optimizer = torch.optim.Adam(params, lr=lr, fused=True)
        return self.optimizer


def run(method: str, dataset, cfg: Config, seed: int) -> dict:
    model = make_model(dataset, cfg, seed)
    steps = math.ceil(len(dataset.train["y"]) / cfg.batch_size)
    clock = EpochClock(steps)
    options = {"members": cfg.members, "dropout": cfg.dropout, "burn_in_epochs": cfg.burn_in_epochs}
    extra = {}
    if method in ("map", "ensemble"):  # their Adam state is part of the training-time memory
        extra["optimizer"] = captured = CapturedAdam()
    started = time.perf_counter()
    guide, result = train(model, method, dataset.train, None, options=options, epochs=cfg.epochs,
                          batch_size=cfg.batch_size, lr=cfg.lr, progress=False, seed=seed,
                          batch_transform=clock, **extra)
    seconds = time.perf_counter() - started
    samples = guide.num_members if method == "ensemble" else 1 if method == "map" else cfg.num_samples
    scores = score(model, guide, dataset, num_samples=samples)
    wall = [row["seconds"] for row in result.history]
    row = {
        "seed": seed, "accuracy": scores["accuracy"], "nll": scores["nll"], "brier": scores["brier"],
        "ece": scores["ece"], "ood_auroc_entropy": scores["ood"]["entropy"]["auroc"], "ood": scores["ood"],
        "predictive_samples": samples, "memory_bytes": memory_bytes(guide), "train_seconds": seconds,
        "epoch_wall_seconds": wall, "epoch_cpu_seconds": clock.cpu_seconds(cfg.epochs),
        "train_elbo": [r["train_elbo"] for r in result.history], "load_average": os.getloadavg(),
    }
    if method in ("map", "ensemble"):
        row["adam_state_bytes"] = memory_bytes(captured.optimizer.state)
        row["weight_bytes"] = memory_bytes(guide)
    if method == "tradi":
        row["tracker_bytes"] = guide.tracker.memory_bytes()
        row["tracked_steps"] = guide.tracker.tracked_steps
        scales = torch.cat([v.clamp_min(0).sqrt().flatten() for v in guide.tracker.variances().values()])
        means = torch.cat([v.abs().flatten() for v in guide.tracker.means().values()])
        row["sigma_quantiles"] = {str(q): scales.quantile(q).item() for q in (0.1, 0.5, 0.9)}
        row["abs_mu_median"] = means.median().item()
    return row


HORIZONS = {"1 epoch (default)": 1, "5 epochs": 5, "whole run (gamma = 1)": None}
SIGMA_FACTORS = (1, 3, 10, 30)


def horizon_sweep(dataset, cfg: Config, seed: int = 0) -> list[dict]:
    """One MAP training watched by one tracker per horizon; each tracker's sigma scaled afterwards."""
    model = make_model(dataset, cfg, seed)
    guide = MAPGuide(model)
    steps = math.ceil(len(dataset.train["y"]) / cfg.batch_size)
    weights = {name: p for name, p in guide.named_weights().items()
               if name in {s.name for s in guide.sites if s.is_real}}
    trackers = {name: WeightTracker(weights, burn_in_steps=cfg.burn_in_epochs * steps,
                                    variance_decay=1.0 if epochs is None else 1 - 1 / (epochs * steps))
                for name, epochs in HORIZONS.items()}

    def adam_with_trackers(params, lr):
        optimizer = torch.optim.Adam(params, lr=lr, fused=True)
        for tracker in trackers.values():
            tracker.attach(optimizer)
        return optimizer

    fit(model, guide, dataset.train, None, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
        optimizer=adam_with_trackers, progress=False, seed=seed)
    rows = []
    for horizon, tracker in tqdm(trackers.items(), desc="sigma horizons"):
        sigma = torch.cat([v.sqrt().flatten() for v in tracker.variances().values()])
        for factor in SIGMA_FACTORS:
            variances = {name: v * factor**2 for name, v in tracker.variances().items()}
            widened = TradiGuide(model, tracker.means(), variances, guide.point())
            row = {"horizon": horizon, "sigma_factor": factor, "median_sigma": factor * sigma.median().item()}
            for split in ("valid", "test"):
                scores = score(model, widened, dataset, split=split, num_samples=cfg.num_samples)
                row[split] = {"nll": scores["nll"], "accuracy": scores["accuracy"], "ece": scores["ece"],
                              "ood_auroc_entropy": scores["ood"]["entropy"]["auroc"]}
            rows.append(row)
    return rows


def tracked_epochs(values: list[float], cfg: Config) -> list[float]:
    """Epochs in which the tracker ran (after its burn-in), less a warm-up epoch if none is left."""
    return values[max(cfg.burn_in_epochs, 1):]


def pyro_overhead(rows: dict[str, list[dict]], cfg: Config) -> dict:
    out = {}
    for clock in ("wall", "cpu"):
        key = f"epoch_{clock}_seconds"
        tradi = [s for r in rows["tradi"] for s in tracked_epochs(r[key], cfg)]
        plain = [s for r in rows["map"] for s in tracked_epochs(r[key], cfg)]
        out[clock] = {"tradi_seconds_per_epoch": median_or_nan(tradi),
                      "map_seconds_per_epoch": median_or_nan(plain),
                      "ratio": median_or_nan(tradi) / median_or_nan(plain), "epochs_each": len(tradi)}
    gaps = [abs(a - b) for t, m in zip(rows["tradi"], rows["map"], strict=True)
            for a, b in zip(t["train_elbo"], m["train_elbo"], strict=True)]
    out["max_train_elbo_gap"] = max(gaps)
    return out


def memory(rows: dict[str, list[dict]], plain: dict) -> dict:
    tradi, ensemble, map_ = rows["tradi"][0], rows["ensemble"][0], rows["map"][0]
    tradi_training = map_["weight_bytes"] + map_["adam_state_bytes"] + tradi["tracker_bytes"]
    ensemble_training = ensemble["weight_bytes"] + ensemble["adam_state_bytes"]
    return {
        "weights_bytes": map_["weight_bytes"],
        "tradi_posterior_bytes": tradi["memory_bytes"],
        "tracker_bytes": tradi["tracker_bytes"],
        "plain_loop_tracker_bytes": plain["tracker_bytes"],
        "ensemble_posterior_bytes": ensemble["memory_bytes"],
        "tradi_posterior_over_ensemble": tradi["memory_bytes"] / ensemble["memory_bytes"],
        "tracker_over_ensemble": tradi["tracker_bytes"] / ensemble["memory_bytes"],
        "tradi_training_bytes": tradi_training,
        "tradi_training_over_ensemble_posterior": tradi_training / ensemble["memory_bytes"],
        "ensemble_training_bytes": ensemble_training,
        "training_ratio": tradi_training / ensemble_training,
        "adam_state_bytes_map": map_["adam_state_bytes"],
        "adam_state_bytes_ensemble": ensemble["adam_state_bytes"],
    }


def summarize(rows: dict[str, list[dict]]) -> dict:
    keys = ("accuracy", "nll", "brier", "ece", "ood_auroc_entropy", "train_seconds")
    return {m: {**{k: mean_se([r[k] for r in runs]) for k in keys}, "memory_bytes": runs[0]["memory_bytes"]}
            for m, runs in rows.items()}


# ----------------------------------------------------------------------------------------------
# Report


def markdown(report: dict) -> str:
    cfg, env = report["config"], report["environment"]
    ov, po = report["plain_overhead"], report["pyro_overhead"]
    mem, summary = report["memory"], report["summary"]
    net = "-".join(str(s) for s in report["net"])
    lines = [
        "# TRADI against MAP, MC dropout, mean-field and a deep ensemble",
        "",
        f"`{report['command']}`, {report['date']} to {report['finished']}; {env['cpu']} "
        f"({env['cpu_count']} cores shared with other jobs), torch threads: {env['torch_threads']}, "
        f"torch {env['torch']}, pyro {env['pyro']}. Load average "
        f"{env['load_average_at_start'][0]:.1f} at the start, {report['load_average_at_end'][0]:.1f} at the "
        f"end. Total {report['seconds']:.0f} s.",
        "",
        f"Data: {report['data']}. Net {net} (ReLU), prior N(0, {cfg['prior_scale']:g}^2) on every weight, "
        f"Adam lr {cfg['lr']:g}, batch {cfg['batch_size']}, {cfg['epochs']} epochs, for every method. TRADI: "
        f"`train(model, \"tradi\")`, the tracker's defaults, {cfg['burn_in_epochs']}-epoch burn-in, "
        f"sigma^2 faded over about one epoch (`variance_decay = 1 - 1/steps per epoch`). MC dropout p = "
        f"{cfg['dropout']}; ensemble of {cfg['members']} members trained in one vectorized step. "
        f"Predictions average {cfg['num_samples']} weight samples (MAP 1, ensemble each member once).",
        "",
        "## Time overhead of tracking (target <= 1.3x)",
        "",
        "| training | without tracker, s/epoch | with tracker, s/epoch | ratio (wall) | ratio (CPU) "
        "| target |",
        "|---|---|---|---|---|---|",
        f"| bayeszoo `train`: \"map\" vs \"tradi\" | {po['wall']['map_seconds_per_epoch']:.3f} | "
        f"{po['wall']['tradi_seconds_per_epoch']:.3f} | {po['wall']['ratio']:.3f}x | "
        f"{po['cpu']['ratio']:.3f}x | "
        f"{verdict(po['wall']['ratio'] <= TARGET_TIME)} |",
        f"| plain PyTorch loop +- `WeightTracker.attach` | {ov['plain_seconds_per_epoch']:.3f} | "
        f"{ov['tracked_seconds_per_epoch']:.3f} | {ov['ratio']:.3f}x | {ov['cpu_ratio']:.3f}x | "
        f"{verdict(ov['ratio'] <= TARGET_TIME)} |",
        "",
        f"bayeszoo row: median over the {po['wall']['epochs_each']} tracked epochs (after the burn-in) of "
        f"the {cfg['seeds']} seeds' runs of each method below; wall time from `fit`'s per-epoch `seconds`, "
        "CPU time of this process. Same seeds, same steps: the training ELBOs of \"map\" and \"tradi\" "
        f"differ by at most {po['max_train_elbo_gap']:.2g} nats per point (0: identical). Plain row: "
        f"{cfg['rounds']} "
        f"alternating rounds of {cfg['overhead_epochs']} epochs each, the first epoch of every run excluded "
        f"({ov['timed_epochs_each']} timed epochs each), every step tracked; the tracked and untracked "
        f"losses differ by at most {ov['max_train_loss_gap']:.2g} (load average "
        f"{ov['load_average'][0]:.1f}).",
        "",
        "## Memory (target: at most half of a 5-member ensemble)",
        "",
        "| what | bytes | / ensemble posterior | target |",
        "|---|---|---|---|",
        f"| network weights (MAP posterior) | {mem['weights_bytes']:,} | "
        f"{mem['weights_bytes'] / mem['ensemble_posterior_bytes']:.2f} | |",
        f"| TRADI posterior (mu, sigma^2) | {mem['tradi_posterior_bytes']:,} | "
        f"{mem['tradi_posterior_over_ensemble']:.2f} | "
        f"{verdict(mem['tradi_posterior_over_ensemble'] <= TARGET_MEMORY)} |",
        f"| TRADI tracker state during training | {mem['tracker_bytes']:,} | "
        f"{mem['tracker_over_ensemble']:.2f} | {verdict(mem['tracker_over_ensemble'] <= TARGET_MEMORY)} |",
        f"| 5-member ensemble posterior | {mem['ensemble_posterior_bytes']:,} | 1.00 | |",
        f"| TRADI training state: weights + Adam moments + tracker | {mem['tradi_training_bytes']:,} | "
        f"{mem['tradi_training_over_ensemble_posterior']:.2f} | |",
        f"| ensemble training state: members + Adam moments | {mem['ensemble_training_bytes']:,} | "
        f"{mem['ensemble_training_bytes'] / mem['ensemble_posterior_bytes']:.2f} | |",
        f"| **training state, TRADI / ensemble** | | {mem['training_ratio']:.2f} | "
        f"{verdict(mem['training_ratio'] <= TARGET_MEMORY)} |",
        "",
        "Bytes of tensors (`inference.metrics.memory_bytes`, `WeightTracker.memory_bytes`; Adam's state "
        "weighed from the optimizer `fit` used). The tracker keeps 3 numbers per weight (mu, sigma^2 and "
        "the running mean descent; during each optimizer step a copy of the weights from before the step "
        "exists as well, like the optimizer's own temporaries); the guide keeps 2. Like for like, the "
        "posteriors compare as 2 : 5 numbers per weight and the training states as 6 : 15 (weights, two "
        "Adam moments and the tracker, against five members with their Adam moments); the tracker alone "
        "is 3 : 5 of the ensemble posterior.",
        "",
        f"## OOD detection and calibration on {cfg['dataset']} "
        f"(mean ± standard error over {cfg['seeds']} seeds)",
        "",
        "| method | accuracy | NLL | ECE | OOD AUROC (entropy) | posterior bytes | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        s = summary[method]
        lines.append(f"| {LABELS[method]} | {fmt_mean_se(s['accuracy'], 4)} | {fmt_mean_se(s['nll'], 3)} | "
                     f"{fmt_mean_se(s['ece'], 4)} | {fmt_mean_se(s['ood_auroc_entropy'], 3)} | "
                     f"{s['memory_bytes']:,} | {fmt_mean_se(s['train_seconds'], 1)} |")
    tradi = report["runs"]["tradi"][0]
    q = tradi["sigma_quantiles"]
    lines += [
        "",
        f"Seeds 0..{cfg['seeds'] - 1} (initial weights, minibatch order, sampling). ECE with 15 equal-width "
        "bins; OOD AUROC: the predictive entropy separating the held-out classes' test images from the "
        "in-distribution test images. Train s: the whole `train` call (TRADI's includes building its "
        "guide). TRADI's tracked standard deviations (seed 0): 10%/50%/90% quantiles "
        f"{q['0.1']:.2g} / {q['0.5']:.2g} / {q['0.9']:.2g}, against a median |mu| of "
        f"{tradi['abs_mu_median']:.2g}.",
    ]
    lines += ["", *sweep_markdown(report["horizon_sweep"], cfg)]
    return "\n".join(lines) + "\n"


def sweep_markdown(rows: list[dict], cfg: dict) -> list[str]:
    lines = [
        "## How wide must sigma be? (seed 0)",
        "",
        "| sigma^2 horizon | sigma x | median sigma | valid NLL | test NLL | test accuracy | test ECE "
        "| test OOD AUROC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v, t = r["valid"], r["test"]
        lines.append(f"| {r['horizon']} | {r['sigma_factor']} | {r['median_sigma']:.2g} | {v['nll']:.3f} "
                     f"| {t['nll']:.3f} | {t['accuracy']:.4f} | {t['ece']:.4f} "
                     f"| {t['ood_auroc_entropy']:.3f} |")
    best = min(rows, key=lambda r: r["valid"]["nll"])
    lines += [
        "",
        f"One training run (seed 0, {cfg['epochs']} epochs) watched by three trackers whose sigma^2 fade "
        "over one epoch, five epochs, or not at all (the seed's recursion as written, summed over the "
        f"tracked run); each tracker's sigma then multiplied by 1-{SIGMA_FACTORS[-1]} before predicting with "
        f"{cfg['num_samples']} weight samples. Lowest validation NLL: {best['horizon']}, sigma x "
        f"{best['sigma_factor']} (test NLL {best['test']['nll']:.3f}, OOD AUROC "
        f"{best['test']['ood_auroc_entropy']:.3f}).",
    ]
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("mnist5k", "digits"), help="default mnist5k")
    parser.add_argument("--hidden", type=int, help="width of the two hidden layers (default 200)")
    parser.add_argument("--epochs", type=int, help="default 20")
    parser.add_argument("--seeds", type=int, help="default 3")
    parser.add_argument("--rounds", type=int, help="alternating plain/tracked rounds (default 3)")
    parser.add_argument("--num-samples", type=int, help="predictive weight samples (default 50)")
    add_threads_argument(parser)
    parser.add_argument("--quick", action="store_true", help="a small configuration to check the script")
    parser.add_argument("--out", type=Path, help="output stem (default results/tradi or results/tradi_quick)")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
    cfg = Config(**QUICK) if args.quick else Config()
    for name in ("dataset", "hidden", "epochs", "seeds", "rounds", "num_samples"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if cfg.epochs <= cfg.burn_in_epochs + 1:
        raise SystemExit(f"--epochs must exceed the burn-in + 1 ({cfg.burn_in_epochs + 1}), got {cfg.epochs}")
    return cfg


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    cfg = config_from(args)
    started = time.perf_counter()
    report = new_report("tradi", cfg)
    dataset = load_supervised(cfg.dataset)
    report["data"] = (f"{cfg.dataset}, {len(dataset.train['y'])} train / {len(dataset.test['y'])} test "
                      f"images of classes 0-7, {len(dataset.ood['x'])} test images of 8 and 9 as OOD inputs")
    report["net"] = sizes(dataset, cfg)
    report["plain_overhead"] = plain_overhead(dataset, cfg)
    rows = {m: [] for m in METHODS}
    for seed in tqdm(range(cfg.seeds), desc="seeds"):
        for method in ("map", "tradi", "mcdropout", "meanfield", "ensemble"):
            rows[method].append(run(method, dataset, cfg, seed))
    report["runs"] = rows
    report["horizon_sweep"] = horizon_sweep(dataset, cfg)
    report["pyro_overhead"] = pyro_overhead(rows, cfg)
    report["memory"] = memory(rows, report["plain_overhead"])
    report["summary"] = summarize(rows)
    ratios = {"time_bayeszoo": (TARGET_TIME, report["pyro_overhead"]["wall"]["ratio"]),
              "time_plain_loop": (TARGET_TIME, report["plain_overhead"]["ratio"]),
              "memory_posterior": (TARGET_MEMORY, report["memory"]["tradi_posterior_over_ensemble"]),
              "memory_tracker": (TARGET_MEMORY, report["memory"]["tracker_over_ensemble"]),
              "memory_training": (TARGET_MEMORY, report["memory"]["training_ratio"])}
    report["targets"] = {name: {"limit": limit, "ratio": ratio, "met": ratio <= limit}
                         for name, (limit, ratio) in ratios.items()}
    report["finished"] = now()
    report["seconds"] = time.perf_counter() - started
    report["load_average_at_end"] = os.getloadavg()
    write(report, args.out or RESULTS / ("tradi_quick" if args.quick else "tradi"), markdown)
    return report


if __name__ == "__main__":
    main()
