"""Names for every model, guide and dataset, which pairs are valid, and how to build them.

A model entry knows its family and how to turn a dataset minibatch (``{"x", "y"}`` for
images, ``{"x", "mask", ...}`` for sequences) into the model's keyword inputs (``inputs``).
A guide entry lists the families it serves and builds itself from the model. Each family
has its datasets. ``check_pair`` is called before any data is loaded or any training
starts, so a typo costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bayeszoo.guides.amortized import AmortizedDelta, AmortizedNormal, AmortizedRank1Normal
from bayeszoo.guides.dkf import StructuredInferenceNetwork, structure_names
from bayeszoo.guides.flows import AmortizedFlow
from bayeszoo.guides.vlae import VLAEGuide
from bayeszoo.inference.data import DATASETS, load_dataset
from bayeszoo.inference.sequences import load_sequence_dataset
from bayeszoo.inference.supervised import SUPERVISED_DATASETS, load_supervised
from bayeszoo.models.bnn import BayesianNeuralNetwork
from bayeszoo.models.dkf import DeepMarkovModel, LinearGaussianSSM
from bayeszoo.models.nn import mlp
from bayeszoo.models.ppca import PPCA
from bayeszoo.models.vae import VAE, ConditionalVAE, DeepLatentGaussianModel, label_inputs, quadrant_inputs

BNN_METHODS = {
    "map": "point estimate of the weights (weight decay = the Gaussian prior)",
    "meanfield": "mean-field Gaussian over the weights: Bayes by Backprop (Blundell et al. 2015)",
    "lrt": "mean-field + local reparameterization (Kingma, Salimans & Welling 2015)",
    "flipout": "mean-field + Flipout pseudo-independent perturbations (Wen et al. 2018)",
    "mcdropout": "MC dropout as variational inference (Gal & Ghahramani 2016)",
    "ensemble": "deep ensemble, M members trained in one vectorized step (Lakshminarayanan et al. 2017)",
    "sgld": "stochastic gradient Langevin dynamics, thinned samples (Welling & Teh 2011)",
    "sghmc": "stochastic gradient HMC (Chen, Fox & Guestrin 2014)",
    "nuts": "NUTS (Hoffman & Gelman 2014): the gold standard for small networks",
    "tradi": "Kalman-filtered SGD trajectory, a Gaussian per weight (Franchi et al. 2020)",
}


class RegistryError(ValueError):
    """An unknown name or an invalid model/guide pair; the message lists the valid choices."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    build: Callable  # (dataset, options) -> model
    summary: str
    inputs: Callable = field(default=lambda batch, dataset, options: {"x": batch["x"]})
    likelihoods: tuple[str, ...] = ("bernoulli", "gaussian")


@dataclass(frozen=True)
class GuideEntry:
    name: str
    families: tuple[str, ...]
    build: Callable  # (model, options) -> guide
    summary: str
    excludes: tuple[str, ...] = ()  # models of those families that this guide cannot serve


def _hidden(options: dict) -> tuple[int, ...]:
    return tuple(options.get("hidden", (400,)))


def _flow_guide(kind: str) -> Callable:
    return lambda m, o: AmortizedFlow(m, _hidden(o), flow=kind, flow_length=o.get("flow_length", 8))


def _inference_network(structure: str) -> Callable:
    return lambda m, o: StructuredInferenceNetwork(
        m, structure, o.get("rnn_dim", 600), num_iafs=o.get("num_iafs", 0))


def _cvae_inputs(batch, dataset, options):
    if options.get("condition", "label") == "label":
        return label_inputs(batch["x"], batch["y"], dataset.num_classes)
    return quadrant_inputs(batch["x"], dataset.image_shape, options.get("observed_quadrant", 0))


def _cvae_context_dim(dataset, options) -> int:
    return dataset.num_classes if options.get("condition", "label") == "label" else dataset.x_dim


def _sequence_inputs(batch, dataset, options):
    return {k: batch[k] for k in ("x", "mask", "u") if k in batch}


def _dmm_emission(dataset, options) -> str:
    # JSB chorales are binary piano rolls; the synthetic sets are real-valued.
    return options.get("likelihood") or ("bernoulli" if dataset.name == "jsb" else "gaussian")


