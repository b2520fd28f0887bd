"""Seconds per training epoch of the flow and VLAE guides against the amortized diagonal one.

    python benchmarks/latent_speed.py time --rounds 3            # interleaved epoch times
    python benchmarks/latent_speed.py profile vlae               # torch.profiler, one epoch
    python benchmarks/latent_speed.py loglik --out before.json   # IS log-likelihood after 2 epochs

The setting of the speed issue: mnist5k (4000 training images, dynamically binarized), the
784-400-20-400-784 Bernoulli VAE, batch 100, Adam, one torch thread. ``time`` trains every
guide for one epoch per round, the guides interleaved within a round, and reports the median
wall and CPU (process) seconds and their ratios to the amortized diagonal guide. ``loglik``
trains each guide for 2 epochs from seed 0 and prints the importance-sampled log-likelihood of
the test split, so a change that must not move the method can be checked before and after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from common import profile_table

from bayeszoo.guides.amortized import AmortizedNormal
from bayeszoo.guides.flows import AmortizedFlow
from bayeszoo.guides.vlae import VLAEGuide
from bayeszoo.inference.data import load_dataset
from bayeszoo.inference.evaluate import importance_sampling
from bayeszoo.inference.svi import fit
from bayeszoo.models.vae import VAE

GUIDES = ("amortized", "planar", "householder", "iaf", "sylvester", "vlae")
BASELINE = "amortized"


def build(kind: str):
    """The model and guide of the issue's setting (as the registry builds them)."""
    model = VAE(784, 20, (400,), "bernoulli")
    if kind == "amortized":
        return model, AmortizedNormal(model, (400,))
    if kind == "vlae":
        return model, VLAEGuide(model, (400,), steps=4)
    return model, AmortizedFlow(model, (400,), flow=kind, flow_length=8)


def train(kind: str, dataset, epochs: int = 1, seed: int = 0, train_size: int | None = None,
          device: str = "cpu"):
    """``train_size``: the first that many training images (None: all)."""
    pyro.set_rng_seed(seed)
    model, guide = build(kind)
    fit(model, guide, {"x": dataset.train["x"][:train_size]}, epochs=epochs, batch_size=100, seed=seed,
        batch_transform=dataset.batch_transform, progress=False, device=device)
    return model, guide


def timed_epoch(kind: str, dataset, train_size: int | None = None,
                device: str = "cpu") -> tuple[float, float]:
    """Wall and CPU (process) seconds of building ``kind`` and training it for one epoch."""
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    train(kind, dataset, train_size=train_size, device=device)
    return time.perf_counter() - start_wall, time.process_time() - start_cpu


def time_epochs(kinds, dataset, rounds: int) -> dict:
    wall = {kind: [] for kind in kinds}
    cpu = {kind: [] for kind in kinds}
    for _ in range(rounds):
        for kind in kinds:  # interleaved: a slow spell of the shared machine hits every guide
            wall_s, cpu_s = timed_epoch(kind, dataset)
            wall[kind].append(wall_s)
            cpu[kind].append(cpu_s)
    result = {}
    for kind in kinds:
        w, c = statistics.median(wall[kind]), statistics.median(cpu[kind])
        result[kind] = {"wall_s": w, "cpu_s": c, "wall_rounds": wall[kind], "cpu_rounds": cpu[kind]}
    for kind in kinds:
        if BASELINE in result:
            result[kind]["wall_ratio"] = result[kind]["wall_s"] / result[BASELINE]["wall_s"]
            result[kind]["cpu_ratio"] = result[kind]["cpu_s"] / result[BASELINE]["cpu_s"]
    return result


def profile(kind: str, dataset, rows: int) -> str:
    return profile_table(lambda: train(kind, dataset), rows)


def log_likelihood(kinds, dataset, epochs: int, samples: int) -> dict:
    test = {"x": dataset.batch_transform(dataset.test, torch.Generator().manual_seed(0))["x"]}
    result = {}
    for kind in kinds:
        model, guide = train(kind, dataset, epochs)
        pyro.set_rng_seed(1)
        with torch.no_grad():
            scores = importance_sampling(model, guide, test, num_samples=samples)
        result[kind] = {"log_likelihood": scores["log_likelihood"].mean().item(),
                        "elbo": scores["elbo"].mean().item()}
        print(f"{kind:12s} log p(x) {result[kind]['log_likelihood']:.6f}  ELBO {result[kind]['elbo']:.6f}",
              flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("time", "profile", "loglik"))
    parser.add_argument("guide", nargs="?", default="vlae", help="the guide to profile")
    parser.add_argument("--guides", default=",".join(GUIDES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15, help="profile rows shown")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs before loglik")
    parser.add_argument("--is-samples", type=int, default=100)
    parser.add_argument("--out", type=Path, help="write the numbers here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.settings.set(module_local_params=True)
    dataset = load_dataset("mnist5k", binarize="dynamic")
    kinds = args.guides.split(",")
    if args.command == "profile":
        print(profile(args.guide, dataset, args.rows))
        return 0
    if args.command == "time":
        result = time_epochs(kinds, dataset, args.rounds)
        for kind, row in result.items():
            print(f"{kind:12s} wall {row['wall_s']:6.2f} s ({row.get('wall_ratio', float('nan')):5.2f}x)  "
                  f"cpu {row['cpu_s']:6.2f} s ({row.get('cpu_ratio', float('nan')):5.2f}x)")
    else:
        result = log_likelihood(kinds, dataset, args.epochs, args.is_samples)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
