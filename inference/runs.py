"""The run folder: the one way every pair is planned, trained, saved, read back and scored.

    config = plan("bnn", "flipout", "gap", epochs=300, lr=0.01)   # checked, nothing written
    run = fit_run(config, "runs/flipout")                          # train, save, score, draw
    run = load_run("runs/flipout")                                 # rebuild the fitted posterior
    scores = evaluate_run("runs/flipout")                          # score it again

Every family goes the same way: registry entry -> build -> train -> run folder -> score. A run
folder holds ``config.json`` (what was asked, every option settled), ``checkpoint.pt`` (every
epoch of SVI, tensors only), ``weights.pt`` (the trained guide, written by ``inference.svi.fit``),
``posterior.pt`` (the fitted posterior: for most pairs the trained guide, for Laplace, the samplers
and TRADI what training made of it), ``metrics.json`` (history, test scores, time, parameters,
posterior bytes, hardware, library versions, chain diagnostics) and the family's figures.

Scores are drawn from a random stream seeded with the run's seed, so ``evaluate_run`` repeats
``fit_run``'s scores exactly.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bayeszoo.inference import registry

CONFIG, METRICS, EVALUATION = "config.json", "metrics.json", "evaluation.json"
POSTERIOR = "posterior.pt"
CHECKPOINT, FINAL_WEIGHTS = "checkpoint.pt", "weights.pt"  # inference.svi.fit's files
#: Sections of a config: the settled options, sorted by who reads them.
RUNTIME = ("device",)  # chosen per invocation, not part of what the run is


class RunError(ValueError):
    """A run folder that cannot be used as asked; raised before anything is written."""


@dataclass
class Run:
    """A fitted pair in its folder: the config, the rebuilt model and posterior, the dataset and
    the metrics written by ``fit_run``."""

    path: Path
    config: dict
    model: object
    posterior: object
    dataset: object
    metrics: dict
    inputs: object = None  # batch -> the model's keyword inputs

    @property
    def scores(self) -> dict:
        return self.metrics.get("test", {})


def plan(model: str, guide: str, data: str, **options) -> dict:
    """The config of a run: names checked, every option of the pair checked and settled (the
    rest at their defaults), sorted into the sections ``fit_run`` reads. Raises
    ``registry.RegistryError`` before anything is loaded or written."""
    registry.check_pair(model, guide, data)
    entry = registry.guide_entry(guide, model)
    family = registry.family_of(model)
    settled = registry.settle_options(model, guide, {k: v for k, v in options.items() if v is not None})
    budget = {option.name for option in entry.budget} | {"seed"}
    data_names = {option.name for option in family.data_options}
    score_names = {option.name for option in family.score_options}
    behaviour = registry.resolve(family.behaviour)
    return {
        "model": model,
        "guide": entry.name,
        "data": data,
        "data_options": behaviour.settle_data_options({**settled, **{k: settled[k] for k in data_names}}),
        "options": {
            k: _jsonable(v)
            for k, v in settled.items()
            if k not in budget | data_names | score_names | set(RUNTIME)
        },
        "fit": {k: v for k, v in settled.items() if k in budget},
        "scoring": {k: v for k, v in settled.items() if k in score_names},
    }


def replan(run_dir: str | os.PathLike, model: str | None = None, guide: str | None = None,
           data: str | None = None, **overrides) -> dict:
    """The config of a rerun of the run in ``run_dir`` (``bayeszoo fit --from RUN``): its saved
    options with ``overrides`` in their place, and its model, guide and dataset unless given.
    Saved options that a newly named pair does not have are dropped; an override it does not have
    is an error. Raises ``RunError`` for a folder whose config cannot be rerun as saved, before
    anything is loaded or written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run folder")
    config = read_config(run_dir)
    saved = saved_options(config)
    try:
        for name, option in registry.pair_options(config["model"], config["guide"]).items():
            if saved.get(name) is not None:
                _check_saved_type(option, saved[name])
        plan(config["model"], config["guide"], config["data"], **saved)  # the saved values still hold
    except (TypeError, ValueError) as error:  # RegistryError is a ValueError
        raise RunError(f"{run_dir / CONFIG} cannot be rerun: {error}") from None
    model, guide, data = model or config["model"], guide or config["guide"], data or config["data"]
    registry.check_pair(model, guide, data)
    declared = registry.pair_options(model, guide)
    kept = {name: value for name, value in saved.items() if name in declared}
    return plan(model, guide, data, **{**kept, **overrides})