def bnn_model(data, o: dict):
    """An MLP (``hidden`` sizes, default one layer of 50) with the likelihood the task needs."""
    classification = data.task == "classification"
    likelihood = "categorical" if classification else (o.get("likelihood") or "gaussian")
    outputs = data.num_classes if classification else (2 if likelihood == "heteroscedastic" else 1)
    net = mlp((data.x_dim, *o.get("hidden", (50,)), outputs))
    return BayesianNeuralNetwork(net, (data.x_dim,), likelihood, prior=o.get("prior", "fan_in"),
                                 noise=o.get("noise", "learned"))


LATENT = "latent-variable"
STATE_SPACE = "state-space"
BNN = "bayesian-neural-network"
FAMILY_DATASETS = {LATENT: DATASETS, STATE_SPACE: ("linear-gaussian", "pendulum", "jsb"),
                   BNN: SUPERVISED_DATASETS}

MODELS: dict[str, ModelEntry] = {entry.name: entry for entry in [
    ModelEntry("vae", LATENT, lambda data, o: VAE(
        data.x_dim, o.get("z_dim", 20), _hidden(o), o.get("likelihood") or "bernoulli"),
        "variational autoencoder, Bernoulli or Gaussian pixels (Kingma & Welling 2014)"),
    ModelEntry("cvae", LATENT, lambda data, o: ConditionalVAE(
        data.x_dim, _cvae_context_dim(data, o), o.get("z_dim", 20), _hidden(o),
        o.get("likelihood") or "bernoulli", o.get("prior", "learned")),
        "conditional VAE on the class label or an observed quadrant (Sohn et al. 2015)",
        _cvae_inputs),
    ModelEntry("dlgm", LATENT, lambda data, o: DeepLatentGaussianModel(
        data.x_dim, tuple(o.get("z_dims", (20, 10))), _hidden(o)[0],
        o.get("likelihood") or "bernoulli"),
        "deep latent Gaussian model, L >= 2 stochastic layers (Rezende et al. 2014)"),
    ModelEntry("ppca", LATENT, lambda data, o: PPCA(data.x_dim, o.get("z_dim", 2)),
               "probabilistic PCA with exact posterior and marginal likelihood (the oracle)",
               likelihoods=("gaussian",)),
    ModelEntry("dmm", STATE_SPACE, lambda data, o: DeepMarkovModel(
        data.x_dim, o.get("z_dim", 16), data.u_dim, emission=_dmm_emission(data, o)),
        "deep Kalman filter / deep Markov model, gated transition (Krishnan et al. 2015, 2017)",
        _sequence_inputs),
    ModelEntry("lgssm", STATE_SPACE, lambda data, o: LinearGaussianSSM(
        data.x_dim, o.get("z_dim", 1), data.u_dim),
        "linear-Gaussian state-space model: exact Kalman likelihood (the oracle)",
        _sequence_inputs, likelihoods=("gaussian",)),
    ModelEntry("bnn", BNN, bnn_model,
               "Bayesian MLP: priors on every weight; regression or classification (Neal 1996)",
               lambda batch, dataset, options: {"x": batch["x"], "y": batch["y"]},
               likelihoods=("gaussian", "heteroscedastic", "categorical")),
]}

