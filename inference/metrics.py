"""Predictive metrics for Bayesian neural networks, computed from predictive samples.

Every function takes samples under S posterior weight draws w_1..w_S, sample axis first:

* regression: ``means`` (S, N) and ``variances`` (S, N), the mean mu_s(x_n) and noise variance
  sigma_s^2(x_n) of the Gaussian likelihood under w_s (a homoscedastic noise is a broadcast
  tensor), and targets ``y`` (N,);
* classification: ``probs`` (S, N, C), the class probabilities p_s(c | x_n) under w_s, and
  labels ``y`` (N,) int64.

The predictive distribution is the equal-weight mixture over samples,

    p(y | x) ~ (1/S) sum_s p(y | x, w_s),

so a point-estimate method (MAP, a single network) is the case S = 1. Scores are per data
point and averaged over points; log densities are in nats. Scalar metrics are returned as
Python floats (ready for JSON), per-point quantities as tensors.

Groups:

* regression: ``predictive_moments`` (mean, aleatoric, epistemic, total variance) and
  ``regression_metrics`` (RMSE and mixture NLL, Hernandez-Lobato & Adams 2015);
* classification: ``classification_metrics`` (accuracy, NLL, Brier, ECE), ``reliability`` and
  ``expected_calibration_error`` (Guo et al. 2017);
* uncertainty scores per point: ``predictive_entropy``, ``mutual_information`` (BALD,
  Houlsby et al. 2011), ``max_probability``;
* out-of-distribution detection: ``auroc``, ``aupr``, ``ood_metrics``;
* cost: ``memory_bytes`` of the tensors that store a posterior.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

# ----------------------------------------------------------------------------- input checks


def _require_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_floating_point() and torch.isnan(value).any():
        raise ValueError(f"{name} contains NaN")


def _check_regression(means: torch.Tensor, variances: torch.Tensor, y: torch.Tensor | None = None):
    """Return ``means`` and ``variances`` broadcast to a common (S, N) shape, after checking them."""
    _require_tensor("means", means)
    _require_tensor("variances", variances)
    if means.dim() != 2:
        raise ValueError(f"means must have shape (S, N), got {tuple(means.shape)}")
    try:
        variances = variances.expand_as(means)
    except RuntimeError:
        raise ValueError(f"variances of shape {tuple(variances.shape)} do not broadcast to means "
                         f"of shape {tuple(means.shape)}") from None
    if (variances <= 0).any():
        raise ValueError("variances must be positive")
    if y is not None:
        _require_tensor("y", y)
        if y.shape != means.shape[1:]:
            raise ValueError(f"y must have shape (N,) = {tuple(means.shape[1:])}, got {tuple(y.shape)}")
    return means, variances


def _check_probabilities(name: str, probs: torch.Tensor, dims: int) -> None:
    _require_tensor(name, probs)
    shape = "(S, N, C)" if dims == 3 else "(N, C)"
    if probs.dim() != dims:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {probs.dtype}")
    # Probabilities, not logits: passing logits is the usual mistake and gives silent nonsense.
    if (probs < 0).any() or not torch.allclose(probs.sum(-1), torch.ones((), dtype=probs.dtype),
                                               atol=1e-3):
        raise ValueError(f"{name} must be probabilities (non-negative, summing to 1 over classes); "
                         "apply softmax to logits first")


def _check_labels(y: torch.Tensor, points: int, classes: int) -> None:
    _require_tensor("y", y)
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"y must hold integer class labels, got {y.dtype}")
    if y.shape != (points,):
        raise ValueError(f"y must have shape (N,) = ({points},), got {tuple(y.shape)}")
    if points and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got [{int(y.min())}, {int(y.max())}]")


# ----------------------------------------------------------------------------- regression


def predictive_moments(means: torch.Tensor, variances: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and variance decomposition of the predictive mixture, per point.

    With mu_s = means[s] and sigma_s^2 = variances[s] (the likelihood under weight sample s),
    the law of total variance splits the variance of the equal-weight mixture:

        mean       = E_s[mu_s]                    = (1/S) sum_s mu_s
        aleatoric  = E_s[sigma_s^2]                 (noise the model believes is in the data)
        epistemic  = Var_s[mu_s] = E_s[(mu_s - mean)^2]   (disagreement between weight samples)
        total      = aleatoric + epistemic = Var[y | x] of the mixture

    Var_s divides by S, not S - 1: the mixture gives each sample weight 1/S, and only then is
    ``total`` exactly its variance.

    Args:
        means: (S, N) likelihood means.
        variances: (S, N), or anything broadcasting to it, likelihood noise variances.

    Returns:
        dict of (N,) tensors ``mean``, ``aleatoric``, ``epistemic``, ``total``.
    """
    means, variances = _check_regression(means, variances)
    mean = means.mean(0)
    aleatoric = variances.mean(0)
    epistemic = (means - mean).pow(2).mean(0)
    return {"mean": mean, "aleatoric": aleatoric, "epistemic": epistemic, "total": aleatoric + epistemic}


