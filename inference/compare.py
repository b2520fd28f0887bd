"""``bayeszoo compare``: train one model with several guides on equal terms and score them side by side.

    bayeszoo compare vae --guides amortized,rank1,planar,iaf,laplace --data mnist5k

Every guide gets the same decoder initialisation (the model is built right after seeding, before
the guide), the same data (train split; validation and test sets binarized once), the same
budget (epochs, batch size, learning rate) and the same seed. Each pair is trained by
``inference.svi.fit`` in its own run folder ``OUT/<guide>/`` (``config.json`` as written by
``bayeszoo fit``, so ``bayeszoo evaluate OUT/<guide>`` works; ``checkpoint.pt``, ``weights.pt``,
``metrics.json``), so an interrupted comparison resumes (``resume=True``) and each pair can be
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
come from the same K weights, drawn with the same seed as ``inference.evaluate.importance_sampling``
would draw them. The results go to ``OUT/compare.md`` (a markdown table under a sentence that
states data, K, budget, seed and hardware), ``OUT/compare.csv`` and ``OUT/compare.png`` (for
every guide a row of reconstructions of the same test images and a row of samples from the
same prior draws, which differ only through the trained decoders).

Sequence models (the state-space family) are compared the same way, with the IS
log-likelihood, ELBO and KL also per observed time step (the table shows those), no active
units and no figure.

A point-mass guide (delta, denoising) has no density: its "ELBO" is the MAP objective
log p(x, z*), and the IS log-likelihood and k-hat are left empty (its status says so).

A guide whose loss turns NaN is reported with its step in the table (``status``) and the
others carry on; a bad name, pair or option fails before any data is loaded.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import statistics
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from tqdm import tqdm

from bayeszoo.inference import registry
from bayeszoo.inference.bnn import POSTERIOR, method_options, save_posterior, saved_progress, score_posterior
from bayeszoo.inference.diagnostics import MIN_PSIS_SAMPLES, psis_khat
from bayeszoo.inference.evaluate import _default_chunk, active_units, log_weight_terms
from bayeszoo.inference.svi import (
    CHECKPOINT,
    FINAL_WEIGHTS,
    NonFiniteLossError,
    fit,
    load_weights,
    max_plate_nesting,
)

#: Keys of ``fit_options``, passed to ``inference.svi.fit``; unset ones take fit's defaults.
FIT_OPTIONS = {"epochs": 10, "batch_size": 100, "lr": 1e-3, "lr_decay": 1.0, "num_particles": 1,
               "kl_anneal_epochs": 0, "kl_anneal_start": 0.0, "patience": None, "clip_norm": None, "seed": 0}
#: k-hat above this: q is far from the posterior (Yao et al. 2018).
KHAT_THRESHOLD = 0.7
#: (row key, markdown header); the CSV has every row key.
TABLE = (("guide", "guide"), ("is_log_likelihood", "IS log-likelihood (K={K})"), ("elbo", "test ELBO"),
         ("kl", "KL"), ("active_units", "active units"), ("khat_mean", "mean k-hat"),
         ("khat_above", f"k-hat > {KHAT_THRESHOLD}"), ("seconds_per_epoch", "s / epoch"),
         ("parameters", "parameters"), ("status", "status"))
POINT_MASS_STATUS = "ok; point-mass q: the ELBO column is log p(x, z*), no IS estimate"
#: Sequence models report these per observed time step too.
PER_STEP = ("is_log_likelihood", "elbo", "kl")
FIGURE_COLUMNS = 10
GAP_COLOUR = "#5b8fd6"


class CompareError(ValueError):
    """Bad input to a comparison, raised before any data is loaded or any training starts."""


def compare(model: str, guides: list[str] | str, data: str, *, options: dict | None = None,
            fit_options: dict | None = None, is_samples: int = 1000, out: str | Path = "runs/compare",
            data_root: str | Path = "data", download: bool = False, binarize: str | None = None,
            device: str = "cpu", progress: bool = True, resume: bool = False) -> list[dict]:
    """Train ``model`` with each of ``guides`` on ``data`` on equal terms, score each pair on the
    test set and write ``out/compare.md``, ``out/compare.csv`` and ``out/compare.png``.

    Args:
        model, guides, data: registry names; ``guides`` is a list or a comma-separated string.
        options: model and guide options, as for ``registry.build`` (``z_dim``, ``hidden``,
            ``likelihood``, ``flow_length``, ``laplace_steps``, ...), shared by every guide.
        fit_options: the training budget, keys of ``FIT_OPTIONS`` (``epochs``, ``batch_size``,
            ``lr``, ``seed``, ...). ``seed`` also seeds the networks' initialisation and the
            importance samples.
        is_samples: K, importance samples per test point (a k-hat needs K >= 21; below that
            the k-hat columns are NaN).
        out: the comparison folder; guide ``g`` trains in ``out/g/``.
        binarize: ``None`` (dynamic for Bernoulli pixels, none for Gaussian ones, as ``fit``),
            ``"dynamic"``, ``"fixed"`` or ``"none"``.
        resume: continue interrupted runs from their checkpoints and reuse finished ones (their
            config must match); without it, a folder that already holds a run is an error.

    Returns one dict per guide, in the order given, with the keys of ``TABLE`` and ``is_samples``,
    ``epochs``, ``train_seconds``, ``khat_max``, ``num_points``, ``point_mass`` (and, for
    sequences, ``is_log_likelihood_per_step``, ``elbo_per_step``, ``kl_per_step``). A guide that
    stopped on a NaN loss has NaN scores and ``status`` "stopped: ...".

    Raises ``registry.RegistryError`` for an unknown name or an invalid pair and ``CompareError``
    for other bad input, both before any data is loaded.
    """
    guides = [g.strip() for g in guides.split(",") if g.strip()] if isinstance(guides, str) else list(guides)
    options = dict(options or {})
    budget = _budget(fit_options)
    out = Path(out)
    _check(model, guides, data, budget, is_samples, device, binarize)
    binarize = _binarize(model, options, binarize)
    configs = {name: {"model": model, "guide": name, "data": data, "binarize": binarize,
                      "options": options, "fit": budget} for name in guides}
    _check_folders(out, configs, resume)

    dataset = registry.load_data(model, data, root=data_root, download=download, binarize=binarize)
    entry = registry.model_entry(model)

    def inputs(batch):
        return entry.inputs(batch, dataset, options)

    valid, test = (_eval_inputs(dataset, inputs, split) for split in ("valid", "test"))
    hardware = describe_hardware(device)
    rows, panels = [], {}
    for index, name in enumerate(guides):
        if progress:
            tqdm.write(f"[{index + 1}/{len(guides)}] {model} + {name}")
        row, images = _run_guide(configs[name], dataset, inputs, valid, test, out / name, is_samples,
                                 device, progress, resume, hardware)
        rows.append(row)
        if images is not None:
            panels[name] = images

    setting = {"model": model, "data": data, "dataset": dataset, "binarize": binarize,
               "budget": budget, "is_samples": is_samples, "hardware": hardware, "options": options}
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(markdown_table(rows, setting))
    write_csv(rows, out / "compare.csv")
    if _is_images(dataset):
        _write_figure(panels, test["x"][:FIGURE_COLUMNS], dataset.image_shape, out / "compare.png",
                      setting)
    return rows


def _is_images(dataset) -> bool:
    return hasattr(dataset, "image_shape")


# --------------------------------------------------------------------------- checks


def _budget(fit_options: dict | None) -> dict:
    fit_options = dict(fit_options or {})
    unknown = sorted(set(fit_options) - set(FIT_OPTIONS))
    if unknown:
        raise CompareError(f"unknown fit option(s) {', '.join(unknown)}; valid: {', '.join(FIT_OPTIONS)}")
    return {**FIT_OPTIONS, **fit_options}


def _check(model, guides, data, budget, is_samples, device, binarize) -> None:
    if not guides:
        raise CompareError("no guides to compare; name at least one, e.g. --guides amortized,rank1")
    duplicates = sorted({g for g in guides if guides.count(g) > 1})
    if duplicates:
        raise CompareError(f"guide(s) named twice: {', '.join(duplicates)}")
    for name in guides:
        registry.check_pair(model, name, data)
    if int(budget["epochs"]) < 1 or int(budget["batch_size"]) < 1 or int(budget["num_particles"]) < 1:
        raise CompareError("epochs, batch_size and num_particles must be positive")
    if not budget["lr"] > 0 or not 0 < budget["lr_decay"] <= 1:
        raise CompareError(f"lr must be > 0 and lr_decay in (0, 1], got {budget['lr']} "
                           f"and {budget['lr_decay']}")
    if int(is_samples) != is_samples or is_samples < 1:
        raise CompareError(f"is_samples must be a positive integer, got {is_samples}")
    if binarize not in (None, "dynamic", "fixed", "none"):
        raise CompareError(f"binarize must be dynamic, fixed or none, got {binarize!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise CompareError(f"device {device} asked for, but torch sees no CUDA device")


def _binarize(model: str, options: dict, binarize: str | None) -> str | None:
    """``fit``'s rule: dynamic binarization for Bernoulli pixels unless told otherwise; none for
    sequences."""
    if registry.model_entry(model).family != registry.LATENT:
        return None
    if binarize is None:
        supported = registry.model_entry(model).likelihoods
        likelihood = options.get("likelihood") or supported[0]
        likelihood = likelihood if likelihood in supported else supported[0]
        return "dynamic" if likelihood == "bernoulli" else None
    return None if binarize == "none" else binarize


def _check_folders(out: Path, configs: dict, resume: bool) -> None:
    """Refuse to overwrite a guide's run folder without ``resume``, or to resume one that holds a
    run of another configuration."""
    for name, config in configs.items():
        run_dir = out / name
        if not (saved_progress(run_dir) or (run_dir / FINAL_WEIGHTS).exists()):
            continue
        if not resume:
            raise CompareError(f"{run_dir} already holds a run; pass resume (--resume) to continue "
                               "the comparison or choose another output folder")
        if (run_dir / "config.json").exists() and _with_fit_defaults(
                json.loads((run_dir / "config.json").read_text())) != _with_fit_defaults(config):
            raise CompareError(f"{run_dir} holds a run with another configuration; "
                               "choose another output folder to compare these settings")


def _with_fit_defaults(config: dict) -> dict:
    """The config as JSON data, with ``fit`` options it does not name at their defaults (a fit
    option added since a run was written had its default value then)."""
    config = json.loads(json.dumps(config))
    return {**config, "fit": {**json.loads(json.dumps(FIT_OPTIONS)), **config.get("fit", {})}}


# --------------------------------------------------------------------------- one guide


def _eval_inputs(dataset, inputs, split: str) -> dict:
    """A validation or test split, binarized once with the seed every bayeszoo run uses."""
    from bayeszoo.inference.cli import EVAL_BINARIZATION_SEED  # here: cli imports this module

    generator = torch.Generator().manual_seed(EVAL_BINARIZATION_SEED)
    return inputs(dataset.batch_transform(getattr(dataset, split), generator))


def build_pair(config: dict, dataset):
    """Seed, then build model and guide: the model (built first) gets the same initial weights
    whichever guide comes with it."""
    pyro.clear_param_store()
    pyro.set_rng_seed(config["fit"]["seed"])
    return registry.build(config["model"], config["guide"], dataset, config["options"])


def _run_guide(config, dataset, inputs, valid, test, run_dir: Path, is_samples, device, progress,
               resume, hardware):
    model, guide, _ = build_pair(config, dataset)
    metrics_path = run_dir / "metrics.json"
    if resume and metrics_path.exists() and (run_dir / FINAL_WEIGHTS).exists():
        metrics = json.loads(metrics_path.read_text())
        load_weights(run_dir / FINAL_WEIGHTS, model, guide)
        return metrics["row"], _figure_rows(model.eval(), guide.eval(), dataset, test, config["fit"]["seed"])

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    row = {"guide": config["guide"], "is_samples": is_samples, "parameters": count_parameters(model, guide)}
    try:
        result = fit(model, guide, dataset.train, valid, **config["fit"], device=device, run_dir=run_dir,
                     resume=resume and (run_dir / CHECKPOINT).exists(),
                     batch_transform=lambda batch, gen: inputs(dataset.batch_transform(batch, gen)),
                     progress=progress)
    except NonFiniteLossError as error:
        row.update({key: math.nan for key, _ in TABLE[1:-2]}, status=f"stopped: {error}")
        return row, None
    history = result.history
    row["epochs"] = len(history)
    row["train_seconds"] = sum(r["seconds"] for r in history)
    row["seconds_per_epoch"] = row["train_seconds"] / len(history)
    pyro.set_rng_seed(config["fit"]["seed"])  # the same importance-sampling stream for every guide
    scores = score(model, guide, test, is_samples, device=device, progress=progress)
    row.update(scores, status=POINT_MASS_STATUS if scores["point_mass"] else "ok")
    metrics = {"config": config, "history": history, "best_epoch": result.best_epoch + 1,
               "stopped_early": result.stopped_early, "hardware": hardware, "row": row}
    metrics_path.write_text(json.dumps(metrics, indent=2))
    return row, _figure_rows(model.cpu(), guide.cpu(), dataset, test, config["fit"]["seed"])


def count_parameters(*modules) -> int:
    """Parameters of all ``modules`` together, a tensor shared between them counted once."""
    seen = {id(p): p for module in modules for p in module.parameters()}
    return sum(p.numel() for p in seen.values())


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def score(model, guide, data: dict, num_samples: int, batch_size: int = 100, device="cpu",
          progress: bool = False) -> dict:
    """Test scores of a fitted pair from one pass of ``num_samples`` importance samples per point.

    Returns means over points (nats per point) of the IS log-likelihood, ELBO and KL; the active
    units (images; NaN for sequences, which get the first three per observed time step as well,
    ``*_per_step``, as in Krishnan et al. 2017); and the PSIS k-hat summaries: ``khat_mean``
    (mean over points with a finite k-hat; a point whose weights are all equal has k-hat -inf
    and is left out of the mean but counted below the threshold), ``khat_above`` (the fraction
    of points with k-hat > 0.7) and ``khat_max``. With fewer than ``MIN_PSIS_SAMPLES`` samples
    the k-hat entries are NaN.
    """
    per_point = importance_weights(model, guide, data, num_samples, batch_size, device=device,
                                   progress=progress)
    point_mass = is_point_mass(guide, {k: v[:1].to(device) for k, v in data.items()})
    if point_mass:  # all K samples coincide: no density, so no IS estimate and no k-hat
        per_point["log_likelihood"] = torch.full_like(per_point["log_likelihood"], math.nan)
        per_point["khat"] = torch.full_like(per_point["khat"], math.nan)
    khat = per_point["khat"]
    finite = khat[torch.isfinite(khat)]
    if khat.isnan().all():
        khat_mean = khat_max = khat_above = math.nan
    else:
        khat_mean = finite.mean().item() if len(finite) else khat.max().item()
        khat_max, khat_above = khat.max().item(), (khat > KHAT_THRESHOLD).double().mean().item()
    num_points = len(next(iter(data.values())))
    scores = {
        "is_log_likelihood": per_point["log_likelihood"].mean().item(),
        "elbo": per_point["elbo"].mean().item(),
        "kl": per_point["kl"].mean().item(),
        "active_units": math.nan,
        "khat_mean": khat_mean,
        "khat_above": khat_above,
        "khat_max": khat_max,
        "num_points": num_points,
        "point_mass": point_mass,
    }
    if "mask" in data:  # sequences
        points_per_step = num_points / float(data["mask"].sum())
        for name in PER_STEP:
            scores[f"{name}_per_step"] = scores[name] * points_per_step
    else:
        scores["active_units"] = sum(active_units(guide, data, device=device).values())
    return scores


def is_point_mass(guide, batch: dict) -> bool:
    """Whether q(z | x) puts all its mass on one point (the delta and denoising guides): then the
    "ELBO" is the MAP objective log p(x, z*) and importance sampling estimates nothing."""
    with torch.no_grad():
        trace = poutine.trace(guide).get_trace(**batch)
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
            fn = site["fn"]
            while hasattr(fn, "base_dist"):
                fn = fn.base_dist
            if isinstance(fn, dist.Delta):
                return True
    return False


@torch.no_grad()
def importance_weights(model, guide, data: dict, num_samples: int, batch_size: int = 100,
                       chunk_size: int | None = None, device="cpu", progress: bool = False) -> dict:
    """Per-point IS log-likelihood, ELBO, KL and PSIS k-hat (tensors (N,), CPU) from one set of
    ``num_samples`` log importance weights per point. Draws, in the same order, the samples
    ``inference.evaluate.importance_sampling`` draws, so the first three agree with it."""
    model.eval(), guide.eval()
    point_size = next(iter(data.values()))[0].numel()
    chunk_size = chunk_size or _default_chunk(batch_size, point_size)
    size = len(next(iter(data.values())))
    results = {"log_likelihood": [], "elbo": [], "kl": [], "khat": []}
    nesting = None
    starts = range(0, size, batch_size)
    for start in tqdm(starts, desc=f"IS + PSIS (K={num_samples})", disable=not progress, leave=False):
        batch = {k: v[start:start + batch_size].to(device) for k, v in data.items()}
        if nesting is None:
            nesting = max_plate_nesting(model, guide, batch)
        log_ws, kls, drawn = [], [], 0
        while drawn < num_samples:
            k = min(chunk_size, num_samples - drawn)
            log_likelihood, log_prior_ratio = log_weight_terms(model, guide, batch, k, nesting)
            log_ws.append(log_likelihood + log_prior_ratio)
            kls.append(-log_prior_ratio.sum(0))
            drawn += k
        log_w = torch.cat(log_ws)  # (K, batch)
        results["log_likelihood"].append(torch.logsumexp(log_w, 0) - math.log(num_samples))
        results["elbo"].append(log_w.mean(0))
        results["kl"].append(torch.stack(kls).sum(0) / num_samples)
        if num_samples >= MIN_PSIS_SAMPLES:
            results["khat"].append(psis_khat(log_w))
        else:
            results["khat"].append(torch.full((log_w.shape[1],), math.nan, dtype=torch.float64))
    return {name: torch.cat([v.cpu() for v in values]) for name, values in results.items()}


# --------------------------------------------------------------------------- reports


def describe_hardware(device: str) -> str:
    """The GPU's name, or the CPU's model and the torch thread count."""
    if str(device).startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} CPU threads"


def _format(key: str, value) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if key in ("active_units", "parameters"):
        return f"{int(value):,}"
    if key == "khat_above":
        return f"{100 * value:.0f}%"
    return f"{value:.2f}"


def markdown_table(rows: list[dict], setting: dict) -> str:
    """The comparison as markdown: a sentence stating the setting, the table, how to read it."""
    budget, dataset, k = setting["budget"], setting["dataset"], setting["is_samples"]
    images = _is_images(dataset)
    if images:
        noun, unit, table = "images", "Nats per test image", TABLE
        binarized = {"dynamic": ", dynamically binarized (validation and test sets binarized once)",
                     "fixed": ", binarized once", None: ", grey levels"}[setting["binarize"]]
    else:  # sequences: nats per observed time step, no active units
        noun, unit, binarized = "sequences", "Nats per observed time step", ""
        table = [(f"{key}_per_step", header) if key in PER_STEP else (key, header)
                 for key, header in TABLE if key != "active_units"]
    options = ", ".join(f"{key}={value}" for key, value in sorted(setting["options"].items()))
    lines = [
        f"# {setting['model']}: guides compared on {setting['data']}",
        "",
        f"`{setting['model']}` on `{setting['data']}` ({len(dataset.train['x']):,} training, "
        f"{len(dataset.test['x']):,} test {noun}{binarized}); every guide trained from the same "
        f"initial model (decoder) weights for {budget['epochs']} epochs (batch {budget['batch_size']}, "
        f"Adam lr {budget['lr']:g}, seed {budget['seed']}) and scored on the test set with "
        f"K = {k} importance samples per {noun[:-1]}; on {setting['hardware']}, torch {torch.__version__}, "
        f"pyro {pyro.__version__}." + (f" Model options: {options}." if options else ""),
        "",
        "| " + " | ".join(header.format(K=k) for _, header in table) + " |",
        "|" + "|".join("---" if key in ("guide", "status") else "---:" for key, _ in table) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_format(key, row.get(key)) for key, _ in table) + " |")
    lines += [
        "",
        f"{unit}. The IS log-likelihood is log (1/K) sum_k p(x, z_k) / q(z_k | x), "
        f"z_k ~ q, with K = {k}: a stochastic lower bound on log p(x) that tightens as K grows; the "
        "ELBO is its K = 1 counterpart, and IS log-likelihood - ELBO estimates KL(q(z | x) || p(z | x)) "
        "from below. k-hat is the Pareto shape fitted to the largest importance weights of each "
        f"test {noun[:-1]} (PSIS, Vehtari et al. 2024, through ArviZ): < 0.5 good, 0.5-0.7 ok, > 0.7 q is "
        "far from the posterior and the IS estimate is unreliable (Yao et al. 2018); the mean is "
        f"over test {noun}, the next column the share of them above 0.7"
        + (f" (a k-hat needs K >= {MIN_PSIS_SAMPLES})" if k < MIN_PSIS_SAMPLES else "")
        + ". Seconds per epoch: training wall-clock time, validation excluded. Parameters: model "
        "and guide together.",
        "",
    ]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path, table=TABLE) -> None:
    """Every key of every row, one line per guide."""
    keys = [key for key, _ in table]
    for row in rows:
        keys += [key for key in row if key not in keys]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


@torch.no_grad()
def _figure_rows(model, guide, dataset, test: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """E[x | z] for z ~ q(z | x) of the first test images, and for z from the prior (the same
    draws for every guide: the prior's sampling only reads the seeded stream). None for sequences."""
    from bayeszoo.inference.plots import observation_mean

    if not _is_images(dataset):
        return None
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
    fig, axes = plt.subplots(len(strips), 1, squeeze=False,
                             figsize=(1.6 + 0.9 * FIGURE_COLUMNS, 0.5 + row_height * len(strips)))
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
    fig.suptitle(f"{setting['model']} on {setting['data']}: E[x | z] with z ~ q(z | x) "
                 "(reconstructions) and z ~ p(z), the same draws for every guide (samples)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Bayesian neural networks: every weight-space guide on one dataset

BNN_REGRESSION_TABLE = (("guide", "guide"), ("rmse", "test RMSE"), ("nll", "test NLL"),
                        ("seconds_per_epoch", "s / epoch"), ("train_seconds", "train s"),
                        ("posterior_bytes", "posterior bytes"), ("status", "status"))
BNN_CLASSIFICATION_TABLE = (("guide", "guide"), ("accuracy", "accuracy"), ("nll", "NLL"),
                            ("brier", "Brier"), ("ece", "ECE"), ("ood_auroc_entropy", "OOD AUROC (entropy)"),
                            ("ood_auroc_mi", "OOD AUROC (MI)"), ("seconds_per_epoch", "s / epoch"),
                            ("train_seconds", "train s"), ("posterior_bytes", "posterior bytes"),
                            ("status", "status"))


def compare_bnn(guides: list[str] | str, data: str, *, options: dict, fit_options: dict, out: Path,
                split: int = 0, num_samples: int = 100, progress: bool = True,
                resume: bool = False) -> list[dict]:
    """Train a Bayesian MLP with every guide from the same initial weights and budget; write
    ``compare.md`` and ``compare.csv`` (test metrics, seconds per epoch, posterior bytes).

    Each guide runs in ``OUT/<guide>/`` as ``bayeszoo fit bnn`` would (``config.json``,
    checkpoints, ``posterior.pt``, ``metrics.json``: ``bayeszoo evaluate OUT/<guide>`` works), so
    ``resume=True`` reuses the finished guides and continues the interrupted one.
    """
    guides = [g for g in guides.split(",") if g] if isinstance(guides, str) else list(guides)
    for guide in guides:
        registry.check_pair("bnn", guide, data)
    configs = {guide: {"model": "bnn", "guide": guide, "data": data, "split": split,
                       "options": method_options(guide, options), "fit": fit_options} for guide in guides}
    _check_folders(out, configs, resume)
    dataset = registry.load_data("bnn", data, split=split)
    rows = [_run_bnn_guide(config, dataset, out / guide, num_samples, progress, resume)
            for guide, config in configs.items()]
    table = BNN_REGRESSION_TABLE if dataset.task == "regression" else BNN_CLASSIFICATION_TABLE
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(_bnn_markdown(rows, table, dataset, data, fit_options, num_samples))
    write_csv(rows, out / "compare.csv", table)
    return rows


def _run_bnn_guide(config: dict, dataset, run_dir: Path, num_samples: int, progress: bool, resume: bool):
    """Train, save and score one guide in its run folder; a finished one is read back on resume."""
    from bayeszoo.inference.metrics import memory_bytes

    metrics_path = run_dir / "metrics.json"
    if resume and metrics_path.exists() and (run_dir / POSTERIOR).exists():
        return json.loads(metrics_path.read_text())["row"]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    seed = config["fit"].get("seed", 0)
    torch.manual_seed(seed)  # the same initial network for every guide
    started = time.perf_counter()
    try:
        model, guide, result = registry.train_bnn(
            dataset, config["guide"], config["options"], **config["fit"], run_dir=run_dir,
            resume=resume and saved_progress(run_dir), progress=progress)
    except NonFiniteLossError as error:
        return {"guide": config["guide"], "status": f"stopped: {error}"}
    row = {"guide": config["guide"], "status": "ok", "train_seconds": time.perf_counter() - started,
           "posterior_bytes": memory_bytes(guide)}
    history = result.history if result is not None else []
    if history:
        row["seconds_per_epoch"] = statistics.median(r["seconds"] for r in history)
    save_posterior(run_dir / POSTERIOR, model, guide)
    scores = score_posterior(model, guide, dataset, num_samples, seed)
    row.update({k: v for k, v in scores.items() if isinstance(v, float)})
    if "ood" in scores:
        row["ood_auroc_entropy"] = scores["ood"]["entropy"]["auroc"]
        row["ood_auroc_mi"] = scores["ood"]["mutual_information"]["auroc"]
    metrics_path.write_text(json.dumps({"config": config, "history": history, "test": scores, "row": row},
                                       indent=2))
    return row


def _bnn_markdown(rows, table, dataset, data: str, fit_options: dict, num_samples: int) -> str:
    lines = [
        f"# bnn: guides compared on {data}",
        "",
        f"A Bayesian MLP on `{data}` ({len(dataset.train['x']):,} training, {len(dataset.test['x']):,} test "
        f"points); every guide from the same initial weights, {fit_options.get('epochs')} epochs, batch "
        f"{fit_options.get('batch_size')}, lr {fit_options.get('lr')}, seed {fit_options.get('seed', 0)}; "
        f"metrics from {num_samples} weight samples (an ensemble: its members; NUTS, SGLD: their draws), "
        f"on {describe_hardware('cpu')}, torch {torch.__version__}, pyro {pyro.__version__}.",
        "",
        "| " + " | ".join(header for _, header in table) + " |",
        "|" + "|".join("---" if key in ("guide", "status") else "---:" for key, _ in table) + "|",
    ]
    for row in rows:
        cells = [f"{int(row[key]):,}" if key == "posterior_bytes" and key in row
                 else _format(key, row.get(key)) if key not in ("rmse", "nll", "brier", "ece")
                 else (f"{row[key]:.4f}" if key in row else "—") for key, _ in table]
        lines.append("| " + " | ".join(cells) + " |")
    unit = ("RMSE and Gaussian NLL (per point, of the predictive mixture) in the data's original units"
            if dataset.task == "regression" else
            "NLL per test point in nats; ECE with 15 bins; OOD: the held-out classes, scored by predictive "
            "entropy or mutual information")
    timing = (". Seconds per epoch: median training wall-clock time; train s: the whole method (MAP "
              "and Laplace, sampling, tracking) including one-off start-up costs in the first row.")
    return "\n".join(lines + ["", unit + timing, ""])