GUIDES: dict[str, GuideEntry] = {entry.name: entry for entry in [
    GuideEntry("amortized", (LATENT,), lambda m, o: AmortizedNormal(m, _hidden(o)),
               "amortized diagonal Gaussian q(z|x)"),
    GuideEntry("rank1", (LATENT,), lambda m, o: AmortizedRank1Normal(m, _hidden(o)),
               "amortized Gaussian with precision D + u u^T (Rezende et al. 2014)"),
    GuideEntry("delta", (LATENT,), lambda m, o: AmortizedDelta(m, _hidden(o)),
               "point estimate z = f(x): the autoencoder as MAP"),
    GuideEntry("denoising", (LATENT,), lambda m, o: AmortizedDelta(
        m, _hidden(o), o.get("masking_noise", 0.25)),
        "denoising autoencoder: delta guide fed inputs with masking noise"),
    GuideEntry("planar", (LATENT,), _flow_guide("planar"),
               "amortized Gaussian + K planar flow steps (Rezende & Mohamed 2015)"),
    GuideEntry("radial", (LATENT,), _flow_guide("radial"),
               "amortized Gaussian + K radial flow steps (Rezende & Mohamed 2015)"),
    GuideEntry("householder", (LATENT,), _flow_guide("householder"),
               "amortized Gaussian + K Householder reflections (Tomczak & Welling 2016)"),
    GuideEntry("sylvester", (LATENT,), _flow_guide("sylvester"),
               "amortized Gaussian + K Householder-Sylvester steps (van den Berg et al. 2018)"),
    GuideEntry("iaf", (LATENT,), _flow_guide("iaf"),
               "amortized Gaussian + K IAF steps, MADE with encoder context (Kingma et al. 2016)"),
    GuideEntry("laplace", (LATENT, BNN),
               lambda m, o: VLAEGuide(m, _hidden(o), steps=o.get("laplace_steps", 4)),
               "VLAE: Laplace posterior after T Newton steps (Park et al. 2019); for a BNN: Laplace "
               "around the MAP (diag / last-layer / full GGN)",
               excludes=("dlgm",)),  # one latent site only
    *[GuideEntry(name, (BNN,), None, summary) for name, summary in BNN_METHODS.items()],
    *[GuideEntry(name, (STATE_SPACE,), _inference_network(name),
                 f"structured inference network {name.upper()} (Krishnan et al. 2017)")
      for name in structure_names()],
]}


def train_bnn(dataset, method: str, options: dict, **fit_options):
    """Build a Bayesian MLP for ``dataset`` and train it with ``method`` (``inference.bnn.train``)."""
    from bayeszoo.inference.bnn import train

    model = bnn_model(dataset, options)
    guide, result = train(model, method, dataset.train, dataset.valid, options=options, **fit_options)
    return model, guide, result


def valid_guides(model: str) -> list[str]:
    family = model_entry(model).family
    return [name for name, entry in GUIDES.items()
            if family in entry.families and model not in entry.excludes]


def model_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise RegistryError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return MODELS[name]


def guide_entry(name: str) -> GuideEntry:
    if name not in GUIDES:
        raise RegistryError(f"unknown guide {name!r}; valid guides: {', '.join(GUIDES)}")
    return GUIDES[name]


def check_pair(model: str, guide: str, data: str | None = None) -> None:
    """Raise RegistryError unless the names exist and the guide fits the model."""
    model_entry(model)
    guide_entry(guide)
    if guide not in valid_guides(model):
        raise RegistryError(f"guide {guide!r} does not fit model {model!r}; "
                            f"valid guides for {model}: {', '.join(valid_guides(model))}")
    datasets = FAMILY_DATASETS[MODELS[model].family]
    if data is not None and data not in datasets:
        raise RegistryError(f"unknown dataset {data!r} for {model}; valid datasets: {', '.join(datasets)}")


def load_data(model: str, data: str, **kwargs):
    """Load a dataset of the model's family (images: ``load_dataset``, sequences:
    ``load_sequence_dataset``); keyword arguments go to the loader that takes them."""
    if MODELS[model].family == STATE_SPACE:
        return load_sequence_dataset(data, kwargs.get("root", "data"), kwargs.get("download", False))
    if MODELS[model].family == BNN:
        return load_supervised(data, split=kwargs.get("split", 0), root=kwargs.get("root", "data"),
                               download=kwargs.get("download", False))
    return load_dataset(data, **kwargs)


def build(model: str, guide: str, dataset, options: dict | None = None):
    """Build the model and guide for a dataset. Returns (model, guide, inputs) where
    ``inputs(batch)`` maps a dataset minibatch {"x", "y"} to the model's keyword inputs."""
    options = dict(options or {})
    check_pair(model, guide)
    entry = MODELS[model]
    if entry.family == BNN:
        raise RegistryError("a Bayesian neural network is built and trained by registry.train_bnn")
    built_model = entry.build(dataset, options)
    built_guide = GUIDES[guide].build(built_model, options)
    return built_model, built_guide, lambda batch: entry.inputs(batch, dataset, options)
