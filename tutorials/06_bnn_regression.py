# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   summary: "Bayesian neural networks for regression: ten weight posteriors from MAP to NUTS on data with a gap, their in-between uncertainty, NUTS diagnostics and the Boston housing benchmark."
# ---

# %% [markdown]
# # Chapter 6 — Bayesian neural networks for regression
#
# A neural network fitted by least squares gives one function. Where the training data pin it
# down that is fine; elsewhere it still answers, and just as confidently. A **Bayesian neural
# network** (MacKay 1992, Neal 1996) keeps every function the data allow, weighted by how well
# it explains them: a prior $p(w)$ on the weights, a likelihood, and the posterior
#
# $$p(w \mid \mathcal{D}) \propto p(w) \prod_{n=1}^{N} p(y_n \mid f(x_n; w)), \qquad
#   p(y \mid x, \mathcal{D}) = \int p(y \mid f(x; w))\, p(w \mid \mathcal{D})\, dw .$$
#
# The integral is done by Monte Carlo over $S$ weight samples $w_s$ from the posterior or an
# approximation $q(w)$ of it. With a Gaussian likelihood $y \mid x, w \sim \mathcal{N}(\mu_w(x),
# \sigma_w^2(x))$ the predictive is a mixture of $S$ Gaussians, and the law of total variance
# splits its variance in two:
#
# $$\operatorname{Var}[y \mid x] = \underbrace{\mathbb{E}_s[\sigma_s^2(x)]}_{\text{aleatoric}}
#   + \underbrace{\operatorname{Var}_s[\mu_s(x)]}_{\text{epistemic}} .$$
#
# *Aleatoric* uncertainty is the noise the model believes is in the data; more data do not
# remove it. *Epistemic* uncertainty is the disagreement between plausible networks: it should
# be small where the training data are and grow where they are not.
#
# The chapter follows the seeds' order: (1) a network that predicts its own noise — uncertainty
# on the output only; (2) uncertainty on the weights, with ten ways to get it, on a 1-D data
# set with a hole in the middle; (3) how to tell whether the gold standard, NUTS, has
# converged; (4) the standard UCI benchmark, Boston housing.
#
# **Smoke mode.** With `SMOKE_TEST=1` every fit runs for a handful of steps, NUTS draws a few
# samples and the Boston table uses one split; it then only shows that the code runs. The prose
# describes what a full run shows; every number is printed by the code.

# %%
import math
import os
import time

import matplotlib.pyplot as plt
import pyro
import torch

pyro.settings.set(module_local_params=True)  # PyroModules keep their parameters, as torch optimizers expect
from bayeszoo.guides.weight_laplace import WeightLaplaceGuide
from bayeszoo.inference import diagnostics
from bayeszoo.inference.distributed import run_tasks
from bayeszoo.inference.metrics import predictive_moments
from bayeszoo.inference.plots import regression_band
from bayeszoo.inference.predictive import predictive, score
from bayeszoo.inference.supervised import GAP_INTERVALS, gap_function, grid, load_supervised
from bayeszoo.inference.training import train
from bayeszoo.models.bnn import BayesianNeuralNetwork
from bayeszoo.models.nn import mlp

SMOKE_TEST = os.environ.get("SMOKE_TEST") == "1"
started = time.perf_counter()
pyro.set_rng_seed(0)
torch.set_num_threads(1)  # small networks: one thread is fastest

HIDDEN = 50                                  # every network in the chapter: one hidden layer of 50 ReLUs
GAP_EPOCHS = 5 if SMOKE_TEST else 800        # full-batch steps on the 160 gap points
SGLD_EPOCHS = 4 if SMOKE_TEST else 300       # minibatches of 40: four steps per epoch
NUTS_CHAINS = 2
NUTS_WARMUP = 3 if SMOKE_TEST else 20        # iterations per chain; see section 3 for why so few
NUTS_SAMPLES = 5 if SMOKE_TEST else 20
BOSTON_SPLITS = 1 if SMOKE_TEST else 20      # of the 20 splits of Hernandez-Lobato & Adams (2015)
BOSTON_EPOCHS = 1 if SMOKE_TEST else 40
NUM_SAMPLES = 10 if SMOKE_TEST else 200      # predictive weight samples for the variational guides


