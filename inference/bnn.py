"""Training a Bayesian neural network with any of its guides, through one function.

``train(model, method, train, valid, ...)`` returns the fitted guide. Most methods are SVI
with ``inference.svi.fit`` and differ only in the guide or an effect handler; the rest start
from the MAP point (Laplace, TRADI) or replace the optimizer by a sampler (SGLD, SGHMC), and
NUTS runs MCMC. Every result is a guide with the model's signature, so ``Predictive``, the
metrics and the ArviZ diagnostics treat them all alike.

    method          what it is                                                 guide
    map             point estimate (weight decay = the Gaussian prior)          MAPGuide
    meanfield       Bayes by Backprop (Blundell et al. 2015)                    MeanFieldGuide
    lrt             mean-field + local reparameterization (Kingma et al. 2015)  MeanFieldGuide
    flipout         mean-field + Flipout (Wen et al. 2018)                      MeanFieldGuide
    mcdropout       MC dropout (Gal & Ghahramani 2016)                          MCDropoutGuide
    ensemble        deep ensemble, M members in one vectorized step             EnsembleGuide
    laplace         Laplace around the MAP (diag / last-layer / full)           WeightLaplaceGuide
    sgld, sghmc     stochastic-gradient MCMC, thinned samples after burn-in     WeightSamples
    nuts            NUTS, the gold standard for small networks                  WeightSamples
    tradi           Kalman-filtered SGD trajectory (Franchi et al. 2020)        TradiGuide
"""

from __future__ import annotations

import contextlib
import os
from functools import partial
from pathlib import Path

import torch
from pyro.infer import TraceMeanField_ELBO

from bayeszoo.guides.ensemble import EnsembleGuide
from bayeszoo.guides.map import MAPGuide
from bayeszoo.guides.mc_dropout import MCDropoutGuide
from bayeszoo.guides.mean_field import MeanFieldGuide
from bayeszoo.guides.reparameterization import flipout, local_reparameterization
from bayeszoo.guides.samples import WeightSamples
from bayeszoo.guides.tradi import TradiGuide
from bayeszoo.guides.weight_laplace import WeightLaplaceGuide
from bayeszoo.guides.weights import weight_sites
from bayeszoo.inference.mcmc import pooled, run_nuts
from bayeszoo.inference.sgmcmc import SGHMC, SGLD, ThinnedSamples
from bayeszoo.inference.svi import CHECKPOINT, fit, save_atomically
from bayeszoo.inference.tradi import WeightTracker

METHODS = ("map", "meanfield", "lrt", "flipout", "mcdropout", "ensemble", "laplace", "sgld", "sghmc",
           "nuts", "tradi")
HANDLERS = {"lrt": local_reparameterization, "flipout": flipout}


