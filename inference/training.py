"""How each pair trains: the trainers a registry entry names, and how a fitted posterior is rebuilt.

Every trainer has one signature, ``trainer(model, guide, data, options, budget) -> (posterior,
FitResult or None)``: ``data`` holds ``train``, ``valid`` and ``batch_transform`` (the family's
``training_data``), ``options`` the pair's settled options, ``budget`` the keywords of
``inference.svi.fit`` the entry declares (plus ``seed``, ``device``, ``run_dir``, ``resume``,
``progress``). The posterior it returns is a guide with the model's signature, so ``Predictive``,
the scores and the ArviZ diagnostics treat every method alike.

    trainer                    what it does                                            posterior
    svi                        fit the guide by SVI                                    the guide
    ensemble                   SVI with one particle a member                          the guide
    closed_form_kl             SVI with the KL to the Gaussian prior in closed form     the guide
    local_reparameterization   the same under the local_reparameterization() handler    the guide
    flipout                    the same under the flipout() handler                     the guide
    laplace                    MAP by SVI, then Laplace around it                       WeightLaplaceGuide
    sgld, sghmc                the sampler as fit's optimizer, thinned draws            WeightSamples
    nuts                       NUTS chains (optionally from a MAP fit)                  WeightSamples
    tradi                      MAP by Adam while a Kalman filter tracks every weight    TradiGuide
    maximum_likelihood         a linear-Gaussian SSM's exact log p(x), L-BFGS           KalmanPosterior

The mean-field trainers use ``TraceMeanField_ELBO``'s estimator (``inference.elbo.ClosedFormKL_ELBO``,
which computes only the terms it reads): the KL from q(w) to a Gaussian prior in closed form, as
Kingma et al. (2015) do, rather than Blundell et al.'s Monte-Carlo log q(w) - log p(w) at the
sampled weights. The same objective, and a step does less arithmetic
(measured 4-10% faster on the digits and 784-400-400-8 nets); the gradient noise barely changes
(1-3% less there): the likelihood term dominates it.

Processes (the budget's ``devices``, ``accelerator``, ``num_nodes``, ``strategy``): the SVI
trainers train data-parallel (``inference.svi.fit``); an ensemble's members, SGLD/SGHMC chains
and NUTS chains are independent work, spread over the processes by
``inference.distributed.run_tasks`` (each member block or chain exactly as one process would
train it, so the posterior does not depend on the number of processes).

A ``posterior`` function rebuilds an empty fitted posterior of the right kind and shapes from
the saved state (``posterior.pt``), for the entries whose posterior is not the guide they built.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from bayeszoo.inference.distributed import PROCESS_KEYWORDS, run_tasks
from bayeszoo.inference.elbo import ClosedFormKL_ELBO
from bayeszoo.inference.svi import CHECKPOINT, FitResult, adam, fit


def _fit(model, guide, data: dict, budget: dict, **extra):
    return fit(
        model,
        guide,
        data["train"],
        data["valid"],
        batch_transform=data["batch_transform"],
        **{**budget, **extra},
    )


def svi(model, guide, data: dict, options: dict, budget: dict, handler=contextlib.nullcontext, elbo=None):
    """Stochastic variational inference of the guide. A guide that is a set of members trained
    together (an ensemble) says how many particles of the ELBO that is (``num_particles``)."""
    extra = {"elbo": elbo} if elbo is not None else {}
    if hasattr(guide, "num_particles"):
        extra["num_particles"] = guide.num_particles
    with handler():
        return guide, _fit(model, guide, data, budget, **extra)


def _split_processes(budget: dict) -> tuple[dict, dict]:
    """(how many processes and where, the rest of the budget): for trainers that spread
    independent tasks over the processes and train each task in one."""
    processes = {key: budget[key] for key in PROCESS_KEYWORDS if key in budget}
    rest = {key: value for key, value in budget.items() if key not in PROCESS_KEYWORDS}
    return processes, rest


def _world(processes: dict) -> int:
    return processes.get("devices", 1) * processes.get("num_nodes", 1)


def _task_budget(budget: dict, device, shows_progress: bool) -> dict:
    return {**budget, "device": device, "progress": budget.get("progress", True) and shows_progress}


def _outcome(result: FitResult) -> dict:
    """A FitResult as ``run_tasks`` carries it back (no objects, only numbers and lists)."""
    return {"history": result.history, "best_epoch": result.best_epoch, "stopped_early": result.stopped_early}


def closed_form_kl(model, guide, data, options, budget):
    return svi(model, guide, data, options, budget, elbo=ClosedFormKL_ELBO)


def local_reparameterization(model, guide, data, options, budget):
    from bayeszoo.guides.reparameterization import local_reparameterization as handler

    return svi(model, guide, data, options, budget, handler=handler, elbo=ClosedFormKL_ELBO)


def flipout(model, guide, data, options, budget):
    from bayeszoo.guides.reparameterization import flipout as handler

    return svi(model, guide, data, options, budget, handler=handler, elbo=ClosedFormKL_ELBO)


def ensemble(model, guide, data, options, budget):
    """A deep ensemble: every member one particle of one vectorized SVI step. On N processes the
    members are split into N contiguous blocks, one a process: a block trains alone with its loss
    scaled by its share of the members, m / M, so each member takes exactly the steps it takes
    among all M (the ensemble's loss is the members' mean) and the blocks' losses add up to the
    ensemble's. The history is that sum. With ``patience`` each block stops on its own members'
    validation ELBO, and ``clip_norm`` clips each block's gradient norm."""
    processes, rest = _split_processes(budget)
    world = _world(processes)
    if world == 1:
        return svi(model, guide, data, options, budget)
    own = [name for name, p in model.named_parameters() if p.requires_grad]
    if own:
        raise ValueError(f"the members share the model's own parameters {own} (e.g. a learned noise scale), "
                         "which one process must train; give --noise a number, or train on one process")
    if guide.num_members < world:
        raise ValueError(f"{guide.num_members} ensemble members cannot be split over {world} processes")
    outcomes = run_tasks(_EnsembleBlock(model, guide, data, rest, world), world,
                         device=budget.get("device", "cpu"), **processes)
    with torch.no_grad():
        for name, member in guide.stacked().items():
            member.copy_(torch.cat([outcome["members"][name] for outcome in outcomes]).to(member.device))
    return guide, _summed(outcomes)