def mixture_log_likelihood(means: torch.Tensor, variances: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-point log density of ``y`` under the predictive mixture, in the units of ``y``:

        log p(y_n | x_n) = log (1/S) sum_s N(y_n | mu_s, sigma_s^2)
                         = logsumexp_s log N(y_n | mu_s, sigma_s^2) - log S

    (logsumexp, because the densities of confident samples underflow far from y).

    Returns:
        (N,) tensor.
    """
    means, variances = _check_regression(means, variances, y)
    log_densities = torch.distributions.Normal(means, variances.sqrt()).log_prob(y)
    return torch.logsumexp(log_densities, 0) - math.log(means.shape[0])


def regression_metrics(means: torch.Tensor, variances: torch.Tensor, y: torch.Tensor,
                       y_scale: float = 1.0) -> dict[str, float]:
    """Test RMSE and NLL of a predictive mixture, the protocol of Hernandez-Lobato & Adams (2015).

        rmse = sqrt( (1/N) sum_n (y_n - E_s[mu_s(x_n)])^2 ) * y_scale
        nll  = -(1/N) sum_n log (1/S) sum_s N(y_n | mu_s(x_n), sigma_s^2(x_n)) + log y_scale

    When the targets were standardized, y = (y_raw - m) / y_scale, and ``means``,
    ``variances`` and ``y`` are all in standardized units, the factors convert both numbers to
    the original units: distances scale by y_scale, and the density of y_raw is the density of
    y divided by y_scale, so its negative log gains log y_scale. Leave y_scale = 1 otherwise.

    Args:
        means: (S, N) likelihood means.
        variances: (S, N), or broadcasting to it, likelihood noise variances.
        y: (N,) targets.
        y_scale: the standard deviation the targets were divided by.

    Returns:
        dict with ``rmse`` and ``nll`` (nats per point), floats.
    """
    if not y_scale > 0:
        raise ValueError(f"y_scale must be positive, got {y_scale}")
    log_likelihood = mixture_log_likelihood(means, variances, y)
    squared_error = (means.mean(0) - y).pow(2).mean()
    return {"rmse": squared_error.sqrt().item() * y_scale,
            "nll": -log_likelihood.mean().item() + math.log(y_scale)}


# ----------------------------------------------------------------------------- classification


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """-sum_c p_c log p_c over the last axis, with 0 log 0 = 0."""
    return -torch.special.xlogy(probs, probs).sum(-1)


def reliability(probs_mean: torch.Tensor, y: torch.Tensor, bins: int = 15) -> dict[str, torch.Tensor]:
    """Reliability diagram data: confidence and accuracy in equal-width confidence bins.

    The confidence of point n is conf_n = max_c p(c | x_n) and its prediction the argmax. The
    interval [0, 1] is cut into ``bins`` equal bins B_b = (b/bins, (b+1)/bins] (closed on the
    right, so a confidence of exactly 0.5 falls in the bin that ends at 0.5); in each bin

        confidence_b = (1/|B_b|) sum_{n in B_b} conf_n
        accuracy_b   = (1/|B_b|) sum_{n in B_b} [argmax_c p(c | x_n) = y_n]

    Args:
        probs_mean: (N, C) predictive class probabilities (already averaged over samples).
        y: (N,) integer labels.
        bins: number of bins.

    Returns:
        dict with ``confidence`` and ``accuracy`` (bins,), NaN in empty bins; ``count`` (bins,)
        int64; ``edges`` (bins + 1,).
    """
    _check_probabilities("probs_mean", probs_mean, dims=2)
    _check_labels(y, *probs_mean.shape)
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    confidence, prediction = probs_mean.max(-1)
    correct = (prediction == y).to(probs_mean.dtype)
    edges = torch.linspace(0, 1, bins + 1, dtype=probs_mean.dtype, device=probs_mean.device)
    # right=False gives edges[b-1] < conf <= edges[b], the (lo, hi] bins documented above.
    bin_index = torch.bucketize(confidence, edges[1:-1], right=False)
    count = torch.zeros(bins, dtype=torch.int64, device=probs_mean.device).index_add_(
        0, bin_index, torch.ones_like(bin_index))
    confidence_sum = torch.zeros_like(edges[1:]).index_add_(0, bin_index, confidence)
    correct_sum = torch.zeros_like(edges[1:]).index_add_(0, bin_index, correct)
    occupied = count.to(probs_mean.dtype)
    empty = count == 0
    return {"confidence": (confidence_sum / occupied).masked_fill(empty, float("nan")),
            "accuracy": (correct_sum / occupied).masked_fill(empty, float("nan")),
            "count": count, "edges": edges}


def expected_calibration_error(probs_mean: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """ECE (Naeini et al. 2015; Guo et al. 2017) over the bins of ``reliability``:

        ECE = sum_b (|B_b| / N) |accuracy_b - confidence_b|

    Empty bins contribute nothing. 0 is perfect calibration; the maximum is 1.
    """
    table = reliability(probs_mean, y, bins)
    occupied = table["count"] > 0
    weights = table["count"][occupied].to(probs_mean.dtype) / len(y)
    gaps = (table["accuracy"][occupied] - table["confidence"][occupied]).abs()
    return (weights * gaps).sum().item()


def classification_metrics(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL, Brier score and ECE of the averaged prediction p(c | x) = (1/S) sum_s p_s(c | x).

        accuracy = (1/N) sum_n [argmax_c p(c | x_n) = y_n]
        nll      = -(1/N) sum_n log p(y_n | x_n)              (the mixture, not E_s[-log p_s])
        brier    = (1/N) sum_n sum_c (p(c | x_n) - [c = y_n])^2
        ece      = ``expected_calibration_error`` with ``bins`` equal-width bins

    The Brier score follows Brier's (1950) original multi-class convention: summed over classes,
    so it lies in [0, 2] (some papers divide by C, or score only the true class).
    A probability of exactly 0 on the true class is clamped to the smallest positive float, so
    the NLL stays finite but very large.

    Args:
        probs: (S, N, C) class probabilities under each weight sample.
        y: (N,) integer labels.

    Returns:
        dict with ``accuracy``, ``nll``, ``brier``, ``ece`` as floats.
    """
    _check_probabilities("probs", probs, dims=3)
    _check_labels(y, *probs.shape[1:])
    probs_mean = probs.mean(0)
    true_class = probs_mean.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)
    one_hot = nn.functional.one_hot(y.long(), probs.shape[-1]).to(probs.dtype)
    return {
        "accuracy": (probs_mean.argmax(-1) == y).to(probs.dtype).mean().item(),
        "nll": -true_class.clamp_min(torch.finfo(probs.dtype).tiny).log().mean().item(),
        "brier": (probs_mean - one_hot).pow(2).sum(-1).mean().item(),
        "ece": expected_calibration_error(probs_mean, y, bins),
    }


