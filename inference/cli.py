"""The ``bayeszoo`` command: list, fit and evaluate model/guide pairs.

    bayeszoo list
    bayeszoo fit vae --guide rank1 --data mnist5k --epochs 20
    bayeszoo evaluate runs/vae-rank1-mnist5k-seed0
    bayeszoo compare vae --guides amortized,rank1,planar,iaf,laplace --data mnist5k --epochs 20

Names and pairs are checked before any data is loaded; a bad one exits with
status 2 and one line that lists the valid choices.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import pyro
import torch

from bayeszoo.inference import registry
from bayeszoo.inference.bnn import (
    POSTERIOR,
    load_posterior,
    method_options,
    save_posterior,
    saved_progress,
    score_posterior,
)
from bayeszoo.inference.svi import FINAL_WEIGHTS, NonFiniteLossError, fit, load_weights

EXIT_USAGE = 2
# Validation and test sets are binarized once with this seed under dynamic binarization,
# so every run and every evaluation scores the same binary images.
EVAL_BINARIZATION_SEED = 1234


class UsageError(Exception):
    """Bad command-line input, reported as one line before any work starts."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bayeszoo", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="models, guides, valid pairs and datasets")

    fit_cmd = commands.add_parser("fit", help="fit a model/guide pair and write a run folder")
    fit_cmd.add_argument("model")
    fit_cmd.add_argument("--guide", required=True)
    fit_cmd.add_argument("--data", required=True)
    _add_data_options(fit_cmd)
    _add_training_options(fit_cmd, "run folder (default runs/NAME)")
    _add_model_options(fit_cmd)

    eval_cmd = commands.add_parser("evaluate", help="score a fitted run on its test set")
    eval_cmd.add_argument("run", type=Path)
    eval_cmd.add_argument("--is-samples", type=_positive_int, default=1000)
    eval_cmd.add_argument("--predictive-samples", type=_positive_int, default=100,
                          help="weight samples per prediction (bnn runs)")
    eval_cmd.add_argument("--device", default="cpu")
    _add_data_options(eval_cmd, with_binarize=False)

    compare_cmd = commands.add_parser(
        "compare", help="train a model with several guides on equal terms; table, CSV and figure")
    compare_cmd.add_argument("model")
    compare_cmd.add_argument("--guides", required=True,
                             help="comma-separated, e.g. amortized,rank1,planar,iaf,laplace")
    compare_cmd.add_argument("--data", required=True)
    _add_data_options(compare_cmd)
    _add_training_options(compare_cmd, "comparison folder (default runs/compare-MODEL-DATA-seedN)")
    _add_model_options(compare_cmd)
    return parser


def _add_training_options(command, out_help: str) -> None:
    group = command.add_argument_group("training")
    group.add_argument("--epochs", type=_positive_int, default=10)
    group.add_argument("--batch-size", type=_positive_int, default=100)
    group.add_argument("--lr", type=float, default=1e-3)
    group.add_argument("--lr-decay", type=float, default=1.0, help="per-epoch factor")
    group.add_argument("--num-particles", type=_positive_int, default=1)
    group.add_argument("--kl-anneal", type=int, default=0, metavar="EPOCHS",
                       help="grow the KL weight linearly from 0 to 1 over this many epochs")
    group.add_argument("--patience", type=_positive_int, default=None,
                       help="early stopping on the validation ELBO")
    group.add_argument("--clip-norm", type=float, default=None,
                       help="rescale every step's gradient to at most this norm")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--device", default="cpu")
    group.add_argument("--out", type=Path, default=None, help=out_help)
    group.add_argument("--resume", action="store_true", help="continue from the checkpoint(s) in --out")
    group.add_argument("--no-progress", action="store_true")


