"""What differs between bayeszoo's three families, in one object each.

A family loads its datasets, builds its models, turns a minibatch into a model's inputs, hands
the training loop its data, scores a fitted pair, says it in one line, draws its figures and lays
out its comparison table. Everything else (building a guide, training it, the run folder, the
comparison) is the same code for every family (``inference.runs``, ``inference.compare``).

    IMAGES      latent-variable image models   test IS log-likelihood, ELBO, KL, k-hat, active units
    SEQUENCES   state-space sequence models    the same per sequence and per observed time step
    SUPERVISED  Bayesian neural networks       RMSE and NLL, or accuracy, NLL, Brier, ECE, OOD AUROC
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bayeszoo.inference import plots

# Validation and test images are binarized once with this seed under dynamic binarization, so every
# run, every evaluation and every comparison scores the same binary images.
EVAL_BINARIZATION_SEED = 1234
POINT_MASS_STATUS = "ok; point-mass q: the ELBO column is log p(x, z*), no IS estimate"
KHAT_THRESHOLD = 0.7


# ---------------------------------------------------------------------------- model builders


def vae(dataset, z_dim, hidden, likelihood):
    from bayeszoo.models.vae import VAE

    return VAE(dataset.x_dim, z_dim, tuple(hidden), likelihood)


def cvae(dataset, z_dim, hidden, likelihood, condition):
    from bayeszoo.models.vae import ConditionalVAE

    context_dim = dataset.num_classes if condition == "label" else dataset.x_dim
    return ConditionalVAE(dataset.x_dim, context_dim, z_dim, tuple(hidden), likelihood, "learned")


def dlgm(dataset, z_dims, hidden, likelihood):
    from bayeszoo.models.vae import DeepLatentGaussianModel

    return DeepLatentGaussianModel(dataset.x_dim, tuple(z_dims), tuple(hidden)[0], likelihood)


def ppca(dataset, z_dim, hidden):  # ``hidden`` sizes the guide's encoder, not the model
    from bayeszoo.models.ppca import PPCA

    return PPCA(dataset.x_dim, z_dim)


def dmm(dataset, z_dim, likelihood):
    from bayeszoo.models.dkf import DeepMarkovModel

    # JSB chorales are binary piano rolls; the synthetic sets are real-valued.
    emission = likelihood or ("bernoulli" if dataset.name == "jsb" else "gaussian")
    return DeepMarkovModel(dataset.x_dim, z_dim, dataset.u_dim, emission=emission)


def lgssm(dataset, z_dim):
    from bayeszoo.models.dkf import LinearGaussianSSM

    return LinearGaussianSSM(dataset.x_dim, z_dim, dataset.u_dim)


def local_level(dataset):
    """Durbin & Koopman's local level model (``models.dkf.local_level_model``), started where
    chapter 10 starts it (sigma2_eps = 10^4, sigma2_eta = 10^3): only the two variances are
    trained, and its first observation, seen through the diffuse alpha_1 ~ N(0, 10^7), is left
    out of the log-likelihood."""
    from bayeszoo.inference.registry import RegistryError
    from bayeszoo.models.dkf import local_level_model

    if dataset.x_dim != 1 or dataset.u_dim:
        raise RegistryError(f"local-level models one series of numbers; {dataset.name} has x_dim "
                            f"{dataset.x_dim} and u_dim {dataset.u_dim}")
    model = local_level_model(sigma2_eps=10000.0, sigma2_eta=1000.0).requires_grad_(False)
    model.dynamics.raw_R.requires_grad_(True), model.dynamics.raw_Q.requires_grad_(True)
    model.diffuse_steps = 1
    return model


def bnn(dataset, hidden, likelihood, prior, noise):
    """An MLP with the likelihood the task needs (classification: categorical)."""
    from bayeszoo.models.bnn import BayesianNeuralNetwork
    from bayeszoo.models.nn import mlp

    classification = dataset.task == "classification"
    likelihood = "categorical" if classification else (likelihood or "gaussian")
    outputs = dataset.num_classes if classification else (2 if likelihood == "heteroscedastic" else 1)
    noise = noise if noise in ("learned", "prior") else float(noise)
    net = mlp((dataset.x_dim, *hidden, outputs))
    return BayesianNeuralNetwork(net, (dataset.x_dim,), likelihood, prior=prior, noise=noise)


def cvae_inputs(batch, dataset, options):
    from bayeszoo.models.vae import label_inputs, quadrant_inputs

    if options["condition"] == "label":
        return label_inputs(batch["x"], batch["y"], dataset.num_classes)
    return quadrant_inputs(batch["x"], dataset.image_shape, options.get("observed_quadrant", 0))


def sequence_inputs(batch, dataset, options):
    return {k: batch[k] for k in ("x", "mask", "u") if k in batch}


def local_level_inputs(batch, dataset, options):
    """The local level model computes in float64 (flows ~10^3 against a prior variance of 10^7)."""
    return {k: v.double() if k == "x" else v for k, v in sequence_inputs(batch, dataset, options).items()}


def supervised_inputs(batch, dataset, options):
    return {"x": batch["x"], "y": batch["y"]}


def image_inputs(batch, dataset, options):
    return {"x": batch["x"]}


@dataclass(frozen=True)
class ModelInputs:
    """``inputs(batch)``: a dataset's minibatch as the model's keyword inputs. It keeps what a
    conversion reads of the dataset (its shapes, classes, binarization) but not its splits, so it
    travels to spawned training processes without a copy of the data."""

    convert: Callable  # (batch, dataset, options) -> inputs, e.g. image_inputs
    dataset: object
    options: dict

    @classmethod
    def of(cls, convert: Callable, dataset, options: dict) -> ModelInputs:
        splits = {name: {} for name in ("train", "valid", "test") if hasattr(dataset, name)}
        return cls(convert, dataclasses.replace(dataset, **splits), options)

    def __call__(self, batch: dict) -> dict:
        return self.convert(batch, self.dataset, self.options)

    def transformed(self, batch: dict, generator: torch.Generator) -> dict:
        """A training minibatch: the dataset's per-batch transform (dynamic binarization), then inputs."""
        return self(self.dataset.batch_transform(batch, generator))


