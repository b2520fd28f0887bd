"""One training loop for every SVI method in bayeszoo.

``fit`` minimizes the negative ELBO of a model/guide pair over minibatches with a
plain torch optimizer (``adam``, torch's fused Adam, by default) on ``model.parameters()`` and
``guide.parameters()``. It validates the data before training, anneals the KL
term if asked, computes the validation ELBO every epoch, stops early, shows a
progress bar, writes a tensors-only checkpoint every epoch, resumes from it to
exactly the result of an uninterrupted run, and stops with the step number when
the loss turns NaN or infinite (the last good checkpoint is kept).

All numbers it reports are per data point: ``elbo`` is the ELBO of one
observation averaged over the set, in nats.

``fit(devices=N)`` (and ``num_nodes``) runs the same loop on N processes, each on a slice of
every global batch, with the gradients all-reduced through Lightning Fabric; the steps follow the
one-process gradient of the global batch (``inference/distributed.py``). One process, the
default, never starts Fabric.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from pyro.poutine.messenger import Messenger
from tqdm import tqdm

from bayeszoo.inference.data import check_batch
from bayeszoo.inference.distributed import (
    check_devices,
    check_picklable,
    launch,
    rank_seed,
    replicate,
    resolve_accelerator,
    same_on_every_rank,
    shared_seed,
    slice_bounds,
    sum_over_ranks,
)

CHECKPOINT = "checkpoint.pt"
FINAL_WEIGHTS = "weights.pt"
#: One INFO record per epoch ("epoch 3: train ELBO ..."), progress bar or not; the library adds no
#: handler, so they show where the caller's logging sends them (the bayeszoo command: stderr).
LOG = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped at ``step``."""

    def __init__(self, step: int, epoch: int, value: float, checkpoint: Path | None):
        kept = f"; the last good checkpoint is {checkpoint}" if checkpoint else ""
        super().__init__(f"loss became {value} at step {step} (epoch {epoch + 1}){kept}")
        self.step, self.epoch, self.value, self.checkpoint = step, epoch, value, checkpoint


class scale_latents(Messenger):
    """Multiply the log density of every latent (unobserved) sample site by ``beta``.

    Applied around both model and guide, the ELBO becomes
    E_q[log p(x | z)] - beta * KL(q(z | x) || p(z)): the KL annealing ("warm-up")
    of Bowman et al. (2016) and Sønderby et al. (2016), for any model.
    """

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = self.beta * msg["scale"]


class scale_global_sites(Messenger):
    """Multiply the log density of every global sample site (one outside all of the model's
    plates: the weights of a Bayesian neural network) by ``factor``.

    With ``factor = batch size / N`` the minibatch losses of one epoch sum to the negative ELBO
    of the whole training set: each minibatch carries its share of log p(w) - log q(w) next to
    its own data terms. Vectorized particle plates sit outside the model's ``plate_nesting``
    dimensions and do not count. Latent-variable models have no global sites: a no-op there.
    """

    def __init__(self, factor: float, plate_nesting: int):
        super().__init__()
        self.factor, self.plate_nesting = factor, plate_nesting

    def _process_message(self, msg):
        if msg["type"] == "sample" and not any(
                frame.vectorized and frame.dim >= -self.plate_nesting for frame in msg["cond_indep_stack"]):
            msg["scale"] = self.factor * msg["scale"]


@dataclass
class FitResult:
    """What ``fit`` did: one history row per epoch and why it stopped."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False
    run_dir: Path | None = None

    @property
    def best_valid_elbo(self) -> float | None:
        return self.history[self.best_epoch].get("valid_elbo") if self.history else None


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (pyro.set_rng_seed does all three)."""
    pyro.set_rng_seed(seed)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _size(data: dict) -> int:
    return len(next(iter(data.values())))


def _first(data: dict, size: int = 1) -> dict:
    return {k: v[:size] for k, v in data.items()}


def _minibatches(data: dict, batch_size: int, generator: torch.Generator | None):
    size = _size(data)
    order = torch.randperm(size, generator=generator) if generator is not None else torch.arange(size)
    for start in range(0, size, batch_size):
        index = order[start:start + batch_size]
        yield {k: v[index] for k, v in data.items()}