def _add_model_options(command) -> None:
    group = command.add_argument_group("model and guide")
    group.add_argument("--z-dim", type=_positive_int, default=None,
                       help="latent size (default: the model's own, e.g. 20 for vae, 16 for dmm)")
    group.add_argument("--z-dims", type=_int_list, default=(20, 10),
                       help="DLGM layer sizes from the data up, e.g. 20,10")
    group.add_argument("--hidden", type=_int_list, default=None,
                       help="hidden layer sizes (default 400 for image models, 50 for bnn)")
    group.add_argument("--likelihood", choices=("bernoulli", "gaussian", "heteroscedastic"), default=None,
                       help="default: bernoulli for images, what the data needs for sequences and bnn "
                            "(heteroscedastic: bnn regression with a predicted noise level)")
    group.add_argument("--condition", choices=("label", "quadrant"), default="label",
                       help="what a conditional VAE is conditioned on")
    group.add_argument("--masking-noise", type=float, default=0.25,
                       help="probability of masking an input pixel (denoising guide)")
    group.add_argument("--flow-length", type=_positive_int, default=8,
                       help="flow steps K of a flow guide (planar, radial, householder, sylvester, iaf)")
    group.add_argument("--laplace-steps", type=_non_negative_int, default=4,
                       help="Newton refinements T of the Laplace guide (VLAE)")
    group.add_argument("--rnn-dim", type=_positive_int, default=None,
                       help="RNN size of a structured inference network (default 600, as the paper)")
    group.add_argument("--num-iafs", type=_non_negative_int, default=0,
                       help="IAF steps after each q(z_t | ...) of a structured inference network")
    group.add_argument("--is-samples", type=_positive_int, default=1000,
                       help="K for the test importance-sampled log-likelihood")
    bnn = command.add_argument_group("Bayesian neural networks (model bnn)")
    bnn.add_argument("--prior", choices=("normal", "fan_in", "hierarchical"), default="fan_in")
    bnn.add_argument("--noise", default="learned",
                     help="regression noise sd: 'learned', 'prior' or a number")
    bnn.add_argument("--split", type=_non_negative_int, default=0, help="Boston split, 0..19")
    bnn.add_argument("--members", type=_positive_int, default=5, help="ensemble size")
    bnn.add_argument("--dropout", type=float, default=0.1, help="MC dropout probability")
    bnn.add_argument("--laplace-structure", choices=("diag", "last-layer", "full"), default="last-layer")
    bnn.add_argument("--laplace-predictive", choices=("glm", "sampled"), default="glm",
                     help="predict with the network linearized at the MAP (glm) or with sampled weights")
    bnn.add_argument("--nuts-samples", type=_positive_int, default=500, help="NUTS draws per chain")
    bnn.add_argument("--nuts-warmup", type=_positive_int, default=500, help="NUTS warm-up steps per chain")
    bnn.add_argument("--nuts-max-tree-depth", type=_positive_int, default=10,
                     help="at most 2^depth leapfrog steps per NUTS draw")
    bnn.add_argument("--chains", type=_positive_int, default=None,
                     help="independent chains for nuts (default 2), sgld and sghmc (default 1); "
                          "with 2 or more, metrics.json gets ArviZ's R-hat and ESS")
    bnn.add_argument("--nuts-init", choices=("prior", "map"), default="prior",
                     help="NUTS chains start from a prior draw, or all from a MAP fit (--epochs)")
    bnn.add_argument("--nuts-jit", action="store_true",
                     help="compile NUTS's potential with TorchScript (about 3x faster gradients)")
    bnn.add_argument("--tradi-rank", type=_non_negative_int, default=0,
                     help="random features correlating the weights of a layer (TRADI; 0: diagonal)")
    bnn.add_argument("--predictive-samples", type=_positive_int, default=100,
                     help="weight samples for the test metrics (an ensemble uses its members)")