def network(outputs: int = 1, inputs: int = 1):
    """A fresh inputs-HIDDEN-outputs ReLU network, the same initialisation every time."""
    torch.manual_seed(0)
    return mlp([inputs, HIDDEN, outputs])


def draws_for(guide) -> int:
    """How many predictive weight samples a guide gets: all members of a sample set, once each."""
    return getattr(guide, "num_members", NUM_SAMPLES)


def moments(model, guide, x, num_samples):
    out = predictive(model, guide, x, num_samples)
    return predictive_moments(out["mean"], out["variance"])


gap = load_supervised("gap")
x_grid = grid(gap)
f_grid = gap_function(x_grid[:, 0])
in_gap = x_grid[:, 0].abs() < GAP_INTERVALS[1][0]
outside = x_grid[:, 0].abs() > 1.05
on_data = torch.zeros_like(in_gap)
for low, high in GAP_INTERVALS:
    on_data |= (x_grid[:, 0] >= low) & (x_grid[:, 0] <= high)
print(gap)


def decorate(ax):
    """The true curve and the hole in the training inputs, on every panel."""
    ax.plot(x_grid[:, 0], f_grid, "k--", linewidth=0.8, label="true f(x)")
    ax.axvspan(GAP_INTERVALS[0][1], GAP_INTERVALS[1][0], color="grey", alpha=0.1, linewidth=0)
    ax.set_ylim(-2.5, 2.5)


# %% [markdown]
# The data: $y = x^3 + \tfrac12 \sin(2\pi x) + \varepsilon$, $\varepsilon \sim \mathcal{N}(0,
# 0.1^2)$, with 160 training inputs drawn from $[-1, -0.3] \cup [0.3, 1]$ and none in between
# (Foong et al. 2019 call the uncertainty that should appear there "in-between uncertainty").
# The 200 test points are uniform on $[-1, 1]$, hole included, so the test scores below reward
# a model that knows what it does not know.
#
# ## 1. Uncertainty on the output only: a heteroscedastic network
#
# The seeds' first step keeps the weights as point estimates and makes the *output*
# probabilistic: the network has two outputs, a mean and a raw scale, and
#
# $$y \mid x \sim \mathcal{N}\big(f_1(x),\ \operatorname{softplus}(f_2(x))^2\big)$$
#
# (Nix & Weigend 1994). Trained by maximum a posteriori (the weight prior is then just weight
# decay), it learns how noisy the data are at each $x$: aleatoric uncertainty. Nothing in it
# knows where the data were.

# %%
tic = time.perf_counter()
hetero = BayesianNeuralNetwork(network(outputs=2), (1,), likelihood="heteroscedastic")
hetero_guide, _ = train(hetero, "map", gap.train, epochs=GAP_EPOCHS, batch_size=len(gap.train["x"]),
                        lr=1e-2, progress=False, seed=0)
hetero_moments = moments(hetero, hetero_guide, x_grid, 1)
hetero_sd = hetero_moments["aleatoric"].sqrt()
hetero_test = score(hetero, hetero_guide, gap, num_samples=1)
print(f"heteroscedastic MAP: {time.perf_counter() - tic:.0f} s; learned noise sd on the data "
      f"{hetero_sd[on_data].mean():.3f} (true 0.1), in the gap {hetero_sd[in_gap].mean():.3f}, "
      f"at |x| > 1.05 {hetero_sd[outside].mean():.3f}; test RMSE {hetero_test['rmse']:.3f}, "
      f"NLL {hetero_test['nll']:.3f}")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
regression_band(axes[0], gap.train["x"], gap.train["y"], x_grid, hetero_moments["mean"],
                torch.zeros_like(hetero_sd), hetero_sd, "heteroscedastic network (MAP)")
decorate(axes[0])
axes[0].legend(fontsize=7, loc="upper left")
axes[1].plot(x_grid[:, 0], hetero_sd, color="tab:blue", label="learned noise sd softplus(f_2(x))")
axes[1].axhline(0.1, color="k", ls="--", linewidth=0.8, label="true noise sd 0.1")
axes[1].axvspan(GAP_INTERVALS[0][1], GAP_INTERVALS[1][0], color="grey", alpha=0.1, linewidth=0)
axes[1].set_xlabel("x")
axes[1].legend(fontsize=7)
axes[1].set_title("aleatoric sd")
plt.tight_layout()
plt.show()

