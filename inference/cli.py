"""The ``bayeszoo`` command: list, fit, evaluate and compare model/guide pairs.

    bayeszoo list
    bayeszoo fit vae --guide rank1 --data mnist5k --epochs 20
    bayeszoo fit --from runs/vae-rank1-mnist5k-seed0 --seed 1   # rerun a saved config, one flag changed
    bayeszoo evaluate runs/vae-rank1-mnist5k-seed0
    bayeszoo compare vae --guides amortized,rank1,planar,iaf,vlae --data mnist5k --epochs 20

The flags are the registry's options (``inference.registry``); a flag that does not apply to the
chosen pair is an error. Names, pairs and values are checked before any data is loaded or any
file is written; a bad one exits with status 2 and one line. ``fit --from RUN`` starts from the
settled options in ``RUN/config.json`` (model, guide and dataset included); every flag given
beside it, and a model, ``--guide`` or ``--data``, overrides the saved value; saved options that a
newly named pair does not have are dropped. Torch and Pyro are imported only by
the commands that train or score.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from pathlib import Path

from bayeszoo.inference import registry

EXIT_USAGE = 2
#: Flags of the command itself, not options of a pair.
COMMAND_FLAGS = (
    "out",
    "resume",
    "no_progress",
    "data_root",
    "download",
    "guides",
    "run",
    "command",
    "from_run",
    "model",
    "guide",
    "data",
)


class UsageError(Exception):
    """Bad command-line input, reported as one line before any work starts."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own prints the usage too)
        self.exit(EXIT_USAGE, f"bayeszoo: error: {message}\n")


def _defaults(declared: list[tuple[str, registry.Option]]) -> str:
    """'default: 20' or, where parts differ, 'default: 20 for vae, cvae; 16 for dmm'."""
    by_value: dict[str, list[str]] = {}
    for owner, option in declared:
        value = option.default
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        by_value.setdefault(text, []).append(owner)
    if len(by_value) == 1:
        return f"default: {next(iter(by_value))}"
    return "default: " + "; ".join(f"{value} for {', '.join(owners)}" for value, owners in by_value.items())


def _add_pair_options(command) -> None:
    """One flag per registry option; the default is left unset so that a given flag is known."""
    group = command.add_argument_group("options of the pair (each applies to the models and guides named)")
    for name, declared in sorted(registry.all_options().items()):
        option = declared[0][1]
        owners = sorted({owner for owner, _ in declared})
        where = "every pair" if "every run" in owners else ", ".join(owners)
        help_text = f"{option.help} ({_defaults(declared)}; applies to {where})"
        if option.type is bool:
            group.add_argument(
                option.flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=help_text
            )
            continue
        choices = sorted({c for _, o in declared for c in (o.choices or ())}) or None
        group.add_argument(
            option.flag,
            dest=name,
            type=_typed(option),
            choices=choices,
            default=argparse.SUPPRESS,
            help=help_text,
        )


def _typed(option: registry.Option):
    def parse(text: str):
        try:
            return option.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option.flag}: cannot read {text!r}") from None

    parse.__name__ = getattr(option.type, "__name__", "value")
    return parse


def _add_run_flags(command, out_help: str) -> None:
    group = command.add_argument_group("run")
    group.add_argument("--out", type=Path, default=None, help=out_help)
    group.add_argument("--resume", action="store_true", help="continue from the checkpoint(s) in --out")
    group.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    _add_data_flags(command)


def _add_data_flags(command) -> None:
    group = command.add_argument_group("data")
    group.add_argument(
        "--data-root", type=Path, default=Path("data"), help="where the full datasets live (default: data)"
    )
    group.add_argument("--download", action="store_true", help="fetch a full dataset if missing")


