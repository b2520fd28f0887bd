"""What every benchmark script shares: the report's head, the machine, threads, clocks, statistics,
the JSON + markdown writer and the table helpers.

The scripts import it by name (``from common import write``): run as ``python benchmarks/x.py``,
Python puts ``benchmarks/`` first on the import path. A report is a dict; ``write`` stores it as
``stem.json`` (NaN as JSON null, which plain ``json`` would write as the non-standard ``NaN``) and
``stem.md`` (the script's own ``render(report)``). Renderers take either the in-memory report or
the one read back from the JSON file, so the table helpers treat a missing number (None) like NaN.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pyro
import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"


# ----------------------------------------------------------------------------------------------
# The report's head: command, date, config, machine


def now() -> str:
    """The UTC date and time to the second, ISO 8601 (``2024-05-01T12:00:00+00:00``)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    """The command that ran this script: its file name and arguments."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: str = "cpu") -> str:
    """What the benchmark ran on: the GPU's name for a CUDA device, else the CPU's."""
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_model()


def environment(device: str = "cpu", names: tuple[str, ...] = ("cpu",), omp_threads: bool = False) -> dict:
    """Software versions, the machine, torch's threads and the load when the benchmark starts.

    ``names``: the keys the machine is named under, ``"hardware"`` (``hardware(device)``) and/or
    ``"cpu"`` (the CPU, whatever the device); each script keeps the keys its renderer reads.
    ``omp_threads`` adds the ``OMP_NUM_THREADS`` setting (None when unset).
    """
    env = {"torch": torch.__version__, "pyro": pyro.__version__, "python": platform.python_version(),
           "device": device}
    if "hardware" in names:
        env["hardware"] = hardware(device)
    if "cpu" in names:
        env["cpu"] = cpu_model()
    env["cpu_count"] = os.cpu_count()
    env["torch_threads"] = torch.get_num_threads()
    if omp_threads:
        env["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    env["load_average_at_start"] = os.getloadavg()
    return env


def new_report(name: str, cfg, env: dict | None = None) -> dict:
    """The head every benchmark report starts with: the command, date, config (a dataclass) and
    machine (``environment()`` unless given)."""
    return {"benchmark": name, "command": command_line(), "date": now(), "config": asdict(cfg),
            "environment": environment() if env is None else env}


def add_threads_argument(parser) -> None:
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)``; None leaves torch's choice."""
    if threads is not None:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# Clocks and statistics


class EpochClock:
    """A batch transform that stamps the wall and CPU clocks at every training minibatch.

    ``fit`` (and the scripts' hand-written loops) call it once per training minibatch, and ``fit``
    once more while it sets up, so the stamps at the first minibatch of consecutive epochs bound
    one epoch: the clock times a training loop from outside, without touching it. CPU time (this
    process) is less disturbed than wall time by other jobs. ``transform``, if given, is the
    batch transform the loop would otherwise use (e.g. dynamic binarization); its time counts.
    """

    def __init__(self, steps_per_epoch: int, transform=None):
        self.steps_per_epoch, self.transform = steps_per_epoch, transform
        self.stamps: list[tuple[float, float]] = []

    def __call__(self, batch: dict, generator=None) -> dict:
        self.stamp()
        return batch if self.transform is None else self.transform(batch, generator)

    def stamp(self) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))

    def epoch_seconds(self, epochs: int, warmup: int = 0) -> tuple[list[float], list[float]]:
        """(wall, cpu) seconds of each of the last ``epochs`` epochs, less the first ``warmup``;
        call ``stamp()`` once after the run to close the last epoch."""
        starts = self.stamps[-(epochs * self.steps_per_epoch + 1)::self.steps_per_epoch]
        spans = list(zip(starts[warmup:-1], starts[warmup + 1:], strict=True))
        return [b[0] - a[0] for a, b in spans], [b[1] - a[1] for a, b in spans]

    def cpu_seconds(self, epochs: int) -> list[float]:
        """CPU seconds of the first ``epochs - 1`` of the last ``epochs`` epochs, without a closing
        stamp (so what runs after the last minibatch, e.g. a Laplace Hessian, is never counted)."""
        starts = self.stamps[-epochs * self.steps_per_epoch::self.steps_per_epoch]
        return [b[1] - a[1] for a, b in zip(starts[:-1], starts[1:], strict=True)]