def _add_data_options(command, with_binarize: bool = True) -> None:
    group = command.add_argument_group("data")
    group.add_argument("--data-root", type=Path, default=Path("data"))
    group.add_argument("--download", action="store_true", help="fetch a full dataset if missing")
    if with_binarize:
        group.add_argument("--binarize", choices=("dynamic", "fixed", "none"), default=None,
                           help="default: dynamic for Bernoulli pixels, none for Gaussian")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The command owns its process: its PyroModules keep their parameters to themselves.
    pyro.settings.set(module_local_params=True)
    try:
        if args.command == "list":
            return _list()
        if args.command == "fit":
            return _fit(args)
        if args.command == "compare":
            return _compare(args)
        return _evaluate(args)
    except (UsageError, registry.RegistryError, FileNotFoundError) as error:
        print(f"bayeszoo: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLossError as error:
        print(f"bayeszoo: training stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bayeszoo: interrupted; continue with the same command and --resume", file=sys.stderr)
        return 130


def _list() -> int:
    print("models:")
    for entry in registry.MODELS.values():
        print(f"  {entry.name:<10} [{entry.family}] {entry.summary}")
    print("guides:")
    for entry in registry.GUIDES.values():
        print(f"  {entry.name:<10} {entry.summary}")
    print("valid pairs:")
    for name in registry.MODELS:
        print(f"  {name:<10} {', '.join(registry.valid_guides(name))}")
    for family, datasets in registry.FAMILY_DATASETS.items():
        print(f"datasets ({family}): {', '.join(datasets)}")
    return 0


def _model_options(args) -> dict:
    """Options for the registry's builders; those left unset take each model's own default."""
    hidden = args.hidden or ((50,) if registry.model_entry(args.model).family == registry.BNN else (400,))
    options = {"z_dim": args.z_dim, "z_dims": list(args.z_dims), "hidden": list(hidden),
               "likelihood": _likelihood(args), "condition": args.condition,
               "masking_noise": args.masking_noise, "flow_length": args.flow_length,
               "laplace_steps": args.laplace_steps, "rnn_dim": args.rnn_dim,
               "num_iafs": args.num_iafs}
    return {name: value for name, value in options.items() if value is not None}


def _likelihood(args) -> str | None:
    """The asked-for likelihood if the model has it, else the model's first (pPCA: Gaussian)."""
    supported = registry.model_entry(args.model).likelihoods
    if args.likelihood is None:
        return None
    return args.likelihood if args.likelihood in supported else supported[0]


def _binarize(args) -> str | None:
    """Images scored by Bernoulli pixels are binarized afresh every minibatch by default."""
    if registry.model_entry(args.model).family != registry.LATENT:
        return None
    if args.binarize is None:
        supported = registry.model_entry(args.model).likelihoods
        return "dynamic" if (_likelihood(args) or supported[0]) == "bernoulli" else None
    return None if args.binarize == "none" else args.binarize


def _noise(text: str):
    if text in ("learned", "prior"):
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"--noise must be 'learned', 'prior' or a positive number, got {text!r}")
    return value


def _bnn_options(args) -> dict:
    if args.likelihood == "bernoulli" or not 0 <= args.dropout < 1:
        raise UsageError("bnn likelihoods: gaussian or heteroscedastic (regression; classification "
                         "is categorical); --dropout must be in [0, 1)")
    options = {"hidden": list(args.hidden or (50,)), "likelihood": args.likelihood, "prior": args.prior,
               "noise": _noise(args.noise), "members": args.members, "dropout": args.dropout,
               "laplace_structure": args.laplace_structure, "laplace_predictive": args.laplace_predictive,
               "nuts_samples": args.nuts_samples,
               "nuts_warmup": args.nuts_warmup, "nuts_max_tree_depth": args.nuts_max_tree_depth,
               "nuts_init": args.nuts_init, "nuts_jit": args.nuts_jit, "tradi_rank": args.tradi_rank,
               "chains": args.chains}
    return {k: v for k, v in options.items() if v is not None}


