"""Benchmark: every row of the speed issue's table in one run, each against its reference.

    .venv/bin/python benchmarks/overhead.py --rounds 5          # the table (results/overhead.*)
    .venv/bin/python benchmarks/overhead.py --quick             # a smoke run, well under a minute
    .venv/bin/python benchmarks/overhead.py --profile           # + results/profiles.md

Each row is a pair, a bayeszoo path and the reference it must come close to, timed back to back
in this process by the timing functions of the per-topic scripts (nothing is re-implemented here):

* VAE epoch: ``inference.svi.fit`` on ``models.vae.VAE`` + ``AmortizedNormal`` against the same
  VAE written in plain PyTorch (``vae.one_round``: same nets, weights, batches, binarization).
* BNN step, for digits 64-100-100-8, Boston 13-50-1 and mnist5k 784-400-400-8
  (``bnn_step.run_variant``): mean-field (Bayes by Backprop through ``train``) against Bayes by
  Backprop written by hand in plain PyTorch, and MAP against the plain PyTorch MLP.
* Latent guides, one epoch on mnist5k, z=20 (``latent_speed.timed_epoch``): VLAE (T=4), Sylvester,
  Householder and IAF (8 steps each) against the amortized diagonal guide.
* TRADI: ``train(model, "tradi")`` against ``train(model, "map")`` (``bnn.run_method``, the
  tracked epochs after the burn-in), and a plain PyTorch loop with and without the tracker
  (``tradi.plain_epochs``).
* DKF: the vectorized ``DeepMarkovModel`` + ``StructuredInferenceNetwork`` against a
  per-time-step ``pyro.markov`` loop of the same networks (``dkf.time_pairs_once``), each structure.

A round measures every pair once, the groups one after the other, so a slow spell of a shared
machine hits all rows alike; within a pair the two run back to back. Per round and pair: the
median epoch (or step) of each side, after a warm-up epoch, in wall seconds and in this process's
CPU seconds (``time.process_time``), and their ratio. Reported: the median over rounds of each
side's time and of the ratio. A row is met when both its wall and CPU ratios are at or under the
target. Torch runs on one thread (``--threads``) unless told otherwise.

"What a GPU changes": with ``--device cuda`` the VAE and latent-guide pairs run once more per
round on the GPU; without a GPU that group says so and measures nothing.

Writes ``results/overhead.json`` and ``results/overhead.md`` (``overhead_quick.*`` with
``--quick``); ``--profile`` also writes ``results/profiles.md``: torch.profiler's top operators
(self CPU time) of a digits mean-field epoch, a VAE epoch, a VLAE epoch and a Sylvester epoch.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import bnn
import bnn_step
import dkf
import latent_speed
import pyro
import torch
import tradi
import vae
from common import RESULTS, median_or_nan, new_report, now, profile_table, write

from bayeszoo.inference.data import load_dataset
from bayeszoo.inference.report import describe_hardware, library_versions
from bayeszoo.inference.supervised import load_supervised
from bayeszoo.models.nn import mlp

pyro.settings.set(module_local_params=True)  # PyroModules keep their parameters, as torch optimizers expect

BNN_NETS = ("digits", "boston", "mnist5k")
LATENT_GUIDES = ("vlae", "sylvester", "householder", "iaf")


@dataclass
class Config:
    rounds: int = 5
    vae_train_size: int | None = None     # None: all 4,000 mnist5k images
    vae_timing_epochs: int = 2            # per run, after a warm-up epoch
    bnn_epochs: int = 3                   # per run, the first a warm-up
    bnn_nets: tuple[str, ...] = BNN_NETS
    latent_train_size: int | None = None  # None: all 4,000 mnist5k images
    tradi_dataset: str = "mnist5k"
    tradi_epochs: int = 3                 # train(): burn-in epoch + tracked epochs
    tradi_plain_epochs: int = 3           # plain loop: warm-up + timed
    dkf_structures: tuple[str, ...] = tuple(dkf.NAMES)
    dkf_train_size: int = 400
    dkf_timing_epochs: int = 1            # per run, after a warm-up epoch
    gpu_rounds: int = 3
    seed: int = 0


QUICK = {"rounds": 1, "vae_train_size": 300, "vae_timing_epochs": 1, "bnn_epochs": 2,
         "bnn_nets": ("digits", "boston"), "latent_train_size": 200, "tradi_dataset": "digits",
         "tradi_epochs": 2, "tradi_plain_epochs": 2, "dkf_structures": ("st-lr",), "dkf_train_size": 100,
         "gpu_rounds": 1}


@dataclass
class Row:
    """One line of the table: ``candidate`` / ``reference`` of group ``group``, at most ``target``."""

    key: str
    what: str
    group: str
    candidate: str
    reference: str
    target: float
    unit: str = "epoch"       # what one timed span is: an epoch or a step
    issue_before: str = ""    # the issue's "now" column, for comparison
    extra: dict = field(default_factory=dict)


def rows_for(cfg: Config) -> list[Row]:
    nets = {name: "-".join(map(str, _net_sizes(name))) for name in cfg.bnn_nets}
    before = {"digits": "3.7x", "boston": "2.0x", "mnist5k": "1.3x"}
    mf_target = {"digits": 1.5, "boston": 1.5, "mnist5k": 1.2}
    rows = [Row("vae", "VAE epoch, Pyro `fit` / plain PyTorch, same nets (z=50)", "vae", "pyro", "torch",
                1.15, issue_before="1.31x")]
    rows += [Row(f"meanfield_{n}", f"BNN mean-field step / Bayes by Backprop by hand, {n} {nets[n]}",
                 f"bnn_{n}", "meanfield", "by_hand", mf_target[n], "step", before[n]) for n in cfg.bnn_nets]
    rows += [Row(f"map_{n}", f"BNN MAP step / plain PyTorch MLP, {n} {nets[n]}", f"bnn_{n}", "map", "plain",
                 1.5, "step", "2.5x (wide net)" if n == "mnist5k" else "") for n in cfg.bnn_nets]
    latent = {"vlae": ("VLAE (T=4)", 6.0, "26x"), "sylvester": ("Sylvester flow (8 steps)", 2.5, "11.6x"),
              "householder": ("Householder flow (8 steps)", 1.5, "1.8x"),
              "iaf": ("IAF (8 steps)", 1.5, "1.9x")}
    rows += [Row(kind, f"{label} epoch / amortized diagonal epoch, z=20", "latent", kind, "amortized",
                 target, issue_before=b) for kind, (label, target, b) in latent.items()]
    rows += [Row("tradi", f"TRADI epoch / MAP epoch in `train` ({cfg.tradi_dataset})", "tradi", "tradi",
                 "map", tradi.TARGET_TIME, issue_before="1.03x"),
             Row("tradi_plain", "plain PyTorch loop + `WeightTracker` / without", "tradi", "tracked", "plain",
                 tradi.TARGET_TIME, issue_before="1.29x")]
    rows += [Row(f"dkf_{s}", f"DKF epoch ({s}), vectorized / per-time-step loop", "dkf", f"vectorized_{s}",
                 f"loop_{s}", dkf.TARGET_RATIO, issue_before="0.57-0.72x") for s in cfg.dkf_structures]
    return rows


def _net_sizes(name: str) -> list[int]:
    _, _, hidden, _, _ = bnn_step.NETS[name]
    inputs, outputs = {"digits": (64, 8), "boston": (13, 1), "mnist5k": (784, 8)}[name]
    return [inputs, *hidden, outputs]


# ----------------------------------------------------------------------------------------------
# The groups: one call measures every variant of the group once, {variant: (wall s, CPU s)}


def median_pair(wall: list[float], cpu: list[float]) -> tuple[float, float]:
    return median_or_nan(wall), median_or_nan(cpu)


class Groups:
    """The data each group trains on, loaded once; ``measure(group)`` times its variants once."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.vae_cfg = vae.Config(train_size=cfg.vae_train_size, timing_epochs=cfg.vae_timing_epochs,
                                  seed=cfg.seed)
        self.vae_data, self.vae_train, _, self.vae_description = vae.load_data(self.vae_cfg)
        self.bnn_data = {n: load_supervised(bnn_step.NETS[n][0], **bnn_step.NETS[n][1]) for n in cfg.bnn_nets}
        self.latent_data = load_dataset("mnist5k", binarize="dynamic")
        self.tradi_cfg = tradi.Config(dataset=cfg.tradi_dataset, overhead_epochs=cfg.tradi_plain_epochs)
        self.tradi_data = load_supervised(cfg.tradi_dataset)
        self.dkf_cfg = dkf.Config(timing_train_size=cfg.dkf_train_size, timing_epochs=cfg.dkf_timing_epochs,
                                  seed=cfg.seed)
        self.dkf_train = dkf.timing_data(self.dkf_cfg)

    def names(self) -> list[str]:
        return ["vae", *(f"bnn_{n}" for n in self.cfg.bnn_nets), "latent", "tradi", "dkf"]

    def measure(self, group: str, device: str = "cpu") -> dict[str, tuple[float, float]]:
        if group.startswith("bnn_"):
            return self.bnn(group.removeprefix("bnn_"))
        return getattr(self, group)(device) if group in ("vae", "latent") else getattr(self, group)()

    def vae(self, device: str = "cpu") -> dict:
        epochs = self.vae_cfg.timing_epochs + 1
        runs = vae.one_round(self.vae_train, self.vae_data, self.vae_cfg, epochs, device)
        return {name: median_pair(wall, cpu) for name, (_, wall, cpu) in runs.items()}

    def bnn(self, net: str) -> dict:
        _, _, hidden, batch_size, lr = bnn_step.NETS[net]
        return {variant: bnn_step.run_variant(variant, self.bnn_data[net], hidden, self.cfg.bnn_epochs,
                                              batch_size, lr, self.cfg.seed)
                for variant in ("meanfield", "by_hand", "map", "plain")}

    def latent(self, device: str = "cpu") -> dict:
        return {kind: latent_speed.timed_epoch(kind, self.latent_data, self.cfg.latent_train_size, device)
                for kind in ("amortized", *LATENT_GUIDES)}

    def tradi(self) -> dict:
        out = {}
        options = bnn.Config()  # the options run_method passes to train (members, dropout, ...)
        for method in ("map", "tradi"):
            model = tradi.make_model(self.tradi_data, self.tradi_cfg, self.cfg.seed)
            _, timing = bnn.run_method(model, method, self.tradi_data.train, options, self.cfg.tradi_epochs,
                                       self.tradi_cfg.batch_size, self.tradi_cfg.lr, self.cfg.seed)
            out[method] = timing["seconds_per_epoch"], timing["cpu_seconds_per_epoch"]  # after the burn-in
        for name in ("plain", "tracked"):
            torch.manual_seed(self.cfg.seed)
            net = mlp(tradi.sizes(self.tradi_data, self.tradi_cfg))
            run = tradi.plain_epochs(net, self.tradi_data.train, self.tradi_cfg, self.cfg.seed,
                                     tracked=name == "tracked")
            out[name] = median_pair(run["wall"][1:], run["cpu"][1:])
        return out

    def dkf(self) -> dict:
        out = {}
        for structure in self.cfg.dkf_structures:
            for name, (_, wall, cpu) in dkf.time_pairs_once(self.dkf_cfg, structure, self.dkf_train).items():
                out[f"{name}_{structure}"] = median_pair(wall[1:], cpu[1:])
        return out