def _epoch_batches(size: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """An epoch's global minibatches: consecutive index tensors of one seeded permutation, drawn
    here, in the training process, before any of the epoch's batches is transformed."""
    return list(torch.randperm(size, generator=generator).split(batch_size))


class _Rows(torch.utils.data.Dataset):
    """A dict of tensors sharing their first dimension as a map-style dataset. ``__getitems__``
    takes a whole minibatch's indices: one indexing op per tensor, not one per example."""

    def __init__(self, data: dict):
        self.data = data

    def __len__(self) -> int:
        return _size(self.data)

    def __getitem__(self, index) -> dict:
        return {k: v[index] for k, v in self.data.items()}

    def __getitems__(self, index: list[int]) -> dict:
        return self[index]


def _as_loaded(batch: dict) -> dict:
    """The DataLoader's collate: ``_Rows`` already returns the minibatch as a dict."""
    return batch


class _Plan:
    """The DataLoader's batch sampler: the minibatches' indices it was last given, in order. The loop
    hands it each epoch's batches before iterating, so the loader follows the seeded permutation
    drawn in the training process and never draws random numbers of its own."""

    def __init__(self):
        self.indices: list[list[int]] = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _BatchLoader:
    """Training minibatches ``{k: v[index]}`` for a list of index tensors, in order.

    ``num_workers = 0``: indexed here (a DataLoader without workers measured 50-60 us more a batch
    of 100: 79 against 27 us on digits, 301 against 244 us on mnist5k). ``num_workers > 0``: a
    ``torch.utils.data.DataLoader`` whose worker processes (persistent across epochs) index ahead
    of the loop, with pinned memory when training on CUDA. Batch transforms stay with the caller
    (in the training process), so the numbers do not depend on ``num_workers``. A context manager:
    leaving it stops the workers."""

    def __init__(self, data: dict, num_workers: int, device):
        self.data, self.plan, self.loader = data, _Plan(), None
        if num_workers > 0:
            # A private generator for the DataLoader's worker seeds: drawn from torch's global
            # stream, they would shift the model's and guide's random draws.
            self.loader = torch.utils.data.DataLoader(
                _Rows(data), batch_sampler=self.plan, collate_fn=_as_loaded, num_workers=num_workers,
                persistent_workers=True, pin_memory=torch.device(device).type == "cuda",
                generator=torch.Generator().manual_seed(0))

    def __call__(self, indices: list[torch.Tensor]):
        if self.loader is None:
            return ({k: v[index] for k, v in self.data.items()} for index in indices)
        # Lists of ints travel to the workers pickled; tensors would each take a shared-memory
        # segment (measured: an mnist5k epoch's batches in 174 ms against 384 ms, 2 workers).
        self.plan.indices = [index.tolist() for index in indices]
        return iter(self.loader)

    def __enter__(self) -> _BatchLoader:
        return self

    def __exit__(self, *exc) -> None:
        iterator, self.loader = getattr(self.loader, "_iterator", None), None
        if iterator is not None:
            iterator._shutdown_workers()  # now, not whenever the garbage collector gets to it


def _check_workers(num_workers) -> None:
    if not (isinstance(num_workers, int) and num_workers >= 0):
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")


def max_plate_nesting(model, guide, batch: dict) -> int:
    """How many batch dimensions the model's and guide's plates use (one trace of each)."""
    guide_trace = poutine.trace(guide).get_trace(**batch)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
    dims = [frame.dim for trace in (guide_trace, model_trace) for site in trace.nodes.values()
            if site["type"] == "sample" for frame in site["cond_indep_stack"] if frame.vectorized]
    return -min(dims, default=0)


def kl_weight(epoch: int, anneal_epochs: int, start: float = 0.0) -> float:
    """Linear warm-up of the KL weight from ``start`` to 1 over ``anneal_epochs`` epochs."""
    if anneal_epochs <= 0:
        return 1.0
    return min(1.0, start + (1.0 - start) * epoch / anneal_epochs)


@torch.no_grad()
def evaluate_elbo(model, guide, data: dict, batch_size: int = 500, num_particles: int = 1,
                  device="cpu", num_data: int | None = None, elbo: type[ELBO] = Trace_ELBO) -> float:
    """Mean per-point ELBO of ``data`` (a dict of model inputs), in nats.

    ``num_data``: the training-set size, for models with global sites (Bayesian neural
    networks): each point then carries 1/num_data of log p(w) - log q(w), as in training.
    ``elbo``: the estimator class, as in ``fit``.
    """
    nesting = max_plate_nesting(model, guide, _to(_first(data), device))
    objective = _elbo(elbo, num_particles, nesting)
    was_training = (model.training, guide.training)
    model.eval(), guide.eval()
    total, count = 0.0, 0
    try:
        for batch in _minibatches(data, batch_size, None):
            batch = _to(batch, device)
            with scale_global_sites(_size(batch) / (num_data or _size(batch)), nesting):
                total -= objective.loss(model, guide, **batch)
            count += _size(batch)
    finally:
        model.train(was_training[0]), guide.train(was_training[1])
    return total / count


def _elbo(estimator: type[ELBO], num_particles: int, plate_nesting: int) -> ELBO:
    return estimator(num_particles=num_particles, vectorize_particles=num_particles > 1,
                      max_plate_nesting=plate_nesting)


def save_atomically(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: an interruption never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _checkpoint_state(model, guide, optimizer, schedule, generator, epoch, result, bad_epochs,
                      best_state, extras: Mapping[str, Stateful]):
    return {
        "model": model.state_dict(),
        "guide": guide.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "data_rng": generator.get_state(),
        "epoch": epoch,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "bad_epochs": bad_epochs,
        "best_model": best_state[0],
        "best_guide": best_state[1],
        "extras": {name: extra.state_dict() for name, extra in extras.items()},
    }


def load_weights(path: str | os.PathLike, model, guide) -> None:
    """Load model and guide weights written by ``fit`` (tensors only, never unpickled objects)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    guide.load_state_dict(state["guide"])


def adam(params, lr: float) -> torch.optim.Optimizer:
    """``fit``'s default optimizer: torch's Adam with its fused kernel, the same update in one pass
    over each parameter tensor instead of about ten elementwise ops (2-4x faster a step on the
    CPU, where torch otherwise loops over the tensors; it is also torch's fastest Adam on CUDA)."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def _parameters(model, guide) -> list[torch.nn.Parameter]:
    seen, params = set(), []
    for p in [*model.parameters(), *guide.parameters()]:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def fit(model, guide, train: dict, valid: dict | None = None, *,
        epochs: int = 10, batch_size: int = 100, lr: float = 1e-3,
        optimizer: Callable[..., torch.optim.Optimizer] = adam,
        lr_decay: float = 1.0, num_particles: int = 1, elbo: type[ELBO] = Trace_ELBO,
        kl_anneal_epochs: int = 0, kl_anneal_start: float = 0.0,
        patience: int | None = None, clip_norm: float | None = None, seed: int = 0, device: str = "cpu",
        run_dir: str | os.PathLike | None = None, resume: bool = False,
        batch_transform: Callable[[dict, torch.Generator], dict] | None = None,
        checkpoint_extras: Mapping[str, Stateful] | None = None,
        x_dim: int | None = None, progress: bool = True,
        devices: int = 1, accelerator: str = "cpu", num_nodes: int = 1, strategy: str = "ddp",
        num_workers: int = 0) -> FitResult:
    """Fit a model/guide pair by stochastic variational inference.

    Args:
        model, guide: callables with the same signature; ``train`` and ``valid`` are
            dicts of their keyword inputs (e.g. ``{"x": images}``), tensors sharing
            the first dimension.
        epochs: total number of epochs (a resumed run continues up to this number).
        lr_decay: the learning rate is multiplied by this after every epoch.
        num_particles: ELBO samples per data point (vectorized).
        elbo: the ELBO estimator class. ``Trace_ELBO`` estimates log p(z) - log q(z) at the
            sample; ``TraceMeanField_ELBO`` uses the closed-form KL(q || p) wherever one is
            registered (a mean-field Gaussian guide against a Gaussian prior): the same ELBO.
        kl_anneal_epochs: if > 0, the KL weight grows linearly from ``kl_anneal_start``
            to 1 over this many epochs.
        patience: stop when the validation ELBO has not improved for this many epochs;
            the weights of the best epoch are restored at the end.
        clip_norm: if given, the gradient of every step is rescaled to at most this total
            norm (``torch.nn.utils.clip_grad_norm_``), against rare spikes that throw training
            back by many epochs.
        run_dir: where ``checkpoint.pt`` (every epoch) and ``weights.pt`` (final) go.
        resume: continue from ``run_dir/checkpoint.pt``.
        batch_transform: applied to every training minibatch with the data generator,
            e.g. dynamic binarization. It runs in the training process, whatever ``num_workers``.
        checkpoint_extras: objects that watch training from the optimizer's hooks (a sampler's
            recorder, a weight tracker), by name: their ``state_dict()`` goes into every
            checkpoint and ``load_state_dict`` restores it on resume, so they resume too.
        x_dim: expected size of the last dimension of ``x``, checked before training.
        devices, num_nodes: train data-parallel on devices x num_nodes processes (Lightning
            Fabric, ``inference/distributed.py``): ``batch_size`` is then the global batch, shared
            out among the processes, and the steps follow the one-process gradient of that batch.
            With one process (the default) training runs here, on ``device``, without Fabric.
        accelerator: "cpu", or "gpu" (= "cuda": one GPU a process, ``device`` unused) for several
            processes; "auto": the GPUs if there are enough, else the CPU.
        strategy: "ddp" (processes spawned: model, guide and callables must pickle) or "ddp_fork".
        num_workers: if > 0, a ``torch.utils.data.DataLoader`` with this many worker processes
            (per training process, kept across epochs) gathers the training minibatches ahead of
            the steps, into pinned memory when training on CUDA; the minibatches, and so every
            number, are those of ``num_workers=0``, which indexes in the training process. It pays
            where gathering a batch is slow next to a step (large images, a GPU doing the steps);
            for small tensors in memory on a CPU the workers only add inter-process traffic.
    """
    _check_inputs(train, valid, x_dim, epochs, batch_size, clip_norm)
    _check_workers(num_workers)
    world = check_devices(devices, num_nodes, accelerator, strategy, device)
    job = _Job(model, guide, train, valid, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
               lr_decay=lr_decay, num_particles=num_particles, elbo=elbo, kl_anneal_epochs=kl_anneal_epochs,
               kl_anneal_start=kl_anneal_start, patience=patience, clip_norm=clip_norm, seed=seed,
               run_dir=Path(run_dir) if run_dir is not None else None, resume=resume,
               batch_transform=batch_transform, checkpoint_extras=checkpoint_extras or {}, progress=progress,
               num_workers=num_workers)
    if world > 1:
        check_picklable(strategy, {"model": model, "guide": guide, "optimizer": optimizer, "elbo": elbo,
                                   "batch_transform": batch_transform,
                                   "checkpoint_extras": checkpoint_extras})
    if resume and (job.checkpoint_path is None or not job.checkpoint_path.exists()):
        raise FileNotFoundError(f"cannot resume: no checkpoint at {job.checkpoint_path}")
    if job.run_dir is not None:
        job.run_dir.mkdir(parents=True, exist_ok=True)
    if world > 1:
        return _fit_on_ranks(job, devices=devices, num_nodes=num_nodes,
                             accelerator=resolve_accelerator(accelerator, devices), strategy=strategy)
    return _train(job, device)


@dataclass
class _Job:
    """What ``fit`` was asked to do, as one process, or each rank of several, receives it."""

    model: torch.nn.Module
    guide: torch.nn.Module
    train: dict
    valid: dict | None
    epochs: int
    batch_size: int
    lr: float
    optimizer: Callable[..., torch.optim.Optimizer]
    lr_decay: float
    num_particles: int
    elbo: type[ELBO]
    kl_anneal_epochs: int
    kl_anneal_start: float
    patience: int | None
    clip_norm: float | None
    seed: int
    run_dir: Path | None
    resume: bool
    batch_transform: Callable[[dict, torch.Generator], dict] | None
    checkpoint_extras: Mapping[str, Stateful]
    progress: bool
    num_workers: int = 0

    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT if self.run_dir is not None else None


def _train(job: _Job, device, ranks: _Ranks | None = None) -> FitResult:
    with _BatchLoader(job.train, job.num_workers, device) as loader:
        return _train_with(job, device, ranks, loader)


def _train_with(job: _Job, device, ranks: _Ranks | None, loader: _BatchLoader) -> FitResult:
    """The loop over epochs, in this process (``ranks=None``) or on one rank of several, where
    ``ranks`` trains, validates and decides to stop together with the others, and rank 0 alone
    writes; the training minibatches come from ``loader``."""
    model, guide, extras, checkpoint_path = job.model, job.guide, job.checkpoint_extras, job.checkpoint_path
    writes = ranks is None or ranks.rank == 0
    set_seed(job.seed)
    generator = torch.Generator().manual_seed(job.seed)
    model.to(device), guide.to(device)
    model.train(), guide.train()
    nesting = _setup_trace(model, guide, job.train, job.batch_size, job.batch_transform, job.seed, device)
    objective = _elbo(job.elbo, job.num_particles, nesting)
    params = _parameters(model, guide)
    opt = job.optimizer(params, lr=job.lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=job.lr_decay)
    initial = (model.state_dict(), guide.state_dict())
    progress_so_far = _Progress(FitResult(run_dir=job.run_dir), best_state=initial)
    if job.resume:
        progress_so_far = _restore(checkpoint_path, device, model, guide, opt, schedule, generator, extras,
                                   job.run_dir)
    else:
        set_seed(job.seed)  # the setup trace must not shift the random stream
    if ranks is not None:
        ranks.setup(model, guide, opt, objective, nesting)
    result = progress_so_far.result

    num_train = _size(job.train)
    for epoch in range(progress_so_far.start_epoch, job.epochs):
        beta = kl_weight(epoch, job.kl_anneal_epochs, job.kl_anneal_start)
        started = time.perf_counter()
        if ranks is None:
            total = _train_epoch(objective, model, guide, opt, params, loader, job.batch_size, generator,
                                 job.batch_transform, beta, nesting, job.clip_norm, device, epoch, job.epochs,
                                 checkpoint_path, job.progress)
        else:
            total = ranks.train_epoch(job, params, loader, generator, beta, epoch)
        schedule.step()
        row = {"epoch": epoch + 1, "train_elbo": -total / num_train, "kl_weight": beta,
               "seconds": time.perf_counter() - started}
        if job.valid is not None:
            score = evaluate_elbo if ranks is None else ranks.evaluate_elbo
            row["valid_elbo"] = score(model, guide, job.valid, device=device, num_data=num_train,
                                      num_particles=job.num_particles, elbo=job.elbo)
        progress_so_far.record(row, model, guide)
        if writes:
            LOG.info(_describe(row))
        if checkpoint_path is not None and writes:
            save_atomically(_checkpoint_state(model, guide, opt, schedule, generator, epoch, result,
                                               progress_so_far.bad_epochs, progress_so_far.best_state,
                                               extras), checkpoint_path)
        stop = job.patience is not None and progress_so_far.bad_epochs >= job.patience
        if ranks is not None:
            stop = ranks.agree(stop)
        if stop:
            result.stopped_early = True
            break

    if job.patience is not None:
        best_model, best_guide = progress_so_far.best_state
        model.load_state_dict(best_model), guide.load_state_dict(best_guide)
    if job.run_dir is not None and writes:
        save_atomically({"model": model.state_dict(), "guide": guide.state_dict()},
                        job.run_dir / FINAL_WEIGHTS)
    model.eval(), guide.eval()
    return result


def _check_inputs(train, valid, x_dim, epochs, batch_size, clip_norm) -> None:
    """Bad data or settings, reported before anything is built or written."""
    for name, data in (("train", train), ("valid", valid)):
        if data is not None:
            try:
                check_batch(data, x_dim)
            except ValueError as error:
                raise ValueError(f"{name} data: {error}") from None
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")


def _setup_trace(model, guide, train: dict, batch_size: int, batch_transform, seed: int, device) -> int:
    """One trace of model and guide on a first minibatch, with Pyro's validation on: it creates
    any parameters a guide makes lazily (AutoGuides) before the optimizer sees them, catches shape
    and support errors, and returns the plates' batch dimensions."""
    first = _first(train, batch_size)
    if batch_transform is not None:
        first = batch_transform(first, torch.Generator().manual_seed(seed))
    return max_plate_nesting(model, guide, _to(first, device))


@dataclass
class _Progress:
    """Where training stands: the result so far, the epoch to start at, epochs without
    improvement and the best weights (restored at the end under early stopping)."""

    result: FitResult
    best_state: tuple[dict, dict]
    start_epoch: int = 0
    bad_epochs: int = 0

    def record(self, row: dict, model, guide) -> None:
        history = self.result.history
        history.append(row)
        if self.result.best_epoch < 0 or _score(row) > _score(history[self.result.best_epoch]):
            self.result.best_epoch, self.bad_epochs = len(history) - 1, 0
            self.best_state = (_clone(model.state_dict()), _clone(guide.state_dict()))
        else:
            self.bad_epochs += 1


def _restore(checkpoint_path: Path, device, model, guide, opt, schedule, generator, extras,
             run_dir) -> _Progress:
    """Load a checkpoint into everything that carries state: weights, optimizer, schedule, both
    random streams and the extras; the resumed run continues exactly as if never stopped."""
    state = torch.load(checkpoint_path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"]), guide.load_state_dict(state["guide"])
    opt.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"].cpu())
    generator.set_state(state["data_rng"].cpu())
    for name, extra in extras.items():
        extra.load_state_dict(state["extras"][name])
    result = FitResult(history=list(state["history"]), best_epoch=state["best_epoch"], run_dir=run_dir)
    best_state = (state["best_model"], state["best_guide"])
    return _Progress(result, best_state, state["epoch"] + 1, state["bad_epochs"])


def _train_epoch(objective, model, guide, opt, params, loader, batch_size, generator, batch_transform, beta,
                 nesting, clip_norm, device, epoch, epochs, checkpoint_path, progress) -> float:
    """One pass over the shuffled training set; returns the summed loss."""
    num_train = _size(loader.data)
    steps_per_epoch = math.ceil(num_train / batch_size)
    total = 0.0
    bar = tqdm(loader(_epoch_batches(num_train, batch_size, generator)), total=steps_per_epoch,
               desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
    # The setup trace ran with Pyro's validation on and caught shape and support errors;
    # switching it off here saves ~15% per step. A NaN then surfaces as a NaN loss.
    with pyro.validation_enabled(False):
        for step_in_epoch, batch in enumerate(bar):
            if batch_transform is not None:
                batch = batch_transform(batch, generator)
            batch = _to(batch, device)
            loss = _step_loss(objective, model, guide, batch, beta, _size(batch) / num_train, nesting)
            value = loss.item()
            if not math.isfinite(value):
                step = epoch * steps_per_epoch + step_in_epoch + 1
                kept = checkpoint_path if checkpoint_path and checkpoint_path.exists() else None
                raise NonFiniteLossError(step, epoch, value, kept)
            opt.zero_grad()
            loss.backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
            opt.step()
            total += value
            if progress:
                bar.set_postfix(loss=f"{value / _size(batch):.2f}")
    return total


def _step_loss(objective: ELBO, model, guide, batch: dict, beta: float, share: float,
               plate_nesting: int) -> torch.Tensor:
    """The (annealed) negative ELBO of a minibatch; global sites count with the batch's share."""
    with scale_global_sites(share, plate_nesting), scale_latents(beta):
        return objective.differentiable_loss(model, guide, **batch)


def _score(row: dict) -> float:
    """Early stopping watches the validation ELBO, or the training ELBO without validation data."""
    return row.get("valid_elbo", row["train_elbo"])


def _clone(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def _describe(row: dict) -> str:
    text = f"epoch {row['epoch']}: train ELBO {row['train_elbo']:.2f}"
    if "valid_elbo" in row:
        text += f", valid ELBO {row['valid_elbo']:.2f}"
    return text + f" nats/point ({row['seconds']:.1f} s)"


# ----------------------------------------------------------------------------------------------
# Several processes: fit(devices=N) trains one replica a rank (inference/distributed.py has the
# equations); the loop over epochs is _train's, the steps and the validation are _Ranks'.


class zero_local_sites(Messenger):
    """Scale the log density of every local site (inside one of the model's plates) by 0: a rank
    with no examples of its own in a batch runs one example that counts for its share of the
    global sites only. A zero scale rather than a mask keeps every parameter in the graph, which
    the gradient all-reduce needs."""

    def __init__(self, plate_nesting: int):
        super().__init__()
        self.plate_nesting = plate_nesting

    def _process_message(self, msg):
        if msg["type"] == "sample" and any(
                frame.vectorized and frame.dim >= -self.plate_nesting for frame in msg["cond_indep_stack"]):
            msg["scale"] = 0.0 * msg["scale"]


def _fit_on_ranks(job: _Job, **processes) -> FitResult:
    """Train on devices x num_nodes processes; model, guide and extras here load rank 0's final
    state, and this process's random stream continues from rank 0's."""
    unused = _some_parameter_unused(job)
    data = (job.train, job.valid)
    job.train = job.valid = None  # they travel apart, shared
    try:
        outcome = launch(_rank_main, (job,), data, find_unused_parameters=unused,
                         broadcast_buffers=_buffers_change(job), **processes)
    finally:
        job.train, job.valid = data
    job.model.load_state_dict(outcome["model"]), job.guide.load_state_dict(outcome["guide"])
    for name, extra in job.checkpoint_extras.items():
        extra.load_state_dict(outcome["extras"][name])
    torch.set_rng_state(outcome["torch_rng"])
    if outcome["error"] is not None:
        error = outcome["error"]
        kept = Path(error["checkpoint"]) if error["checkpoint"] else None
        raise NonFiniteLossError(error["step"], error["epoch"], error["value"], kept)
    job.model.eval(), job.guide.eval()
    return FitResult(history=outcome["history"], best_epoch=outcome["best_epoch"],
                     stopped_early=outcome["stopped_early"], run_dir=job.run_dir)


def _buffers_change(job: _Job) -> bool:
    """Whether model or guide hold buffers that training changes: batch normalization's running
    statistics (the buffers of bayeszoo's own modules are constants: masks, anchors, fitted
    posteriors), which the ranks must then share."""
    from torch.nn.modules.batchnorm import _NormBase

    return any(isinstance(module, _NormBase) and module.track_running_stats
               for part in (job.model, job.guide) for module in part.modules())


def _some_parameter_unused(job: _Job) -> bool:
    """The setup trace and one loss here, before any process starts: errors in model or guide show
    as with one process, lazily made parameters exist before the job is sent, and a parameter
    the loss leaves without gradient tells DistributedDataParallel to look for such at every step."""
    set_seed(job.seed)
    device = next(iter(_parameters(job.model, job.guide)), torch.empty(0)).device
    nesting = _setup_trace(job.model, job.guide, job.train, job.batch_size, job.batch_transform, job.seed,
                           device)
    first = _first(job.train, job.batch_size)
    if job.batch_transform is not None:
        first = job.batch_transform(first, torch.Generator().manual_seed(job.seed))
    params = _parameters(job.model, job.guide)
    loss = _elbo(job.elbo, job.num_particles, nesting).differentiable_loss(job.model, job.guide,
                                                                          **_to(first, device))
    return any(grad is None for grad in torch.autograd.grad(loss, params, allow_unused=True))


def _rank_main(fabric, job: _Job, train: dict, valid: dict | None) -> dict:
    """One rank's run, in a process ``distributed.launch`` started; the outcome of a node's first
    rank is what the node's calling process receives (tensors, numbers and strings only): the
    weights and the history are the same on every rank."""
    job.train, job.valid = train, valid
    result, error = None, None
    try:
        result = _train(job, fabric.device, _Ranks(fabric))
    except NonFiniteLossError as stopped:
        error = {"step": stopped.step, "epoch": stopped.epoch, "value": stopped.value,
                 "checkpoint": str(stopped.checkpoint) if stopped.checkpoint else None}
    return {"model": _cpu(job.model.state_dict()), "guide": _cpu(job.guide.state_dict()),
            "extras": {name: extra.state_dict() for name, extra in job.checkpoint_extras.items()},
            "torch_rng": torch.get_rng_state(), "error": error,
            "history": result.history if result else [], "best_epoch": result.best_epoch if result else -1,
            "stopped_early": result.stopped_early if result else False}


def _cpu(state: dict) -> dict:
    return {k: v.cpu() for k, v in _clone(state).items()}


def _rank_loss(model, guide, objective: ELBO, batch: dict, beta: float, share: float, plate_nesting: int,
               has_examples: bool) -> torch.Tensor:
    """v_r: the rank's slice of the global batch with the global sites' share B / (N N_train)."""
    local = contextlib.nullcontext() if has_examples else zero_local_sites(plate_nesting)
    with local:
        return _step_loss(objective, model, guide, batch, beta, share, plate_nesting)


class _Ranks:
    """One rank's part of the loop: its slice of every global batch, its own random stream each
    epoch, losses and validation sums added over the ranks, rank 0's decision to stop."""

    def __init__(self, fabric):
        self.fabric, self.rank, self.world = fabric, fabric.global_rank, fabric.world_size
        self.device = fabric.device

    def setup(self, model, guide, optimizer, objective: ELBO, plate_nesting: int) -> None:
        self.replicas, self.optimizer = replicate(self.fabric, model, guide, optimizer)
        self.objective, self.plate_nesting = objective, plate_nesting

    def train_epoch(self, job: _Job, params, loader: _BatchLoader, generator: torch.Generator, beta: float,
                    epoch: int) -> float:
        """One pass over the shuffled training set; returns the loss summed over the ranks (one
        process's total). Every rank draws its own noise, from a stream seeded by (seed, epoch,
        rank): the N draws of a BNN's weights in a step are independent, and a resumed run needs
        no per-rank random state from the checkpoint. The optimizer's step draws alike on every
        rank (seeded by the step's number), so the replicas stay equal."""
        pyro.set_rng_seed(rank_seed(job.seed, epoch, self.rank))
        num_train = _size(job.train)
        steps_per_epoch = math.ceil(num_train / job.batch_size)
        batches = _epoch_batches(num_train, job.batch_size, generator)
        parts = [self._part(index, job.batch_transform is not None) for index in batches]
        loaded = loader([load for load, _, _ in parts])
        shows, total = job.progress and self.rank == 0, 0.0
        bar = tqdm(zip(batches, parts, loaded, strict=True), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{job.epochs}", disable=not shows, leave=False)
        with pyro.validation_enabled(False):
            for step_in_epoch, (index, (_, keep, has_examples), batch) in enumerate(bar):
                if job.batch_transform is not None:
                    batch = job.batch_transform(batch, generator)
                    batch = {k: v[keep] for k, v in batch.items()}
                value = self.replicas(_rank_loss, self.objective, _to(batch, self.device), beta,
                                      len(index) / (num_train * self.world), self.plate_nesting, has_examples)
                summed = sum_over_ranks(value).item()  # a NaN on any rank stops every rank here
                if not math.isfinite(summed):
                    checkpoint = job.checkpoint_path
                    kept = checkpoint if checkpoint and checkpoint.exists() else None
                    raise NonFiniteLossError(epoch * steps_per_epoch + step_in_epoch + 1, epoch, summed, kept)
                self.optimizer.zero_grad()
                self.fabric.backward(self.world * value)  # DDP averages: N v_r, mean over r = sum
                if job.clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, job.clip_norm)
                step = epoch * steps_per_epoch + step_in_epoch
                with same_on_every_rank(self.device, shared_seed(job.seed, step)):
                    self.optimizer.step()
                total += summed
                if shows:
                    bar.set_postfix(loss=f"{summed / len(index):.2f}")
        return total

    def _part(self, index: torch.Tensor, transforms: bool) -> tuple[torch.Tensor, slice | None, bool]:
        """(the rows of the global batch ``index`` this rank loads, the slice of them it keeps after
        the batch transform, whether it has examples). The rank's part is its contiguous slice
        (if empty, the batch's first example, weighed by 0). A ``batch_transform`` sees the whole
        global batch on every rank: it advances the data generator as one process does."""
        start, stop = slice_bounds(len(index), self.rank, self.world)
        has_examples = stop > start
        if not has_examples:
            start, stop = 0, 1
        if transforms:
            return index, slice(start, stop), has_examples
        return index[start:stop], None, has_examples

    def evaluate_elbo(self, model, guide, data: dict, **options) -> float:
        """The validation ELBO per point: every rank scores its contiguous slice, the sums are added."""
        size = _size(data)
        start, stop = slice_bounds(size, self.rank, self.world)
        total = 0.0
        if stop > start:
            total = (stop - start) * evaluate_elbo(model, guide, {k: v[start:stop] for k, v in data.items()},
                                                   **options)
        return sum_over_ranks(torch.tensor(total, dtype=torch.float64, device=self.device)).item() / size

    def agree(self, stop: bool) -> bool:
        return self.fabric.broadcast(stop, src=0)
