"""Data parallelism for ``svi.fit``: processes, replicas and slices through Lightning Fabric.

``svi.fit(..., devices=N)`` (with ``num_nodes``) trains one replica of model and guide per
process, rank r of N. Every epoch all ranks draw the same seeded permutation of the training
set; rank r takes its slice S_r of every global minibatch b of B examples (``slice_bounds``). With
the one-process loss of b written as

    L_b = sum_{i in b} l_i + (B / N_train) g,

l_i the negative ELBO terms of example i (its likelihood and local latents) and g those of the
global sites (-log p(w) + log q(w) for a Bayesian neural network's weights), rank r computes

    v_r = sum_{i in S_r} l_i + (B / (N N_train)) g_r

and backpropagates N v_r. DistributedDataParallel averages gradients over the ranks, so the step
follows

    (1/N) sum_r grad(N v_r) = sum_{i in b} grad l_i + (B / N_train) (1/N) sum_r grad g_r,

the gradient of L_b: exactly where the ranks' random draws agree with one process's, and in
expectation otherwise. The v_r sum to L_b, which the history reports. A rank whose slice is
empty (a last batch smaller than N) runs one example with its local terms scaled by 0: it adds
its share of g and takes part in the gradient all-reduce.

Work that needs no communication, ensemble members and Markov chains, is spread over the same
processes by ``run_tasks``: task i runs on rank i mod N exactly as it would in one process (its
own seed, its own run folder), so the results do not depend on how many processes ran them.

This module knows processes and tensors, not ELBOs: ``check_devices`` (settings that cannot run
fail before anything starts), ``launch`` (run a function on every rank, return rank 0's
outcome), ``replicate`` (model and guide under DistributedDataParallel), ``run_tasks``, and the
slices, seeds and sums the loop in ``svi`` uses.

Processes start by spawning (``strategy="ddp"``): what they receive must pickle. ``"ddp_fork"``
forks instead (nothing is pickled, no imports are repeated; CPU, or a GPU machine where CUDA is
not yet initialised in the calling process). Fabric is imported only here and only when more
than one process trains.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro import poutine
from torch import nn

STRATEGIES = {"ddp": "spawn", "ddp_spawn": "spawn", "ddp_fork": "fork"}
ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
#: The keywords of ``svi.fit`` (and of the registry's budgets) that say how many processes train.
PROCESS_KEYWORDS = ("devices", "accelerator", "num_nodes", "strategy")


def resolve_accelerator(accelerator: str, devices: int) -> str:
    """``"auto"``: the GPUs when this machine has ``devices`` of them, else the CPU."""
    if accelerator != "auto":
        return accelerator
    return "gpu" if torch.cuda.device_count() >= devices else "cpu"


def check_devices(devices: int, num_nodes: int, accelerator: str, strategy: str, device) -> int:
    """The number of processes (devices x nodes); a ``ValueError`` for settings that cannot run."""
    if not (isinstance(devices, int) and devices >= 1 and isinstance(num_nodes, int) and num_nodes >= 1):
        raise ValueError(f"devices and num_nodes must be positive integers, got {devices!r} and "
                         f"{num_nodes!r}")
    if accelerator not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {accelerator!r}; choose from {', '.join(ACCELERATORS)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if accelerator in ("gpu", "cuda") and torch.cuda.device_count() < devices:
        raise ValueError(f"accelerator={accelerator!r} with devices={devices} needs {devices} CUDA GPU(s) "
                         f"on this machine, found {torch.cuda.device_count()}")
    missing = [key for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if key not in os.environ]
    if num_nodes > 1 and missing:
        raise ValueError(f"num_nodes={num_nodes}: every node runs the same command with MASTER_ADDR "
                         f"(node 0's address), MASTER_PORT and NODE_RANK set; {', '.join(missing)} not set")
    world = devices * num_nodes
    if world == 1 and accelerator in ("gpu", "cuda") and torch.device(device).type != "cuda":
        raise ValueError(f"one process trains on device={str(device)!r}; for accelerator={accelerator!r} "
                         "pass device='cuda'")
    return world


def check_picklable(strategy: str, objects: Mapping[str, object]) -> None:
    """Spawned processes receive their arguments pickled; name the one that cannot be, before
    any process starts."""
    if STRATEGIES[strategy] != "spawn":
        return
    for name, value in objects.items():
        try:
            pickle.dumps(value)
        except Exception as error:
            raise ValueError(f"strategy={strategy!r} starts processes by spawning and must pickle {name}, "
                             f"which fails ({error}); define it at module level, or use strategy='ddp_fork'"
                             ) from None


@dataclass
class _Settings:
    """Global switches a spawned process would otherwise start without: Pyro's module-local
    parameters and validation flags, torch's default dtype."""

    module_local_params: bool
    validation: tuple[bool, bool, bool]
    default_dtype: torch.dtype

    @classmethod
    def capture(cls) -> _Settings:
        return cls(pyro.settings.get("module_local_params"),
                   (pyro.infer.is_validation_enabled(), pyro.distributions.is_validation_enabled(),
                    poutine.is_validation_enabled()),
                   torch.get_default_dtype())

    def apply(self) -> None:
        pyro.settings.set(module_local_params=self.module_local_params)
        pyro.infer.enable_validation(self.validation[0])
        pyro.distributions.enable_validation(self.validation[1])
        poutine.enable_validation(self.validation[2])
        torch.set_default_dtype(self.default_dtype)