# ----------------------------------------------------------------------------------------------
# Rounds and the summary


def run_rounds(groups: Groups, names: list[str], rounds: int, device: str = "cpu") -> dict:
    """{group: {variant: {"wall": [per round], "cpu": [...]}}} and the load average after each round."""
    times = {name: {} for name in names}
    loads = []
    for r in range(rounds):
        started = time.perf_counter()
        for name in names:
            for variant, (wall, cpu) in groups.measure(name, device).items():
                slot = times[name].setdefault(variant, {"wall": [], "cpu": []})
                slot["wall"].append(wall)
                slot["cpu"].append(cpu)
        loads.append(os.getloadavg())
        print(f"round {r + 1}/{rounds} ({device}): {time.perf_counter() - started:.0f} s, "
              f"load average {loads[-1][0]:.1f}", flush=True)
    return {"times": times, "load_average_after_round": loads}


def summarize(row: Row, times: dict) -> dict:
    """Median times of both sides, the median per-round ratios, and the verdict."""
    cand, ref = times[row.group][row.candidate], times[row.group][row.reference]
    ratios = {clock: [c / r for c, r in zip(cand[clock], ref[clock], strict=True)]
              for clock in ("wall", "cpu")}
    ratio = {clock: statistics.median(values) for clock, values in ratios.items()}
    return {
        "what": row.what, "group": row.group, "candidate": row.candidate, "reference": row.reference,
        "unit": row.unit, "target": row.target, "issue_before": row.issue_before,
        "candidate_seconds": {clock: statistics.median(cand[clock]) for clock in ("wall", "cpu")},
        "reference_seconds": {clock: statistics.median(ref[clock]) for clock in ("wall", "cpu")},
        "ratio": ratio, "ratio_rounds": ratios,
        "met": all(value <= row.target for value in ratio.values()),
        "met_cpu": ratio["cpu"] <= row.target, "met_wall": ratio["wall"] <= row.target,
    }


