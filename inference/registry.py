"""Every model, guide, family and option of bayeszoo, by name: the one place that says what exists.

A **family** (latent-variable images, state-space sequences, Bayesian neural networks) owns its
datasets, how they load, how a model is scored and what a comparison table shows. A **model
entry** says how to build the model for a dataset. A **guide entry** says how to build the guide
for a model, **how the pair trains** (plain SVI, SVI under an effect handler, SG-MCMC as the
optimizer, MCMC, MAP then Laplace, TRADI) and, where the fitted posterior is not the guide that
was built, how to rebuild it from its saved tensors. Every entry declares its **options**: the
command line builds its flags from them, and an option that no part of a pair declares is an
error for that pair.

Builders, trainers and family behaviour are named as ``"module:attribute"`` and imported when
first used, so listing names (``bayeszoo list``, ``--help``) imports neither torch nor Pyro.
Adding a guide is one file (its class) and one ``GuideEntry`` line below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

LATENT = "latent-variable"
STATE_SPACE = "state-space"
BNN = "bayesian-neural-network"


class RegistryError(ValueError):
    """An unknown name, an invalid model/guide pair or an option that does not apply; the
    message lists the valid choices."""


def resolve(ref: str) -> Any:
    """The object a ``"package.module:attribute"`` reference names."""
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


# ----------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    """One setting of a family, model, guide or trainer.

    ``name`` is the Python keyword (``flow_length``) and gives the flag (``--flow-length``);
    ``arg`` is the builder's keyword when it differs from ``name``. ``check`` returns an error
    message for a bad value (or None).
    """

    name: str
    type: Callable = str
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    arg: str | None = None
    check: Callable[[Any], str | None] | None = None
    cli: str | None = None  # the flag, when it is not --name-with-dashes

    @property
    def flag(self) -> str:
        return self.cli or "--" + self.name.replace("_", "-")

    def validate(self, value) -> None:
        if self.choices is not None and value not in self.choices:
            raise RegistryError(
                f"{self.flag} must be one of {', '.join(map(str, self.choices))}, got {value!r}"
            )
        message = self.check(value) if self.check is not None and value is not None else None
        if message:
            raise RegistryError(f"{self.flag} {message}, got {value!r}")

    def default_to(self, value) -> Option:
        return replace(self, default=value)


def _positive(value) -> str | None:
    return None if value > 0 else "must be positive"


def _non_negative(value) -> str | None:
    return None if value >= 0 else "must be non-negative"


def _probability(value) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


def _decay(value) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def _sizes(value) -> str | None:
    return None if len(value) and min(value) >= 1 else "must be positive integers"


def _noise(value) -> str | None:
    if value in ("learned", "prior"):
        return None
    try:
        return None if float(value) > 0 else "must be 'learned', 'prior' or a positive number"
    except ValueError:
        return "must be 'learned', 'prior' or a positive number"


# The training budget: ``inference.svi.fit``'s keywords. Each trainer declares which apply.
EPOCHS = Option(
    "epochs", int, 10, "training epochs (a resumed run continues up to this number)", check=_positive
)
BATCH_SIZE = Option("batch_size", int, 100, "minibatch size", check=_positive)
LR = Option("lr", float, 1e-3, "learning rate (Adam), or the sampler's step size", check=_positive)
LR_DECAY = Option("lr_decay", float, 1.0, "learning-rate factor per epoch", check=_decay)
NUM_PARTICLES = Option("num_particles", int, 1, "ELBO samples per data point (vectorized)", check=_positive)
KL_ANNEAL = Option(
    "kl_anneal_epochs",
    int,
    0,
    "grow the KL weight linearly from 0 to 1 over this many epochs",
    check=_non_negative,
    cli="--kl-anneal",
)
PATIENCE = Option(
    "patience", int, None, "early stopping: epochs without a better validation ELBO", check=_positive
)
CLIP_NORM = Option(
    "clip_norm", float, None, "rescale every step's gradient to at most this norm", check=_positive
)
# How many processes train (Lightning Fabric, ``inference/distributed.py``): SVI data-parallel,
# ensemble members and Markov chains spread over them.
PROCESSES = (
    Option(
        "devices",
        int,
        1,
        "processes per node: data-parallel SVI, or ensemble members / MCMC chains spread over them",
        check=_positive,
    ),
    Option(
        "accelerator",
        str,
        "cpu",
        "what the processes run on (gpu: one GPU each; auto: the GPUs if there are enough)",
        choices=("cpu", "gpu", "auto"),
    ),
    Option(
        "num_nodes",
        int,
        1,
        "machines running the same command (MASTER_ADDR, MASTER_PORT, NODE_RANK set on each)",
        check=_positive,
    ),
    Option(
        "strategy",
        str,
        "ddp",
        "ddp spawns the processes; ddp_fork forks them (CPU, starts in a second)",
        choices=("ddp", "ddp_fork"),
    ),
)
NUM_WORKERS = Option(
    "num_workers", int, 0, "DataLoader worker processes for the training minibatches", check=_non_negative
)
SVI_BUDGET = (EPOCHS, BATCH_SIZE, LR, LR_DECAY, NUM_PARTICLES, KL_ANNEAL, PATIENCE, CLIP_NORM, *PROCESSES,
              NUM_WORKERS)
# weight-space SVI: no KL to anneal
POINT_BUDGET = (EPOCHS, BATCH_SIZE, LR, LR_DECAY, PATIENCE, CLIP_NORM, *PROCESSES, NUM_WORKERS)
SAMPLER_BUDGET = (EPOCHS, BATCH_SIZE, LR, LR_DECAY, *PROCESSES, NUM_WORKERS)

HIDDEN = Option(
    "hidden",
    lambda text: tuple(int(v) for v in text.split(",") if v),
    None,
    "hidden layer sizes, comma-separated",
    check=_sizes,
)
Z_DIM = Option("z_dim", int, 20, "latent size", check=_positive)
IMAGE_LIKELIHOOD = Option(
    "likelihood", str, "bernoulli", "pixel likelihood", choices=("bernoulli", "gaussian")
)
IS_SAMPLES = Option("is_samples", int, 1000, "K, importance samples per test point", check=_positive)


# ----------------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Family:
    """A kind of model with its datasets. ``behaviour`` names the object that loads a dataset,
    maps minibatches to model inputs, scores a fitted pair, summarises and draws it
    (``inference.families``)."""

    name: str
    datasets: tuple[str, ...]
    behaviour: str
    data_options: tuple[Option, ...] = ()  # how a dataset loads
    score_options: tuple[Option, ...] = ()  # how a fitted pair is scored


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    summary: str
    build: str  # (dataset, **options) -> model
    options: tuple[Option, ...] = ()
    inputs: str | None = None  # (batch, dataset, options) -> model inputs; default {"x": batch["x"]}


@dataclass(frozen=True)
class GuideEntry:
    name: str
    families: tuple[str, ...]
    summary: str
    build: str | None  # (model, **options) -> guide; None: the trainer makes the posterior (MCMC)
    train: str = "bayeszoo.inference.training:svi"  # (model, guide, data, options, budget) -> (guide, result)
    budget: tuple[Option, ...] = SVI_BUDGET  # the keywords of inference.svi.fit that apply
    options: tuple[Option, ...] = ()  # the builder's keywords
    train_options: tuple[Option, ...] = ()  # the trainer's settings
    build_kwargs: dict = field(default_factory=dict)
    posterior: str | None = None  # (model, state, options, dataset) -> empty fitted posterior to load into
    excludes: tuple[str, ...] = ()  # models of these families that the guide cannot serve
    aliases: tuple[str, ...] = ()  # older names that still work
    model_defaults: dict = field(default_factory=dict)  # model options this guide needs by default
    refuses: tuple[tuple[str, Any, str], ...] = ()  # (option, value, why): settings the guide cannot train


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in [
        Family(
            LATENT,
            ("digits", "mnist5k", "mnist", "fashion-mnist", "cifar10"),
            "bayeszoo.inference.families:IMAGES",
            (
                Option(
                    "binarize",
                    str,
                    None,
                    "default: dynamic for Bernoulli pixels, none for Gaussian",
                    choices=("dynamic", "fixed", "none"),
                ),
            ),
            (IS_SAMPLES,),
        ),
        Family(
            STATE_SPACE,
            ("linear-gaussian", "pendulum", "jsb", "nile"),
            "bayeszoo.inference.families:SEQUENCES",
            score_options=(IS_SAMPLES,),
        ),
        Family(
            BNN,
            ("gap", "boston", "digits", "mnist5k"),
            "bayeszoo.inference.families:SUPERVISED",
            (
                Option(
                    "split",
                    int,
                    0,
                    "Boston split, 0..19",
                    check=lambda v: None if 0 <= v < 20 else "must be in 0..19",
                ),
            ),
            (
                Option(
                    "predictive_samples",
                    int,
                    100,
                    "weight samples for the test metrics (an ensemble: its members)",
                    check=_positive,
                ),
            ),
        ),
    ]
}

_M = "bayeszoo.inference.families:"
MODELS: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in [
        ModelEntry(
            "vae",
            LATENT,
            "variational autoencoder, Bernoulli or Gaussian pixels (Kingma & Welling 2014)",
            _M + "vae",
            (Z_DIM, HIDDEN.default_to((400,)), IMAGE_LIKELIHOOD),
        ),
        ModelEntry(
            "cvae",
            LATENT,
            "conditional VAE on the class label or an observed quadrant (Sohn et al. 2015)",
            _M + "cvae",
            (
                Z_DIM,
                HIDDEN.default_to((400,)),
                IMAGE_LIKELIHOOD,
                Option(
                    "condition", str, "label", "what the VAE is conditioned on", choices=("label", "quadrant")
                ),
            ),
            inputs=_M + "cvae_inputs",
        ),
        ModelEntry(
            "dlgm",
            LATENT,
            "deep latent Gaussian model, L >= 2 stochastic layers (Rezende et al. 2014)",
            _M + "dlgm",
            (
                Option("z_dims", HIDDEN.type, (20, 10), "layer sizes from the data up", check=_sizes),
                HIDDEN.default_to((400,)),
                IMAGE_LIKELIHOOD,
            ),
        ),
        ModelEntry(
            "ppca",
            LATENT,
            "probabilistic PCA with exact posterior and marginal likelihood (the oracle)",
            _M + "ppca",
            (Z_DIM.default_to(2), HIDDEN.default_to((400,))),
        ),
        ModelEntry(
            "dmm",
            STATE_SPACE,
            "deep Kalman filter / deep Markov model, gated transition (Krishnan et al. 2015, 2017)",
            _M + "dmm",
            (
                Z_DIM.default_to(16),
                Option(
                    "likelihood",
                    str,
                    None,
                    "emission; default bernoulli for jsb, gaussian otherwise",
                    choices=("bernoulli", "gaussian"),
                ),
            ),
            inputs=_M + "sequence_inputs",
        ),
        ModelEntry(
            "lgssm",
            STATE_SPACE,
            "linear-Gaussian state-space model: exact Kalman likelihood (the oracle)",
            _M + "lgssm",
            (Z_DIM.default_to(1),),
            inputs=_M + "sequence_inputs",
        ),
        ModelEntry(
            "local-level",
            STATE_SPACE,
            "local level model: a random walk seen through noise, the Nile's (Durbin & Koopman 2012)",
            _M + "local_level",
            inputs=_M + "local_level_inputs",
        ),
        ModelEntry(
            "bnn",
            BNN,
            "Bayesian MLP: priors on every weight; regression or classification (Neal 1996)",
            _M + "bnn",
            (
                HIDDEN.default_to((50,)),
                Option(
                    "likelihood",
                    str,
                    None,
                    "regression noise model (classification is categorical)",
                    choices=("gaussian", "heteroscedastic"),
                ),
                Option(
                    "prior",
                    str,
                    "fan_in",
                    "prior on the weights",
                    choices=("normal", "fan_in", "hierarchical"),
                ),
                Option(
                    "noise",
                    str,
                    "learned",
                    "regression noise sd: 'learned', 'prior' or a number",
                    check=_noise,
                ),
            ),
            inputs=_M + "supervised_inputs",
        ),
    ]
}

_G = "bayeszoo.guides."
_T = "bayeszoo.inference.training:"
_LATENT_HIDDEN = HIDDEN.default_to((400,))
_FLOW_LENGTH = Option("flow_length", int, 8, "flow steps K", check=_positive)
_MEMBERS = Option("members", int, 5, "ensemble size", check=_positive)
_BURN_IN = Option(
    "burn_in_epochs", int, 1, "epochs before the first kept sample or tracked step", check=_non_negative
)
_THIN = Option(
    "thin", int, None, "keep every n-th sampler step (default: the last of every epoch)", check=_positive
)
_CHAINS = Option(
    "chains", int, 1, "independent chains; with 2 or more, ArviZ's R-hat and ESS", check=_positive
)
_NUTS = (
    Option("nuts_samples", int, 500, "NUTS draws per chain", check=_positive),
    Option("nuts_warmup", int, 500, "NUTS warm-up steps per chain", check=_positive),
    Option("nuts_max_tree_depth", int, 10, "at most 2^depth leapfrog steps per draw", check=_positive),
    _CHAINS.default_to(2),
    Option(
        "nuts_init",
        str,
        "prior",
        "chains start from a prior draw, or all from a MAP fit (--epochs)",
        choices=("prior", "map"),
    ),
    Option("nuts_jit", bool, False, "compile the potential with TorchScript (about 3x faster gradients)"),
)
_LAPLACE = (
    Option(
        "laplace_structure",
        str,
        "last-layer",
        "Gauss-Newton structure",
        choices=("diag", "last-layer", "full"),
    ),
    Option(
        "laplace_predictive",
        str,
        "glm",
        "predict with the network linearized at the MAP, or sampled",
        choices=("glm", "sampled"),
    ),
)
_INIT_SCALE = Option("init_scale", float, 0.01, "initial posterior standard deviation", check=_positive)
_SEQUENCE_NET = (
    Option("rnn_dim", int, 600, "RNN size of the inference network", check=_positive),
    Option("num_iafs", int, 0, "IAF steps after each q(z_t | ...)", check=_non_negative),
)


def _flow(kind: str, summary: str) -> GuideEntry:
    return GuideEntry(
        kind,
        (LATENT,),
        summary,
        _G + "flows:AmortizedFlow",
        options=(_LATENT_HIDDEN, _FLOW_LENGTH),
        build_kwargs={"flow": kind},
    )


def _inference_network(structure: str, aliases: tuple[str, ...] = ()) -> GuideEntry:
    return GuideEntry(
        structure,
        (STATE_SPACE,),
        f"structured inference network {structure.upper()} (Krishnan et al. 2017)",
        _G + "dkf:StructuredInferenceNetwork",
        options=_SEQUENCE_NET,
        build_kwargs={"structure": structure},
        aliases=aliases,
        excludes=("local-level",),  # a float64 model of two variances: fitted exactly, by kalman
    )


GUIDES: dict[str, GuideEntry] = {
    entry.name: entry
    for entry in [
        # latent-variable family: amortized guides q(z | x)
        GuideEntry(
            "amortized",
            (LATENT,),
            "amortized diagonal Gaussian q(z|x)",
            _G + "amortized:AmortizedNormal",
            options=(_LATENT_HIDDEN,),
        ),
        GuideEntry(
            "rank1",
            (LATENT,),
            "amortized Gaussian with precision D + u u^T (Rezende et al. 2014)",
            _G + "amortized:AmortizedRank1Normal",
            options=(_LATENT_HIDDEN,),
        ),
        GuideEntry(
            "delta",
            (LATENT,),
            "point estimate z = f(x): the autoencoder as MAP",
            _G + "amortized:AmortizedDelta",
            options=(_LATENT_HIDDEN,),
        ),
        GuideEntry(
            "denoising",
            (LATENT,),
            "denoising autoencoder: delta guide fed inputs with masking noise",
            _G + "amortized:AmortizedDelta",
            options=(
                _LATENT_HIDDEN,
                Option(
                    "masking_noise", float, 0.25, "probability of masking an input pixel", check=_probability
                ),
            ),
        ),
        _flow("planar", "amortized Gaussian + K planar flow steps (Rezende & Mohamed 2015)"),
        _flow("radial", "amortized Gaussian + K radial flow steps (Rezende & Mohamed 2015)"),
        _flow("householder", "amortized Gaussian + K Householder reflections (Tomczak & Welling 2016)"),
        _flow("sylvester", "amortized Gaussian + K Householder-Sylvester steps (van den Berg et al. 2018)"),
        _flow("iaf", "amortized Gaussian + K IAF steps, MADE with encoder context (Kingma et al. 2016)"),
        GuideEntry(
            "vlae",
            (LATENT,),
            "Variational Laplace Autoencoder: Laplace posterior after T Newton steps (Park et al. 2019)",
            _G + "vlae:VLAEGuide",
            options=(
                _LATENT_HIDDEN,
                Option("laplace_steps", int, 4, "Newton refinements T", arg="steps", check=_non_negative),
            ),
            excludes=("dlgm",),
            aliases=("laplace",),
        ),  # one latent site only
        # state-space family: structured inference networks
        *[_inference_network(name) for name in ("mf-l", "mf-lr", "st-l", "st-lr")],
        _inference_network("st-r", aliases=("dks",)),
        GuideEntry(
            "kalman",
            (STATE_SPACE,),
            "exact posterior (Kalman filter, RTS smoother); the model by maximum likelihood, L-BFGS",
            _G + "kalman:KalmanPosterior",
            _T + "maximum_likelihood",
            (),
            train_options=(
                Option(
                    "lbfgs_iterations", int, 50, "L-BFGS iterations on the exact log p(x)", check=_positive
                ),
            ),
            excludes=("dmm",),  # needs a linear-Gaussian model
        ),
        # Bayesian neural networks: guides over the weights
        GuideEntry(
            "map",
            (BNN,),
            "point estimate of the weights (weight decay = the Gaussian prior)",
            _G + "map:MAPGuide",
            budget=POINT_BUDGET,
        ),
        GuideEntry(
            "meanfield",
            (BNN,),
            "mean-field Gaussian over the weights: Bayes by Backprop (Blundell et al. 2015)",
            _G + "mean_field:MeanFieldGuide",
            _T + "closed_form_kl",
            POINT_BUDGET,
            (_INIT_SCALE,),
        ),
        GuideEntry(
            "lrt",
            (BNN,),
            "mean-field + local reparameterization (Kingma, Salimans & Welling 2015)",
            _G + "mean_field:MeanFieldGuide",
            _T + "local_reparameterization",
            POINT_BUDGET,
            (_INIT_SCALE,),
        ),
        GuideEntry(
            "flipout",
            (BNN,),
            "mean-field + Flipout pseudo-independent perturbations (Wen et al. 2018)",
            _G + "mean_field:MeanFieldGuide",
            _T + "flipout",
            POINT_BUDGET,
            (_INIT_SCALE,),
        ),
        GuideEntry(
            "mcdropout",
            (BNN,),
            "MC dropout as variational inference (Gal & Ghahramani 2016)",
            _G + "mc_dropout:MCDropoutGuide",
            budget=POINT_BUDGET,
            options=(Option("dropout", float, 0.1, "dropout probability", arg="p", check=_probability),),
        ),
        GuideEntry(
            "ensemble",
            (BNN,),
            "deep ensemble, M members trained in one vectorized step (Lakshminarayanan et al. 2017)",
            _G + "ensemble:EnsembleGuide",
            _T + "ensemble",
            POINT_BUDGET,
            options=(_MEMBERS,),
        ),
        GuideEntry(
            "laplace",
            (BNN,),
            "Laplace around the MAP: diag / last-layer / full GGN, prior precision by evidence (MacKay 1992)",
            _G + "map:MAPGuide",
            _T + "laplace",
            POINT_BUDGET,
            train_options=_LAPLACE,
            posterior=_T + "laplace_posterior",
        ),
        GuideEntry(
            "sgld",
            (BNN,),
            "stochastic gradient Langevin dynamics, thinned samples (Welling & Teh 2011)",
            _G + "map:MAPGuide",
            _T + "sgld",
            SAMPLER_BUDGET,
            train_options=(_CHAINS, _BURN_IN, _THIN),
            posterior=_T + "samples_posterior",
        ),
        GuideEntry(
            "sghmc",
            (BNN,),
            "stochastic gradient HMC (Chen, Fox & Guestrin 2014)",
            _G + "map:MAPGuide",
            _T + "sghmc",
            SAMPLER_BUDGET,
            train_options=(
                _CHAINS,
                _BURN_IN,
                _THIN,
                Option("friction", float, 0.05, "SGHMC friction", check=_positive),
            ),
            posterior=_T + "samples_posterior",
        ),
        GuideEntry(
            "nuts",
            (BNN,),
            "NUTS (Hoffman & Gelman 2014): the gold standard for small networks",
            None,
            _T + "nuts",
            (EPOCHS, BATCH_SIZE, LR, *PROCESSES),
            train_options=_NUTS,
            posterior=_T + "samples_posterior",
            model_defaults={"noise": "prior"},
            refuses=(
                (
                    "noise",
                    "learned",
                    "MCMC samples sample sites only, so a learned noise scale would stay "
                    "at its initial value; use --noise prior or a number",
                ),
            ),
        ),
        GuideEntry(
            "tradi",
            (BNN,),
            "Kalman-filtered SGD trajectory, a Gaussian per weight (Franchi et al. 2020)",
            _G + "map:MAPGuide",
            _T + "tradi",
            POINT_BUDGET,
            train_options=(
                _BURN_IN,
                Option(
                    "tradi_rank",
                    int,
                    0,
                    "random features correlating a layer's weights (0: diagonal)",
                    check=_non_negative,
                ),
            ),
            posterior=_T + "tradi_posterior",
        ),
    ]
}

#: Options every run has, whatever the pair.
RUN_OPTIONS = (
    Option("seed", int, 0, "seeds the networks' initialisation, training and scoring"),
    Option("device", str, "cpu", "cpu, cuda or cuda:N"),
)


# ----------------------------------------------------------------------------------- look-ups


def model_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise RegistryError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return MODELS[name]


def family_of(model: str) -> Family:
    return FAMILIES[model_entry(model).family]


def valid_guides(model: str) -> list[str]:
    entry = model_entry(model)
    return [
        name
        for name, guide in GUIDES.items()
        if entry.family in guide.families and model not in guide.excludes
    ]


def guide_entry(name: str, model: str | None = None) -> GuideEntry:
    """The guide called ``name`` (or, for ``model``, the guide of which it is an old name)."""
    candidates = valid_guides(model) if model is not None else list(GUIDES)
    if name in GUIDES and (model is None or name in candidates):
        return GUIDES[name]
    for candidate in candidates:
        if name in GUIDES[candidate].aliases:
            return GUIDES[candidate]
    if name not in GUIDES and not any(name in entry.aliases for entry in GUIDES.values()):
        raise RegistryError(f"unknown guide {name!r}; valid guides: {', '.join(GUIDES)}")
    raise RegistryError(
        f"guide {name!r} does not fit model {model!r}; valid guides for {model}: {', '.join(candidates)}"
    )


def check_pair(model: str, guide: str, data: str | None = None) -> None:
    """Raise RegistryError unless the names exist and the guide fits the model."""
    guide_entry(guide, model_entry(model).name)
    datasets = family_of(model).datasets
    if data is not None and data not in datasets:
        raise RegistryError(f"unknown dataset {data!r} for {model}; valid datasets: {', '.join(datasets)}")


def pair_options(model: str, guide: str) -> dict[str, Option]:
    """Every option of a pair by name: the family's, the model's, the guide's and its trainer's
    budget, and the run's own. Where two parts declare one name the model's default wins (the
    latent guides' ``hidden`` follows the model's)."""
    entry = guide_entry(guide, model)
    options: dict[str, Option] = {}
    for option in (
        *RUN_OPTIONS,
        *entry.budget,
        *entry.options,
        *entry.train_options,
        *family_of(model).data_options,
        *family_of(model).score_options,
        *model_entry(model).options,
    ):
        options[option.name] = option
    for name, value in entry.model_defaults.items():
        options[name] = options[name].default_to(value)
    return options


def all_options() -> dict[str, list[tuple[str, Option]]]:
    """Every option name, with who declares it (a model, guide or family name) and how."""
    owners: dict[str, list[tuple[str, Option]]] = {}
    parts = [
        *[(f.name, (*f.data_options, *f.score_options)) for f in FAMILIES.values()],
        *[(m.name, m.options) for m in MODELS.values()],
        *[(g.name, (*g.budget, *g.options, *g.train_options)) for g in GUIDES.values()],
        ("every run", RUN_OPTIONS),
    ]
    for owner, options in parts:
        for option in options:
            owners.setdefault(option.name, []).append((owner, option))
    return owners


def settle_options(model: str, guide: str, given: dict) -> dict:
    """The pair's options: ``given`` checked against what the pair declares (an option it does
    not declare is an error that says who does), every other option at its default."""
    options = pair_options(model, guide)
    for name, value in given.items():
        if name not in options:
            declared = all_options().get(name, [])
            owners = sorted({owner for owner, _ in declared})
            flag = declared[0][1].flag if declared else "--" + name.replace("_", "-")
            where = f"; it is an option of: {', '.join(owners)}" if owners else ""
            raise RegistryError(f"{flag} does not apply to {model} with guide {guide}{where}")
        options[name].validate(value)
    for name, value, why in guide_entry(guide, model).refuses:
        if given.get(name) == value:
            raise RegistryError(f"{options[name].flag} {value} does not apply to guide {guide}: {why}")
    return {name: given.get(name, option.default) for name, option in options.items()}


def builder_kwargs(options: tuple[Option, ...], values: dict) -> dict:
    """The keyword arguments a builder takes from the settled option values."""
    return {option.arg or option.name: values[option.name] for option in options}
