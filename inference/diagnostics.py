"""ArviZ diagnostics: the one place bayeszoo talks to ArviZ (written against the arviz 0.23 API).

Everything else in bayeszoo works in torch tensors; the functions here convert to NumPy,
call ArviZ and hand torch tensors back, so a change of ArviZ's API touches this file only.

``inference_data`` / ``guide_inference_data``: ArviZ ``InferenceData`` from MCMC draws per chain
or from any guide's samples; ``summary`` (posterior mean, sd, R-hat, bulk and tail ESS),
``plot_trace`` and ``plot_forest`` on it.

``psis_khat``: the Pareto k-hat of importance weights w_k = p(x, z_k) / q(z_k | x), z_k ~ q
(Vehtari et al., "Pareto smoothed importance sampling", JMLR 2024; Yao et al., "Yes, but did
it work?", ICML 2018). A generalized Pareto distribution is fitted to the largest weights; its
shape k says how heavy their tail is, that is, how far q is from the posterior p(z | x):

* k < 0.5        the weights have a finite variance: importance sampling (and the IS
                 log-likelihood) is reliable, q is close to the posterior;
* 0.5 <= k < 0.7 finite mean, infinite variance: usable, converges slowly;
* k >= 0.7       q misses mass the posterior has; IS estimates are unreliable.

Vehtari et al. (2024) refine the 0.7 threshold to min(1 - 1 / log10 S, 0.7) for S samples,
which is 0.7 for S >= 2,154 (and lower below it).
"""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import torch

#: ArviZ fits the tail to the largest ceil(min(S / 5, 3 sqrt(S))) weights and needs more than
#: four of them, so a k-hat needs at least this many samples per data point.
MIN_PSIS_SAMPLES = 21


def psis_khat(log_weights: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """Pareto k-hat of each column of ``log_weights`` (shape (S, N): S samples of N points,
    the layout of ``inference.evaluate.log_weight_terms``), or of a single vector (S,).

    Returns a float64 tensor of shape (N,) (or a 0-d tensor), on the CPU.

    A column whose log weights are all equal, up to ``rtol`` times their largest magnitude
    (float rounding of an exact posterior, as for pPCA with the Laplace guide), gets
    k-hat = -inf: the weights are constant and importance sampling is exact. ArviZ itself
    would return +inf there (it finds no tail to fit), which would read as the worst case.
    A column with too few distinct large weights for a fit keeps ArviZ's +inf.

    Raises ``ValueError`` for fewer than ``MIN_PSIS_SAMPLES`` samples (ArviZ would return +inf
    for every column) and for NaN or +inf log weights.
    """
    weights = torch.as_tensor(log_weights).detach().to("cpu", torch.float64)
    if weights.dim() not in (1, 2):
        raise ValueError(f"log_weights must have shape (S,) or (S, N), got {tuple(weights.shape)}")
    if weights.shape[0] < MIN_PSIS_SAMPLES:
        raise ValueError(f"a Pareto k-hat needs at least {MIN_PSIS_SAMPLES} samples per point, "
                         f"got {weights.shape[0]}")
    if torch.isnan(weights).any() or (weights == float("inf")).any():
        raise ValueError("log_weights contain NaN or +inf")
    columns = weights.reshape(weights.shape[0], -1)
    # A constant column makes ArviZ's tail fit divide 0 by 0 (NumPy warns; the column is set to
    # -inf below), which is no news for the caller: keep NumPy quiet here only.
    with np.errstate(divide="ignore", invalid="ignore"):
        _, khat = az.psislw(columns.T.contiguous().numpy(), reff=1.0)  # samples on the last axis
    khat = torch.from_numpy(np.asarray(khat, dtype=np.float64).reshape(-1))
    top = columns.max(0).values
    spread = top - columns.min(0).values
    constant = (spread <= rtol * top.abs().clamp(min=1.0)) & torch.isfinite(top)
    khat = torch.where(constant, torch.tensor(float("-inf"), dtype=torch.float64), khat)
    return khat.reshape(weights.shape[1:])


def inference_data(draws: dict[str, torch.Tensor]) -> az.InferenceData:
    """``InferenceData`` from draws per chain: site name -> (chains, draws, *site shape)."""
    return az.from_dict(posterior={name: value.detach().cpu().numpy() for name, value in draws.items()})


def guide_inference_data(guide, num_samples: int = 1000, num_chains: int = 1, *args,
                         **kwargs) -> az.InferenceData:
    """``InferenceData`` from a guide: ``num_chains`` x ``num_samples`` independent draws of every
    sample site it returns (``forward`` returns a dict of its sites, as bayeszoo's weight guides
    do). Independent draws, so R-hat near 1 and ESS near the draw count are the expected
    readings: a check of the pipeline, not of convergence."""
    draws = {}
    with torch.no_grad():
        for _ in range(num_chains * num_samples):
            for name, value in guide(*args, **kwargs).items():
                draws.setdefault(name, []).append(value)
    return inference_data({name: torch.stack(values).reshape(num_chains, num_samples, *values[0].shape)
                           for name, values in draws.items()})


def summary(data: az.InferenceData, var_names: list[str] | None = None):
    """ArviZ's summary table (pandas): mean, sd, HDI, MCSE, ESS (bulk, tail) and R-hat per scalar."""
    return az.summary(data, var_names=var_names)


def max_rhat(data: az.InferenceData) -> float:
    """The largest rank-normalized split R-hat over every scalar of the posterior; NaN when
    none can be computed (fewer than four draws per chain, or chains that never moved)."""
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 is how ArviZ reaches its NaN
        rhat = _defined(az.rhat(data))
    return float(rhat.max()) if rhat.size else np.nan


def min_ess(data: az.InferenceData) -> float:
    """The smallest bulk effective sample size over every scalar of the posterior; NaN when
    none can be computed."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ess = _defined(az.ess(data, method="bulk"))
    return float(ess.min()) if ess.size else np.nan


def _defined(per_scalar) -> np.ndarray:
    """Every scalar's value of an ArviZ per-variable result, the undefined (NaN) ones left out:
    ArviZ returns NaN for a scalar whose draws are all equal."""
    values = np.concatenate([np.asarray(per_scalar[name]).ravel() for name in per_scalar.data_vars])
    return values[~np.isnan(values)]


def plot_trace(data: az.InferenceData, var_names: list[str] | None = None):
    """Trace plot (per-chain densities and draws); returns the matplotlib Figure. A chain that
    never moved (every draw the same value: R-hat and ESS say so) has no density to estimate;
    ArviZ warns and leaves its density curve out, which the figure itself shows, so the warning
    is not passed on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your data appears to have a single value",
                                category=UserWarning)
        axes = az.plot_trace(data, var_names=var_names, compact=True)
    return np.asarray(axes).ravel()[0].figure


def plot_forest(data: az.InferenceData, var_names: list[str] | None = None):
    """Forest plot (94% HDI per scalar, per chain, with R-hat); returns the Figure."""
    axes = az.plot_forest(data, var_names=var_names, combined=False, r_hat=True)
    return np.asarray(axes).ravel()[0].figure