def saved_options(config: dict) -> dict:
    """A config's settled options as ``plan``'s keywords, which settle to the same config again."""
    behaviour = registry.resolve(registry.family_of(config["model"]).behaviour)
    return {
        **behaviour.given_data_options(config["data_options"]),
        **config["options"],
        **config["fit"],
        **config["scoring"],
    }


def _check_saved_type(option: registry.Option, value) -> None:
    """JSON holds numbers, strings, booleans and lists: each option's value must be its kind."""
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
    if option.type in kinds:
        fits = isinstance(value, kinds[option.type]) and (option.type is bool or not isinstance(value, bool))
    else:  # a comma-separated list of sizes, saved as a JSON list
        fits = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not fits:
        raise TypeError(f"{option.name} is {value!r}, not a value of {option.flag}")


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def saved_progress(run_dir: str | os.PathLike) -> bool:
    """Whether a folder holds anything a resumed run continues from (an epoch checkpoint, trained
    weights, a finished posterior, a finished NUTS chain)."""
    run_dir = Path(run_dir)
    return any((run_dir / name).exists() for name in (CHECKPOINT, FINAL_WEIGHTS, POSTERIOR)) or any(
        run_dir.glob("nuts-chain*.pt")
    )


def is_finished(run_dir: str | os.PathLike) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / METRICS).exists() and (run_dir / POSTERIOR).exists()


def load_data(config: dict, root="data", download: bool = False):
    """The run's dataset, loaded by its family."""
    behaviour = registry.resolve(registry.family_of(config["model"]).behaviour)
    return behaviour.load(config["data"], config["data_options"], root, download)


def build(config: dict, dataset):
    """Seed, then build model and guide (the model first, so it gets the same initial weights
    whichever guide comes with it). Returns (model, guide or None, inputs) where ``inputs(batch)``
    maps a dataset minibatch to the model's keyword inputs."""
    from bayeszoo.inference.families import ModelInputs
    from bayeszoo.inference.svi import set_seed

    model_entry = registry.model_entry(config["model"])
    guide_entry = registry.guide_entry(config["guide"], config["model"])
    options = config["options"]
    set_seed(config["fit"]["seed"])
    model = registry.resolve(model_entry.build)(
        dataset, **registry.builder_kwargs(model_entry.options, options)
    )
    guide = None
    if guide_entry.build is not None:
        guide = registry.resolve(guide_entry.build)(
            model, **registry.builder_kwargs(guide_entry.options, options), **guide_entry.build_kwargs
        )
    to_inputs = registry.resolve(model_entry.inputs or "bayeszoo.inference.families:image_inputs")
    return model, guide, ModelInputs.of(to_inputs, dataset, options)


def fit_run(
    config: dict,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    device: str = "cpu",
    data_root="data",
    download: bool = False,
    dataset=None,
) -> Run:
    """Train the pair ``config`` describes (see ``plan``) in ``run_dir``, save its posterior,
    score it on the test split and write ``metrics.json`` and the figures.

    Without ``resume`` a folder that already holds a run is refused; with it, training continues
    from the last checkpoint. A loss that turns NaN raises ``inference.svi.NonFiniteLossError``
    (the last good checkpoint is kept). ``dataset``: the loaded dataset, if the caller has it.
    """
    run_dir = Path(run_dir)
    if saved_progress(run_dir) and not resume:
        raise RunError(
            f"{run_dir} already holds a run; pass --resume to continue it or --out to start another"
        )
    writes = _check_processes(config, device)
    dataset = dataset if dataset is not None else load_data(config, data_root, download)
    model, guide, inputs = build(config, dataset)
    if writes:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG).write_text(json.dumps(config, indent=2))

    entry = registry.guide_entry(config["guide"], config["model"])
    family = _family(config)
    budget = {**config["fit"], "device": device, "run_dir": run_dir, "resume": resume, "progress": progress}
    started = time.perf_counter()
    posterior, result = registry.resolve(entry.train)(
        model, guide, family.training_data(dataset, inputs), config["options"], budget
    )
    seconds = time.perf_counter() - started
    if writes:
        save_posterior(run_dir / POSTERIOR, model, posterior)
    metrics = {
        "config": config,
        "history": result.history if result else [],
        "stopped_early": result.stopped_early if result else False,
        "best_epoch": result.best_epoch + 1 if result else None,
        "train_seconds": seconds,
        **describe(model, posterior, device),
        "test": score(config, model, posterior, dataset, inputs, device, progress),
    }
    metrics.update(chain_diagnostics(posterior))
    metrics["warnings"] = diagnostic_warnings(metrics)
    if writes:
        (run_dir / METRICS).write_text(json.dumps(metrics, indent=2))
        write_figures(run_dir, family, model.cpu(), posterior.cpu(), dataset, inputs, metrics["history"])
    return Run(run_dir, config, model, posterior, dataset, metrics, inputs)