def launch(function: Callable, private: tuple, shared: tuple, *, devices: int, num_nodes: int,
           accelerator: str, strategy: str, find_unused_parameters: bool = False,
           broadcast_buffers: bool = True) -> dict:
    """Run ``function(fabric, *private, *shared)`` on every rank; return what this node's first
    rank returned (a dict of tensors, numbers, strings and lists), loaded on the CPU: rank 0's on
    node 0.

    ``private``: what every rank gets a copy of its own (model, guide, optimizer factory...).
    Spawned processes would receive its tensors in shared memory and update one set of weights in
    turn, so it travels as one ``pickle.dumps`` (which also keeps the objects that refer to each
    other, a factory and the recorder it feeds, tied together). ``shared``: what the ranks only
    read (the data), passed as is: in shared memory when spawned. Forked processes copy both
    on write. ``find_unused_parameters``: some parameter gets no gradient from the loss, which
    DistributedDataParallel must then look for at every step. ``broadcast_buffers``: some buffer
    changes in training (batch-norm statistics), so rank 0's are sent to the others before every
    forward pass (about 3 ms a step on the CPU, measured for a VAE with one constant buffer).
    """
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    start_method = STRATEGIES[strategy]
    if start_method == "spawn":
        private = pickle.dumps(private)
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                    strategy=DDPStrategy(start_method=start_method,
                                         find_unused_parameters=find_unused_parameters,
                                         **_buffer_sync(broadcast_buffers)))
    with _local_main_address(num_nodes), tempfile.TemporaryDirectory(prefix="bayeszoo-") as folder:
        outcome = Path(folder) / "outcome.pt"
        fabric.launch(_run_rank, function, private, shared, _Settings.capture(), outcome)
        return torch.load(outcome, map_location="cpu", weights_only=True)


def _buffer_sync(every_forward: bool) -> dict:
    """DistributedDataParallel's keyword for syncing buffers before every forward pass:
    ``forward_sync_buffers`` from torch 2.14 (``broadcast_buffers`` warns there), before it
    ``broadcast_buffers``. Either way the buffers are synced once at the start."""
    import inspect

    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters:
        return {"forward_sync_buffers": every_forward}
    return {"broadcast_buffers": every_forward}


def _run_rank(fabric, function: Callable, private: tuple | bytes, shared: tuple, settings: _Settings,
              outcome: Path) -> None:
    """A rank's entry: the caller's settings, its own copy of ``private``, the function, and for
    each node's first rank its outcome, saved tensors-only to the file ``outcome`` in the calling
    process's temporary folder. A file, not the return value: Lightning's launcher joins its
    processes before it reads what rank 0 returned through a pipe, so an outcome larger than the
    pipe's buffer (64 KiB, the weights of any real network) would never arrive."""
    settings.apply()
    if isinstance(private, bytes):
        private = pickle.loads(private)
    result = function(fabric, *private, *shared)
    if fabric.local_rank == 0:
        torch.save(result, outcome)