def _fit_bnn(args, run_dir: Path) -> int:
    """Train a Bayesian MLP with the chosen method and score it on the test split."""
    options = method_options(args.guide, _bnn_options(args))
    fit_options = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                   "lr_decay": args.lr_decay, "patience": args.patience, "clip_norm": args.clip_norm,
                   "seed": args.seed}
    dataset = registry.load_data(args.model, args.data, root=args.data_root, download=args.download,
                                 split=args.split)
    config = {"model": args.model, "guide": args.guide, "data": args.data, "split": args.split,
              "options": options, "fit": fit_options}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model, guide, result = registry.train_bnn(dataset, args.guide, options, **fit_options,
                                              device=args.device, run_dir=run_dir, resume=args.resume,
                                              progress=not args.no_progress)
    seconds = time.perf_counter() - started
    from bayeszoo.inference.metrics import memory_bytes

    model, guide = model.cpu(), guide.cpu()
    save_posterior(run_dir / POSTERIOR, model, guide)
    metrics = {"config": config, "history": result.history if result else [], "train_seconds": seconds,
               "posterior_bytes": memory_bytes(guide), "hardware": _hardware(args.device),
               "test": score_posterior(model, guide, dataset, args.predictive_samples, args.seed)}
    chains = getattr(guide, "chains", None)
    if chains is not None and len(next(iter(chains.values()))) >= 2:
        from bayeszoo.inference import diagnostics

        draws = diagnostics.inference_data(chains)
        metrics["chains"] = {"count": len(next(iter(chains.values()))),
                             "max_rhat": diagnostics.max_rhat(draws), "min_ess": diagnostics.min_ess(draws)}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _write_bnn_figures(run_dir, model, guide, dataset, metrics["history"])
    print(_bnn_summary(metrics["test"]))
    print(f"run folder: {run_dir}")
    return 0


def _bnn_summary(scores: dict) -> str:
    if "rmse" in scores:
        return f"test: RMSE {scores['rmse']:.4f}, NLL {scores['nll']:.4f} (S={scores['num_samples']})"
    text = (f"test: accuracy {scores['accuracy']:.4f}, NLL {scores['nll']:.4f}, "
            f"Brier {scores['brier']:.4f}, ECE {scores['ece']:.4f}")
    if "ood" in scores:
        text += f", OOD AUROC (entropy) {scores['ood']['entropy']['auroc']:.4f}"
    return text + f" (S={scores['num_samples']})"


def _write_bnn_figures(run_dir: Path, model, guide, dataset, history) -> None:
    """Training curve; the uncertainty band for 1-D regression, reliability for classification."""
    import matplotlib.pyplot as plt

    from bayeszoo.inference import metrics, plots
    from bayeszoo.inference.predictive import predictive

    figures = {"training.png": plots.training_curves(history)} if history else {}
    samples = getattr(guide, "num_members", 100)
    if dataset.task == "regression" and dataset.x_dim == 1:
        from bayeszoo.inference.supervised import grid

        x = grid(dataset)
        draws = predictive(model, guide, x, samples)
        moments = metrics.predictive_moments(draws["mean"], draws["variance"])
        figure, ax = plt.subplots(figsize=(6, 4))
        plots.regression_band(ax, dataset.train["x"][:, 0], dataset.train["y"], x[:, 0], moments["mean"],
                              moments["epistemic"].sqrt(), moments["total"].sqrt(), "posterior predictive")
        figures["predictive.png"] = figure
    elif dataset.task == "classification":
        probs = predictive(model, guide, dataset.test["x"], samples)["probs"].mean(0)
        figures["reliability.png"] = plots.reliability_diagram({"test": (probs, dataset.test["y"])})
    for name, figure in figures.items():
        figure.savefig(run_dir / name, dpi=100)
        plt.close(figure)