# %% [markdown]
# The learned noise is not the truth, 0.1 everywhere. It is largest, about 0.2, in and near
# the gap, where the piecewise-linear mean misses the bends of the curve at the cluster edges
# and the network explains the misfit as noise; and it is smallest, about 0.05, at the ends of
# the plot, outside the data, exactly where the straight-line extrapolation is furthest from
# the truth (at $x = 1.5$ the true curve is at 3.4). The network's $\sigma(x)$ is one more
# function interpolated and extrapolated by ReLUs; nothing in it knows which inputs it has
# seen. A band that narrows where the model is most wrong is overconfidence, and an
# output-only model cannot fix it: that needs uncertainty about the function itself, that is,
# about the weights.
#
# ## 2. Uncertainty on the weights: ten posteriors on the gap data
#
# Now every weight gets a prior, $w \sim \mathcal{N}(0, 1/\text{fan-in})$ (`prior="fan_in"`, the
# scale that keeps activations of the same size from layer to layer), the likelihood is
# homoscedastic $\mathcal{N}(f(x; w), \sigma^2)$ with $\sigma$ a learned point estimate (type-II
# maximum likelihood), and the network is the same 1-50-1 ReLU network throughout. Only the
# guide changes — one word in `train(model, method, ...)`:
#
# | method | $q(w)$ | how it is fitted |
# |---|---|---|
# | `map` | a point, $\delta(w - \hat w)$ | maximize $\log p(w, \mathcal{D})$: the baseline, no epistemic uncertainty |
# | `meanfield` | $\prod_i \mathcal{N}(\mu_i, \sigma_i^2)$ | Bayes by Backprop (Blundell et al. 2015): maximize the ELBO with one reparameterized weight sample per step for the likelihood term; the KL to the prior in closed form (Pyro's `TraceMeanField_ELBO`) |
# | `lrt` | same | the same ELBO, but each layer samples its *pre-activations* per example (local reparameterization, Kingma et al. 2015): lower gradient variance |
# | `flipout` | same | one weight sample, decorrelated across examples by random sign flips (Wen et al. 2018) |
# | `mcdropout` | Bernoulli masks on a point | dropout kept on at test time (Gal & Ghahramani 2016) |
# | `ensemble` | $\frac1M \sum_m \delta(w - w_m)$ | $M = 5$ MAP networks from different initialisations, trained in one vectorized step (Lakshminarayanan et al. 2017) |
# | `laplace` | $\mathcal{N}(\hat w, H^{-1})$ | a Gaussian around the MAP, curvature from the generalized Gauss-Newton matrix, here over the last layer only, prior precision chosen by the marginal likelihood |
# | `sgld` | samples | stochastic-gradient Langevin dynamics (Welling & Teh 2011): gradient steps plus noise of the right size, thinned after burn-in |
# | `nuts` | samples | the No-U-Turn sampler (Hoffman & Gelman 2014), exact up to Monte Carlo error: the gold standard |
# | `tradi` | $\prod_i \mathcal{N}(\mu_i, \sigma_i^2)$ | a Kalman filter tracks each weight along the SGD trajectory (Franchi et al. 2020) |
#
# NUTS samples latent variables only (a point-estimated noise would stay at its initial value),
# so its model gives $\sigma$ a prior, $\sigma \sim \text{HalfNormal}(1)$, and samples it with
# the weights. Laplace needs no training of its own: it is a step taken from the MAP fit. The
# optimizers train with Adam on the full batch of 160 points for 800 steps; SGLD takes 1,200
# Langevin steps on minibatches of 40 and keeps every fourth of the second half; NUTS runs two
# chains of 20 warm-up and 20 kept iterations, one process each (`devices=2`) — all it can
# afford in this chapter's time budget, as Section 3 explains.