def profile_table(run, rows: int = 10) -> str:
    """torch.profiler's table of the ``rows`` operators with the most self CPU time in ``run()``.

    ``run`` is called once un-profiled first, so the allocator, lazy imports and first-call
    caches are warm and the table shows the steady state.
    """
    from torch.profiler import ProfilerActivity, profile

    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def after_warmup(values: list[float]) -> list[float]:
    """All but the first value (the warm-up epoch), unless it is the only one."""
    return values[1:] if len(values) > 1 else values


def median_or_nan(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def mean_se(values: list[float]) -> dict:
    """Mean and standard error (sample sd / sqrt(n)) of ``values``; NaN if any value is NaN, and
    a NaN standard error for a single value."""
    if any(math.isnan(v) for v in values):
        return {"mean": math.nan, "se": math.nan, "n": len(values), "values": values}
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return {"mean": mean, "se": se, "n": len(values), "values": values}


# ----------------------------------------------------------------------------------------------
# Writing and rendering


def finite(obj):
    """``obj`` with every NaN replaced by None (JSON null), through dicts, lists and tuples."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(obj, path: Path, **dumps_options) -> None:
    """``obj`` as indented JSON with NaN as null, and a final newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(obj), indent=2, **dumps_options) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def write(report: dict, stem: Path, render) -> None:
    """``stem``.json (the report) and ``stem``.md (``render(report)``); prints the markdown."""
    text = render(report)
    write_json(report, stem.with_suffix(".json"))
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


def missing(value) -> bool:
    """A number the report does not have: NaN in memory, None once read back from JSON."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_bytes(n: int) -> str:
    return f"{n:,}"


def fmt_mean_se(stat: dict, digits: int = 2) -> str:
    """``mean ± se`` of a ``mean_se`` dict; ``n/a`` without a mean, the mean alone without an se."""
    if missing(stat["mean"]):
        return "n/a"
    se = "" if missing(stat["se"]) else f" ± {stat['se']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}{se}"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def bayes_by_backprop_step(net, data: dict, task: str, lr: float, prior_scale: float = 1.0):
    """``step(index) -> loss``: one Bayes-by-Backprop step written by hand in plain PyTorch (no
    Pyro), the timing reference of the BNN benchmarks. mu starts at the net's weights, sigma =
    softplus(rho) at 0.01 (as ``guides/mean_field.py``); Adam on mu and rho; loss: summed NLL
    (unit-variance Gaussian or cross-entropy) + batch/N * KL(q || N(0, prior_scale^2))."""
    import torch.nn.functional as F

    mu = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    rho = {k: torch.full_like(v, math.log(math.expm1(0.01))).requires_grad_() for k, v in mu.items()}
    optimizer = torch.optim.Adam([*mu.values(), *rho.values()], lr=lr, fused=True)
    x, y = data["x"], data["y"]

    def step(index: torch.Tensor) -> float:
        sigma = {k: F.softplus(r) for k, r in rho.items()}
        weights = {k: mu[k] + s * torch.randn_like(s) for k, s in sigma.items()}
        out = torch.func.functional_call(net, weights, (x[index],))
        nll = (0.5 * (out[:, 0] - y[index]).pow(2).sum() if task == "regression"
               else F.cross_entropy(out, y[index], reduction="sum"))
        kl = sum((math.log(prior_scale) - s.log() + (s**2 + mu[k]**2) / (2 * prior_scale**2) - 0.5).sum()
                 for k, s in sigma.items())
        loss = nll + len(index) / len(x) * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step
