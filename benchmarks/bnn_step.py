"""Per-step cost of the Bayesian-neural-network SVI path against plain PyTorch (a timing script).

    .venv/bin/python benchmarks/bnn_step.py --threads 1 --rounds 7

For each net (digits 64-100-100-8, Boston 13-50-1, mnist5k 784-400-400-8) and each round it runs,
one after the other (interleaved, so a busy machine slows all four alike):

* ``meanfield``: ``inference.training.train(model, "meanfield", ...)``, the library's Bayes by
  Backprop (``MeanFieldGuide``, ``inference.elbo.ClosedFormKL_ELBO``, ``inference.svi.fit``);
* ``by_hand``: Bayes by Backprop written by hand in plain PyTorch (the arithmetic of
  ``benchmarks/bnn.py``'s ``train_handwritten_meanfield``: a normal draw, a softplus and
  w = mu + sigma * eps per weight, the closed-form KL, Adam on mu and rho);
* ``map``: ``inference.training.train(model, "map", ...)`` (``MAPGuide``, ``Trace_ELBO``);
* ``plain``: the plain PyTorch MLP with Adam and MSE / cross-entropy.

With ``--floor`` two more variants run: ``floor_meanfield`` and ``floor_map``, a bare Pyro
model/guide pair with the same sample sites (priors built once, the network by
``torch.func.functional_call``, no PyroModule, no deterministic sites, the library's own
``DiagonalNormal`` / ``PointMass``) trained by ``inference.svi.fit`` with the same ELBO: what any
model/guide pair with these sites costs per step in ``fit``, whatever the model and guide code does.

Each run trains ``--epochs`` epochs on the same minibatches (the order ``fit`` draws); the first is
a warm-up. A step's time is the time between the starts of consecutive steps (so it includes the
minibatch indexing), in wall seconds and in this process's CPU seconds; the epoch's last (smaller)
step is left out. Per round: the median step of each variant and the ratios meanfield / by_hand
and map / plain; reported: the median over rounds of those ratios. Prints a table and, with
``--json``, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from common import bayes_by_backprop_step
from pyro.infer import Trace_ELBO
from torch import nn

from bayeszoo.guides.mean_field import DiagonalNormal
from bayeszoo.guides.weights import PointMass
from bayeszoo.inference.elbo import ClosedFormKL_ELBO
from bayeszoo.inference.supervised import load_supervised
from bayeszoo.inference.svi import fit
from bayeszoo.inference.training import train
from bayeszoo.models.bnn import BayesianNeuralNetwork, IsotropicNormal
from bayeszoo.models.nn import mlp

NETS = {  # dataset, load_supervised options, hidden sizes, batch size, Adam lr (as benchmarks/bnn.py)
    "digits": ("digits", {}, (100, 100), 100, 3e-3),
    "boston": ("boston", {"split": 0}, (50,), 32, 1e-2),
    "mnist5k": ("mnist5k", {}, (400, 400), 100, 1e-3),
}
VARIANTS = ("meanfield", "by_hand", "map", "plain")
FLOOR = ("floor_meanfield", "floor_map")
RATIOS = {"meanfield": "by_hand", "map": "plain", "floor_meanfield": "by_hand", "floor_map": "plain"}


class StepClock:
    """Stamps (wall, CPU) at the start of every training step; ``fit`` calls it as its batch
    transform (it returns the minibatch unchanged), the hand-written loops call it directly."""

    def __init__(self):
        self.stamps: list[tuple[float, float]] = []

    def __call__(self, batch=None, generator=None):
        self.stamps.append((time.perf_counter(), time.process_time()))
        return batch

    def step_times(self, steps_per_epoch: int, skip_epochs: int = 1) -> tuple[list[float], list[float]]:
        """Wall and CPU seconds of every full step after the warm-up epochs: the difference to the
        next stamp. The last step of an epoch (shorter, and followed by the epoch's bookkeeping)
        is left out. Expects one stamp per step and a closing one."""
        wall, cpu = [], []
        for k in range(skip_epochs * steps_per_epoch, len(self.stamps) - 1):
            if (k + 1) % steps_per_epoch:
                wall.append(self.stamps[k + 1][0] - self.stamps[k][0])
                cpu.append(self.stamps[k + 1][1] - self.stamps[k][1])
        return wall, cpu


def make_pair(dataset, hidden, seed: int):
    """A Bayesian net (prior N(0, 1), learned noise for regression) and the plain net it copies."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    outputs = 1 if dataset.task == "regression" else dataset.num_classes
    net = mlp([dataset.x_dim, *hidden, outputs])
    likelihood = "gaussian" if dataset.task == "regression" else "categorical"
    model = BayesianNeuralNetwork(net, dataset.x_shape, likelihood=likelihood, prior="normal",
                                  noise="learned")
    return model, net


def minibatch_loop(step, n: int, epochs: int, batch_size: int, seed: int, clock: StepClock) -> None:
    """``fit``'s minibatch order (torch.randperm from a generator seeded with ``seed``)."""
    pyro.set_rng_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            clock()
            step(order[start:start + batch_size])
    clock()  # the end of the last step


def run_plain(net: nn.Module, data: dict, task: str, epochs: int, batch_size: int, lr: float, seed: int,
              clock: StepClock) -> None:
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, fused=True)
    x, y = data["x"], data["y"]

    def step(index):
        out = net(x[index])
        loss = F.mse_loss(out[:, 0], y[index]) if task == "regression" else F.cross_entropy(out, y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    minibatch_loop(step, len(data["x"]), epochs, batch_size, seed, clock)


def run_by_hand(net: nn.Module, data: dict, task: str, epochs: int, batch_size: int, lr: float, seed: int,
                clock: StepClock, prior_scale: float = 1.0) -> None:
    step = bayes_by_backprop_step(net, data, task, lr, prior_scale)
    minibatch_loop(step, len(data["x"]), epochs, batch_size, seed, clock)


class BareModel(nn.Module):
    """The sample sites of ``BayesianNeuralNetwork`` (prior N(0, 1) on every weight, learned noise
    for regression) with nothing around them: the floor of the model side."""

    def __init__(self, net: nn.Module, task: str):
        super().__init__()
        self.net, self.task = net.requires_grad_(False), task  # the weights come from the sites
        self.priors = {name: IsotropicNormal(1.0, p.shape) for name, p in net.named_parameters()}
        self.log_noise = nn.Parameter(torch.tensor(math.log(0.5)))

    def forward(self, x, y=None):
        weights = {name: pyro.sample(f"net.{name}", prior) for name, prior in self.priors.items()}
        f = torch.func.functional_call(self.net, weights, (x,))
        with pyro.plate("data", x.shape[0]):
            if self.task == "regression":
                return pyro.sample("y", dist.Normal(f[..., 0], self.log_noise.exp()), obs=y)
            return pyro.sample("y", dist.Categorical(logits=f), obs=y)


class BareGuide(nn.Module):
    """Mean-field (``DiagonalNormal``) or point-mass (``PointMass``) guide, parameters in lists."""

    def __init__(self, net: nn.Module, mean_field: bool):
        super().__init__()
        self.names = [name for name, _ in net.named_parameters()]
        self.loc = nn.ParameterList([p.detach().clone() for p in net.parameters()])
        self.rho = nn.ParameterList([torch.full_like(p, math.log(math.expm1(0.01))) for p in net.parameters()]
                                    if mean_field else [])

    def forward(self, x, y=None):
        if not len(self.rho):
            return {name: pyro.sample(f"net.{name}", PointMass(loc, event_dim=loc.dim()))
                    for name, loc in zip(self.names, self.loc, strict=True)}
        return {name: pyro.sample(f"net.{name}", DiagonalNormal(dist.Normal(loc, F.softplus(rho)), loc.dim()))
                for name, loc, rho in zip(self.names, self.loc, self.rho, strict=True)}


def run_variant(variant: str, dataset, hidden, epochs: int, batch_size: int, lr: float, seed: int):
    """Train one variant; returns the median full-step (wall, CPU) seconds after the warm-up epoch."""
    model, net = make_pair(dataset, hidden, seed)
    clock = StepClock()
    data = dataset.train
    if variant in ("meanfield", "map"):
        train(model, variant, data, None, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
              progress=False, batch_transform=clock)
        clock.stamps = clock.stamps[1:]  # fit's setup call, before training
        clock()  # the end of the last step
    elif variant in FLOOR:
        mean_field = variant == "floor_meanfield"
        fit(BareModel(net, dataset.task), BareGuide(net, mean_field), data, None, epochs=epochs,
            batch_size=batch_size, lr=lr, seed=seed, progress=False, batch_transform=clock,
            elbo=ClosedFormKL_ELBO if mean_field else Trace_ELBO)
        clock.stamps = clock.stamps[1:]
        clock()
    elif variant == "by_hand":
        run_by_hand(net, data, dataset.task, epochs, batch_size, lr, seed, clock)
    else:
        run_plain(net, data, dataset.task, epochs, batch_size, lr, seed, clock)
    wall, cpu = clock.step_times(math.ceil(len(data["x"]) / batch_size))
    return statistics.median(wall), statistics.median(cpu)


def measure(name: str, rounds: int, epochs: int, seed: int, variants=VARIANTS) -> dict:
    dataset_name, options, hidden, batch_size, lr = NETS[name]
    dataset = load_supervised(dataset_name, **options)
    per_round = {v: {"wall": [], "cpu": []} for v in variants}
    ratios = {v: {"wall": [], "cpu": []} for v in RATIOS if v in variants}
    for _ in range(rounds):
        medians = {}
        for variant in variants:
            medians[variant] = run_variant(variant, dataset, hidden, epochs, batch_size, lr, seed)
            per_round[variant]["wall"].append(medians[variant][0])
            per_round[variant]["cpu"].append(medians[variant][1])
        for variant in ratios:
            reference = RATIOS[variant]
            ratios[variant]["wall"].append(medians[variant][0] / medians[reference][0])
            ratios[variant]["cpu"].append(medians[variant][1] / medians[reference][1])
    net = "-".join(str(s) for s in (dataset.x_dim, *hidden,
                                       1 if dataset.task == "regression" else dataset.num_classes))
    return {"net": net, "batch_size": batch_size, "train_size": len(dataset.train["x"]),
            "step_ms": {v: {k: 1e3 * statistics.median(t) for k, t in per_round[v].items()}
                        for v in variants},
            "ratio": {v: {k: statistics.median(r) for k, r in ratios[v].items()} for v in ratios},
            "ratio_rounds": ratios}


def table(results: dict) -> str:
    lines = ["| net | meanfield ms | by hand ms | MF / hand (wall, CPU) | MAP ms | plain ms | "
             "MAP / plain (wall, CPU) |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        ms, ratio = r["step_ms"], r["ratio"]
        lines.append(
            f"| {name} {r['net']} | {ms['meanfield']['cpu']:.2f} | {ms['by_hand']['cpu']:.2f} | "
            f"{ratio['meanfield']['wall']:.2f}x, {ratio['meanfield']['cpu']:.2f}x | {ms['map']['cpu']:.2f} | "
            f"{ms['plain']['cpu']:.2f} | {ratio['map']['wall']:.2f}x, {ratio['map']['cpu']:.2f}x |")
    floors = [f"{name}: floor mean-field {r['step_ms'][v]['cpu']:.2f} ms, {r['ratio'][v]['wall']:.2f}x / "
              f"{r['ratio'][v]['cpu']:.2f}x by hand; floor MAP {r['step_ms'][w]['cpu']:.2f} ms, "
              f"{r['ratio'][w]['wall']:.2f}x / {r['ratio'][w]['cpu']:.2f}x plain"
              for name, r in results.items() for v, w in [FLOOR] if v in r["ratio"]]
    note = "(ms: median CPU milliseconds per step; ratios wall / CPU, median over rounds)"
    return "\n".join([*lines, *floors, note])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", nargs="+", choices=tuple(NETS), default=list(NETS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=3, help="per run, the first one a warm-up")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--floor", action="store_true", help="also time the bare Pyro pair (see above)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.settings.set(module_local_params=True)
    variants = VARIANTS + (FLOOR if args.floor else ())
    results = {name: measure(name, args.rounds, args.epochs, args.seed, variants) for name in args.nets}
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
