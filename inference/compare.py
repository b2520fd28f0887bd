"""``bayeszoo compare``: train one model with several guides on equal terms and score them side by side.

    bayeszoo compare vae --guides amortized,rank1,planar,iaf,vlae --data mnist5k
    bayeszoo compare bnn --guides map,meanfield,flipout,laplace --data gap

One comparer for every family: each guide is planned, trained and scored by ``inference.runs``
exactly as ``bayeszoo fit`` would, in its own run folder ``OUT/<guide>/``, and the family
(``inference.families``) gives the table's columns and rows. Below, the latent-variable case.

Every guide gets the same decoder initialisation (the model is built right after seeding, before
the guide), the same data (train split; validation and test sets binarized once), the same
budget (epochs, batch size, learning rate) and the same seed. Each pair is trained in its own run
folder ``OUT/<guide>/`` (a ``bayeszoo fit`` run folder, so ``bayeszoo evaluate OUT/<guide>`` works),
so an interrupted comparison resumes (``resume=True``) and each pair can be
inspected on its own. Then every pair is scored on the test set from one pass of K importance
samples z_k ~ q(z | x) per test point, log w_k = log p(x, z_k) - log q(z_k | x):

* IS log-likelihood  log (1/K) sum_k w_k  (Burda et al. 2016; K is stated with it)
* test ELBO          mean_k log w_k
* KL                 mean_k [log q(z_k | x) - log p(z_k)]
* active units       latent units with Cov_x(E_q[u | x]) > 0.01
* PSIS k-hat         the Pareto shape of the weights w_k of each test point (Yao et al. 2018):
                     < 0.5 good, 0.5-0.7 ok, > 0.7 q is far from the posterior; reported as its
                     mean over test points and the fraction of points above 0.7
* seconds per epoch  the mean over epochs of the training time (validation excluded)
* parameters         of model and guide together (shared tensors counted once)

Numbers are per test point, in nats. The IS log-likelihood, ELBO, KL and k-hat of a guide
come from the same K weights (``inference.evaluate.importance_sampling``), drawn from a stream seeded
with the run's seed. The results go to ``OUT/compare.md`` (a markdown table under a sentence that
states data, K, budget, seed and hardware), ``OUT/compare.csv`` and ``OUT/compare.png`` (for
every guide a row of reconstructions of the same test images and a row of samples from the
same prior draws, which differ only through the trained decoders).

Sequence models (the state-space family) are compared the same way, with the IS
log-likelihood, ELBO and KL also per observed time step (the table shows those), no active
units and no figure.

A point-mass guide (delta, denoising) has no density: its "ELBO" is the MAP objective
log p(x, z*), and the IS log-likelihood and k-hat are left empty (its status says so).

Bayesian neural networks get the test RMSE and NLL (regression) or accuracy, NLL, Brier, ECE and
OOD AUROC (classification), seconds per epoch (median), the whole method's time and the
posterior's bytes; every guide starts from the same initial network.

A guide whose loss turns NaN is reported with its step in the table (``status``) and the
others carry on; a bad name, pair or option fails before any data is loaded.

The guides are independent runs, so ``devices=N`` (with ``accelerator``, ``num_nodes``,
``strategy``, as for ``fit``) trains them N at a time, one process each: guide i on process
i mod N (``inference.distributed.run_tasks``), each exactly as it would train alone on one
device. The table does not depend on N; to train one pair data-parallel, ``fit`` it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch

from bayeszoo.inference import registry, runs
from bayeszoo.inference.distributed import PROCESS_KEYWORDS, check_devices, is_main_node, run_tasks
from bayeszoo.inference.report import describe_hardware, write_csv
from bayeszoo.inference.svi import NonFiniteLossError

LOG = logging.getLogger(__name__)

FIGURE_COLUMNS = 10
GAP_COLOUR = "#5b8fd6"


class CompareError(ValueError):
    """Bad input to a comparison, raised before any data is loaded or any training starts."""


def compare(
    model: str,
    guides: list[str] | str,
    data: str,
    *,
    options: dict | None = None,
    fit_options: dict | None = None,
    is_samples: int | None = None,
    binarize: str | None = None,
    out: str | Path = "runs/compare",
    data_root: str | Path = "data",
    download: bool = False,
    device: str = "cpu",
    progress: bool = True,
    resume: bool = False,
) -> list[dict]:
    """Train ``model`` with each of ``guides`` on ``data`` on equal terms, score each pair on the
    test set and write ``out/compare.md``, ``out/compare.csv`` and, for images, ``out/compare.png``.

    Args:
        model, guides, data: registry names; ``guides`` is a list or a comma-separated string.
        options: options of the model, the guides and the family (``z_dim``, ``hidden``,
            ``flow_length``, ``laplace_steps``, ``split``, ``predictive_samples``, ...); each guide
            takes those that apply to it, and one that applies to none is an error.
        fit_options: the training budget (``epochs``, ``batch_size``, ``lr``, ``seed``, ...), the
            same for every guide (each takes those its trainer has). ``seed`` also seeds the
            networks' initialisation and the scores. ``devices`` (``accelerator``, ``num_nodes``,
            ``strategy``): train the guides that many at a time, one process each.
        is_samples, binarize: shorthands for ``options["is_samples"]`` (K, importance samples per
            test point; a k-hat needs K >= 21) and ``options["binarize"]``.
        out: the comparison folder; guide ``g`` trains in ``out/g/``.
        resume: continue interrupted runs from their checkpoints and reuse finished ones (their
            config must match); without it, a folder that already holds a run is an error.

    Returns one row per guide, in the order given, with the family's table keys (see
    ``inference.report``) and more. A guide that stopped on a NaN loss has NaN scores and
    ``status`` "stopped: ...".

    Raises ``registry.RegistryError`` for an unknown name or an invalid pair and ``CompareError``
    for other bad input, both before any data is loaded.
    """
    guides = [g.strip() for g in guides.split(",") if g.strip()] if isinstance(guides, str) else list(guides)
    given = {
        **(options or {}),
        **{k: v for k, v in (("is_samples", is_samples), ("binarize", binarize)) if v is not None},
    }
    budget = dict(fit_options or {})
    processes = _processes({key: budget.pop(key) for key in PROCESS_KEYWORDS if key in budget}, device)
    configs = _plan(model, guides, data, given, budget)
    out = Path(out)
    _check_folders(out, configs, resume)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise CompareError(f"device {device} asked for, but torch sees no CUDA device")

    first = next(iter(configs.values()))
    dataset = runs.load_data(first, data_root, download)
    family = registry.resolve(registry.family_of(model).behaviour)
    guide_runs = _GuideRuns(configs, dataset, out, progress, resume)
    outcomes = run_tasks(guide_runs, len(configs), **processes, device=device)
    rows = [outcome["row"] for outcome in outcomes]
    panels = {name: outcome["panels"] for name, outcome in zip(configs, outcomes, strict=True)
              if outcome["panels"] is not None}
    if not is_main_node():  # every node gets the rows; node 0 writes the comparison
        return rows

    setting = {
        "model": model,
        "data": data,
        "dataset": dataset,
        "binarize": first["data_options"].get("binarize"),
        "budget": first["fit"],
        "is_samples": first["scoring"].get("is_samples"),
        "predictive_samples": first["scoring"].get("predictive_samples"),
        "hardware": describe_hardware(device) + _side_by_side(processes),
        "options": given,
        "table": family.table(dataset),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(family.markdown(rows, setting))
    write_csv(rows, out / "compare.csv", setting["table"])
    if family.compare_images:
        test = family.evaluation_split(dataset, lambda batch: {"x": batch["x"]}, "test")
        _write_figure(panels, test["x"][:FIGURE_COLUMNS], dataset.image_shape, out / "compare.png", setting)
    return rows


# --------------------------------------------------------------------------- checks


def _processes(given: dict, device) -> dict:
    """The process settings (``fit``'s defaults for those not given), checked before anything runs."""
    from bayeszoo.inference.registry import PROCESSES

    settings = {option.name: given.get(option.name, option.default) for option in PROCESSES}
    try:
        check_devices(**settings, device=device)
    except ValueError as error:
        raise CompareError(str(error)) from None
    return settings


def _plan(model: str, guides: list[str], data: str, given: dict, budget: dict) -> dict[str, dict]:
    """Every guide's run config; each guide takes the options and budget that apply to it."""
    if not guides:
        raise CompareError("no guides to compare; name at least one, e.g. --guides amortized,rank1")
    duplicates = sorted({g for g in guides if guides.count(g) > 1})
    if duplicates:
        raise CompareError(f"guide(s) named twice: {', '.join(duplicates)}")
    for name in guides:
        registry.check_pair(model, name, data)
    declared = {name: registry.pair_options(model, name) for name in guides}
    budgets = {option.name for name in guides for option in registry.guide_entry(name, model).budget} | {
        "seed"
    }
    unknown = sorted(set(budget) - budgets)
    if unknown:
        raise CompareError(f"unknown fit option(s) {', '.join(unknown)}; valid: {', '.join(sorted(budgets))}")
    # Options are shared by the guides, and each takes those that apply to it; a name no part of
    # bayeszoo declares is a typo.
    unknown = sorted(set(given) - set(registry.all_options()))
    if unknown:
        raise CompareError(f"unknown option(s) {', '.join(unknown)}; `bayeszoo compare --help` lists them")
    try:
        return {
            name: runs.plan(
                model, name, data, **{k: v for k, v in {**given, **budget}.items() if k in declared[name]}
            )
            for name in guides
        }
    except registry.RegistryError as error:
        raise CompareError(str(error)) from None


def _check_folders(out: Path, configs: dict, resume: bool) -> None:
    """Refuse to overwrite a guide's run folder without ``resume``, or to resume one that holds a
    run of another configuration."""
    for name, config in configs.items():
        run_dir = out / name
        if not runs.saved_progress(run_dir):
            continue
        if not resume:
            raise CompareError(
                f"{run_dir} already holds a run; pass resume (--resume) to continue "
                "the comparison or choose another output folder"
            )
        if (run_dir / runs.CONFIG).exists() and not _same_run(
            json.loads((run_dir / runs.CONFIG).read_text()), config
        ):
            raise CompareError(
                f"{run_dir} holds a run with another configuration; "
                "choose another output folder to compare these settings"
            )


def _same_run(stored: dict, config: dict) -> bool:
    """Whether a stored config describes the run ``config`` does. An option the stored config
    does not name had its default then (it was added since the run was written)."""
    defaults = runs.plan(config["model"], config["guide"], config["data"])
    for key, value in config.items():
        if isinstance(value, dict):
            if {**defaults[key], **stored.get(key, {})} != value:
                return False
        elif stored.get(key) != value:
            return False
    return True


def _side_by_side(processes: dict) -> str:
    """How the guides shared the machine, for the table's sentence (seconds per epoch of guides
    trained at once compete for its cores)."""
    world = processes["devices"] * processes["num_nodes"]
    return f", {world} guides at a time, one process each" if world > 1 else ""


# --------------------------------------------------------------------------- one guide


@dataclass
class _GuideRuns:
    """Task i of a comparison: train, save and score guide i (``_run_guide``) on ``device``; its
    table row, and for image data the figure's rows of reconstructions and samples."""

    configs: dict[str, dict]  # by the guide's name as given (its run folder's name)
    dataset: object
    out: Path
    progress: bool
    resume: bool

    def __call__(self, index: int, device, shows_progress: bool) -> dict:
        name, config = list(self.configs.items())[index]
        LOG.info("[%d/%d] %s + %s", index + 1, len(self.configs), config["model"], name)
        row, run = _run_guide(config, self.dataset, self.out / name, str(device),
                              self.progress and shows_progress, self.resume)
        panels = None
        family = registry.resolve(registry.family_of(config["model"]).behaviour)
        if run is not None and family.compare_images:
            test = family.evaluation_split(self.dataset, run.inputs, "test")
            panels = _figure_rows(run.model.cpu(), run.posterior.cpu(), test, config["fit"]["seed"])
        return {"row": row, "panels": panels}


def _run_guide(config: dict, dataset, run_dir: Path, device, progress, resume):
    """Train, save and score one guide in its run folder (a finished one is read back on resume).
    Returns (row, Run or None if it stopped)."""
    family = registry.resolve(registry.family_of(config["model"]).behaviour)
    if resume and runs.is_finished(run_dir):
        run = runs.load_run(run_dir, device=device, dataset=dataset)
        return family.row(run.metrics), run
    try:
        run = runs.fit_run(
            config,
            run_dir,
            resume=resume and runs.saved_progress(run_dir),
            progress=progress,
            device=device,
            dataset=dataset,
        )
    except NonFiniteLossError as error:
        return family.stopped_row(config["guide"], f"stopped: {error}"), None
    return family.row(run.metrics), run


# --------------------------------------------------------------------------- the image figure


@torch.no_grad()
def _figure_rows(model, guide, test: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E[x | z] for z ~ q(z | x) of the first test images, and for z from the prior (the same
    draws for every guide: the prior's sampling only reads the seeded stream)."""
    from bayeszoo.inference.plots import observation_mean

    few = {k: v[:FIGURE_COLUMNS] for k, v in test.items()}
    pyro.set_rng_seed(seed)
    reconstructions = observation_mean(model, guide, **few)
    pyro.set_rng_seed(seed)
    if "c" in few:  # a conditional model generates for the same contexts
        samples = observation_mean(model, c=few["c"])
    else:
        samples = observation_mean(model, batch_size=FIGURE_COLUMNS)
    return reconstructions.cpu(), samples.cpu()


def _strip(images: torch.Tensor, image_shape) -> torch.Tensor:
    """Images (n, D) side by side as one (H, n * (W + gap) - gap[, 3]) canvas, with NaN gaps
    (drawn in a colour that neither a black nor a white border hides)."""
    images = images.detach().cpu().float().clamp(0, 1).reshape(-1, *image_shape)
    if len(image_shape) == 3:  # (n, C, H, W) -> (n, H, W, C)
        images = images.permute(0, 2, 3, 1)
    spacer = torch.full((images.shape[1], max(1, images.shape[2] // 8), *images.shape[3:]), math.nan)
    pieces = [piece for image in images for piece in (image, spacer)][:-1]
    return torch.cat(pieces, dim=1)


def _write_figure(panels: dict, images: torch.Tensor, image_shape, path: Path, setting: dict) -> None:
    """One strip of images per row (one axes each: quick to draw even for many guides)."""
    import matplotlib
    import matplotlib.pyplot as plt

    rows, titles = [images], ["test data"]
    for name, (reconstructions, samples) in panels.items():
        rows += [reconstructions, samples]
        titles += [f"{name}\nreconstructions", f"{name}\nsamples"]
    strips = [_strip(row, image_shape) for row in rows]
    height, width = strips[0].shape[:2]
    row_height = 0.9 * FIGURE_COLUMNS * height / width + 0.1  # inches: 0.9 in per image
    fig, axes = plt.subplots(
        len(strips), 1, squeeze=False, figsize=(1.6 + 0.9 * FIGURE_COLUMNS, 0.5 + row_height * len(strips))
    )
    cmap = plt.get_cmap("gray").with_extremes(bad=GAP_COLOUR)
    for ax, strip, title in zip(axes[:, 0], strips, titles, strict=True):
        if strip.dim() == 3:  # colour: RGBA with the gaps opaque in GAP_COLOUR
            gaps = strip.isnan().any(-1, keepdim=True)
            gap_rgb = torch.tensor(matplotlib.colors.to_rgb(GAP_COLOUR))
            strip = torch.where(gaps, gap_rgb, strip)
        ax.imshow(strip.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(
        f"{setting['model']} on {setting['data']}: E[x | z] with z ~ q(z | x) "
        "(reconstructions) and z ~ p(z), the same draws for every guide (samples)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