def _fit(args) -> int:
    registry.check_pair(args.model, args.guide, args.data)
    if args.lr <= 0 or not 0 < args.lr_decay <= 1 or not 0 <= args.masking_noise < 1:
        raise UsageError("--lr must be > 0, --lr-decay in (0, 1], --masking-noise in [0, 1)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} asked for, but torch sees no CUDA device")
    run_dir = args.out or Path("runs") / f"{args.model}-{args.guide}-{args.data}-seed{args.seed}"
    if saved_progress(run_dir) and not args.resume:
        raise UsageError(f"{run_dir} already holds a run; pass --resume to continue it "
                         "or --out to start another")
    if registry.model_entry(args.model).family == registry.BNN:
        return _fit_bnn(args, run_dir)
    config = {"model": args.model, "guide": args.guide, "data": args.data,
              "binarize": _binarize(args), "options": _model_options(args),
              "fit": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                      "lr_decay": args.lr_decay, "num_particles": args.num_particles,
                      "kl_anneal_epochs": args.kl_anneal, "patience": args.patience,
                      "clip_norm": args.clip_norm,
                      "seed": args.seed}}
    dataset = registry.load_data(args.model, args.data, root=args.data_root, download=args.download,
                                 binarize=config["binarize"])
    torch.manual_seed(args.seed)  # network initialisation
    model, guide, inputs = registry.build(args.model, args.guide, dataset, config["options"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))

    started = time.perf_counter()
    result = fit(model, guide, dataset.train, _eval_inputs(dataset, inputs, "valid"),
                 **config["fit"], device=args.device, run_dir=run_dir, resume=args.resume,
                 batch_transform=lambda batch, gen: inputs(dataset.batch_transform(batch, gen)),
                 progress=not args.no_progress)
    seconds = time.perf_counter() - started
    metrics = {"config": config, "history": result.history, "stopped_early": result.stopped_early,
               "best_epoch": result.best_epoch + 1, "train_seconds": seconds,
               "parameters": _count(model) + _count(guide), "hardware": _hardware(args.device)}
    metrics["test"] = _score(model, guide, dataset, inputs, args.is_samples, args.device,
                             progress=not args.no_progress)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _write_figures(run_dir, model.cpu(), guide.cpu(), dataset, inputs, result.history)
    print(_summary(metrics["test"]))
    print(f"run folder: {run_dir}")
    return 0


def _compare(args) -> int:
    from bayeszoo.inference.compare import CompareError, compare

    if not 0 <= args.masking_noise < 1:
        raise UsageError("--masking-noise must be in [0, 1)")
    out = args.out or Path("runs") / f"compare-{args.model}-{args.data}-seed{args.seed}"
    fit_options = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                   "lr_decay": args.lr_decay, "num_particles": args.num_particles,
                   "kl_anneal_epochs": args.kl_anneal, "patience": args.patience,
                   "clip_norm": args.clip_norm, "seed": args.seed}
    try:
        if registry.model_entry(args.model).family == registry.BNN:
            from bayeszoo.inference.compare import compare_bnn

            fit_options.pop("num_particles"), fit_options.pop("kl_anneal_epochs")
            rows = compare_bnn(args.guides, args.data, options=_bnn_options(args), fit_options=fit_options,
                               out=out, split=args.split, num_samples=args.predictive_samples,
                               progress=not args.no_progress, resume=args.resume)
        else:
            rows = compare(args.model, args.guides, args.data, options=_model_options(args),
                           fit_options=fit_options, is_samples=args.is_samples, out=out,
                           data_root=args.data_root, download=args.download, binarize=args.binarize,
                           device=args.device, progress=not args.no_progress, resume=args.resume)
    except CompareError as error:
        raise UsageError(str(error)) from None
    print((out / "compare.md").read_text())
    print(f"comparison folder: {out}")
    return 1 if any(row["status"].startswith("stopped") for row in rows) else 0


def _evaluate(args) -> int:
    config_path = args.run / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    bnn = "model" in config and registry.model_entry(config["model"]).family == registry.BNN
    final = POSTERIOR if bnn else FINAL_WEIGHTS
    if not config or not (args.run / final).exists():
        raise UsageError(f"{args.run} is not a finished run folder (needs config.json and "
                         f"{final}); fit one with `bayeszoo fit`")
    if bnn:
        return _evaluate_bnn(args, config)
    dataset = registry.load_data(config["model"], config["data"], root=args.data_root,
                                 download=args.download, binarize=config["binarize"])
    model, guide, inputs = registry.build(config["model"], config["guide"], dataset,
                                          config["options"])
    load_weights(args.run / FINAL_WEIGHTS, model, guide)
    scores = _score(model.to(args.device), guide.to(args.device), dataset, inputs,
                    args.is_samples, args.device)
    (args.run / "evaluation.json").write_text(json.dumps(scores, indent=2))
    print(_summary(scores))
    return 0