@dataclass
class _EnsembleBlock:
    """Task i of an ensemble on ``blocks`` processes: members [start, stop) of block i."""

    model: torch.nn.Module
    guide: torch.nn.Module
    data: dict
    budget: dict
    blocks: int

    def __call__(self, block: int, device, shows_progress: bool) -> dict:
        from pyro import poutine

        from bayeszoo.guides.ensemble import EnsembleGuide
        from bayeszoo.inference.distributed import slice_bounds

        size = self.guide.num_members
        start, stop = slice_bounds(size, block, self.blocks)
        block_members = {name: value[start:stop] for name, value in self.guide.stacked().items()}
        members = EnsembleGuide.of_members(self.model, block_members)
        budget = {**_task_budget(self.budget, device, shows_progress),
                  **_run_folder(self.budget, block, "block")}
        share = partial(poutine.scale, scale=(stop - start) / size)
        _, result = svi(self.model, members, self.data, {}, budget, handler=share)
        return {"members": {k: v.detach() for k, v in members.stacked().items()}, **_outcome(result)}


def _summed(outcomes: list[dict]) -> FitResult:
    """The ensemble's history from its blocks': ELBOs added epoch by epoch (the losses were scaled
    to add up), the slowest block's seconds."""
    history = []
    for rows in zip(*[outcome["history"] for outcome in outcomes], strict=False):
        row = {**rows[0], "seconds": max(r["seconds"] for r in rows)}
        for key in ("train_elbo", "valid_elbo"):
            if key in row:
                row[key] = sum(r[key] for r in rows)
        history.append(row)
    best = max(range(len(history)), key=lambda i: history[i].get("valid_elbo", history[i]["train_elbo"]))
    return FitResult(history=history, best_epoch=best,
                     stopped_early=any(outcome["stopped_early"] for outcome in outcomes))


def laplace(model, guide, data, options, budget):
    """MAP by SVI, then the Laplace approximation around it."""
    from bayeszoo.guides.weight_laplace import WeightLaplaceGuide

    guide, result = svi(model, guide, data, options, budget)
    return WeightLaplaceGuide(
        model,
        guide,
        data["train"],
        structure=options["laplace_structure"],
        predictive=options["laplace_predictive"],
    ), result


def sgld(model, guide, data, options, budget):
    from bayeszoo.inference.sgmcmc import SGLD

    return _sgmcmc(model, guide, SGLD, data, options, budget)


def sghmc(model, guide, data, options, budget):
    from bayeszoo.inference.sgmcmc import SGHMC

    return _sgmcmc(model, guide, partial(SGHMC, friction=options["friction"]), data, options, budget)