def _parser() -> argparse.ArgumentParser:
    from bayeszoo import __version__

    parser = _Parser(prog="bayeszoo", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"bayeszoo {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser("list", help="models, guides, valid pairs and datasets")

    fit_cmd = commands.add_parser("fit", help="fit a model/guide pair and write a run folder")
    fit_cmd.add_argument("model", nargs="?", help="a model name (see `bayeszoo list`)")
    fit_cmd.add_argument("--guide", help="a guide that fits the model")
    fit_cmd.add_argument("--data", help="a dataset of the model's family")
    fit_cmd.add_argument(
        "--from",
        dest="from_run",
        type=Path,
        metavar="RUN",
        help="rerun the config saved in the run folder RUN; the flags given beside it override it",
    )
    _add_run_flags(fit_cmd, "run folder (default: runs/MODEL-GUIDE-DATA-seedN)")
    _add_pair_options(fit_cmd)

    eval_cmd = commands.add_parser("evaluate", help="score a fitted run on its test set again")
    eval_cmd.add_argument("run", type=Path, help="a run folder written by `bayeszoo fit`")
    for option in (registry.IS_SAMPLES, *registry.FAMILIES[registry.BNN].score_options):
        eval_cmd.add_argument(
            option.flag,
            dest=option.name,
            type=_typed(option),
            default=argparse.SUPPRESS,
            help=f"{option.help} (default: the run's own)",
        )
    eval_cmd.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    _add_data_flags(eval_cmd)

    compare_cmd = commands.add_parser(
        "compare", help="train a model with several guides on equal terms; table, CSV and figure"
    )
    compare_cmd.add_argument("model", help="a model name (see `bayeszoo list`)")
    compare_cmd.add_argument(
        "--guides", required=True, help="comma-separated, e.g. amortized,rank1,planar,iaf,vlae"
    )
    compare_cmd.add_argument("--data", required=True, help="a dataset of the model's family")
    _add_run_flags(compare_cmd, "comparison folder (default: runs/compare-MODEL-DATA-seedN)")
    _add_pair_options(compare_cmd)

    course_cmd = commands.add_parser("course", help="build the course: executed HTML chapters and an index")
    course_cmd.add_argument("--out", type=Path, default=Path("build/course"),
                            help="where the pages go (default: build/course)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with _epoch_lines_to_stderr(), _torch_jit_notes_hidden():
        return _command(args)


class _TqdmHandler(logging.Handler):
    """Writes each record to stderr through ``tqdm.write``, which clears and redraws the bars
    around it, so a line never lands inside a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's own contract: a handler never raises
            self.handleError(record)


@contextlib.contextmanager
def _epoch_lines_to_stderr():
    """The library's INFO lines (one per epoch, one per guide of a comparison) on stderr, bars or
    not: ``--no-progress`` hides the bars only. Removed again on the way out, so a caller that
    runs ``main`` twice (the tests) gets each line once."""
    logger = logging.getLogger("bayeszoo")
    handler, level = _TqdmHandler(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def _torch_jit_notes_hidden():
    """Torch 2.14 deprecates ``torch.jit`` and says so with a FutureWarning from its own modules
    whenever Pyro uses it: notes on torch's internals, not on the user's run. Only those are hidden;
    every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit(\.|$)")
        yield


def _command(args) -> int:
    try:
        if args.command == "list":
            return _list()
        if args.command == "course":
            from bayeszoo.inference.course import main as build_course

            return build_course(["--out", str(args.out)])
        _own_the_process()
        from bayeszoo.inference.compare import CompareError
        from bayeszoo.inference.runs import RunError
        from bayeszoo.inference.svi import NonFiniteLossError

        try:
            return {"fit": _fit, "compare": _compare, "evaluate": _evaluate}[args.command](args)
        except (CompareError, RunError) as error:
            raise UsageError(str(error)) from None
        except NonFiniteLossError as error:
            print(f"bayeszoo: training stopped: {error}", file=sys.stderr)
            return 1
    except (UsageError, registry.RegistryError, FileNotFoundError) as error:
        print(f"bayeszoo: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("bayeszoo: interrupted; continue with the same command and --resume", file=sys.stderr)
        return 130


def _own_the_process() -> None:
    """The command owns its process: its PyroModules keep their parameters to themselves, and it
    starts from an empty parameter store."""
    import pyro

    pyro.settings.set(module_local_params=True)
    pyro.clear_param_store()


def _list() -> int:
    print("models:")
    for entry in registry.MODELS.values():
        print(f"  {entry.name:<10} [{entry.family}] {entry.summary}")
    print("guides:")
    for entry in registry.GUIDES.values():
        aliases = f" (also: {', '.join(entry.aliases)})" if entry.aliases else ""
        print(f"  {entry.name:<10} {entry.summary}{aliases}")
    print("valid pairs:")
    for name in registry.MODELS:
        print(f"  {name:<10} {', '.join(registry.valid_guides(name))}")
    for family in registry.FAMILIES.values():
        print(f"datasets ({family.name}): {', '.join(family.datasets)}")
    return 0


def _given(args) -> dict:
    """The pair options given on the command line (flags left out keep their defaults)."""
    return {name: value for name, value in vars(args).items() if name not in COMMAND_FLAGS}


def _check_device(device: str) -> None:
    import torch

    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for, but torch sees no CUDA device")


def _fit(args) -> int:
    from bayeszoo.inference import runs

    given = _given(args)
    device = given.pop("device", "cpu")
    if args.from_run is not None:
        config = runs.replan(args.from_run, args.model, args.guide, args.data, **given)
    elif None in (args.model, args.guide, args.data):
        raise UsageError("fit needs MODEL, --guide and --data, or --from RUN")
    else:
        config = runs.plan(args.model, args.guide, args.data, **given)
    _check_device(device)
    run_dir = args.out or Path("runs") / _run_name(config)
    family = registry.resolve(registry.family_of(config["model"]).behaviour)
    run = runs.fit_run(
        config,
        run_dir,
        resume=args.resume,
        progress=not args.no_progress,
        device=device,
        data_root=args.data_root,
        download=args.download,
    )
    print(family.summary(run.scores))
    for warning in run.metrics["warnings"]:
        print(f"bayeszoo: warning: {warning}", file=sys.stderr)
    print(f"run folder: {run_dir}")
    return 0


def _run_name(config: dict) -> str:
    """model-guide-data[-splitN]-seedN: every setting that makes one default run folder differ
    from another's."""
    split = config["data_options"].get("split", 0)
    return "-".join(
        [
            config["model"],
            config["guide"],
            config["data"],
            *([f"split{split}"] if split else []),
            f"seed{config['fit']['seed']}",
        ]
    )


def _compare(args) -> int:
    from bayeszoo.inference.compare import compare

    given = _given(args)
    device = given.pop("device", "cpu")
    budget_names = {option.name for entry in registry.GUIDES.values() for option in entry.budget} | {"seed"}
    fit_options = {k: v for k, v in given.items() if k in budget_names}
    options = {k: v for k, v in given.items() if k not in budget_names}
    seed = fit_options.get("seed", 0)
    out = args.out or Path("runs") / f"compare-{args.model}-{args.data}-seed{seed}"
    rows = compare(
        args.model,
        args.guides,
        args.data,
        options=options,
        fit_options=fit_options,
        out=out,
        data_root=args.data_root,
        download=args.download,
        device=device,
        progress=not args.no_progress,
        resume=args.resume,
    )
    print((out / "compare.md").read_text())
    print(f"comparison folder: {out}")
    return 1 if any(row["status"].startswith("stopped") for row in rows) else 0


def _evaluate(args) -> int:
    from bayeszoo.inference import runs

    config = runs.read_config(args.run)
    scoring = {k: v for k, v in vars(args).items() if k in ("is_samples", "predictive_samples")}
    unknown = sorted(set(scoring) - set(config["scoring"]))
    if unknown:
        flags = ", ".join("--" + name.replace("_", "-") for name in unknown)
        raise UsageError(
            f"{flags} does not apply to a {config['model']} run; it scores with "
            f"{', '.join(config['scoring']) or 'no options'}"
        )
    _check_device(args.device)
    scores = runs.evaluate_run(
        args.run, device=args.device, data_root=args.data_root, download=args.download, **scoring
    )
    print(registry.resolve(registry.family_of(config["model"]).behaviour).summary(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