# ----------------------------------------------------------------------------- uncertainty scores


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Total uncertainty per point: the entropy of the averaged prediction,

        H[E_s p_s] = -sum_c pbar_c log pbar_c,   pbar_c = (1/S) sum_s p_s(c | x).

    Args:
        probs: (S, N, C).

    Returns:
        (N,) tensor in nats, between 0 and log C.
    """
    _check_probabilities("probs", probs, dims=3)
    return _entropy(probs.mean(0))


def mutual_information(probs: torch.Tensor) -> torch.Tensor:
    """Epistemic uncertainty per point: the information between label and weights (BALD),

        I[y; w | x] = H[E_s p_s] - E_s H[p_s]

    the total entropy minus the expected entropy of the individual samples (the aleatoric
    part). It is 0 when all samples agree and at most log C. By Jensen it is never negative;
    rounding can make it -1e-8, so it is clamped at 0.

    Args:
        probs: (S, N, C).

    Returns:
        (N,) tensor in nats.
    """
    _check_probabilities("probs", probs, dims=3)
    expected_entropy = _entropy(probs).mean(0)
    return (_entropy(probs.mean(0)) - expected_entropy).clamp_min(0)


def max_probability(probs: torch.Tensor) -> torch.Tensor:
    """Confidence per point: max_c pbar_c of the averaged prediction (Hendrycks & Gimpel 2017).

    Args:
        probs: (S, N, C).

    Returns:
        (N,) tensor between 1/C and 1. High means confident, the opposite sign of the entropies.
    """
    _check_probabilities("probs", probs, dims=3)
    return probs.mean(0).max(-1).values


# ----------------------------------------------------------------------------- OOD detection


def _scores_and_labels(scores_in: torch.Tensor, scores_out: torch.Tensor):
    """Concatenated scores (float64) and labels, out-of-distribution = 1, the positive class."""
    for name, scores in (("scores_in", scores_in), ("scores_out", scores_out)):
        _require_tensor(name, scores)
        if scores.dim() != 1 or scores.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    scores = torch.cat([scores_in, scores_out]).double()
    labels = torch.cat([torch.zeros(len(scores_in)), torch.ones(len(scores_out))]).double()
    return scores, labels.to(scores.device)


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values`` in ascending order, tied values sharing the mean of their ranks."""
    distinct, group, group_size = torch.unique(values, sorted=True, return_inverse=True,
                                               return_counts=True)
    last_rank = group_size.cumsum(0).to(values.dtype)
    # A group of size k ending at rank r holds ranks r-k+1 .. r, whose mean is r - (k-1)/2.
    return (last_rank - (group_size - 1) / 2)[group]


def auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """Area under the ROC curve for telling OOD points (positive) by a HIGHER score.

    It is the Mann-Whitney statistic, the probability that a random OOD point outscores a random
    in-distribution point, ties counting 1/2:

        AUROC = (1 / (n_in n_out)) sum_{i in in, j in out} ([s_j > s_i] + 1/2 [s_j = s_i])
              = (R_out - n_out (n_out + 1) / 2) / (n_in n_out)

    with R_out the sum of the OOD points' ranks among all scores (ties given their mean rank).
    1 separates perfectly, 0.5 is chance.

    Args:
        scores_in: (n_in,) scores of in-distribution points.
        scores_out: (n_out,) scores of out-of-distribution points.
    """
    scores, labels = _scores_and_labels(scores_in, scores_out)
    n_out, n_in = labels.sum(), (1 - labels).sum()
    rank_sum_out = (_average_ranks(scores) * labels).sum()
    return ((rank_sum_out - n_out * (n_out + 1) / 2) / (n_in * n_out)).item()


def aupr(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """Area under the precision-recall curve, OOD positive, as average precision.

    Thresholds t run over the distinct scores from high to low; predicting "OOD" for s >= t
    gives precision P(t) and recall R(t). Average precision is the step-wise sum

        AP = sum_k (R_k - R_{k-1}) P_k,   R_0 = 0,

    (no interpolation between points, the definition of sklearn's ``average_precision_score``).
    Tied scores enter at the same threshold. A random score gives AP near the OOD fraction.

    Args:
        scores_in: (n_in,) scores of in-distribution points.
        scores_out: (n_out,) scores of out-of-distribution points.
    """
    scores, labels = _scores_and_labels(scores_in, scores_out)
    order = torch.argsort(scores, descending=True, stable=True)
    scores, labels = scores[order], labels[order]
    # The last position of each run of equal scores is where that threshold's counts are read.
    threshold_ends = torch.nonzero(scores[1:] != scores[:-1]).squeeze(-1)
    threshold_ends = torch.cat([threshold_ends, torch.tensor([len(scores) - 1], device=scores.device)])
    true_positives = labels.cumsum(0)[threshold_ends]
    predicted_positives = (threshold_ends + 1).to(scores.dtype)
    precision = true_positives / predicted_positives
    recall = true_positives / labels.sum()
    recall_steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return (recall_steps * precision).sum().item()


def ood_metrics(probs_in: torch.Tensor, probs_out: torch.Tensor) -> dict[str, dict[str, float]]:
    """AUROC and AUPR of three uncertainty scores at telling OOD inputs from in-distribution ones.

    The OOD score is high when the point looks out of distribution:

        entropy             H[E_s p_s]                    (``predictive_entropy``)
        mutual_information  H[E_s p_s] - E_s H[p_s]       (``mutual_information``)
        max_probability     -max_c E_s p_s(c)             (``max_probability``, negated)

    Args:
        probs_in: (S, N_in, C) predictive samples on in-distribution test points.
        probs_out: (S, N_out, C) predictive samples on OOD points (same S and C).

    Returns:
        {score name: {"auroc": float, "aupr": float}}.
    """
    scores = {
        "entropy": predictive_entropy,
        "mutual_information": mutual_information,
        "max_probability": lambda probs: -max_probability(probs),
    }
    results = {}
    for name, score in scores.items():
        score_in, score_out = score(probs_in), score(probs_out)
        results[name] = {"auroc": auroc(score_in, score_out), "aupr": aupr(score_in, score_out)}
    return results


# ----------------------------------------------------------------------------- memory


def _tensors(obj, path: str = "obj"):
    """Every tensor inside ``obj``: a tensor, a module's parameters and buffers, or containers of them."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _tensors(value, f"{path}[{key!r}]")
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for index, value in enumerate(obj):
            yield from _tensors(value, f"{path}[{index}]")
    else:
        raise TypeError(f"memory_bytes counts tensors, modules and dicts/lists of them; "
                        f"{path} is a {type(obj).__name__}")


def memory_bytes(obj) -> int:
    """Bytes of memory that the tensors of a posterior hold (its storage cost, not Python overhead).

        bytes = sum over the distinct storages s behind the tensors of nbytes(s)

    ``obj`` is a tensor, an ``nn.Module`` (its parameters and buffers: a PyroModule guide,
    a network), or a dict / list / tuple nesting any of these (an ensemble's state dicts, a
    Laplace mean and precision). Tensors are judged by the memory they keep alive, so what shares
    memory is counted once: a parameter and the same parameter read from a ``state_dict``, a weight
    tied between two modules, a buffer and a view of it, the slices of one flat vector. A view
    counts the whole storage it keeps (a row of a matrix keeps the matrix; an expanded tensor keeps
    only the values it repeats).
    """
    seen = set()
    total = 0
    for tensor in _tensors(obj):
        # A state_dict entry or a slice is a new tensor object over the same memory, so identity is
        # judged by the storage, not by id() or by the view's own shape.
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total