@contextlib.contextmanager
def _local_main_address(num_nodes: int):
    """One machine rendezvouses on 127.0.0.1 whatever MASTER_ADDR says; the free port Fabric picks
    (MASTER_PORT) is forgotten afterwards, so the next run picks a fresh one."""
    saved = {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT")}
    if num_nodes == 1:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Replicas(nn.Module):
    """Model and guide as one module, so DistributedDataParallel, wrapping it, all-reduces the
    gradients of both. A loss computed through ``forward`` (``replicas(loss, *args)`` calls
    ``loss(model, guide, *args)``) arms the all-reduce of the next backward pass."""

    def __init__(self, model: nn.Module, guide: nn.Module):
        super().__init__()
        self.model, self.guide = model, guide

    def forward(self, loss: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        return loss(self.model, self.guide, *args)


def replicate(fabric, model: nn.Module, guide: nn.Module, optimizer: torch.optim.Optimizer):
    """(DistributedDataParallel over ``Replicas(model, guide)``, the optimizer as Fabric wraps it).
    DistributedDataParallel starts every rank from rank 0's weights."""
    return fabric.setup(Replicas(model, guide), optimizer)


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of rank ``rank``'s own random stream in ``epoch``."""
    return _seed(0, seed, epoch, rank)


def shared_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s random numbers that every rank must draw alike."""
    return _seed(1, seed, step, 0)


def _seed(purpose: int, *keys: int) -> int:
    """Independent streams: NumPy's SeedSequence hashes the keys (none is a shifted copy of another)."""
    return int(np.random.SeedSequence([purpose, *keys]).generate_state(1)[0])


@contextlib.contextmanager
def same_on_every_rank(device: torch.device, seed: int):
    """Inside, torch's random numbers (on the CPU and on ``device``) come from a stream seeded by
    ``seed``, so every rank draws the same; outside, each rank's own stream goes on untouched.
    For an optimizer that draws noise (SGLD, SGHMC): a different draw on each rank would pull
    the replicas apart, DistributedDataParallel only averages gradients."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[device.index].manual_seed(seed)
        yield


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) of a few numbers. Fabric's ``all_reduce`` adds a barrier, one round trip
    more, which a per-step loss does without."""
    value = value.detach().clone()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
    return value


def is_main_node() -> bool:
    """Whether this process is on node 0 (``NODE_RANK``, unset on one machine), the node that
    writes a run's files; every node's calling process gets the same outcome."""
    return os.environ.get("NODE_RANK", "0") == "0"


def run_tasks(task: Callable, count: int, *, devices: int = 1, num_nodes: int = 1, accelerator: str = "cpu",
              strategy: str = "ddp", device="cpu") -> list:
    """``[task(i, device, shows_progress) for i in range(count)]``, the tasks spread over devices x
    num_nodes processes: rank r runs tasks r, r + N, r + 2N, ... one after the other on its own
    device. A task returns tensors, numbers, strings and lists (what ``torch.save`` keeps without
    pickling code) and must not depend on which rank runs it: its seed comes from i. One process
    runs them here, on ``device``, without Fabric. Only the first rank shows progress bars."""
    world = check_devices(devices, num_nodes, accelerator, strategy, device)
    if world == 1:
        return [task(index, torch.device(device), True) for index in range(count)]
    check_picklable(strategy, {"task": task})
    outcome = launch(_rank_tasks, (task, count), (), devices=devices, num_nodes=num_nodes,
                     accelerator=resolve_accelerator(accelerator, devices), strategy=strategy)
    return outcome["results"]


def _rank_tasks(fabric, task: Callable, count: int) -> dict:
    """A rank's share of ``run_tasks``, gathered from every rank into task order."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    rank, world = fabric.global_rank, fabric.world_size
    mine = [(index, task(index, fabric.device, rank == 0)) for index in range(rank, count, world)]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, move_data_to_device(mine, "cpu"))
    done = sorted((pair for part in gathered for pair in part), key=lambda pair: pair[0])
    return {"results": [result for _, result in done]}


def slice_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous slice of ``size`` items; the first size % world slices
    have one item more (as ``torch.tensor_split`` cuts)."""
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)