GPU_ROWS = [("vae", "pyro", "torch", "VAE epoch, Pyro `fit` / plain PyTorch (z=50)"),
            *(("latent", kind, "amortized", f"{kind} epoch / amortized diagonal epoch (z=20)")
              for kind in LATENT_GUIDES)]


def gpu_summary(cpu_times: dict, gpu_times: dict) -> list[dict]:
    """Per GPU row: the ratio on the GPU and how many times faster each side runs than on the CPU."""
    out = []
    for group, cand, ref, what in GPU_ROWS:
        row = Row(group, what, group, cand, ref, math.inf)
        gpu, cpu = summarize(row, gpu_times), summarize(row, cpu_times)
        out.append({"what": what, "gpu_ratio": gpu["ratio"]["wall"],
                    "gpu_candidate_seconds": gpu["candidate_seconds"]["wall"],
                    "gpu_reference_seconds": gpu["reference_seconds"]["wall"],
                    "cpu_ratio": cpu["ratio"]["wall"],
                    "candidate_speedup": cpu["candidate_seconds"]["wall"] / gpu["candidate_seconds"]["wall"],
                    "reference_speedup": cpu["reference_seconds"]["wall"] / gpu["reference_seconds"]["wall"]})
    return out


# ----------------------------------------------------------------------------------------------
# Profiles