def _sgmcmc(model, guide, sampler, data: dict, options: dict, budget: dict):
    """Run the sampler on the MAP guide's weights and keep thinned samples after burn-in.

    For ``sgld`` and ``sghmc`` ``lr`` is the sampler's step size on the whole-data potential, far
    below an Adam learning rate: about 3e-4 (SGLD) and 1e-5 (SGHMC, whose drift per step is about
    lr / friction) worked on the gap and Boston sets; larger steps diverge.

    Only the weight sites are sampled. Parameters of the model itself (a ``noise="learned"``
    scale) have no prior; they follow the same sampler at temperature 0, i.e. gradient descent on
    the potential, and end as point estimates like in MAP.

    ``chains`` independent chains run one after the other, each from a fresh draw of PyTorch's
    initialisation and with its own seed (the model's own parameters restart too); the posterior
    pools their draws and keeps them per chain in ``.chains`` for ArviZ's R-hat and ESS, as for
    NUTS. The FitResult returned is the last chain's. With a ``run_dir``, chain c > 0 checkpoints
    in ``run_dir/chain<c>``, and every checkpoint holds the chain's draws so far, so
    ``resume=True`` continues an interrupted run chain by chain.
    """
    from bayeszoo.guides.samples import WeightSamples

    processes, rest = _split_processes(budget)
    outcomes = run_tasks(_SamplerChain(model, guide, sampler, data, options, rest), options["chains"],
                         device=budget.get("device", "cpu"), **processes)
    model.load_state_dict(outcomes[-1]["model"])
    chains = [outcome["draws"] for outcome in outcomes]
    samples = WeightSamples(model, {name: torch.cat([c[name] for c in chains]) for name in chains[0]})
    samples.chains = {name: torch.stack([c[name] for c in chains]) for name in chains[0]}
    last = outcomes[-1]
    return samples, FitResult(last["history"], last["best_epoch"], last["stopped_early"])


@dataclass
class _SamplerChain:
    """Task c of an SG-MCMC run: chain c, from the model's initial state (chain 0 from the guide's
    weights, chain c > 0 from a fresh initialisation seeded by c), seeded by seed + c."""

    model: torch.nn.Module
    guide: torch.nn.Module
    sampler: object
    data: dict
    options: dict
    budget: dict
    start: dict = field(init=False)

    def __post_init__(self):
        self.start = {key: value.detach().clone() for key, value in self.model.state_dict().items()}

    def __call__(self, chain: int, device, shows_progress: bool) -> dict:
        from bayeszoo.guides.map import MAPGuide

        model, guide = self.model, self.guide
        model.load_state_dict(self.start)
        if chain > 0:
            guide = MAPGuide(model)
            torch.manual_seed(self.budget.get("seed", 0) + chain)
            fresh = model.initial_values(fresh=True)
            with torch.no_grad():
                for name, weight in guide.named_weights().items():
                    if name in fresh:
                        weight.copy_(fresh[name])
        seed = self.budget.get("seed", 0) + chain
        budget = {**_task_budget(self.budget, device, shows_progress), "seed": seed,
                  **_run_folder(self.budget, chain)}
        recorder, result = _sgmcmc_chain(model, guide, self.sampler, self.data, self.options, budget)
        return {"draws": recorder.stacked(), "model": model.state_dict(), **_outcome(result)}


def _run_folder(budget: dict, task: int, name: str = "chain") -> dict:
    """Task ``task``'s run folder (the run's own for task 0, ``chain<task>`` or ``block<task>``
    inside it for the others) and whether it resumes: only a task that wrote a checkpoint can; a
    later one starts afresh."""
    run_dir = budget.get("run_dir")
    if run_dir is None:
        return {}
    run_dir = Path(run_dir) if task == 0 else Path(run_dir) / f"{name}{task}"
    resume = budget.get("resume", False) and (run_dir / CHECKPOINT).exists()
    return {"run_dir": run_dir, "resume": resume}


