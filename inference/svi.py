"""One training loop for every SVI method in bayeszoo.

``fit`` minimizes the negative ELBO of a model/guide pair over minibatches with a
plain torch optimizer (Adam by default) on ``model.parameters()`` and
``guide.parameters()``. It validates the data before training, anneals the KL
term if asked, computes the validation ELBO every epoch, stops early, shows a
progress bar, writes a tensors-only checkpoint every epoch, resumes from it to
exactly the result of an uninterrupted run, and stops with the step number when
the loss turns NaN or infinite (the last good checkpoint is kept).

All numbers it reports are per data point: ``elbo`` is the ELBO of one
observation averaged over the set, in nats.
"""

from __future__ import annotations

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

CHECKPOINT = "checkpoint.pt"
FINAL_WEIGHTS = "weights.pt"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped at ``step``."""

    def __init__(self, step: int, epoch: int, value: float, checkpoint: Path | None):
        kept = f"; the last good checkpoint is {checkpoint}" if checkpoint else ""
        super().__init__(f"loss became {value} at step {step} (epoch {epoch + 1}){kept}")
        self.step, self.epoch = step, epoch


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


def _parameters(model, guide) -> list[torch.nn.Parameter]:
    seen, params = set(), []
    for p in [*model.parameters(), *guide.parameters()]:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def fit(model, guide, train: dict, valid: dict | None = None, *,
        epochs: int = 10, batch_size: int = 100, lr: float = 1e-3,
        optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
        lr_decay: float = 1.0, num_particles: int = 1, elbo: type[ELBO] = Trace_ELBO,
        kl_anneal_epochs: int = 0, kl_anneal_start: float = 0.0,
        patience: int | None = None, clip_norm: float | None = None, seed: int = 0, device: str = "cpu",
        run_dir: str | os.PathLike | None = None, resume: bool = False,
        batch_transform: Callable[[dict, torch.Generator], dict] | None = None,
        checkpoint_extras: Mapping[str, Stateful] | None = None,
        x_dim: int | None = None, progress: bool = True) -> FitResult:
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
            e.g. dynamic binarization.
        checkpoint_extras: objects that watch training from the optimizer's hooks (a sampler's
            recorder, a weight tracker), by name: their ``state_dict()`` goes into every
            checkpoint and ``load_state_dict`` restores it on resume, so they resume too.
        x_dim: expected size of the last dimension of ``x``, checked before training.
    """
    _check_inputs(train, valid, x_dim, epochs, batch_size, clip_norm)
    run_dir = Path(run_dir) if run_dir is not None else None
    checkpoint_path = run_dir / CHECKPOINT if run_dir is not None else None
    if resume and (checkpoint_path is None or not checkpoint_path.exists()):
        raise FileNotFoundError(f"cannot resume: no checkpoint at {checkpoint_path}")
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)

    set_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device), guide.to(device)
    model.train(), guide.train()
    nesting = _setup_trace(model, guide, train, batch_size, batch_transform, seed, device)
    objective = _elbo(elbo, num_particles, nesting)
    params = _parameters(model, guide)
    opt = optimizer(params, lr=lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=lr_decay)
    initial = (model.state_dict(), guide.state_dict())
    progress_so_far = _Progress(FitResult(run_dir=run_dir), best_state=initial)
    if resume:
        progress_so_far = _restore(checkpoint_path, device, model, guide, opt, schedule, generator,
                                   checkpoint_extras or {}, run_dir)
    else:
        set_seed(seed)  # the setup trace must not shift the random stream
    result = progress_so_far.result

    num_train = _size(train)
    for epoch in range(progress_so_far.start_epoch, epochs):
        beta = kl_weight(epoch, kl_anneal_epochs, kl_anneal_start)
        started = time.perf_counter()
        total = _train_epoch(objective, model, guide, opt, params, train, batch_size, generator,
                             batch_transform, beta, nesting, clip_norm, device, epoch, epochs,
                             checkpoint_path, progress)
        schedule.step()
        row = {"epoch": epoch + 1, "train_elbo": -total / num_train, "kl_weight": beta,
               "seconds": time.perf_counter() - started}
        if valid is not None:
            row["valid_elbo"] = evaluate_elbo(model, guide, valid, device=device, num_data=num_train,
                                              num_particles=num_particles, elbo=elbo)
        progress_so_far.record(row, model, guide)
        if progress:
            tqdm.write(_describe(row))
        if checkpoint_path is not None:
            save_atomically(_checkpoint_state(model, guide, opt, schedule, generator, epoch, result,
                                               progress_so_far.bad_epochs, progress_so_far.best_state,
                                               checkpoint_extras or {}), checkpoint_path)
        if patience is not None and progress_so_far.bad_epochs >= patience:
            result.stopped_early = True
            break

    if patience is not None:
        best_model, best_guide = progress_so_far.best_state
        model.load_state_dict(best_model), guide.load_state_dict(best_guide)
    if run_dir is not None:
        save_atomically({"model": model.state_dict(), "guide": guide.state_dict()}, run_dir / FINAL_WEIGHTS)
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


def _train_epoch(objective, model, guide, opt, params, train, batch_size, generator, batch_transform, beta,
                 nesting, clip_norm, device, epoch, epochs, checkpoint_path, progress) -> float:
    """One pass over the shuffled training set; returns the summed loss."""
    num_train = _size(train)
    steps_per_epoch = math.ceil(num_train / batch_size)
    total = 0.0
    bar = tqdm(_minibatches(train, batch_size, generator), total=steps_per_epoch,
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
