"""Benchmark: data-parallel SVI, one process against two (``svi.fit(devices=N)``).

Run ``.venv/bin/python benchmarks/scaling.py`` (``--quick``: digits and small networks, well under
a minute). Two pairs, trained by ``inference.svi.fit`` on ``--data`` (mnist5k: 4,000 training
digits, binarized once, ``binarize="fixed"``, so no per-batch transform runs):

* **vae**: ``models.vae.VAE`` 784-400-50 with ``guides.amortized.AmortizedNormal`` (400 hidden);
* **bnn**: ``models.bnn.BayesianNeuralNetwork`` on an MLP 784-400-400-10 (categorical likelihood,
  about 478,000 weights) with ``guides.mean_field.MeanFieldGuide``.

Each pair and global batch size B (``--batch-sizes``, the batch the ELBO's N/B scaling uses; each
of N ranks gets B/N examples of it) trains three ways, interleaved over ``--rounds``:

1. ``loop``: ``fit(devices=1)``, the loop in this process without Fabric: today's loop;
2. ``ddp x1``: the data-parallel path on one rank: Fabric, DistributedDataParallel and the
   per-step all-reduce of the loss, in one started process. ``fit(devices=1)`` never takes this
   path, so it is reached through ``svi``'s internals (``one_rank``); its epoch time over the
   loop's is the overhead of the distributed path at one process (target <= 1.05);
3. ``ddp x2``: ``fit(devices=2)``: two ranks, gloo on the CPU.

Times come from the optimizer: a step hook stamps the wall clock and each rank's CPU clock at the
end of every epoch (all-gathered over the ranks); the stamps come back to this process as a
checkpoint extra. The first epoch is a warm-up; an epoch's time is the median of the others,
medians over the rounds. Start-up is reported apart: from the call to ``fit`` to the end of the
first step, less one steady step (processes started, Lightning imported or forked, rendezvous,
DistributedDataParallel's first broadcast). Throughput = training examples / epoch seconds, wall
and CPU (all ranks' CPU seconds added). Parallel efficiency = throughput(ddp x2) / (2 x
throughput(loop)); target >= 0.8. Two readings of it: at the same global batch B (each rank does
half the work of the loop's step but pays the per-step costs in full: the optimizer's update of
every weight, Pyro's tracing), and at the same batch per rank (two ranks on a global batch 2b
against the loop on b, the way data-parallel training is used and reported: a rank's step is
the loop's step plus the all-reduce), from the rows of batch sizes b and 2b when both ran.

Every process runs one torch thread (``OMP_NUM_THREADS=1``). On a GPU machine, ``--accelerator
gpu`` trains the loop on ``cuda`` and the ranks one GPU each (``--strategy ddp``: CUDA cannot be
forked once this process has used it); the two-rank row needs two GPUs.

Writes ``results/scaling.json`` and ``results/scaling.md`` (``scaling_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import pyro
import torch
from common import RESULTS, median_or_nan, missing, new_report, verdict, write

from bayeszoo.guides.amortized import AmortizedNormal
from bayeszoo.guides.mean_field import MeanFieldGuide
from bayeszoo.inference import svi
from bayeszoo.inference.data import load_dataset
from bayeszoo.inference.report import describe_hardware, library_versions
from bayeszoo.models.bnn import BayesianNeuralNetwork
from bayeszoo.models.nn import mlp
from bayeszoo.models.vae import VAE

pyro.settings.set(module_local_params=True)  # PyroModules keep their parameters, as torch optimizers expect

TARGET_EFFICIENCY = 0.8
TARGET_OVERHEAD = 1.05
MODES = ("loop", "ddp x1", "ddp x2")
PROCESSES = {"loop": 1, "ddp x1": 1, "ddp x2": 2}


@dataclass
class Config:
    data: str = "mnist5k"
    pairs: tuple[str, ...] = ("vae", "bnn")
    batch_sizes: tuple[int, ...] = (100, 200, 250, 500)   # global batches
    epochs: int = 4                             # one warm-up epoch, then timed ones
    rounds: int = 2                             # loop, ddp x1, ddp x2, loop, ...
    vae_hidden: int = 400
    z_dim: int = 50
    bnn_hidden: tuple[int, ...] = (400, 400)
    lr: float = 1e-3
    seed: int = 0
    strategy: str = "ddp_fork"
    accelerator: str = "cpu"
    device: str = "cpu"
    train_size: int | None = None               # None: the whole split
    quick: bool = False
    notes: list[str] = field(default_factory=list)


QUICK = {"data": "digits", "batch_sizes": (50, 100), "epochs": 3, "rounds": 1, "vae_hidden": 100,
         "z_dim": 10, "bnn_hidden": (100, 100)}


# ----------------------------------------------------------------------------------------------
# The clock: an optimizer factory whose step hook stamps every epoch's end on every rank


class EpochEndClock:
    """Makes Adam (``fit``'s ``optimizer``) with a step hook that, at the last step of every epoch,
    stamps (wall, CPU) seconds on every rank and gathers them; also a checkpoint extra, so rank 0's
    stamps come back from the ranks' processes. ``time.perf_counter`` (CLOCK_MONOTONIC) is one
    clock for all processes of a machine, so a rank's stamps compare with this process's."""

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch, self.steps = steps_per_epoch, 0
        self.ends: list[torch.Tensor] = []  # per epoch, (rank, wall | CPU)
        self.first_step = math.nan  # wall clock at the end of the first step

    def __call__(self, params, lr: float) -> torch.optim.Optimizer:
        optimizer = torch.optim.Adam(params, lr=lr, fused=True)
        optimizer.register_step_post_hook(self._after_step)
        return optimizer

    def _after_step(self, optimizer, *_) -> None:
        self.steps += 1
        if self.steps == 1:
            self.first_step = time.perf_counter()
        if self.steps % self.steps_per_epoch == 0:
            device = optimizer.param_groups[0]["params"][0].device
            stamp = torch.tensor([time.perf_counter(), time.process_time()], dtype=torch.float64,
                                 device=device)
            self.ends.append(_gathered(stamp).cpu())

    def state_dict(self) -> dict:
        return {"ends": torch.stack(self.ends), "steps": torch.tensor(self.steps),
                "first_step": torch.tensor(self.first_step, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        self.ends, self.steps = list(state["ends"]), int(state["steps"])
        self.first_step = state["first_step"].item()


def _gathered(stamp: torch.Tensor) -> torch.Tensor:
    """(rank, 2): every rank's stamp; this one's alone outside a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return stamp[None]
    stamps = [torch.empty_like(stamp) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(stamps, stamp)
    return torch.stack(stamps)


# ----------------------------------------------------------------------------------------------
# The pairs and the three ways to train them


def build(pair: str, x_dim: int, num_classes: int, cfg: Config):
    torch.manual_seed(cfg.seed)
    if pair == "vae":
        model = VAE(x_dim, z_dim=cfg.z_dim, hidden=(cfg.vae_hidden,))
        return model, AmortizedNormal(model, (cfg.vae_hidden,))
    model = BayesianNeuralNetwork(mlp((x_dim, *cfg.bnn_hidden, num_classes)), (x_dim,), "categorical")
    return model, MeanFieldGuide(model)


def one_rank(model, guide, train: dict, *, epochs: int, batch_size: int, lr: float, optimizer, seed: int,
             checkpoint_extras: dict, accelerator: str, strategy: str) -> svi.FitResult:
    """The data-parallel path of ``fit`` on one rank (``fit(devices=1)`` trains without Fabric):
    the job ``fit`` would send, given to ``svi._fit_on_ranks`` with ``devices=1``."""
    job = svi._Job(model, guide, train, None, epochs=epochs, batch_size=batch_size, lr=lr,
                   optimizer=optimizer, lr_decay=1.0, num_particles=1, elbo=pyro.infer.Trace_ELBO,
                   kl_anneal_epochs=0, kl_anneal_start=0.0, patience=None, clip_norm=None, seed=seed,
                   run_dir=None, resume=False, batch_transform=None,
                   checkpoint_extras=checkpoint_extras, progress=False)
    return svi._fit_on_ranks(job, devices=1, num_nodes=1, accelerator=accelerator, strategy=strategy)


def _time_all_reduce(fabric, size: int, repeats: int) -> dict:
    """Seconds of one all-reduce of ``size`` floats between the ranks (after a warm-up), wall and
    this rank's CPU: what every step of ``ddp x2`` adds to the loop's arithmetic."""
    tensor = torch.randn(size, device=fabric.device)
    for _ in range(5):
        torch.distributed.all_reduce(tensor)
    torch.distributed.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        torch.distributed.all_reduce(tensor)
    return {"wall": (time.perf_counter() - wall) / repeats, "cpu": (time.process_time() - cpu) / repeats}


def all_reduce_seconds(pair: str, x_dim: int, num_classes: int, cfg: Config, repeats: int = 50) -> dict:
    """One gradient all-reduce of the pair (all its parameters, as DistributedDataParallel sends
    them) on two ranks, nothing else running: the floor of the per-step communication."""
    from bayeszoo.inference.distributed import launch

    model, guide = build(pair, x_dim, num_classes, cfg)
    size = sum(p.numel() for p in svi._parameters(model, guide))
    timing = launch(_time_all_reduce, (size, repeats), (), devices=2, num_nodes=1,
                    accelerator=cfg.accelerator, strategy=cfg.strategy)
    return {"parameters": size, **timing}


def timed_run(mode: str, pair: str, train: dict, batch_size: int, num_classes: int, cfg: Config) -> dict:
    """One training run of ``mode``; its epoch and start-up seconds from the clock's stamps."""
    model, guide = build(pair, train["x"].shape[-1], num_classes, cfg)
    if pair == "vae":
        train = {"x": train["x"]}
    steps = math.ceil(len(train["x"]) / batch_size)
    clock = EpochEndClock(steps)
    options = {"epochs": cfg.epochs, "batch_size": batch_size, "lr": cfg.lr, "optimizer": clock,
               "seed": cfg.seed, "checkpoint_extras": {"clock": clock}}
    called = time.perf_counter()
    if mode == "loop":
        result = svi.fit(model, guide, train, device=cfg.device, progress=False, **options)
    elif mode == "ddp x1":
        result = one_rank(model, guide, train, accelerator=cfg.accelerator, strategy=cfg.strategy, **options)
    else:
        result = svi.fit(model, guide, train, devices=2, accelerator=cfg.accelerator, strategy=cfg.strategy,
                         progress=False, **options)
    returned = time.perf_counter()
    return summarize_stamps(torch.stack(clock.ends), clock.first_step - called, steps, returned,
                            len(train["x"]), result.history[-1]["train_elbo"])


def summarize_stamps(ends: torch.Tensor, to_first_step: float, steps_per_epoch: int, returned: float,
                     num_train: int, final_elbo: float) -> dict:
    """Steady epoch seconds (median over epochs 2..E), wall and all ranks' CPU; start-up (the call
    to the end of the first step, less one steady step) and wind-down (last epoch's end to the
    return)."""
    wall = ends[:, 0, 0].tolist()  # every rank stamps after the same all-reduced step: rank 0's wall
    cpu = ends[:, :, 1].sum(1).tolist()
    wall_epochs = [b - a for a, b in zip(wall[:-1], wall[1:], strict=True)]
    cpu_epochs = [b - a for a, b in zip(cpu[:-1], cpu[1:], strict=True)]
    epoch = median_or_nan(wall_epochs)
    return {"epoch_seconds": epoch, "cpu_epoch_seconds": median_or_nan(cpu_epochs),
            "wall_epochs": wall_epochs, "cpu_epochs": cpu_epochs,
            "startup_seconds": to_first_step - epoch / steps_per_epoch,
            "winddown_seconds": returned - wall[-1],
            "num_train": num_train, "final_train_elbo": final_elbo}


# ----------------------------------------------------------------------------------------------
# The measurements and their ratios


def measure(cfg: Config, train: dict, num_classes: int) -> dict:
    """{pair: {batch: {mode: [run per round]}}}, the modes interleaved within every round."""
    runs = {pair: {str(b): {mode: [] for mode in MODES} for b in cfg.batch_sizes} for pair in cfg.pairs}
    for round_ in range(cfg.rounds):
        for pair in cfg.pairs:
            for batch_size in cfg.batch_sizes:
                for mode in modes_that_run(cfg):
                    run = timed_run(mode, pair, train, batch_size, num_classes, cfg)
                    runs[pair][str(batch_size)][mode].append(run)
                    print(f"round {round_ + 1} {pair} B={batch_size} {mode}: "
                          f"{run['epoch_seconds']:.3f} s/epoch "
                          f"(CPU {run['cpu_epoch_seconds']:.3f}), start-up {run['startup_seconds']:.2f} s",
                          flush=True)
    return runs


def modes_that_run(cfg: Config) -> tuple[str, ...]:
    """Two ranks need two GPUs under the GPU accelerator."""
    if cfg.accelerator != "cpu" and torch.cuda.device_count() < 2:
        return MODES[:2]
    return MODES


def summarize(runs: list[dict]) -> dict:
    """Medians over the rounds; NaN for a mode that did not run."""
    def median(key):
        return statistics.median(run[key] for run in runs) if runs else math.nan

    row = {key: median(key) for key in ("epoch_seconds", "cpu_epoch_seconds", "startup_seconds",
                                         "winddown_seconds")}
    num_train = runs[0]["num_train"] if runs else math.nan
    row["examples_per_second"] = num_train / row["epoch_seconds"]
    row["examples_per_cpu_second"] = num_train / row["cpu_epoch_seconds"]
    row["final_train_elbo"] = [run["final_train_elbo"] for run in runs]
    return row


def ratios(rows: dict) -> dict:
    """Efficiency of two ranks (against the loop and against one rank) and the one-rank overhead."""
    loop, one, two = (rows[mode] for mode in MODES)
    return {"efficiency": two["examples_per_second"] / (2 * loop["examples_per_second"]),
            "efficiency_vs_one_rank": two["examples_per_second"] / (2 * one["examples_per_second"]),
            "cpu_efficiency": two["examples_per_cpu_second"] / loop["examples_per_cpu_second"],
            "overhead": one["epoch_seconds"] / loop["epoch_seconds"],
            "cpu_overhead": one["cpu_epoch_seconds"] / loop["cpu_epoch_seconds"]}


def step_costs(loop_rows: dict, num_train: int) -> dict:
    """The loop's CPU seconds per epoch as S a + N b (S = ceil(N / B) steps, N examples): a per
    step whatever its size (Pyro's tracing, the optimizer's update of every parameter), b per
    example; solved from the two largest batch sizes. Two ranks split the N b but each pays all
    S a, so on two idle cores their epoch takes at least S a + N b / 2: the efficiency bound
    (S a + N b) / (2 (S a + N b / 2)). A model fitted to two numbers, not a measurement."""
    sizes = sorted(loop_rows, key=int)[-2:]
    if len(sizes) < 2:
        return {}
    steps = [math.ceil(num_train / int(b)) for b in sizes]
    cpu = [loop_rows[b]["cpu_epoch_seconds"] for b in sizes]
    per_step = (cpu[0] - cpu[1]) / (steps[0] - steps[1])
    per_example = (cpu[1] - steps[1] * per_step) / num_train
    if not (per_step > 0 and per_example > 0):
        return {}  # times too noisy (or too close) for the model: no bound rather than a wrong one
    bound = {b: (s * per_step + num_train * per_example) / (2 * (s * per_step + num_train * per_example / 2))
             for b, s in ((b, math.ceil(num_train / int(b))) for b in loop_rows)}
    return {"per_step_cpu_seconds": per_step, "per_example_cpu_seconds": per_example,
            "efficiency_bound": bound}


def tabulate(runs: dict) -> dict:
    return {pair: {batch: {"rows": (rows := {mode: summarize(runs[pair][batch][mode]) for mode in MODES}),
                           "ratios": ratios(rows)}
                   for batch in by_batch}
            for pair, by_batch in runs.items()}


def per_rank_efficiency(results: dict) -> dict:
    """{pair: {b: throughput(ddp x2 at global batch 2b) / (2 x throughput(loop at b))}}: the batch
    each rank trains on held fixed, for every b whose double also ran."""
    return {pair: {b: by_batch[str(2 * int(b))]["rows"]["ddp x2"]["examples_per_second"]
                   / (2 * block["rows"]["loop"]["examples_per_second"])
                   for b, block in by_batch.items() if str(2 * int(b)) in by_batch}
            for pair, by_batch in results.items()}


def fixed_costs(results: dict, num_train: int) -> dict:
    return {pair: step_costs({b: block["rows"]["loop"] for b, block in by_batch.items()}, num_train)
            for pair, by_batch in results.items()}


# ----------------------------------------------------------------------------------------------
# The report


def _num(value, digits: int = 2) -> str:
    return "n/a" if missing(value) else f"{value:,.{digits}f}"


PAIR_NAMES = {"vae": "VAE + AmortizedNormal", "bnn": "BNN + mean-field"}


def markdown(report: dict) -> str:
    cfg, env = report["config"], report["environment"]
    lines = [
        "# Data-parallel SVI: one process against two",
        "",
        f"Command: `{report['command']}` ({report['date']}, {report['seconds']:.0f} s). Hardware: "
        f"{env['hardware']}; {env['cpu_count']} cores, load average {env['load_average_at_start'][0]:.2f} at "
        f"the start and {report['load_average_at_end'][0]:.2f} at the end; one torch thread per process "
        f"(OMP_NUM_THREADS={env['omp_num_threads']}). Versions: "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".",
        "",
        f"Data: {cfg['data']}, {report['num_train']:,} training examples. Networks: {report['networks']}. "
        f"{cfg['epochs']} epochs a run, the first a warm-up; medians over {cfg['rounds']} interleaved "
        "round(s). "
        f"Strategy {cfg['strategy']}, accelerator {cfg['accelerator']}. B is the global batch; each of the "
        "two ranks trains on B/2 of it.",
        "",
        "| pair | B | run | s/epoch | CPU s/epoch | examples/s | examples/CPU-s | start-up s |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for pair, by_batch in report["results"].items():
        for batch, block in by_batch.items():
            for mode, row in block["rows"].items():
                lines.append(f"| {PAIR_NAMES[pair]} | {batch} | {mode} | {_num(row['epoch_seconds'], 3)} | "
                             f"{_num(row['cpu_epoch_seconds'], 3)} | {_num(row['examples_per_second'], 0)} | "
                             f"{_num(row['examples_per_cpu_second'], 0)} | {_num(row['startup_seconds'])} |")
    lines += [
        "",
        f"Parallel efficiency = throughput(ddp x2) / (2 x throughput(loop)), target >= {TARGET_EFFICIENCY}; "
        f"overhead = s/epoch(ddp x1) / s/epoch(loop), target <= {TARGET_OVERHEAD}. CPU efficiency: "
        "examples per CPU-second of both ranks over the loop's (1 = no extra work).",
        "",
        "| pair | B | efficiency | target | vs ddp x1 | CPU efficiency | overhead x1 | target "
        "| CPU overhead |",
        "|---|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for pair, by_batch in report["results"].items():
        for batch, block in by_batch.items():
            r = block["ratios"]
            lines.append(
                f"| {PAIR_NAMES[pair]} | {batch} | {_num(r['efficiency'])} | "
                f"{'n/a' if missing(r['efficiency']) else verdict(r['efficiency'] >= TARGET_EFFICIENCY)} | "
                f"{_num(r['efficiency_vs_one_rank'])} | {_num(r['cpu_efficiency'])} | "
                f"{_num(r['overhead'])} | "
                f"{'n/a' if missing(r['overhead']) else verdict(r['overhead'] <= TARGET_OVERHEAD)} | "
                f"{_num(r['cpu_overhead'])} |")
    lines += per_rank_lines(report.get("per_rank_efficiency", {}))
    lines += all_reduce_lines(report)
    lines += fixed_cost_lines(report.get("fixed_costs", {}))
    if cfg["notes"]:
        lines += ["", *cfg["notes"]]
    return "\n".join(lines) + "\n"


def per_rank_lines(efficiency: dict) -> list[str]:
    rows = [f"| {PAIR_NAMES[pair]} | {b} | {2 * int(b)} | {_num(value)} | "
            f"{'n/a' if missing(value) else verdict(value >= TARGET_EFFICIENCY)} |"
            for pair, by_batch in efficiency.items() for b, value in by_batch.items()]
    if not rows:
        return []
    return ["", "The same batch per rank: two ranks on a global batch 2b (b each) against the loop on b; "
            "efficiency = throughput(ddp x2, 2b) / (2 x throughput(loop, b)).", "",
            "| pair | b per rank | global batch of ddp x2 | efficiency | target |",
            "|---|---:|---:|---:|---|", *rows]


def all_reduce_lines(report: dict) -> list[str]:
    """The measured communication floor and the efficiency it alone allows at a fixed batch per
    rank: loop step / (loop step + one all-reduce)."""
    timings = report.get("all_reduce", {})
    if not timings:
        return []
    lines = ["", "One all-reduce of all the pair's gradients between two ranks (gloo, measured on its own, "
             "50 repeats), and what it alone leaves of the efficiency at a fixed batch b per rank: "
             "loop step(b) / (loop step(b) + all-reduce); the rest of the gap is the two busy cores slowing "
             "each other (memory) and DistributedDataParallel's bucket copies.", ""]
    for pair, timing in timings.items():
        by_batch = report["results"][pair]
        bounds = []
        for b in report.get("per_rank_efficiency", {}).get(pair, {}):
            loop = by_batch[b]["rows"]["loop"]
            step = loop["epoch_seconds"] / math.ceil(report["num_train"] / int(b))
            bounds.append(f"{_num(step / (step + timing['wall']))} at b={b}")
        lines.append(f"* {PAIR_NAMES[pair]}: {timing['parameters']:,} parameters, "
                     f"{1000 * timing['wall']:.2f} ms wall ({1000 * timing['cpu']:.2f} ms CPU) an all-reduce"
                     + (f"; bound {', '.join(bounds)}." if bounds else "."))
    return lines


def fixed_cost_lines(costs: dict) -> list[str]:
    """The per-step cost model of ``step_costs``, a sentence per pair."""
    lines = []
    for pair, cost in costs.items():
        if not cost:
            continue
        bounds = ", ".join(f"{_num(bound)} at B={b}" for b, bound in cost["efficiency_bound"].items())
        lines.append(f"{PAIR_NAMES[pair]}: the loop's CPU time is "
                     f"{1000 * cost['per_step_cpu_seconds']:.1f} ms a step plus "
                     f"{1e6 * cost['per_example_cpu_seconds']:.0f} µs an example (fitted to its "
                     f"two batch sizes); every rank pays the per-step part in full, which bounds the "
                     f"efficiency of two ranks on two idle cores to {bounds}.")
    if lines:
        lines = ["", "Why two ranks cannot double the throughput here (a model fitted to the loop's rows, "
                 "not a measurement):", "", *(f"* {line}" for line in lines)]
    return lines


def environment(cfg: Config) -> dict:
    import lightning

    versions = {**library_versions(), "lightning": lightning.__version__}
    return {"hardware": describe_hardware(cfg.device), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_at_start": os.getloadavg(), "versions": versions}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, small networks: under a minute")
    parser.add_argument("--data", choices=("digits", "mnist5k"))
    parser.add_argument("--pairs", nargs="+", choices=("vae", "bnn"))
    parser.add_argument("--batch-sizes", nargs="+", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--strategy", choices=("ddp_fork", "ddp"))
    parser.add_argument("--accelerator", choices=("cpu", "gpu"))
    parser.add_argument("--note", action="append", default=[], help="a line for the report (e.g. the load)")
    args = parser.parse_args(argv)
    cfg = Config(**(QUICK if args.quick else {}), quick=args.quick, notes=args.note)
    for key in ("data", "pairs", "batch_sizes", "epochs", "rounds", "strategy", "accelerator"):
        if getattr(args, key) is not None:
            value = getattr(args, key)
            setattr(cfg, key, tuple(value) if isinstance(value, list) else value)
    if cfg.accelerator == "gpu":
        cfg.device = "cuda"
        if cfg.strategy == "ddp_fork":
            parser.error("--accelerator gpu needs --strategy ddp: this process uses CUDA before it forks")
    # One thread a process: OMP_NUM_THREADS reaches spawned ranks and stops Fabric from setting
    # cores / N threads itself; forked ranks inherit torch's setting.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

    dataset = load_dataset(cfg.data, binarize="fixed")
    train = {"x": dataset.train["x"], "y": dataset.train["y"]}
    if cfg.train_size is not None:
        train = {k: v[:cfg.train_size] for k, v in train.items()}
    started = time.perf_counter()
    report = new_report("scaling", cfg, environment(cfg))
    x_dim = train["x"].shape[-1]
    report["num_train"] = len(train["x"])
    report["networks"] = (f"VAE {x_dim}-{cfg.vae_hidden}-{cfg.z_dim}, "
                          f"BNN {'-'.join(map(str, (x_dim, *cfg.bnn_hidden, dataset.num_classes)))}")
    report["results"] = tabulate(measure(cfg, train, dataset.num_classes))
    report["per_rank_efficiency"] = per_rank_efficiency(report["results"])
    if "ddp x2" in modes_that_run(cfg):
        report["all_reduce"] = {pair: all_reduce_seconds(pair, x_dim, dataset.num_classes, cfg)
                                for pair in cfg.pairs}
    report["fixed_costs"] = fixed_costs(report["results"], len(train["x"]))
    report.update(seconds=time.perf_counter() - started, load_average_at_end=os.getloadavg())
    write(report, RESULTS / ("scaling_quick" if cfg.quick else "scaling"), markdown)
    return report


if __name__ == "__main__":
    main()