# ---------------------------------------------------------------------------- families


class _LatentVariables:
    """What images and sequences share: importance-sampled scores of local latent variables."""

    compare_images = False

    def evaluation_split(self, dataset, inputs, split: str) -> dict:
        generator = torch.Generator().manual_seed(EVAL_BINARIZATION_SEED)
        return inputs(dataset.batch_transform(getattr(dataset, split), generator))

    def training_data(self, dataset, inputs: ModelInputs) -> dict:
        return {
            "train": dataset.train,
            "valid": self.evaluation_split(dataset, inputs, "valid"),
            "batch_transform": inputs.transformed,
        }

    def score(self, model, guide, dataset, inputs, scoring: dict, device: str, progress: bool) -> dict:
        from bayeszoo.inference.evaluate import evaluate

        test = self.evaluation_split(dataset, inputs, "test")
        return evaluate(
            model,
            guide,
            test,
            num_samples=scoring["is_samples"],
            device=device,
            progress=progress,
            count_active_units="mask" not in test,
        )

    def row(self, metrics: dict) -> dict:
        """A comparison row: the test scores with the training cost."""
        history = metrics["history"]
        train_seconds = sum(r["seconds"] for r in history)
        test = metrics["test"]
        return {
            "guide": metrics["config"]["guide"],
            "is_samples": test["is_samples"],
            "parameters": metrics["parameters"],
            "epochs": len(history),
            "train_seconds": train_seconds,
            "seconds_per_epoch": train_seconds / len(history),
            **{k: v for k, v in test.items() if k not in ("is_samples", "active_units_per_site")},
            "status": POINT_MASS_STATUS if test["point_mass"] else "ok",
        }

    def stopped_row(self, guide: str, status: str) -> dict:
        from bayeszoo.inference.report import LATENT_TABLE

        return {"guide": guide, **{key: math.nan for key, _ in LATENT_TABLE[1:-2]}, "status": status}

    def markdown(self, rows, setting) -> str:
        from bayeszoo.inference.report import latent_markdown

        return latent_markdown(rows, setting)