def profiles(groups: Groups, rows: int = 10) -> dict[str, str]:
    """torch.profiler's top operators of one epoch of each of four training paths."""
    digits = groups.bnn_data.get("digits") or load_supervised("digits")
    _, _, hidden, batch_size, lr = bnn_step.NETS["digits"]
    vae_model, vae_guide = vae.make_pair(vae.AmortizedNormal, groups.vae_data.x_dim, groups.vae_cfg)
    size = groups.cfg.latent_train_size
    runs = {
        f"digits mean-field ({'-'.join(map(str, _net_sizes('digits')))}), two epochs of `train(model, "
        f"\"meanfield\")`, {math.ceil(len(digits.train['x']) / batch_size)} steps each":
            lambda: bnn_step.run_variant("meanfield", digits, hidden, 2, batch_size, lr, 0),
        f"VAE (z=50), one epoch of `fit`, {math.ceil(len(groups.vae_train['x']) / 100)} steps":
            lambda: vae.train_pyro(vae_model, vae_guide, groups.vae_train, groups.vae_data.batch_transform,
                                   groups.vae_cfg, 1, "cpu"),
        "VLAE (T=4, z=20), one epoch of `fit`":
            lambda: latent_speed.train("vlae", groups.latent_data, train_size=size),
        "Sylvester flow (8 steps, z=20), one epoch of `fit`":
            lambda: latent_speed.train("sylvester", groups.latent_data, train_size=size),
    }
    return {title: profile_table(run, rows) for title, run in runs.items()}