def train(model, method: str, train: dict, valid: dict | None = None, *, options: dict | None = None,
          **fit_options):
    """Fit ``model`` with ``method``; returns (guide, FitResult or None for NUTS).

    For ``sgld`` and ``sghmc`` ``lr`` is the sampler's step size on the whole-data potential, far
    below an Adam learning rate: about 3e-4 (SGLD) and 1e-5 (SGHMC, whose drift per step is about
    lr / friction) worked on the gap and Boston sets; larger steps diverge.

    ``options``: method settings (``init_scale``, ``dropout``, ``members``, ``laplace_structure``,
    ``laplace_predictive`` ("glm" or "sampled"), ``burn_in_epochs``, ``thin``, ``chains`` (NUTS:
    default 2; SGLD/SGHMC: default 1), ``nuts_samples``, ``nuts_warmup``, ``nuts_max_tree_depth``,
    ``nuts_jit``, ``nuts_init`` ("prior" or "map"), ``tradi`` tracker settings). ``fit_options``
    go to ``inference.svi.fit`` (epochs, lr, batch_size, ...).

    The mean-field methods (meanfield, lrt, flipout) train with ``TraceMeanField_ELBO``: the KL
    from q(w) to a Gaussian prior in closed form, as Kingma et al. (2015) do, rather than
    Blundell et al.'s Monte-Carlo log q(w) - log p(w) at the sampled weights. The same objective,
    and a step does less arithmetic (measured 4-10% faster on the digits and 784-400-400-8 nets).
    The gradient noise barely changes (1-3% less there): the likelihood term dominates it.
    """
    if method not in METHODS:
        raise ValueError(f"unknown BNN method {method!r}; choose from {', '.join(METHODS)}")
    options = dict(options or {})
    if method in ("sgld", "sghmc", "tradi") and "optimizer" in fit_options:
        raise ValueError(f"{method} brings its own optimizer (a sampler, or Adam with the tracker)")
    if method == "nuts":
        return _nuts(model, train, options, fit_options), None
    if method in ("sgld", "sghmc"):
        return _sgmcmc(model, method, train, valid, options, fit_options)
    if method == "tradi":
        return _tradi(model, train, valid, options, fit_options)
    guide = _svi_guide(model, method, options)
    if isinstance(guide, MeanFieldGuide):
        fit_options.setdefault("elbo", TraceMeanField_ELBO)
    if isinstance(guide, EnsembleGuide):
        fit_options["num_particles"] = guide.num_particles
    handler = HANDLERS.get(method, contextlib.nullcontext)
    with handler():
        result = fit(model, guide, train, valid, **fit_options)
    if method == "laplace":
        guide = WeightLaplaceGuide(model, guide, train,
                                   structure=options.get("laplace_structure", "last-layer"),
                                   predictive=options.get("laplace_predictive", "glm"))
    return guide, result


def _svi_guide(model, method: str, options: dict):
    if method in ("meanfield", "lrt", "flipout"):
        return MeanFieldGuide(model, init_scale=options.get("init_scale", 0.01))
    if method == "mcdropout":
        return MCDropoutGuide(model, p=options.get("dropout", 0.1))
    if method == "ensemble":
        return EnsembleGuide(model, members=options.get("members", 5))
    return MAPGuide(model)  # map, and laplace's starting point


def _sgmcmc(model, method: str, train: dict, valid, options: dict, fit_options: dict):
    """Run SGLD / SGHMC on the MAP guide's weights and keep thinned samples after burn-in.

    Only the weight sites are sampled. Parameters of the model itself (a ``noise="learned"``
    scale) have no prior; they follow the same sampler at temperature 0, i.e. gradient descent on
    the potential, and end as point estimates like in MAP.

    ``chains`` (default 1) independent chains run one after the other, each from a fresh draw of
    PyTorch's initialisation and with its own seed (the model's own parameters restart too); the
    guide pools their draws and keeps them per chain in ``guide.chains`` for ArviZ's R-hat and
    ESS, as for NUTS. The FitResult returned is the last chain's. With a ``run_dir``, chain c > 0
    checkpoints in ``run_dir/chain<c>``, and every checkpoint holds the chain's draws so far, so
    ``resume=True`` continues an interrupted run chain by chain.
    """
    num_chains = options.get("chains", 1)
    start = {key: value.clone() for key, value in model.state_dict().items()}
    seed = fit_options.get("seed", 0)
    chains, result = [], None
    for chain in range(num_chains):
        model.load_state_dict(start)
        guide = MAPGuide(model)
        if chain > 0:
            torch.manual_seed(seed + chain)
            fresh = model.initial_values(fresh=True)
            with torch.no_grad():
                for name, weight in guide.named_weights().items():
                    if name in fresh:
                        weight.copy_(fresh[name])
        chain_options = {**fit_options, "seed": seed + chain, **_run_folder(fit_options, chain)}
        recorder, result = _sgmcmc_chain(model, guide, method, train, valid, options, chain_options)
        chains.append(recorder.stacked())
    samples = WeightSamples(model, {name: torch.cat([c[name] for c in chains]) for name in chains[0]})
    samples.chains = {name: torch.stack([c[name] for c in chains]) for name in chains[0]}
    return samples, result


