"""bayeszoo: a Pyro model zoo for Bayesian deep learning.

Every method is a Pyro model/guide pair, named in one registry; any valid pair trains, saves and
scores the same way, from Python or from the ``bayeszoo`` command::

    import bayeszoo

    print(bayeszoo.list_pairs()["bnn"])                       # the guides that fit a model
    run = bayeszoo.fit("bnn", "flipout", "gap", epochs=300, batch_size=40, lr=0.01, out="runs/flipout")
    print(run.scores["rmse"], run.metrics["posterior_bytes"])
    again = bayeszoo.evaluate("runs/flipout")                  # the same scores, from posterior.pt
    run = bayeszoo.load_run("runs/flipout")                    # run.model, run.posterior: Pyro modules
    rows = bayeszoo.compare("vae", ["amortized", "iaf", "vlae"], "digits", fit_options={"epochs": 5})

The building blocks are importable on their own: ``bayeszoo.models`` (generative models),
``bayeszoo.guides`` (approximate posteriors), ``bayeszoo.inference`` (training loops, scores,
diagnostics, data). Importing bayeszoo changes no Pyro setting and imports torch only when a
function here is called.

bayeszoo's modules hold plain ``nn.Parameter``s and train with torch optimizers over
``module.parameters()``, so they work in either of Pyro's parameter modes; the ``bayeszoo`` command,
the tutorials and the tests run with ``pyro.settings.set(module_local_params=True)``, Pyro's
recommendation for PyroModules trained this way (each module keeps its parameters to itself).
Nothing here clears or fills Pyro's global parameter store for you.
"""

from __future__ import annotations

import logging

# Training logs a line per epoch to the "bayeszoo" loggers; where they go is the application's choice.
logging.getLogger("bayeszoo").addHandler(logging.NullHandler())

__version__ = "0.1.0"
__all__ = ["__version__", "compare", "evaluate", "fit", "list_pairs", "load_run"]


def list_pairs() -> dict[str, list[str]]:
    """Every model name with the guides that fit it: ``{"vae": ["amortized", "rank1", ...], ...}``.
    ``bayeszoo.inference.registry`` has the datasets, options and summaries."""
    from bayeszoo.inference import registry

    return {name: registry.valid_guides(name) for name in registry.MODELS}


def fit(
    model: str,
    guide: str,
    data: str,
    *,
    out,
    resume: bool = False,
    progress: bool = True,
    device: str = "cpu",
    data_root="data",
    download: bool = False,
    **options,
):
    """Train ``guide`` on ``model`` with ``data`` into the run folder ``out``; returns the ``Run``
    (``.model``, ``.posterior``, ``.scores``, ``.metrics``, ``.path``).

    ``options`` are the pair's options by their Python names: the budget (``epochs``,
    ``batch_size``, ``lr``, ``seed``, ...), the model's and the guide's (``z_dim``, ``hidden``,
    ``flow_length``, ``members``, ...) and the family's (``binarize``, ``split``, ``is_samples``,
    ``predictive_samples``). One that does not apply to the pair raises ``ValueError`` before
    anything is loaded or written, and so does a folder that already holds a run (unless
    ``resume``). ``devices``, ``accelerator``, ``num_nodes`` and ``strategy`` train on several
    processes (Lightning Fabric): SVI data-parallel, an ensemble's members and MCMC chains shared
    out; process settings that cannot run here are a ``ValueError`` before anything is written.
    Spawned processes (``strategy="ddp"``, the default) re-import your script: call ``fit`` under
    ``if __name__ == "__main__":``.

        run = bayeszoo.fit("vae", "iaf", "digits", out="runs/iaf", epochs=10, flow_length=4)
    """
    from bayeszoo.inference import runs

    config = runs.plan(model, guide, data, **options)
    return runs.fit_run(
        config, out, resume=resume, progress=progress, device=device, data_root=data_root, download=download
    )


def evaluate(
    run_dir,
    *,
    device: str = "cpu",
    progress: bool = False,
    data_root="data",
    download: bool = False,
    **scoring,
) -> dict:
    """Score a finished run folder again and write its ``evaluation.json``; with the run's own
    scoring options (the default) this repeats the scores ``fit`` wrote. ``scoring`` overrides
    them, e.g. ``is_samples=5000`` for a latent-variable model, ``predictive_samples=1000`` for a
    Bayesian network.

        scores = bayeszoo.evaluate("runs/iaf", is_samples=5000)
    """
    from bayeszoo.inference import runs

    return runs.evaluate_run(
        run_dir, device=device, progress=progress, data_root=data_root, download=download, **scoring
    )


def load_run(run_dir, *, device: str = "cpu", data_root="data", download: bool = False):
    """A finished run folder as a ``Run``: its config, the rebuilt model and fitted posterior (Pyro
    modules, ready for ``pyro.infer.Predictive``), its dataset and metrics.

        run = bayeszoo.load_run("runs/iaf")
        predictive = pyro.infer.Predictive(run.model, guide=run.posterior, num_samples=10)
    """
    from bayeszoo.inference import runs

    return runs.load_run(run_dir, device=device, data_root=data_root, download=download)


def compare(
    model: str,
    guides,
    data: str,
    *,
    out="runs/compare",
    fit_options: dict | None = None,
    options: dict | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str = "cpu",
    data_root="data",
    download: bool = False,
) -> list[dict]:
    """Train ``model`` with every guide in ``guides`` on equal terms (same initial model, data,
    budget and seed), each in ``out/<guide>/`` as ``fit`` would, and write ``out/compare.md``,
    ``out/compare.csv`` (and ``out/compare.png`` for images). Returns one row of scores per guide.

        rows = bayeszoo.compare("bnn", "map,meanfield,laplace", "gap", fit_options={"epochs": 100})
    """
    from bayeszoo.inference.compare import compare as run_comparison

    return run_comparison(
        model,
        guides,
        data,
        options=options,
        fit_options=fit_options,
        out=out,
        data_root=data_root,
        download=download,
        device=device,
        progress=progress,
        resume=resume,
    )