def profiles_markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# Where the time goes: torch.profiler, top operators by self CPU time", "",
             f"`{report['command']}`, {report['date']}; {env['hardware']}, torch {env['versions']['torch']}, "
             f"pyro {env['versions']['pyro']}. Each path ran once un-profiled (warm-up), then once under "
             "`torch.profiler.profile(activities=[CPU])`; the table is `key_averages()` sorted by self CPU "
             "time. Self time is the operator's own time, without the operators it calls; the gap between "
             "the sum of self times and the wall time of the epoch is Python (Pyro's messengers, traces, "
             "the modules' attribute access), which the profiler does not attribute to an operator.", ""]
    for title, table in report["profiles"].items():
        lines += [f"## {title}", "", "```", table.rstrip(), "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Report


def fmt_seconds(seconds: dict, unit: str) -> str:
    scale, suffix = (1e3, " ms") if unit == "step" else (1.0, " s")
    return f"{scale * seconds['wall']:.3g} / {scale * seconds['cpu']:.3g}{suffix}"


def row_verdict(row: dict) -> str:
    if row["met"]:
        return "met"
    if row["met_cpu"] or row["met_wall"]:
        return f"met on {'CPU' if row['met_cpu'] else 'wall'} time only"
    return "**not met**"


def markdown(report: dict) -> str:
    cfg, env = report["config"], report["environment"]
    loads = [load[0] for load in report["load_average_after_round"]]
    note = f", {report['machine_note']}" if report.get("machine_note") else ""
    lines = [
        "# Speed: every path against its plain-PyTorch or hand-written reference, one run",
        "",
        f"`{report['command']}`, {report['date']} to {report['finished']} ({report['seconds']:.0f} s). "
        f"{env['hardware']}; {env['cpu_count']} CPU cores{note}; "
        f"1-minute load average {env['load_average_at_start'][0]:.1f} at the start, "
        f"{min(loads):.1f}-{max(loads):.1f} after the rounds. Versions: "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + f", Python {env['python']}.",
        "",
        f"{cfg['rounds']} interleaved rounds; in each, every pair ran once, its two sides back to back. "
        "Per side and round: the median epoch (or step) after a warm-up epoch; below, the median over "
        "rounds, wall / CPU (process) time, and the median over rounds of the per-round ratio, wall "
        "(CPU). Met: both ratios at or under the target.",
        "",
        "| what | now: ratio wall (CPU) | bayeszoo, wall / CPU | reference, wall / CPU | target | "
        "issue's before | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"].values():
        lines.append(
            f"| {row['what']} | {row['ratio']['wall']:.2f}x ({row['ratio']['cpu']:.2f}x) | "
            f"{fmt_seconds(row['candidate_seconds'], row['unit'])} | "
            f"{fmt_seconds(row['reference_seconds'], row['unit'])} | <= {row['target']:g}x | "
            f"{row['issue_before'] or '-'} | {row_verdict(row)} |")
    lines += ["", *data_lines(report), "", "## What a GPU changes", ""]
    gpu = report["gpu"]
    if gpu is None:
        lines.append(f"Not measured: no GPU (`--device {report['device']}`; torch.cuda.is_available() was "
                     f"{report['cuda_available']}). Run `benchmarks/overhead.py --device cuda` on a machine "
                     "with one to fill this table.")
    else:
        lines += [f"On {gpu['hardware']}, {cfg['gpu_rounds']} interleaved rounds, wall time (the CPU rows "
                  "above are the 1-thread reference).", "",
                  "| what | ratio on the GPU | CPU ratio | bayeszoo s on the GPU | reference s on the GPU | "
                  "bayeszoo: GPU speed-up | reference: GPU speed-up |", "|---|---|---|---|---|---|---|"]
        for row in gpu["rows"]:
            lines.append(f"| {row['what']} | {row['gpu_ratio']:.2f}x | {row['cpu_ratio']:.2f}x | "
                         f"{row['gpu_candidate_seconds']:.3f} | {row['gpu_reference_seconds']:.3f} | "
                         f"{row['candidate_speedup']:.1f}x | {row['reference_speedup']:.1f}x |")
    return "\n".join(lines) + "\n"


def data_lines(report: dict) -> list[str]:
    cfg = report["config"]
    size = lambda n: "all" if n is None else f"the first {n}"  # noqa: E731
    return [
        f"Data and settings: VAE on mnist5k ({size(cfg['vae_train_size'])} of 4,000 training images, "
        f"dynamically binarized), 784-400-50-400-784, batch 100, Adam, {cfg['vae_timing_epochs']} timed "
        f"epochs per side and round. BNN steps ({', '.join(cfg['bnn_nets'])}): the nets and batches of "
        f"`benchmarks/bnn.py`, {cfg['bnn_epochs']} epochs per side and round, the first a warm-up, each "
        "full step timed. Latent guides: mnist5k "
        f"({size(cfg['latent_train_size'])} training images), 784-400-20-400-784 Bernoulli VAE, batch 100, "
        "one epoch per side and round, building the pair included. TRADI: "
        f"{cfg['tradi_dataset']}, 784-200-200-8 (digits: 64-200-200-8), batch 100, {cfg['tradi_epochs']} "
        f"epochs of `train` (the tracked ones after the burn-in timed), {cfg['tradi_plain_epochs']} epochs "
        f"of the plain loop. DKF: pendulum, {cfg['dkf_train_size']} sequences of T=40, batch 100, "
        f"{cfg['dkf_timing_epochs']} timed epoch(s) per side and round.",
    ]


def environment(device: str) -> dict:
    return {"hardware": describe_hardware("cpu"), "device": device, "versions": library_versions(),
            "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg()}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke setting, well under a minute")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device,
                        help=f"cuda fills the GPU group (default here: {default_device}); the table is on "
                        "the CPU")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--profile", action="store_true", help="also write results/profiles.md")
    parser.add_argument("--profile-only", action="store_true", help="only the profiles, no timing rounds")
    parser.add_argument("--machine-note", default="", help="what the md says about the machine (e.g. shared)")
    parser.add_argument("--out", type=Path, help="output stem (default results/overhead[_quick])")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
    cfg = Config(**QUICK) if args.quick else Config()
    if args.rounds is not None:
        cfg.rounds = args.rounds
    return cfg


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    cfg = config_from(args)
    started = time.perf_counter()
    report = new_report("overhead", cfg, environment(args.device))
    report.update(device=args.device, cuda_available=torch.cuda.is_available(),
                  machine_note=args.machine_note)
    groups = Groups(cfg)
    stem = args.out or RESULTS / ("overhead_quick" if args.quick else "overhead")
    if not args.profile_only:
        measured = run_rounds(groups, groups.names(), cfg.rounds)
        report["times"] = measured["times"]
        report["load_average_after_round"] = measured["load_average_after_round"]
        report["rows"] = {row.key: summarize(row, report["times"]) for row in rows_for(cfg)}
        report["gpu"] = None
        if args.device.startswith("cuda"):
            gpu = run_rounds(groups, ["vae", "latent"], cfg.gpu_rounds, args.device)
            report["gpu"] = {"hardware": describe_hardware(args.device), "times": gpu["times"],
                             "rows": gpu_summary(report["times"], gpu["times"])}
        report["finished"], report["seconds"] = now(), time.perf_counter() - started
        write(report, stem, markdown)
    if args.profile or args.profile_only:
        report["profiles"] = profiles(groups)
        path = stem.with_name("profiles_quick.md" if args.quick else "profiles.md")
        path.write_text(profiles_markdown(report))
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