def _run_folder(fit_options: dict, chain: int) -> dict:
    """Chain ``chain``'s run folder (the run's own for chain 0) and whether it resumes: only a
    chain that wrote a checkpoint can; a later one starts afresh."""
    run_dir = fit_options.get("run_dir")
    if run_dir is None:
        return {}
    run_dir = Path(run_dir) if chain == 0 else Path(run_dir) / f"chain{chain}"
    resume = fit_options.get("resume", False) and (run_dir / CHECKPOINT).exists()
    return {"run_dir": run_dir, "resume": resume}


def _sgmcmc_chain(model, guide: MAPGuide, method: str, train: dict, valid, options: dict,
                  fit_options: dict):
    """One chain: the sampler as ``fit``'s optimizer, a recorder on its steps.

    The loss ``fit`` differentiates is a minibatch's share of U(w) = -log p(w, y | x) (see
    ``scale_global_sites``), so the sampler's ``grad_scale`` is N / batch size.
    """
    batch_size = fit_options.get("batch_size", 100)
    num_train = len(train["x"])
    steps_per_epoch = -(-num_train // batch_size)
    recorder = ThinnedSamples(burn_in=options.get("burn_in_epochs", 1) * steps_per_epoch,
                              thin=options.get("thin", steps_per_epoch))
    sampler = SGLD if method == "sgld" else partial(SGHMC, friction=options.get("friction", 0.05))

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

    result = fit(model, guide, train, valid, optimizer=optimizer, checkpoint_extras={"samples": recorder},
                 **fit_options)
    if len(recorder) == 0:
        raise ValueError("the sampler kept no samples: train for more epochs than burn_in_epochs")
    return recorder, result


def _tradi(model, train: dict, valid, options: dict, fit_options: dict):
    """Train the MAP network with Adam while a ``WeightTracker`` filters every weight's trajectory.

    The tracker starts after ``burn_in_epochs`` (default 1). Its fading factor defaults to
    1 - 1 / (steps per epoch): sigma^2 is the variance the steps accumulate over about one epoch.
    """
    guide = MAPGuide(model)
    batch_size = fit_options.get("batch_size", 100)
    steps_per_epoch = -(-len(train["x"]) // batch_size)
    weights = {name: p for name, p in guide.named_weights().items()
               if name in {s.name for s in guide.sites if s.is_real}}
    tracker = WeightTracker(weights, burn_in_steps=options.get("burn_in_epochs", 1) * steps_per_epoch,
                            variance_decay=options.get("variance_decay", 1 - 1 / steps_per_epoch),
                            **{k: options[k] for k in ("process_noise", "measurement_noise") if k in options})

    def optimizer(params, lr):
        opt = torch.optim.Adam(params, lr=lr)
        tracker.attach(opt)
        return opt

    result = fit(model, guide, train, valid, optimizer=optimizer, checkpoint_extras={"tracker": tracker},
                 **fit_options)
    if tracker.tracked_steps == 0:
        raise ValueError("TRADI tracked no step: train for more epochs than burn_in_epochs")
    tradi = TradiGuide(model, tracker.means(), tracker.variances(), guide.point(),
                       rank=options.get("tradi_rank", 0), correlation=options.get("tradi_correlation", 0.5))
    tradi.tracker = tracker
    return tradi, result


def _nuts(model, train: dict, options: dict, fit_options: dict) -> WeightSamples:
    """NUTS chains; with ``nuts_init="map"`` they start from a MAP fit (``fit_options`` train it)."""
    init_values = None
    if options.get("nuts_init", "prior") == "map":
        start = MAPGuide(model)
        fit(model, start, train, None, **{**fit_options, **_run_folder(fit_options, 0)})
        init_values = start.point()
    elif options.get("nuts_init", "prior") != "prior":
        raise ValueError(f"nuts_init must be 'prior' or 'map', got {options['nuts_init']!r}")
    draws = run_nuts(model, train, num_samples=options.get("nuts_samples", 500),
                     warmup=options.get("nuts_warmup", 500), num_chains=options.get("chains", 2),
                     max_tree_depth=options.get("nuts_max_tree_depth", 10),
                     seed=fit_options.get("seed", 0), progress=fit_options.get("progress", True),
                     jit_compile=options.get("nuts_jit", False), init_values=init_values,
                     run_dir=fit_options.get("run_dir"), resume=fit_options.get("resume", False))
    guide = WeightSamples(model, pooled(draws))
    guide.chains = draws  # per chain, for ArviZ's R-hat and ESS
    return guide


# ----------------------------------------------------------------------------------------------
# The fitted posterior on disk

POSTERIOR = "posterior.pt"


def method_options(method: str, options: dict) -> dict:
    """``options`` as ``method`` runs them: NUTS samples sample sites only, so a learned noise
    scale (a parameter it would leave at its initial value) becomes a sampled one with a prior."""
    if method == "nuts" and options.get("noise", "learned") == "learned":
        return {**options, "noise": "prior"}
    return dict(options)


def saved_progress(run_dir: str | os.PathLike) -> bool:
    """Whether a run folder holds anything a resumed run continues from: an epoch checkpoint, a
    finished posterior, a finished NUTS chain."""
    run_dir = Path(run_dir)
    return any((run_dir / name).exists() for name in (CHECKPOINT, POSTERIOR)) or \
        any(run_dir.glob("nuts-chain*.pt"))


def score_posterior(model, guide, dataset, predictive_samples: int, seed: int) -> dict:
    """Test scores (``inference.predictive.score``) from a seeded random stream, so scoring a
    posterior rebuilt by ``load_posterior`` repeats them. Sample-set guides (ensemble, SGLD,
    SGHMC, NUTS) predict with each member once."""
    from bayeszoo.inference.predictive import score
    from bayeszoo.inference.svi import set_seed

    set_seed(seed)
    return score(model, guide, dataset, num_samples=getattr(guide, "num_members", predictive_samples))


def save_posterior(path: str | os.PathLike, model, guide) -> None:
    """Write the model's and the final guide's tensors (weights, draws, Laplace factors, TRADI's
    means and scales) to ``path``: what ``load_posterior`` needs to predict without training."""
    save_atomically({"model": model.state_dict(), "guide": guide.state_dict()}, Path(path))


def load_posterior(path: str | os.PathLike, model, method: str, options: dict, train: dict):
    """The guide ``train(model, method, ...)`` returned, rebuilt from ``save_posterior``'s file.

    ``model`` must be built as for training; ``options`` are the method settings used then.
    Laplace recomputes its Gauss-Newton matrix from ``train`` at the saved MAP point (the same
    deterministic computation as after training), then takes the saved factors.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    guide = _guide_shell(model, method, options, state["guide"], train)
    guide.load_state_dict(state["guide"])
    return guide


def _guide_shell(model, method: str, options: dict, state: dict, train: dict):
    """A guide of the right kind and shapes, to load ``state`` into."""
    if method not in METHODS:
        raise ValueError(f"unknown BNN method {method!r}; choose from {', '.join(METHODS)}")
    sites = weight_sites(model)
    if method in ("sgld", "sghmc", "nuts"):
        return WeightSamples(model, {s.name: state[f"members.{s.key}"] for s in sites})
    if method == "tradi":
        tracked = [s for s in sites if f"{s.key}_loc" in state]
        means = {s.name: state[f"{s.key}_loc"] for s in tracked}
        variances = {s.name: state[f"{s.key}_scale"] ** 2 for s in tracked}
        point = {s.name: state[f"{s.key}_point"] for s in sites if s.name not in means}
        return TradiGuide(model, means, variances, point, rank=options.get("tradi_rank", 0),
                          correlation=options.get("tradi_correlation", 0.5))
    if method == "laplace":
        map_guide = MAPGuide(model)
        with torch.no_grad():
            for site, weight in zip(sites, map_guide.named_weights().values(), strict=True):
                weight.copy_(map_guide.transforms[site.name].inv(state[f"{site.key}_point"]))
        return WeightLaplaceGuide(model, map_guide, train,
                                  structure=options.get("laplace_structure", "last-layer"),
                                  predictive=options.get("laplace_predictive", "glm"))
    return _svi_guide(model, method, options)