class ImageFamily(_LatentVariables):
    compare_images = True

    def load(self, name: str, data_options: dict, root, download: bool):
        from bayeszoo.inference.data import load_dataset

        return load_dataset(name, root=root, download=download, binarize=data_options["binarize"])

    def settle_data_options(self, options: dict) -> dict:
        """``binarize``: dynamic binarization for Bernoulli pixels unless told otherwise."""
        binarize = options.get("binarize")
        if binarize is None:
            binarize = "dynamic" if options.get("likelihood", "gaussian") == "bernoulli" else "none"
        return {"binarize": None if binarize == "none" else binarize}

    def given_data_options(self, settled: dict) -> dict:
        """The options that settle to ``settled`` again (a rerun of a saved config)."""
        return {"binarize": settled["binarize"] or "none"}

    def summary(self, scores: dict) -> str:
        return (
            f"test: IS log-likelihood {scores['is_log_likelihood']:.2f} nats "
            f"(K={scores['is_samples']}), ELBO {scores['elbo']:.2f}, KL {scores['kl']:.2f}, "
            f"active units {scores['active_units']}"
        )

    def figures(self, model, guide, dataset, inputs, history) -> dict:
        """Training curves, reconstructions, samples, the latent space, the decoded grid for 2-D z."""
        from bayeszoo.inference.evaluate import posterior_means

        test = self.evaluation_split(dataset, inputs, "test")
        figures = {
            "training.png": plots.training_curves(history),
            "reconstructions.png": plots.reconstructions(model, guide, test, dataset.image_shape),
        }
        if "c" in test:
            figures["samples.png"] = plots.samples(model, dataset.image_shape, c=test["c"][:10])
        else:
            figures["samples.png"] = plots.samples(model, dataset.image_shape)
        means = posterior_means(guide, test)
        first_site = next(iter(means))
        figures["latent.png"] = plots.latent_scatter(
            means[first_site], dataset.test["y"], f"E[{first_site} | x] on the test set", site=first_site
        )
        if getattr(model, "latent_sites", {}).get("z") == 2 and "c" not in test:
            figures["manifold.png"] = plots.latent_manifold(model, dataset.image_shape)
        return figures

    def table(self, dataset):
        from bayeszoo.inference.report import LATENT_TABLE

        return LATENT_TABLE



class SequenceFamily(_LatentVariables):
    def load(self, name: str, data_options: dict, root, download: bool):
        from bayeszoo.inference.sequences import load_sequence_dataset

        return load_sequence_dataset(name, root, download)

    def settle_data_options(self, options: dict) -> dict:
        return {}

    def given_data_options(self, settled: dict) -> dict:
        return dict(settled)

    def score(self, model, guide, dataset, inputs, scoring: dict, device: str, progress: bool) -> dict:
        """Importance-sampled scores, or the exact ones where the posterior is exact (``kalman``);
        a dataset whose splits are not disjoint says so beside them."""
        if getattr(guide, "exact", False):
            scores = guide.scores(self.evaluation_split(dataset, inputs, "test"))
        else:
            scores = super().score(model, guide, dataset, inputs, scoring, device, progress)
        return {**scores, "note": dataset.note} if dataset.note else scores

    def summary(self, scores: dict) -> str:
        if scores.get("exact"):
            fitted = ", ".join(f"{k} {v:.6g}" for k, v in scores["fitted"].items() if isinstance(v, float))
            return (
                f"test: exact log-likelihood {scores['log_likelihood']:.2f} nats per sequence "
                f"({scores['log_likelihood_per_step']:.4f} per step, the first "
                f"{scores['diffuse_steps_left_out']} left out); fitted {fitted}"
            )
        return (
            f"test: IS log-likelihood {scores['is_log_likelihood_per_step']:.3f} nats per time "
            f"step (K={scores['is_samples']}), ELBO {scores['elbo_per_step']:.3f} per step, "
            f"KL {scores['kl_per_step']:.3f} per step"
        )

    def figures(self, model, guide, dataset, inputs, history) -> dict:
        return {"training.png": plots.training_curves(history)} if history else {}

    def table(self, dataset):
        from bayeszoo.inference.report import sequence_table

        return sequence_table()