def _check_processes(config: dict, device: str) -> bool:
    """Settings of the training processes that cannot run are a RunError before anything is loaded
    or written; returns whether this process writes the run's files: a run on one node always
    (it may be one of a comparison's guides on node k); a run over several on node 0 alone (every
    node runs the same command and gets the same outcome)."""
    from bayeszoo.inference.distributed import PROCESS_KEYWORDS, check_devices, is_main_node

    fit = config["fit"]
    if any(key in fit for key in PROCESS_KEYWORDS):
        try:
            check_devices(fit["devices"], fit["num_nodes"], fit["accelerator"], fit["strategy"], device)
        except ValueError as error:
            raise RunError(str(error)) from None
    return fit.get("num_nodes", 1) == 1 or is_main_node()


def _family(config: dict):
    return registry.resolve(registry.family_of(config["model"]).behaviour)


def score(
    config: dict, model, posterior, dataset, inputs, device: str = "cpu", progress: bool = False, **scoring
) -> dict:
    """The family's test scores, from a random stream seeded with the run's seed; ``scoring``
    overrides the config's (e.g. ``is_samples``)."""
    from bayeszoo.inference.svi import set_seed

    set_seed(config["fit"]["seed"])
    return _family(config).score(
        model, posterior, dataset, inputs, {**config["scoring"], **scoring}, device, progress
    )


def describe(model, posterior, device: str) -> dict:
    """Size and setting of a fitted pair: parameters (shared tensors once), the posterior's memory
    (``inference.metrics.memory_bytes``), the hardware and the library versions."""
    from bayeszoo.inference.metrics import memory_bytes
    from bayeszoo.inference.report import describe_hardware, library_versions

    seen = {id(p): p for module in (model, posterior) for p in module.parameters()}
    return {
        "parameters": sum(p.numel() for p in seen.values()),
        "posterior_bytes": memory_bytes(posterior),
        "hardware": describe_hardware(device),
        "versions": library_versions(),
    }


def chain_diagnostics(posterior) -> dict:
    """R-hat and ESS (ArviZ) of a posterior kept as two or more chains (NUTS, SGLD, SGHMC)."""
    chains = getattr(posterior, "chains", None)
    if chains is None or len(next(iter(chains.values()))) < 2:
        return {}
    from bayeszoo.inference import diagnostics

    draws = diagnostics.inference_data(chains)
    return {
        "chains": {
            "count": len(next(iter(chains.values()))),
            "max_rhat": diagnostics.max_rhat(draws),
            "min_ess": diagnostics.min_ess(draws),
        }
    }


#: Thresholds of Vehtari et al. (2021) for chains, and Yao et al. (2018) for importance weights.
MAX_RHAT, MIN_ESS_PER_CHAIN, MAX_KHAT = 1.01, 100, 0.7


