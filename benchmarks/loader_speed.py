"""What ``svi.fit(num_workers=N)`` costs or saves: the minibatch loader alone, and VAE epochs.

    python benchmarks/loader_speed.py --rounds 7

One torch thread. ``loader``: seconds to produce one epoch of minibatches (no training) of a
dataset's training split, batch 100, by four routes, interleaved within every round: the loop's
generator before the DataLoader existed (``_minibatches``), ``fit``'s route at ``num_workers=0``
(direct indexing), a ``DataLoader`` over the same whole-batch dataset in the training process
(0 workers), and the DataLoader with 2 persistent workers. ``epoch``: one ``fit`` epoch of the
64-400-20-400-64 Bernoulli VAE on digits with dynamic binarization (amortized guide, batch 100),
``num_workers`` 0 and 2 interleaved: the epoch's wall seconds from the history and the training
process's CPU seconds for the whole call (workers' CPU not counted). Medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import pyro
import torch

from bayeszoo.guides.amortized import AmortizedNormal
from bayeszoo.inference.data import load_dataset
from bayeszoo.inference.svi import (
    _as_loaded,
    _BatchLoader,
    _epoch_batches,
    _minibatches,
    _Plan,
    _Rows,
    fit,
)
from bayeszoo.models.vae import VAE

BATCH = 100


def _drain(batches) -> None:
    for batch in batches:
        batch["x"].sum()  # touch the batch, as a step would


def _loader_routes(train: dict) -> dict:
    """Each route: a function that produces one epoch of minibatches from a seeded generator."""
    direct = _BatchLoader(train, 0, "cpu")
    workers = _BatchLoader(train, 2, "cpu")
    plan = _Plan()
    in_process = torch.utils.data.DataLoader(_Rows(train), batch_sampler=plan, collate_fn=_as_loaded,
                                             generator=torch.Generator().manual_seed(0))

    def batches(generator):
        return _epoch_batches(len(train["x"]), BATCH, generator)

    def in_process_epoch(generator):
        plan.indices = batches(generator)  # index tensors: nothing to pickle without workers
        return iter(in_process)

    return {
        "before (generator)": lambda generator: _minibatches(train, BATCH, generator),
        "fit, 0 workers (direct)": lambda generator: direct(batches(generator)),
        "DataLoader, 0 workers": in_process_epoch,
        "DataLoader, 2 workers": lambda generator: workers(batches(generator)),
    }, workers


def time_loaders(train: dict, rounds: int, repeats: int) -> dict:
    routes, workers = _loader_routes(train)
    seconds = {name: [] for name in routes}
    try:
        for route in routes.values():  # warm-up: workers start, caches fill
            _drain(route(torch.Generator().manual_seed(0)))
        for _ in range(rounds):
            for name, route in routes.items():
                started = time.perf_counter()
                for repeat in range(repeats):
                    _drain(route(torch.Generator().manual_seed(repeat)))
                seconds[name].append((time.perf_counter() - started) / repeats)
    finally:
        workers.__exit__(None, None, None)
    steps = -(-len(train["x"]) // BATCH)
    return {name: {"epoch_ms": 1e3 * statistics.median(s), "per_batch_us": 1e6 * statistics.median(s) / steps}
            for name, s in seconds.items()}


def time_epochs(dataset, rounds: int) -> dict:
    wall, cpu = {0: [], 2: []}, {0: [], 2: []}
    for _ in range(rounds):
        for workers in (0, 2):
            torch.manual_seed(0)
            model = VAE(dataset.x_dim, 20, (400,))
            guide = AmortizedNormal(model, (400,))
            started = time.process_time()
            result = fit(model, guide, {"x": dataset.train["x"]}, epochs=1, batch_size=BATCH, progress=False,
                         batch_transform=dataset.batch_transform, num_workers=workers)
            cpu[workers].append(time.process_time() - started)
            wall[workers].append(result.history[0]["seconds"])
    return {f"{workers} workers": {"epoch_wall_s": statistics.median(wall[workers]),
                                   "fit_cpu_s": statistics.median(cpu[workers])} for workers in wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=20, help="loader epochs per round and route")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pyro.settings.set(module_local_params=True)
    report = {}
    for name in ("digits", "mnist5k"):
        dataset = load_dataset(name, binarize="dynamic")
        report[f"loader, {name}"] = time_loaders(dataset.train, args.rounds, args.repeats)
    report["epoch, digits VAE"] = time_epochs(load_dataset("digits", binarize="dynamic"), args.rounds)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