class SupervisedFamily:
    compare_images = False

    def load(self, name: str, data_options: dict, root, download: bool):
        from bayeszoo.inference.supervised import load_supervised

        return load_supervised(name, split=data_options["split"], root=root, download=download)

    def settle_data_options(self, options: dict) -> dict:
        return {"split": options.get("split", 0)}

    def given_data_options(self, settled: dict) -> dict:
        return dict(settled)

    def training_data(self, dataset, inputs) -> dict:
        return {"train": dataset.train, "valid": dataset.valid, "batch_transform": None}

    def score(self, model, guide, dataset, inputs, scoring: dict, device: str, progress: bool) -> dict:
        """Sample-set guides (ensemble, SGLD, SGHMC, NUTS) predict with each member once."""
        from bayeszoo.inference.predictive import score

        model, guide = model.cpu(), guide.cpu()  # the datasets live on the CPU
        return score(
            model, guide, dataset, num_samples=getattr(guide, "num_members", scoring["predictive_samples"])
        )

    def summary(self, scores: dict) -> str:
        if "rmse" in scores:
            return f"test: RMSE {scores['rmse']:.4f}, NLL {scores['nll']:.4f} (S={scores['num_samples']})"
        text = (
            f"test: accuracy {scores['accuracy']:.4f}, NLL {scores['nll']:.4f}, "
            f"Brier {scores['brier']:.4f}, ECE {scores['ece']:.4f}"
        )
        if "ood" in scores:
            text += f", OOD AUROC (entropy) {scores['ood']['entropy']['auroc']:.4f}"
        return text + f" (S={scores['num_samples']})"

    def figures(self, model, guide, dataset, inputs, history) -> dict:
        """Training curve; the uncertainty band for 1-D regression, reliability for classification."""
        from bayeszoo.inference import metrics
        from bayeszoo.inference.predictive import predictive

        figures = {"training.png": plots.training_curves(history)} if history else {}
        samples = getattr(guide, "num_members", 100)
        if dataset.task == "regression" and dataset.x_dim == 1:
            from bayeszoo.inference.supervised import grid

            x = grid(dataset)
            draws = predictive(model, guide, x, samples)
            moments = metrics.predictive_moments(draws["mean"], draws["variance"])
            figures["predictive.png"] = plots.predictive_band(
                dataset.train["x"][:, 0], dataset.train["y"], x[:, 0], moments["mean"],
                moments["epistemic"].sqrt(), moments["total"].sqrt())
        elif dataset.task == "classification":
            probs = predictive(model, guide, dataset.test["x"], samples)["probs"].mean(0)
            figures["reliability.png"] = plots.reliability_diagram({"test": (probs, dataset.test["y"])})
        return figures

    def row(self, metrics: dict) -> dict:
        scores = metrics["test"]
        row = {
            "guide": metrics["config"]["guide"],
            "status": "ok",
            "train_seconds": metrics["train_seconds"],
            "posterior_bytes": metrics["posterior_bytes"],
        }
        if metrics["history"]:
            row["seconds_per_epoch"] = statistics.median(r["seconds"] for r in metrics["history"])
        row.update({k: v for k, v in scores.items() if isinstance(v, float)})
        if "ood" in scores:
            row["ood_auroc_entropy"] = scores["ood"]["entropy"]["auroc"]
            row["ood_auroc_mi"] = scores["ood"]["mutual_information"]["auroc"]
        return row

    def stopped_row(self, guide: str, status: str) -> dict:
        return {"guide": guide, "status": status}

    def table(self, dataset):
        from bayeszoo.inference.report import BNN_CLASSIFICATION_TABLE, BNN_REGRESSION_TABLE

        return BNN_REGRESSION_TABLE if dataset.task == "regression" else BNN_CLASSIFICATION_TABLE

    def markdown(self, rows, setting) -> str:
        from bayeszoo.inference.report import bnn_markdown

        return bnn_markdown(rows, setting)


IMAGES = ImageFamily()
SEQUENCES = SequenceFamily()
SUPERVISED = SupervisedFamily()