def _evaluate_bnn(args, config: dict) -> int:
    """Rebuild a bnn run's posterior from ``posterior.pt`` and score it on the test split."""
    dataset = registry.load_data(config["model"], config["data"], root=args.data_root,
                                 download=args.download, split=config["split"])
    model = registry.bnn_model(dataset, config["options"])
    guide = load_posterior(args.run / POSTERIOR, model, config["guide"], config["options"], dataset.train)
    scores = score_posterior(model, guide, dataset, args.predictive_samples, config["fit"]["seed"])
    (args.run / "evaluation.json").write_text(json.dumps(scores, indent=2))
    print(_bnn_summary(scores))
    return 0


def _eval_inputs(dataset, inputs, split: str) -> dict:
    generator = torch.Generator().manual_seed(EVAL_BINARIZATION_SEED)
    return inputs(dataset.batch_transform(getattr(dataset, split), generator))


def _score(model, guide, dataset, inputs, is_samples: int, device: str,
           progress: bool = True) -> dict:
    from bayeszoo.inference.evaluate import evaluate

    test = _eval_inputs(dataset, inputs, "test")
    if "mask" not in test:
        return evaluate(model, guide, test, num_samples=is_samples, device=device, progress=progress)
    # Sequences: per-sequence totals and, as in Krishnan et al. (2017), nats per time step.
    scores = evaluate(model, guide, test, num_samples=is_samples, device=device, progress=progress,
                      count_active_units=False)
    sequences_per_step = scores["num_points"] / float(test["mask"].sum())
    for name in ("is_log_likelihood", "elbo", "kl"):
        scores[f"{name}_per_step"] = scores[name] * sequences_per_step
    return scores


def _summary(scores: dict) -> str:
    if "elbo_per_step" in scores:
        return (f"test: IS log-likelihood {scores['is_log_likelihood_per_step']:.3f} nats per time "
                f"step (K={scores['is_samples']}), ELBO {scores['elbo_per_step']:.3f} per step, "
                f"KL {scores['kl_per_step']:.3f} per step")
    return (f"test: IS log-likelihood {scores['is_log_likelihood']:.2f} nats "
            f"(K={scores['is_samples']}), ELBO {scores['elbo']:.2f}, KL {scores['kl']:.2f}, "
            f"active units {scores['active_units']}")


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads"


def _write_figures(run_dir: Path, model, guide, dataset, inputs, history) -> None:
    import matplotlib.pyplot as plt

    from bayeszoo.inference import plots

    figures = {"training.png": plots.training_curves(history)}
    if hasattr(dataset, "image_shape"):
        figures.update(_image_figures(model, guide, dataset, inputs))
    for name, figure in figures.items():
        figure.savefig(run_dir / name, dpi=100)
        plt.close(figure)


def _image_figures(model, guide, dataset, inputs) -> dict:
    """Reconstructions, samples, the latent space and (for 2-D z) the decoded latent grid."""
    from bayeszoo.inference import plots
    from bayeszoo.inference.evaluate import posterior_means

    test = _eval_inputs(dataset, inputs, "test")
    figures = {"reconstructions.png": plots.reconstructions(model, guide, test, dataset.image_shape)}
    if "c" in test:
        figures["samples.png"] = plots.samples(model, dataset.image_shape, c=test["c"][:10])
    else:
        figures["samples.png"] = plots.samples(model, dataset.image_shape)
    means = posterior_means(guide, test)
    first_site = next(iter(means))
    figures["latent.png"] = plots.latent_scatter(means[first_site], dataset.test["y"],
                                                 f"E[{first_site} | x] on the test set")
    if getattr(model, "latent_sites", {}).get("z") == 2 and "c" not in test:
        figures["manifold.png"] = plots.latent_manifold(model, dataset.image_shape)
    return figures


if __name__ == "__main__":
    sys.exit(main())