def diagnostic_warnings(metrics: dict) -> list[str]:
    """Plain sentences for diagnostics that say the numbers should not be trusted as they are."""
    warnings = []
    chains = metrics.get("chains")
    if chains and math.isnan(chains["max_rhat"]):
        warnings.append(
            f"R-hat cannot be computed from these {chains['count']} chains (fewer than four draws each, "
            "or chains that never moved): nothing says they agree; draw more samples"
        )
    if chains and chains["max_rhat"] > MAX_RHAT:
        warnings.append(
            f"R-hat is {chains['max_rhat']:.3f} (> {MAX_RHAT}): the {chains['count']} chains disagree; "
            "run longer or start them better (e.g. --nuts-init map)"
        )
    if chains and chains["min_ess"] < MIN_ESS_PER_CHAIN * chains["count"]:
        warnings.append(
            f"the smallest effective sample size is {chains['min_ess']:.0f} (< {MIN_ESS_PER_CHAIN} per "
            "chain): the posterior summaries are noisy; draw more samples"
        )
    khat = metrics.get("test", {}).get("khat_mean")
    if khat is not None and khat > MAX_KHAT:  # False for NaN, an undefined k-hat
        warnings.append(
            f"the mean PSIS k-hat is {khat:.2f} (> {MAX_KHAT}): q is far from the posterior and the "
            "importance-sampled log-likelihood is unreliable (a loose lower bound)"
        )
    return warnings


def write_figures(run_dir: Path, family, model, posterior, dataset, inputs, history) -> None:
    import matplotlib.pyplot as plt

    for name, figure in family.figures(model, posterior, dataset, inputs, history).items():
        figure.savefig(run_dir / name, dpi=100)
        plt.close(figure)


def save_posterior(path: str | os.PathLike, model, posterior) -> None:
    """Write the model's and the fitted posterior's tensors, atomically: what ``load_run`` needs
    to predict without training."""
    from bayeszoo.inference.svi import save_atomically

    save_atomically({"model": model.state_dict(), "guide": posterior.state_dict()}, Path(path))


def read_config(run_dir: str | os.PathLike) -> dict:
    """A run folder's config, or a ``RunError`` saying why the folder is not a run."""
    path = Path(run_dir) / CONFIG
    try:
        config = json.loads(path.read_text())
        registry.check_pair(config["model"], config["guide"], config["data"])
        for section in ("data_options", "options", "fit", "scoring"):
            if not isinstance(config[section], dict):
                raise TypeError(section)
        return config
    except FileNotFoundError:
        raise RunError(
            f"{run_dir} is not a finished run folder (no {CONFIG}); fit one with `bayeszoo fit`"
        ) from None
    except (ValueError, KeyError, TypeError) as error:
        raise RunError(f"{path} is not a bayeszoo run config ({type(error).__name__}: {error})") from None


def load_run(
    run_dir: str | os.PathLike, *, device: str = "cpu", data_root="data", download: bool = False, dataset=None
) -> Run:
    """A finished run folder's model and fitted posterior, rebuilt from ``posterior.pt``
    (tensors only), with its dataset and metrics."""
    import torch

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if not (run_dir / POSTERIOR).exists():
        raise RunError(
            f"{run_dir} is not a finished run folder (needs {CONFIG} and {POSTERIOR}); "
            "fit one with `bayeszoo fit`"
        )
    dataset = dataset if dataset is not None else load_data(config, data_root, download)
    model, guide, inputs = build(config, dataset)
    state = torch.load(run_dir / POSTERIOR, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    entry = registry.guide_entry(config["guide"], config["model"])
    if entry.posterior is not None:
        guide = registry.resolve(entry.posterior)(model, state["guide"], config["options"], dataset)
    guide.load_state_dict(state["guide"])
    metrics_path = run_dir / METRICS
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return Run(run_dir, config, model.to(device).eval(), guide.to(device).eval(), dataset, metrics, inputs)


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    device: str = "cpu",
    progress: bool = False,
    data_root="data",
    download: bool = False,
    **scoring,
) -> dict:
    """Score a finished run again (``scoring`` overrides, e.g. ``is_samples=5000``) and write
    ``evaluation.json``; with the run's own scoring options it repeats ``fit_run``'s scores."""
    run = load_run(run_dir, device=device, data_root=data_root, download=download)
    scores = score(run.config, run.model, run.posterior, run.dataset, run.inputs, device, progress, **scoring)
    (run.path / EVALUATION).write_text(json.dumps(scores, indent=2))
    return scores