# %%
FULL_BATCH = len(gap.train["x"])
SETTINGS = {
    "map": {},
    "meanfield": {},
    "lrt": {},
    "flipout": {},
    "mcdropout": {"options": {"dropout": 0.1}},
    "ensemble": {"options": {"members": 5}},
    # Langevin dynamics on the full-data potential: its step size bounds how sharp a posterior
    # it can follow, so it is small, and it runs on minibatches of 40 after a burn-in.
    "sgld": {"lr": 3e-4, "batch_size": 40, "epochs": SGLD_EPOCHS,
             "options": {"burn_in_epochs": SGLD_EPOCHS // 2, "thin": 4}},
    "tradi": {},
}
TITLES = {"map": "MAP", "meanfield": "Bayes by Backprop (mean-field)", "lrt": "local reparameterization",
          "flipout": "Flipout", "mcdropout": "MC dropout (p = 0.1)", "ensemble": "deep ensemble (M = 5)",
          "laplace": "Laplace (last layer)", "sgld": "SGLD", "nuts": "NUTS", "tradi": "TRADI"}
fits = {}  # method -> (model, guide, seconds)

for method, setting in SETTINGS.items():
    model = BayesianNeuralNetwork(network(), (1,), noise="learned")
    tic = time.perf_counter()
    guide, _ = train(model, method, gap.train, options=setting.get("options"),
                     epochs=setting.get("epochs", GAP_EPOCHS),
                     batch_size=setting.get("batch_size", FULL_BATCH), lr=setting.get("lr", 1e-2),
                     progress=False, seed=0)
    fits[method] = (model, guide, time.perf_counter() - tic)
    if method == "map":  # Laplace: a Gaussian around this MAP fit
        tic = time.perf_counter()
        laplace = WeightLaplaceGuide(model, guide, gap.train, structure="last-layer")
        fits["laplace"] = (model, laplace, fits["map"][2] + time.perf_counter() - tic)
    print(f"{method:10s} {fits[method][2]:5.1f} s", flush=True)

nuts_model = BayesianNeuralNetwork(network(), (1,), noise="prior")
tic = time.perf_counter()
# The chains are independent: each runs in a process of its own (forked from this one), and each
# draws what it would draw in this process, so the numbers below do not depend on it.
nuts_guide, _ = train(nuts_model, "nuts", gap.train, progress=False, seed=0,
                      options={"nuts_samples": NUTS_SAMPLES, "nuts_warmup": NUTS_WARMUP,
                               "chains": NUTS_CHAINS}, devices=NUTS_CHAINS, strategy="ddp_fork")
fits["nuts"] = (nuts_model, nuts_guide, time.perf_counter() - tic)
print(f"nuts       {fits['nuts'][2]:5.1f} s ({NUTS_CHAINS} chains x ({NUTS_WARMUP} warm-up + "
      f"{NUTS_SAMPLES} kept) iterations)")

# %%
ORDER = ["map", "meanfield", "lrt", "flipout", "mcdropout", "ensemble", "laplace", "sgld", "nuts", "tradi"]
fig, axes = plt.subplots(2, 5, figsize=(18, 6.5), sharex=True, sharey=True)
rows = []
for ax, method in zip(axes.ravel(), ORDER, strict=True):
    model, guide, seconds = fits[method]
    S = draws_for(guide) if method != "map" else 1
    m = moments(model, guide, x_grid, S)
    epistemic_sd, total_sd = m["epistemic"].sqrt(), m["total"].sqrt()
    regression_band(ax, gap.train["x"], gap.train["y"], x_grid, m["mean"], epistemic_sd, total_sd,
                    TITLES[method])
    decorate(ax)
    test = score(model, guide, gap, num_samples=S)
    rows.append((method, seconds, test["rmse"], test["nll"], epistemic_sd[on_data].mean().item(),
                 epistemic_sd[in_gap].mean().item(), epistemic_sd[outside].mean().item(),
                 m["aleatoric"].sqrt()[on_data].mean().item()))
axes[0, 0].legend(fontsize=7, loc="upper left")
plt.tight_layout()
plt.show()

print("gap data, 200 test points on [-1, 1]; epistemic sd averaged over the grid on the data, in the gap "
      "and beyond |x| = 1.05; noise sd: the learned aleatoric sd on the data (true 0.1)")
print(f"{'method':10s} {'seconds':>8s} {'test RMSE':>10s} {'test NLL':>9s} "
      f"{'epist. sd: data':>16s} {'gap':>6s} {'outside':>8s} {'noise sd':>9s}")
for method, seconds, rmse, nll, sd_data, sd_gap, sd_out, noise in rows:
    print(f"{method:10s} {seconds:8.1f} {rmse:10.3f} {nll:9.3f} {sd_data:16.3f} {sd_gap:6.3f} {sd_out:8.3f} "
          f"{noise:9.3f}")

# %% [markdown]
# What the full run shows (the numbers are the table's, the pictures the panels'):
#
# * **Two groups.** MAP, the ensemble, Laplace, TRADI and NUTS fit the data: test RMSE 0.14 to
#   0.21, noise sd 0.10 to 0.15 (true 0.1). Mean-field (with or without local
#   reparameterization or Flipout), MC dropout and SGLD do not: their mean is a flattened curve,
#   almost a straight line for mean-field and SGLD, with RMSE 0.32 to 0.36, and they explain the
#   wiggles as noise (sd 0.26 to 0.33). For mean-field this is what its objective prefers, not a
#   lack of training (a run of 3,000 steps ends at the same place): with 151 weights and 160
#   points, the KL price of weights precise enough to draw the curve is more than the
#   likelihood gains, the small-data failure known as over-pruning (Trippe & Turner 2018). The
#   three estimators of the same ELBO end close together; local reparameterization and Flipout
#   only reduce the gradient noise. SGLD is another story: its step size is bounded by the
#   sharpest direction of the posterior, so in 1,200 steps it has crawled only part of the way
#   from the initialisation; it is still fitting, not yet sampling (a separate run of 20,000
#   full-batch steps reached noise sd 0.23, still well above the 0.10 to 0.15 of the methods that
#   fit).
# * **In-between uncertainty.** Only NUTS widens clearly in the gap: its epistemic sd is 0.05
#   there against 0.02 on the data. Laplace (last layer) is nearly flat across the gap (0.026
#   against 0.024), the ensemble's five members agree closely (sd 0.016 on the data and 0.010 in
#   the gap: five weight-decayed ReLU networks draw nearly the same line between the clusters)
#   and TRADI's band is invisible. The mean-field family and MC dropout do the opposite of what
#   we want: their epistemic sd is *smaller* in the gap (0.075 to 0.098 for mean-field, 0.006 for
#   dropout) than on the data (0.13 to 0.16, 0.02). Foong et al. (2020) showed why: in a
#   single-hidden-layer network, the mean-field Gaussian and MC dropout predictive variance at
#   a point between two inputs cannot exceed the sum of the variances at those inputs, so these
#   approximations cannot express in-between uncertainty at all.
# * **Away from the data** (|x| > 1.05) Laplace, MC dropout and NUTS grow their epistemic band
#   (sd 0.09 to 0.12), the mean-field family more (0.275 to 0.308, around a wrong mean), SGLD
#   0.17, the ensemble (0.03) and TRADI (0.003) barely. No method follows the true cubic out there,
#   and none is wide enough to cover it: the prior of a ReLU network extrapolates straight lines.
# * **Scores.** NUTS has the best test NLL (-0.49), then Laplace (-0.22), TRADI and MAP: on this
#   test set, whose hard points are in the gap, a little honest width pays. The mean-field
#   family's wide bands do not help, because they come with a wrong mean.
#
# None of this is a verdict on the methods in general: it is one small network, one prior and
# one training budget. It is what the code above does, and the point of the workbench is that
# changing any of those is one line.
#
# ## 3. Has NUTS converged? R-hat, ESS and a trace plot
#
# NUTS is exact only in the limit. Two checks come with every run (Vehtari et al. 2021): the
# **rank-normalized split R-hat** compares the chains with each other and with their own halves
# (near 1 when they agree; above 1.01 says "run longer"), and the **effective sample size**
# counts how many independent draws the autocorrelated chain is worth. `inference.diagnostics`
# hands the draws to ArviZ.

# %%
nuts_data = diagnostics.inference_data(nuts_guide.chains)
print(diagnostics.summary(nuts_data, var_names=["noise_scale", "net.2.bias"]).to_string())
print(f"over all {sum(v[0, 0].numel() for v in nuts_guide.chains.values())} scalars (weights, biases, noise scale): "
      f"max R-hat {diagnostics.max_rhat(nuts_data):.2f}, min bulk ESS {diagnostics.min_ess(nuts_data):.0f} "
      f"of {NUTS_CHAINS * NUTS_SAMPLES} draws")

# %% [markdown]
# Weight space is the wrong place to look for convergence in a neural network: permuting the
# hidden units gives the same function, so two chains can sit in equivalent modes and disagree
# on every weight. What matters for prediction is the *function*. The same diagnostics on the
# network's output at three inputs — on the left cluster, in the gap, on the right cluster:

# %%
x_probe = torch.tensor([[-0.65], [0.0], [0.65]])
chains = nuts_guide.chains
num_chains, num_draws = next(iter(chains.values())).shape[:2]
flat = {name: value.reshape(num_chains * num_draws, *value.shape[2:]) for name, value in chains.items()}
f_probe = predictive(nuts_model, x=x_probe, posterior_samples=flat)["mean"]
function_data = diagnostics.inference_data(
    {"f(-0.65)": f_probe[:, 0].reshape(num_chains, num_draws),
     "f(0)": f_probe[:, 1].reshape(num_chains, num_draws),
     "f(0.65)": f_probe[:, 2].reshape(num_chains, num_draws),
     "noise_scale": chains["noise_scale"]})
print(diagnostics.summary(function_data).to_string())
fig = diagnostics.plot_trace(function_data)
plt.tight_layout()
plt.show()

# %% [markdown]
# In the full run the weight-space diagnostics fail: max R-hat above 2 (2.2 to 3.6 in our runs;
# 3.56 in this one) and a minimum bulk ESS of 4 out of 40 draws. Part of that is the symmetry (a
# chain that has swapped two hidden units disagrees on their weights without disagreeing on
# anything that matters), part is simply too few draws. But in this run the function values at
# the three probe inputs, which is what predictions are made of, fail as well: R-hat 2.21 to
# 2.38 (bulk ESS 53 to 64), and the noise scale has R-hat 2.29 and a bulk ESS of 4. The trace
# plot shows why: one of the two chains (dotted) is a flat line, it did not move in its 20 kept
# draws, so the chains cannot agree. These chains have not converged, and the NUTS row of
# Section 2 averages one moving chain and one stuck one. Even chains that agreed would be only a
# weak "consistent so far", not a certificate: forty draws cannot reveal a mode neither chain
# visited.
#
# Why so few draws? NUTS builds each trajectory until it turns back, up to 1,023 leapfrog steps,
# and here it needs hundreds of them or the maximum: the posterior is narrow in some directions
# (160 points with noise sd 0.1 pin some combinations of weights to about $0.1 / \sqrt{160}
# \approx 0.01$ or less) and as wide as the prior in others (the weights of hidden units the
# data barely use), so the step size must be small and the path long. Each leapfrog step is one
# gradient of the full-data log density through Pyro, a few milliseconds here, so one draw
# costs seconds: the 80 iterations above, the two chains in a process each, took 70 to 80 s
# on two otherwise idle CPU cores, the largest part of this chapter's running time. One chain
# after the other they draw the same numbers, slower (197 to 309 s in our runs on shared cores;
# on a busy machine 569 s against 211 s side by side). This is why NUTS is the gold
# standard for *small* networks, and a reference rather than a tool for larger ones (Izmailov
# et al. 2021 ran full-batch HMC on hundreds of TPUs).
#
# ## 4. Boston housing: the benchmark table
#
# Hernández-Lobato & Adams (2015) fixed the protocol most BNN papers report: 20 random 90/10
# train/test splits of the 506 Boston tracts, one hidden layer of 50 units, 40 epochs, inputs and
# targets standardized with the training statistics, and the test RMSE and Gaussian NLL in the
# original units (thousands of dollars), as mean ± standard error over splits. `load_supervised("boston",
# split=i, valid_fraction=0)` gives split $i$ with the paper's 455 / 51 sizes, and `score`
# converts back to the original units.

# %%
BOSTON_METHODS = ["map", "laplace", "meanfield", "mcdropout", "ensemble"]


def boston_split(split, device, shows_progress):
    """Every method on Boston split ``split``: {method: (test RMSE, test NLL, training seconds)}."""
    boston = load_supervised("boston", split=split, valid_fraction=0.0)
    fitted, results = {}, {}
    for method in BOSTON_METHODS:
        tic = time.perf_counter()
        if method == "laplace":  # a step from this split's MAP fit, which comes first in the list
            model, map_guide = fitted["map"]
            guide = WeightLaplaceGuide(model, map_guide, boston.train, structure="last-layer")
        else:
            model = BayesianNeuralNetwork(network(inputs=boston.x_dim), (boston.x_dim,), noise="learned")
            guide, _ = train(model, method, boston.train, options=SETTINGS[method].get("options"),
                             epochs=BOSTON_EPOCHS, batch_size=32, lr=1e-2, progress=False, seed=split)
        fitted[method] = (model, guide)
        seconds = time.perf_counter() - tic
        scores = score(model, guide, boston, num_samples=draws_for(guide))
        results[method] = [float(scores["rmse"]), float(scores["nll"]), seconds]
    return results


# The splits are independent: two at a time, one process each (as the NUTS chains above).
tic_boston = time.perf_counter()
per_split = run_tasks(boston_split, BOSTON_SPLITS, devices=2, strategy="ddp_fork")
boston_scores = {m: [{"rmse": r[m][0], "nll": r[m][1]} for r in per_split] for m in BOSTON_METHODS}
boston_seconds = {m: sum(r[m][2] for r in per_split) for m in BOSTON_METHODS}
print(f"{BOSTON_SPLITS} split(s) in {time.perf_counter() - tic_boston:.0f} s, two at a time")


def mean_se(values):
    """Mean ± standard error over splits (just the value for a single split)."""
    values = torch.tensor(values, dtype=torch.float64)
    if len(values) == 1:
        return f"{values.item():.2f}"
    return f"{values.mean():.2f} ± {values.std() / math.sqrt(len(values)):.2f}"


splits = "all 20 splits" if BOSTON_SPLITS == 20 else f"the first {BOSTON_SPLITS} of the 20 splits"
print(f"Boston housing, test RMSE and NLL ($1000s), mean ± standard error over {splits}, "
      f"{BOSTON_EPOCHS} epochs")
print(f"{'method':10s} {'RMSE':>13s} {'NLL':>13s} {'seconds/split':>14s}")
for method in BOSTON_METHODS:
    s = boston_scores[method]
    print(f"{method:10s} {mean_se([r['rmse'] for r in s]):>13s} {mean_se([r['nll'] for r in s]):>13s} "
          f"{boston_seconds[method] / BOSTON_SPLITS:14.1f}")

# %% [markdown]
# In the full run (all 20 splits, two at a time: 70 to 80 s on two otherwise idle cores, 7 to 8 s
# a split for the five methods), MAP, Laplace and the ensemble reach RMSE about 3.5 and NLL 2.74 to
# 2.77, MC dropout is a little worse in RMSE (3.64) and a little better in NLL (2.72), and
# mean-field is the worst on both (RMSE 4.08, NLL 2.85), the same underfitting as on the gap
# data. Between the first four the differences are within about one standard error; even twenty
# splits cannot rank them. For orientation only, since
# budgets and tuning differ: the papers report RMSE 3.0 and NLL 2.57 for probabilistic
# backpropagation and 4.3 and 2.90 for the variational method of Graves (2011)
# (Hernández-Lobato & Adams 2015), 2.97 and 2.46 for MC dropout with a tuned dropout rate and
# noise (Gal & Ghahramani 2016), and NLL 2.41 for deep ensembles of heteroscedastic networks
# (Lakshminarayanan et al. 2017). The standard errors
# understate the real uncertainty of such comparisons: the 20 training sets overlap, so the
# splits are not independent.

# %%
print(f"chapter ran in {time.perf_counter() - started:.0f} s (SMOKE_TEST={SMOKE_TEST})")