def _sgmcmc_chain(model, guide, sampler, data: dict, options: dict, budget: dict):
    """One chain: the sampler as ``fit``'s optimizer, a recorder on its steps.

    The loss ``fit`` differentiates is a minibatch's share of U(w) = -log p(w, y | x) (see
    ``inference.svi.scale_global_sites``), so the sampler's ``grad_scale`` is N / batch size.
    """
    from bayeszoo.inference.sgmcmc import ThinnedSamples

    batch_size = budget.get("batch_size", 100)
    num_train = len(data["train"]["x"])
    steps_per_epoch = -(-num_train // batch_size)
    recorder = ThinnedSamples(
        burn_in=options["burn_in_epochs"] * steps_per_epoch, thin=options["thin"] or steps_per_epoch
    )

    def optimizer(params, lr):
        sampled = {id(p) for p in guide.named_weights().values()}
        params = list(params)
        groups = [{"params": [p for p in params if id(p) in sampled]}]
        point_estimates = [p for p in params if id(p) not in sampled]
        if point_estimates:  # e.g. a learned noise scale: it has no prior, so it is optimized (T = 0)
            groups.append({"params": point_estimates, "temperature": 0.0})
        opt = sampler(groups, lr=lr, grad_scale=num_train / batch_size)
        opt.register_step_post_hook(lambda *_: recorder.record(guide.point()))
        return opt

    result = _fit(model, guide, data, budget, optimizer=optimizer, checkpoint_extras={"samples": recorder})
    if len(recorder) == 0:
        raise ValueError("the sampler kept no samples: train for more epochs than burn_in_epochs")
    return recorder, result


def tradi(model, guide, data, options, budget):
    """Train the MAP network with Adam while a ``WeightTracker`` filters every weight's trajectory.

    The tracker starts after ``burn_in_epochs``. Its fading factor defaults to
    1 - 1 / (steps per epoch): sigma^2 is the variance the steps accumulate over about one epoch.
    """
    from bayeszoo.guides.tradi import TradiGuide
    from bayeszoo.inference.tradi import WeightTracker

    steps_per_epoch = -(-len(data["train"]["x"]) // budget.get("batch_size", 100))
    weights = {
        name: p
        for name, p in guide.named_weights().items()
        if name in {s.name for s in guide.sites if s.is_real}
    }
    tracker = WeightTracker(
        weights,
        burn_in_steps=options["burn_in_epochs"] * steps_per_epoch,
        variance_decay=options.get("variance_decay", 1 - 1 / steps_per_epoch),
        **{k: options[k] for k in ("process_noise", "measurement_noise") if k in options},
    )

    result = _fit(model, guide, data, budget, optimizer=_TrackedAdam(tracker),
                  checkpoint_extras={"tracker": tracker})
    if tracker.tracked_steps == 0:
        raise ValueError("TRADI tracked no step: train for more epochs than burn_in_epochs")
    posterior = TradiGuide(
        model,
        tracker.means(),
        tracker.variances(),
        guide.point(),
        rank=options["tradi_rank"],
        correlation=options.get("tradi_correlation", 0.5),
    )
    posterior.tracker = tracker
    return posterior, result


@dataclass
class _TrackedAdam:
    """``fit``'s optimizer for TRADI: Adam with the tracker on its steps (a class, not a closure,
    so that spawned processes can unpickle it)."""

    tracker: object

    def __call__(self, params, lr: float) -> torch.optim.Optimizer:
        opt = adam(params, lr=lr)
        self.tracker.attach(opt)
        return opt


def nuts(model, guide, data, options, budget):
    """NUTS chains; with ``nuts_init="map"`` they start from a MAP fit (the budget trains it).
    MCMC samples sample sites only: give a learned noise scale a prior (``noise="prior"``)."""
    from bayeszoo.guides.map import MAPGuide
    from bayeszoo.guides.samples import WeightSamples
    from bayeszoo.inference.mcmc import pooled

    init_values = None
    if options["nuts_init"] == "map":
        start = MAPGuide(model)
        _fit(model, start, data, budget, **_run_folder(budget, 0))
        init_values = start.point()
    processes, rest = _split_processes(budget)
    chain = _NutsChain(model, data["train"], options, rest, init_values)
    chains = run_tasks(chain, options["chains"], device=budget.get("device", "cpu"), **processes)
    draws = {name: torch.stack([c[name] for c in chains]) for name in chains[0]}
    posterior = WeightSamples(model, pooled(draws))
    posterior.chains = draws  # per chain, for ArviZ's R-hat and ESS
    return posterior, None


@dataclass
class _NutsChain:
    """Task c of a NUTS run: ``inference.mcmc.run_nuts_chain`` with the run's settings."""

    model: torch.nn.Module
    train: dict
    options: dict
    budget: dict
    init_values: dict | None

    def __call__(self, chain: int, device, shows_progress: bool) -> dict:
        from bayeszoo.inference.mcmc import run_nuts_chain

        options, budget = self.options, self.budget
        return run_nuts_chain(
            self.model,
            self.train,
            chain,
            num_samples=options["nuts_samples"],
            warmup=options["nuts_warmup"],
            max_tree_depth=options["nuts_max_tree_depth"],
            seed=budget.get("seed", 0),
            progress=budget.get("progress", True) and shows_progress,
            jit_compile=options["nuts_jit"],
            init_values=self.init_values,
            run_dir=budget.get("run_dir"),
            resume=budget.get("resume", False),
        )


def maximum_likelihood(model, guide, data, options, budget):
    """The model's trainable parameters by maximum likelihood: L-BFGS (strong Wolfe line search)
    on the Kalman filter's exact log p(x) of the whole training split, less the first
    ``model.diffuse_steps`` terms of each sequence. The posterior is then exact: the guide,
    a ``guides.kalman.KalmanPosterior``, holds no parameters of its own."""
    device = budget.get("device", "cpu")
    model.to(device)
    train = {k: v.to(device) for k, v in data["batch_transform"](data["train"], None).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    lbfgs = torch.optim.LBFGS(params, max_iter=options["lbfgs_iterations"], tolerance_grad=1e-9,
                              line_search_fn="strong_wolfe")

    def negative_log_likelihood():
        lbfgs.zero_grad()
        loss = -model.log_likelihood(**train, skip_first=guide.diffuse_steps).sum()
        loss.backward()
        return loss

    lbfgs.step(negative_log_likelihood)
    model.eval()
    return guide, None


# ------------------------------------------------------------------------ fitted posteriors


def samples_posterior(model, state: dict, options: dict, dataset):
    from bayeszoo.guides.samples import WeightSamples
    from bayeszoo.guides.weights import weight_sites

    return WeightSamples(model, {s.name: state[f"members.{s.key}"] for s in weight_sites(model)})


def tradi_posterior(model, state: dict, options: dict, dataset):
    from bayeszoo.guides.tradi import TradiGuide
    from bayeszoo.guides.weights import weight_sites

    sites = weight_sites(model)
    tracked = [s for s in sites if f"{s.key}_loc" in state]
    means = {s.name: state[f"{s.key}_loc"] for s in tracked}
    variances = {s.name: state[f"{s.key}_scale"] ** 2 for s in tracked}
    point = {s.name: state[f"{s.key}_point"] for s in sites if s.name not in means}
    return TradiGuide(
        model,
        means,
        variances,
        point,
        rank=options["tradi_rank"],
        correlation=options.get("tradi_correlation", 0.5),
    )


def laplace_posterior(model, state: dict, options: dict, dataset):
    """Laplace recomputes its Gauss-Newton matrix from the training data at the saved MAP point
    (the same deterministic computation as after training); the saved factors are loaded next."""
    from bayeszoo.guides.map import MAPGuide
    from bayeszoo.guides.weight_laplace import WeightLaplaceGuide
    from bayeszoo.guides.weights import weight_sites

    map_guide = MAPGuide(model)
    with torch.no_grad():
        for site, weight in zip(weight_sites(model), map_guide.named_weights().values(), strict=True):
            weight.copy_(map_guide.transforms[site.name].inv(state[f"{site.key}_point"]))
    return WeightLaplaceGuide(
        model,
        map_guide,
        dataset.train,
        structure=options["laplace_structure"],
        predictive=options["laplace_predictive"],
    )


# ------------------------------------------------------------------------ one call


def train(
    model,
    guide: str,
    train: dict,
    valid: dict | None = None,
    *,
    options: dict | None = None,
    batch_transform=None,
    **budget,
):
    """Build ``guide`` (a registry name) for ``model`` and train the pair the way its registry
    entry says; returns (posterior, FitResult or None). ``options`` are the guide's and its
    trainer's settings (defaults for the rest); ``budget`` goes to ``inference.svi.fit``.

        posterior, result = train(model, "flipout", data.train, data.valid, epochs=30, lr=0.01)
    """
    from bayeszoo.inference import registry

    entry = registry.guide_entry(guide)
    settled = {option.name: option.default for option in (*entry.options, *entry.train_options)}
    settled.update(options or {})
    built = (
        registry.resolve(entry.build)(
            model, **registry.builder_kwargs(entry.options, settled), **entry.build_kwargs
        )
        if entry.build
        else None
    )
    trainer = registry.resolve(entry.train)
    data = {"train": train, "valid": valid, "batch_transform": batch_transform}
    return trainer(model, built, data, settled, budget)
