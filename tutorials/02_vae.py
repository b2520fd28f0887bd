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
#   summary: "The VAE as a Pyro model/guide pair: the ELBO, the reparameterization trick, importance-sampled log-likelihoods, a rank-one guide, KL and active units, and training on one process or two."
# ---

# %% [markdown]
# # Chapter 2 — The variational autoencoder
#
# Chapter 1 ended with an autoencoder whose codes had no prescribed place to live, and with
# probabilistic PCA, whose posterior and likelihood are exact because everything is linear and
# Gaussian. The **variational autoencoder** (VAE; Kingma & Welling 2014, Rezende, Mohamed &
# Wierstra 2014) keeps pPCA's generative story — a code $z$ drawn from a standard normal prior,
# an image drawn given $z$ — but lets a neural network decode $z$. The price: $p(z \mid x)$ and
# $p(x)$ are no longer computable, so we learn an approximation $q(z \mid x)$ by **variational
# inference**. This chapter derives the objective (the ELBO), shows the trick that makes its
# gradients usable (reparameterization), trains VAEs on real MNIST digits, and measures them
# honestly: importance-sampled log-likelihoods with the sample count stated, KL, active units.
#
# **Smoke mode.** With `SMOKE_TEST=1` the chapter trains on a subset for a few epochs and uses
# few importance samples; it then only shows that the code runs. The prose describes what a
# full run shows; every number is printed by the code.

# %%
import inspect
import math
import os
import time

import matplotlib.pyplot as plt
import pyro
import torch

pyro.settings.set(module_local_params=True)  # PyroModules keep their parameters, as torch optimizers expect
from bayeszoo.guides.amortized import AmortizedGuide, AmortizedNormal, AmortizedRank1Normal
from bayeszoo.inference import plots
from bayeszoo.inference.data import load_dataset
from bayeszoo.inference.evaluate import active_units, importance_sampling, posterior_means
from bayeszoo.inference.svi import fit
from bayeszoo.models.ppca import PPCA
from bayeszoo.models.vae import VAE

SMOKE_TEST = os.environ.get("SMOKE_TEST") == "1"
started = time.perf_counter()
pyro.set_rng_seed(0)

EPOCHS = 2 if SMOKE_TEST else 100       # upper limit; early stopping on the validation ELBO
PATIENCE = 10
K_MAX = 100 if SMOKE_TEST else 1000     # importance samples for log-likelihoods
N_TRAIN = 500 if SMOKE_TEST else None   # None: all 4,000 training images
N_TEST = 100 if SMOKE_TEST else None    # None: all 500 test images

# %% [markdown]
# ## 1. The model, the posterior we cannot compute, and the ELBO
#
# The generative model is the one from Chapter 1 with a neural decoder $f_\theta$:
#
# $$z \sim \mathcal{N}(0, I_k), \qquad x \mid z \sim p_\theta(x \mid z) =
#   \prod_{d=1}^{D} \mathrm{Bernoulli}\big(x_d;\ \mathrm{sigmoid}(f_\theta(z))_d\big)$$
#
# for binary images (a Gaussian for grey ones, Section 4). The likelihood of an image
# $p_\theta(x) = \int p_\theta(x \mid z)\, p(z)\, dz$ has no closed form, and neither has the
# posterior $p_\theta(z \mid x) = p_\theta(x \mid z) p(z) / p_\theta(x)$.
#
# Pick any distribution $q(z \mid x)$ and write the likelihood as an expectation under it. By
# Jensen's inequality ($\log$ is concave):
#
# $$\log p_\theta(x) = \log \mathbb{E}_{q(z \mid x)}\Big[\frac{p_\theta(x, z)}{q(z \mid x)}\Big]
#   \;\ge\; \mathbb{E}_{q(z \mid x)}\big[\log p_\theta(x, z) - \log q(z \mid x)\big]
#   = \underbrace{\mathbb{E}_{q}\big[\log p_\theta(x \mid z)\big]}_{\text{reconstruction}}
#   - \underbrace{\mathrm{KL}\big(q(z \mid x)\,\|\,p(z)\big)}_{\text{regulariser}}
#   =: \mathrm{ELBO}(x).$$
#
# This is the **evidence lower bound**. Expanding $p_\theta(x, z) = p_\theta(z \mid x)\,p_\theta(x)$
# inside it shows exactly how loose it is:
#
# $$\log p_\theta(x) - \mathrm{ELBO}(x) = \mathrm{KL}\big(q(z \mid x)\,\|\,p_\theta(z \mid x)\big) \;\ge 0 .$$
#
# So maximising the ELBO over $q$ pulls $q$ towards the true posterior, and maximising it over
# $\theta$ pushes up (a bound on) the likelihood. The VAE does both at once for all images,
# with an **amortized** $q$: one encoder network maps every $x$ to the parameters of its own
# Gaussian, $q_\phi(z \mid x) = \mathcal{N}\big(\mu_\phi(x), \mathrm{diag}\,\sigma_\phi^2(x)\big)$,
# and training maximises $\sum_n \mathrm{ELBO}(x_n)$ over $(\theta, \phi)$ by stochastic
# gradients on minibatches. Compared with the autoencoder of Chapter 1: the encoder now outputs
# a distribution instead of a point, and the KL term replaces the code penalty.
#
# In Pyro the generative story is the **model** and $q$ is the **guide**; they share the sample
# site `"z"`. Here are the library's model (read it as the two lines of math above), the
# guide's `forward` (sample `"z"` from the encoder's distribution for every image) and the
# diagonal Gaussian that `AmortizedNormal` builds from the encoder's outputs:

# %%
print(inspect.getsource(VAE.forward))
print(inspect.getsource(AmortizedGuide.forward))
print(inspect.getsource(AmortizedNormal.site_distribution))

# %% [markdown]
# `pyro.plate("data", ...)` says that the images are independent given the parameters, so the
# ELBO is a sum over them and a minibatch gives an unbiased estimate of it.
#
# ## 2. The reparameterization trick
#
# The ELBO is an expectation over $q_\phi$, which depends on the parameters we differentiate.
# Two ways to get an unbiased Monte Carlo estimate of $\nabla_\phi \mathbb{E}_{q_\phi(z)}[f(z)]$:
#
# * **score function** (REINFORCE): $\nabla_\phi \mathbb{E}_q[f(z)] =
#   \mathbb{E}_q\big[f(z)\,\nabla_\phi \log q_\phi(z)\big]$ — works for any $q$, even discrete,
#   but multiplies the value of $f$ by a noisy score;
# * **reparameterization**: write $z = \mu + \sigma \odot \varepsilon$ with
#   $\varepsilon \sim \mathcal{N}(0, I)$, so $\nabla_\phi \mathbb{E}_q[f(z)] =
#   \mathbb{E}_\varepsilon\big[\nabla_\phi f(\mu_\phi + \sigma_\phi \odot \varepsilon)\big]$ — uses
#   the gradient of $f$ itself.
#
# A toy problem shows the difference. Take $f(z) = \sum_{d=1}^{D} z_d^2$ with
# $z \sim \mathcal{N}(\mu, I_D)$, $\mu = (1, \dots, 1)$, and estimate
# $\partial/\partial\mu_1\, \mathbb{E}[f(z)] = 2\mu_1 = 2$ from one sample at a time. Both
# estimators are written as "surrogate losses" whose autograd gradient is the estimate — which is
# what Pyro's `Trace_ELBO` builds internally (reparameterized for `Normal`, score function for
# distributions without `rsample`).


# %%
def single_sample_gradients(dim, num_draws, estimator):
    """num_draws independent one-sample estimates of d/d mu_1 E[sum z_d^2], z ~ N(mu, I)."""
    mu = torch.ones(num_draws, dim, requires_grad=True)   # one copy of mu per draw
    eps = torch.randn(num_draws, dim)
    if estimator == "reparameterization":
        surrogate = (mu + eps).pow(2).sum(-1)             # gradient flows through z
    else:
        z = (mu + eps).detach()                           # z is just a number here
        log_q = torch.distributions.Normal(mu, 1.0).log_prob(z).sum(-1)
        surrogate = z.pow(2).sum(-1) * log_q              # f(z) * grad log q(z)
    surrogate.sum().backward()
    return mu.grad[:, 0]


pyro.set_rng_seed(0)
ESTIMATORS = ("score function", "reparameterization")
draws = 2000 if SMOKE_TEST else 20000
dims = [1, 3, 10, 30, 100, 300, 1000]
variance = {e: [single_sample_gradients(d, draws, e).var().item() for d in dims] for e in ESTIMATORS}
example = {e: single_sample_gradients(10, draws, e) for e in ESTIMATORS}
for e in ESTIMATORS:
    print(f"{e:>18}: D = 10 mean {example[e].mean():.2f} (true 2), "
          f"variance {example[e].var():.1f}; D = 1000 variance {variance[e][-1]:.0f}")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
bins = torch.linspace(-40, 40, 81)
for e, colour in zip(ESTIMATORS, ("tab:red", "tab:blue"), strict=True):
    ax1.hist(example[e].clamp(-40, 40), bins=bins, alpha=0.6, color=colour, label=e, density=True)
    ax2.loglog(dims, variance[e], "o-", color=colour, label=e)
ax1.axvline(2.0, color="k", ls="--", label="true gradient")
ax1.set_xlabel(r"one-sample estimate of $\partial_{\mu_1} \mathbb{E}[f]$ (clipped to ±40)")
ax1.set_ylabel("density")
ax1.set_title("D = 10")
ax1.legend(fontsize=8)
ax2.set_xlabel("dimension D")
ax2.set_ylabel("variance of one-sample estimate")
ax2.set_title("estimator variance vs dimension")
ax2.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# Both estimators are unbiased, but the score-function estimate of one coordinate's gradient
# also carries the noise of every other coordinate of $f$, so its variance grows with $D$; the
# reparameterized estimate stays at $\mathrm{Var}[2(\mu_1 + \varepsilon_1)] = 4$ whatever $D$ is.
# A VAE decoder is a function of 20 latent numbers and 784 pixels — reparameterization is what
# makes training it with one sample per image practical.
#
# ## 3. A Bernoulli VAE on binarized MNIST
#
# A Bernoulli likelihood needs binary pixels. We use **dynamic binarization** (Salakhutdinov &
# Murray 2008): each training minibatch is a fresh Bernoulli draw of the grey levels
# (`batch_transform=data.batch_transform`), which acts as data augmentation. The validation and
# test images are binarized once, with a fixed seed, so every model is scored on the same bits.
#
# `fit` maximises the ELBO with Adam, reports it per image in nats, evaluates the validation
# ELBO after each epoch, stops when it has not improved for `PATIENCE` epochs and restores the
# best weights. Encoder and decoder have one hidden layer of 400 units; $k = 20$.

# %%
binary = load_dataset("mnist5k", binarize="dynamic")
grey = load_dataset("mnist5k")
shape = binary.image_shape


def subset(split, n):
    return split if n is None else {key: value[:n] for key, value in split.items()}


def binarize_once(split, seed):
    generator = torch.Generator().manual_seed(seed)
    return {**split, "x": torch.bernoulli(split["x"], generator=generator)}


train = subset(binary.train, N_TRAIN)                 # grey levels, binarized per minibatch
valid = binarize_once(binary.valid, seed=1)
test = binarize_once(subset(binary.test, N_TEST), seed=2)
print(f"train {len(train['x'])} images (dynamic binarization), valid {len(valid['x'])}, "
      f"test {len(test['x'])} (binarized once)")


def train_vae(z_dim, guide_class=AmortizedNormal, likelihood="bernoulli", data=None, seed=0,
              epochs=EPOCHS):
    """Build a VAE and a guide, fit them, and report the time taken."""
    train_split, valid_split, transform = data or (train, valid, binary.batch_transform)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = VAE(binary.x_dim, z_dim=z_dim, hidden=(400,), likelihood=likelihood)
    guide = guide_class(model, hidden=(400,))
    tic = time.perf_counter()
    result = fit(model, guide, train_split, valid_split, epochs=epochs, batch_size=100, lr=1e-3,
                 patience=PATIENCE, batch_transform=transform, seed=seed, progress=False)
    best = result.history[result.best_epoch]
    print(f"{guide_class.__name__}, z_dim={z_dim}, {likelihood}: {len(result.history)} epochs in "
          f"{time.perf_counter() - tic:.0f} s; best validation ELBO {best['valid_elbo']:.2f} "
          f"nats/image at epoch {best['epoch']}")
    return model, guide, result


vae, vae_guide, vae_fit = train_vae(20)

# %%
fig = plots.training_curves(vae_fit.history)
fig.axes[0].set_title("Bernoulli VAE, k = 20: ELBO per image")
plt.show()

# %% [markdown]
# The training ELBO (on freshly binarized minibatches, averaged while the weights change) and
# the validation ELBO both rise; the validation curve flattens while the training curve keeps
# climbing: the model starts to overfit 4,000 images. Here the validation ELBO still crept up
# to the end (best at epoch 98), so early stopping never fired and all 100 epochs ran; `fit`
# keeps the best validation epoch.
#
# Reconstructions: the top row is the binary test image, the bottom row is the decoder mean
# $\mathrm{sigmoid}(f_\theta(z))$ — a grey-level image of pixel probabilities — for one
# $z \sim q(z \mid x)$. Samples: $z \sim \mathcal{N}(0, I)$ from the prior, decoded the same way.
# Sampling the prior is something no plain autoencoder could do.

# %%
fig = plots.reconstructions(vae, vae_guide, test, shape, count=12)
fig.suptitle("Bernoulli VAE (k = 20): test images and reconstructions", y=1.04)
plt.show()
pyro.set_rng_seed(1)
fig = plots.samples(vae, shape, count=12, rows=3)
fig.suptitle("Bernoulli VAE (k = 20): decoded samples from the prior p(z)", y=1.02)
plt.show()

# %% [markdown]
# ## 4. Bernoulli or Gaussian pixels — and why their numbers do not compare
#
# MNIST pixels are really grey levels. We can keep them and use a Gaussian likelihood
# $x_d \mid z \sim \mathcal{N}(f_\theta(z)_d, \sigma^2)$ with one learned $\sigma$
# (`likelihood="gaussian"`), trained on the grey images without binarization.

# %%
grey_data = (subset(grey.train, N_TRAIN), grey.valid, None)
grey_test = subset(grey.test, N_TEST)
gauss_vae, gauss_guide, _ = train_vae(20, likelihood="gaussian", data=grey_data)
sigma = gauss_vae.likelihood.log_sigma.exp().item()
print(f"learned pixel noise sigma = {sigma:.3f}")

pyro.set_rng_seed(3)
few_binary, few_grey = test["x"][:10], grey_test["x"][:10]
bernoulli_mean = plots.observation_mean(vae, vae_guide, x=few_binary)
gauss_mean = plots.observation_mean(gauss_vae, gauss_guide, x=few_grey)
rows = [few_binary, bernoulli_mean, torch.bernoulli(bernoulli_mean),
        few_grey, gauss_mean, gauss_mean + sigma * torch.randn_like(gauss_mean)]
titles = ["binary data", "Bernoulli: mean", "Bernoulli: draw",
          "grey data", "Gaussian: mean", "Gaussian: draw"]
fig = plots.image_grid(rows, shape, titles)
fig.suptitle("reconstructions: the decoder mean and one draw of x from p(x | z)", y=1.02)
plt.show()

# %% [markdown]
# The means look alike; the *draws* show what each model believes an image is. The Bernoulli
# draw is a plausible binary image; the Gaussian draw adds independent noise of size $\sigma$ to
# every pixel, including the black background (shown clipped to $[0, 1]$), a reminder that
# independent Gaussian pixels are a poor model of digits even when the mean is good.
#
# Now put the numbers side by side — and then refuse to compare the wrong ones. The
# log-likelihoods are importance-sampled estimates, explained in Section 6; pPCA's is exact.

# %%
ppca_grey = PPCA(grey.x_dim, 20).set_maximum_likelihood(grey.train["x"])
with torch.no_grad():
    ppca_ll = ppca_grey.log_marginal(grey_test["x"]).mean().item()
pyro.set_rng_seed(0)
bernoulli_ll = importance_sampling(vae, vae_guide, test, num_samples=K_MAX)["log_likelihood"]
gauss_ll = importance_sampling(gauss_vae, gauss_guide, grey_test, num_samples=K_MAX)["log_likelihood"]
print(f"test log-likelihoods, nats/image (VAEs: importance sampling with K={K_MAX}, Section 6):")
print(f"  Bernoulli VAE (k=20), binary images: {bernoulli_ll.mean():8.1f}  (log of a probability: < 0)")
print(f"  Gaussian VAE (k=20), grey images:    {gauss_ll.mean():8.1f}  (log of a density)")
print(f"  pPCA (k=20, exact), grey images:     {ppca_ll:8.1f}  (log of a density)")
print(f"one pixel's log density ceiling at the learned sigma: "
      f"-log(sigma sqrt(2 pi)) = {-math.log(sigma * math.sqrt(2 * math.pi)):.2f} nats")

# %% [markdown]
# * The Bernoulli number is the log of a **probability** of a binary image, one of $2^{784}$
#   possible ones: it is always negative, and $-\mathrm{ELBO}$ is a code length in nats.
# * The Gaussian number is the log of a **density** over $[0,1]^{784}$. Each pixel contributes up
#   to $-\log(\sigma\sqrt{2\pi})$, positive as soon as $\sigma < 0.4$; rescale the pixels (say to
#   0–255) and every value shifts by $784 \log 255$ nats. It can grow without limit by shrinking
#   $\sigma$ around the many pixels that are exactly 0 — which is why serious continuous models
#   of 8-bit images first *dequantize* (add uniform noise) the data.
# * They are scores of different data (binary vs grey images) under different kinds of measure.
#   Only models of the **same** data with the **same** kind of likelihood compare: the Gaussian
#   VAE against pPCA's exact density of the same grey test images (both printed above), the
#   Bernoulli VAE against other models of the same binary images.
#
# The Bernoulli likelihood applied to grey values, another common shortcut, is not a normalized
# likelihood at all (the continuous Bernoulli of Loaiza-Ganem & Cunningham 2019 repairs that).
# From here on we stay with binary images and Bernoulli pixels, the standard protocol for
# reporting MNIST log-likelihoods.
#
# ## 5. A two-dimensional latent space
#
# With $k = 2$ we can draw the whole latent space. Left: the posterior means
# $\mathbb{E}_q[z \mid x]$ of the test images, coloured by digit (labels never used in
# training). Right: the decoder mean over a grid of $z$ values placed at the quantiles of
# $\mathcal{N}(0, 1)$ in each coordinate (as in Kingma & Welling 2014), so the grid covers the
# prior's mass evenly.

# %%
vae_2d, guide_2d, _ = train_vae(2)
means_2d = posterior_means(guide_2d, test)["z"]
fig = plots.latent_scatter(means_2d, test["y"], title="Bernoulli VAE, k = 2: E[z | x], test set")
plt.show()
fig = plots.latent_manifold(vae_2d, shape, steps=15)
fig.axes[0].set_title("decoder mean over a 15×15 grid of N(0,1) quantiles in z")
plt.show()

# %% [markdown]
# Compare with the autoencoder's 2-D codes in Chapter 1: the KL term packs the codes into the
# region where the prior has its mass, centred on the origin, so the space has no large empty
# gaps, and every point of the grid decodes to something digit-like. Moving across the grid
# morphs one digit into the next. Two numbers cannot hold all the detail, though: digits that
# overlap in the scatter (often 4, 7 and 9) blur into each other on the grid.
#
# ## 6. How good is the model? Importance-sampled log-likelihood
#
# The ELBO is a bound, not the likelihood. To estimate $\log p_\theta(x)$ itself we use the guide
# as an importance-sampling proposal (Burda, Grosse & Salakhutdinov 2016):
#
# $$\log p_\theta(x) \approx \log \frac{1}{K}\sum_{k=1}^{K} \frac{p_\theta(x, z_k)}{q(z_k \mid x)},
#   \qquad z_k \sim q(z \mid x).$$
#
# For $K = 1$ its expectation is the ELBO; it increases with $K$ and converges to
# $\log p_\theta(x)$ as $K \to \infty$. Always state $K$. The better $q$ matches the posterior,
# the fewer samples it needs. `importance_sampling` returns the estimate, the ELBO and the KL
# for every test image (`evaluate` wraps it with the active-unit count of Section 8, and is what
# the command line reports).

# %%
Ks = [K for K in (1, 10, 100, 1000) if K < K_MAX] + [K_MAX]


def score(model, guide, seed=0):
    """Per-image IS estimates at K_MAX, summary scores, and the mean IS estimate for each K."""
    pyro.set_rng_seed(seed)
    per_point = importance_sampling(model, guide, test, num_samples=K_MAX)
    summary = {name: values.mean().item() for name, values in per_point.items()}
    summary["active_units"] = sum(active_units(guide, test).values())
    curve = [importance_sampling(model, guide, test, num_samples=K)["log_likelihood"].mean().item()
             for K in Ks[:-1]] + [summary["log_likelihood"]]
    return per_point, summary, curve


per_point, summary, curve = score(vae, vae_guide)
points, scores, curves = {"diagonal": per_point}, {"diagonal": summary}, {"diagonal": curve}
print(f"diagonal guide, {len(test['x'])} test images: ELBO {summary['elbo']:.2f}, "
      f"IS log-likelihood (K={K_MAX}) {summary['log_likelihood']:.2f} nats/image")
print("IS estimate by K:", dict(zip(Ks, [round(v, 2) for v in curve], strict=True)))

gap = per_point["log_likelihood"] - per_point["elbo"]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
ax1.semilogx(Ks, curve, "o-", label="IS estimate")
ax1.axhline(summary["elbo"], color="grey", ls="--", label="ELBO (its K = 1 expectation)")
ax1.set_xlabel("number of importance samples K")
ax1.set_ylabel("nats per test image")
ax1.set_title("IS log-likelihood tightens with K")
ax1.legend()
ax2.hist(gap.numpy(), bins=40, color="tab:purple")
ax2.set_xlabel(f"IS estimate (K={K_MAX}) − ELBO, nats")
ax2.set_ylabel("test images")
ax2.set_title("per-image gap: a lower estimate of KL(q || posterior)")
fig.tight_layout()
plt.show()

# %% [markdown]
# The estimate rises fastest from $K = 1$ to $K = 10$ and then keeps rising ever more slowly:
# even at $K = 1000$ it is still a lower bound (in expectation), just a much tighter one than
# the ELBO. The histogram shows that the gap varies a lot between images: for some the diagonal
# Gaussian $q$ fits the posterior
# well, for others it does not. Because
# $\log p - \mathrm{ELBO} = \mathrm{KL}(q \,\|\, p(z \mid x))$ and the IS estimate is still below
# $\log p$ on average, each gap is a lower estimate of how far $q$ is from the true posterior.
#
# ## 7. A richer guide: rank-1 plus diagonal covariance
#
# The diagonal $q$ cannot express correlations between latent coordinates, which the true
# posterior generally has (a stroke can be explained by moving two coordinates together).
# Rezende et al. (2014) gave the encoder one more output vector $u(x)$ and used the precision
# matrix $C^{-1} = D(x) + u(x)u(x)^\top$: a full covariance with only $3k$ outputs, and
# $O(k)$ sampling and density evaluation. `AmortizedRank1Normal` implements it; swapping it in is
# a one-word change. Same model, same data, same seed, same training budget:

# %%
rank1_vae, rank1_guide, _ = train_vae(20, guide_class=AmortizedRank1Normal)
points["rank-1"], scores["rank-1"], curves["rank-1"] = score(rank1_vae, rank1_guide)

print(f"{'guide':<10} {'ELBO':>8} {'IS (K=' + str(K_MAX) + ')':>12} {'IS - ELBO':>10} "
      f"{'KL':>7} {'active':>7}")
for name, s in scores.items():
    print(f"{name:<10} {s['elbo']:8.2f} {s['log_likelihood']:12.2f} "
          f"{s['log_likelihood'] - s['elbo']:10.2f} {s['kl']:7.2f} {s['active_units']:7d}")
difference = points["rank-1"]["log_likelihood"] - points["diagonal"]["log_likelihood"]
stderr = difference.std().item() / math.sqrt(len(difference))
print(f"rank-1 minus diagonal, IS log-likelihood (K={K_MAX}), paired over {len(difference)} "
      f"test images: {difference.mean():.2f} ± {stderr:.2f} nats (± one standard error)")

fig, ax = plt.subplots(figsize=(5.5, 3.8))
for (name, values), colour in zip(curves.items(), ("tab:blue", "tab:orange"), strict=True):
    ax.semilogx(Ks, values, "o-", color=colour, label=f"{name}: IS estimate")
    ax.axhline(scores[name]["elbo"], color=colour, ls="--", lw=1, label=f"{name}: ELBO")
ax.set_xlabel("number of importance samples K")
ax.set_ylabel("nats per test image")
ax.set_title("diagonal vs rank-1 guide")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# Read the table and the paired difference with their uncertainty before drawing conclusions.
# The two runs differ in their guide *and* in the model each guide helped to train (and early
# stopping may end them at different epochs, printed above), so the IS log-likelihoods compare
# the two trained models, while the gap IS − ELBO says how well each guide fits its own model's
# posterior. The richer guide can raise the ELBO without shrinking that gap, because the model
# it trains changes too. The standard error printed with the difference covers only the choice
# of test images, not the randomness of training: on 4,000 training images and one seed,
# differences of a fraction of a nat are hints, not conclusions — rerun with other seeds before
# believing one.
#
# ## 8. KL and active units
#
# The KL term charges every latent coordinate for the information it carries about $x$. A
# coordinate that is not worth its cost collapses onto the prior, $q(z_d \mid x) \approx
# \mathcal{N}(0, 1)$ for every $x$, and is simply switched off. Burda et al. (2016) call unit $d$
# **active** if its posterior mean varies across the data,
# $A_d = \mathrm{Cov}_x\big(\mathbb{E}_q[z_d \mid x]\big) > 0.01$. For the diagonal guide the KL
# also splits over coordinates in closed form,
# $\mathrm{KL}_d = \tfrac{1}{2}\big(\mu_d^2 + \sigma_d^2 - 1 - \log \sigma_d^2\big)$.
#
# To see units switch off we also train a VAE with more latent coordinates than these images
# need, $k = 50$ (with a shorter budget, to keep the chapter quick).

# %%
vae_50, guide_50, _ = train_vae(50, epochs=2 if SMOKE_TEST else 50)


def unit_statistics(guide):
    """Per-unit activity Cov_x(E_q[z_d|x]) and mean KL(q(z_d|x) || N(0,1)) on the test set."""
    with torch.no_grad():
        q = guide.site_distributions(test["x"])["z"].base_dist   # a diagonal Normal
    kl = 0.5 * (q.loc**2 + q.scale**2 - 1 - 2 * q.scale.log()).mean(0)
    return q.loc.var(0), kl


units = {"k = 20": (vae_guide, "tab:blue"), "k = 50": (guide_50, "tab:red")}
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
for name, (guide, colour) in units.items():
    activity, kl = unit_statistics(guide)
    count = active_units(guide, test)["z"]
    least_active_half = kl[activity.argsort()[: len(kl) // 2]]
    print(f"{name}: {count} of {len(kl)} units active (activity > 0.01); KL summed over units "
          f"{kl.sum():.2f} nats/image, of which the least active half carries {least_active_half.sum():.2f}")
    ax1.semilogy(range(1, len(kl) + 1), activity.sort(descending=True).values, "o-", ms=3,
                 color=colour, label=f"{name} ({count} active)")
    ax2.scatter(activity, kl, s=14, color=colour, label=name)
ax1.axhline(0.01, color="k", ls="--", lw=1, label="threshold 0.01")
ax2.axvline(0.01, color="k", ls="--", lw=1, label="threshold 0.01")
ax1.legend(fontsize=8)
ax2.legend(fontsize=8)
ax1.set_xlabel("latent unit, sorted by activity")
ax1.set_ylabel(r"activity $\mathrm{Cov}_x(\mathbb{E}_q[z_d|x])$")
ax1.set_title("which latent units are used?")
ax2.set_xscale("log")
ax2.set_xlabel("activity of the unit")
ax2.set_ylabel("mean KL per image, nats")
ax2.set_title("KL(q(z_d|x) || N(0,1)) against activity")
fig.tight_layout()
plt.show()

# %% [markdown]
# The $k = 20$ model uses all of its units. The $k = 50$ model has a head of units whose
# activity and KL look like the $k = 20$ model's, and then a tail whose activity falls by orders
# of magnitude and whose KL is nearly zero: for every image those units are (almost) the prior,
# and the decoder ignores them. Compare the printed KL sums — thirty extra coordinates add
# essentially no information. Collapse is gradual, though: after this short training run the
# whole tail still sits above the 0.01 threshold (50 of 50 units count as active), so the
# active-unit count is a convention to
# read together with the KL, not a measurement of how many units matter.
#
# How many units a VAE keeps depends on the data, the decoder's power and the training (KL
# annealing — `fit(..., kl_anneal_epochs=...)` — is a common remedy for units that switch off
# too early). Checking them is a cheap test that the latent space is used at all; a powerful
# decoder with every unit collapsed has an ELBO that looks fine and a latent space that is pure
# noise.
#
# ## 9. The same experiments from the command line
#
# Every model/guide pair in this chapter is also one `bayeszoo` command, which writes a run
# folder with the training history, the test scores (IS log-likelihood with its $K$, ELBO, KL,
# active units) and the figures:
#
# ```
# bayeszoo fit vae --guide amortized --data mnist5k --z-dim 20 --epochs 100 --patience 10
# bayeszoo fit vae --guide rank1     --data mnist5k --z-dim 20 --epochs 100 --patience 10
# bayeszoo evaluate runs/vae-rank1-mnist5k-seed0 --is-samples 5000
# ```
#
# **Where this lives in the library.** `models/vae.py` (`VAE`), `guides/amortized.py`
# (`AmortizedNormal`, `AmortizedRank1Normal`), `inference/svi.py` (`fit`),
# `inference/evaluate.py` (`importance_sampling`, `evaluate`, `active_units`),
# `inference/plots.py`.

# %% [markdown]
# ## 10. One process or two
#
# `fit(..., devices=N)` trains the same model data-parallel on $N$ processes (through Lightning
# Fabric): every process holds a replica of model and guide, each takes its share of every
# minibatch of $B$ images, and DistributedDataParallel averages the gradients, so the step is the
# one a single process takes on the whole minibatch. The ELBO's scaling stays exact: each process
# weighs its share so the shares add up to the one-process loss of the $B$ images
# (`inference/distributed.py` writes the equations out). `batch_size` is the **global** batch.
#
# Below, the $k = 20$ VAE trains twice from the same seed, on one process and on two.
# `strategy="ddp_fork"` forks the second process from this one, which works in a notebook or a
# script without pickling anything (the default, `"ddp"`, spawns fresh processes: everything
# must pickle and each one imports torch and Pyro again). Both runs see the same minibatches and
# the same binarization draws; what differs is the reparameterization noise $\epsilon$, which
# each process draws for its own images. The two ELBO curves therefore agree closely but not to
# the last digit; with the noise taken out the parameters agree to float rounding
# (`tests/test_distributed.py`).

# %%
DP_EPOCHS = 2 if SMOKE_TEST else 10
dp_train = subset(binary.train, 300 if SMOKE_TEST else None)
dp_valid = subset(valid, 100 if SMOKE_TEST else None)


def train_on_processes(devices):
    """The k = 20 VAE from seed 0 on ``devices`` processes; its history."""
    pyro.set_rng_seed(0)
    model = VAE(binary.x_dim, z_dim=20, hidden=(400,))
    guide = AmortizedNormal(model, hidden=(400,))
    result = fit(model, guide, dp_train, dp_valid, epochs=DP_EPOCHS, batch_size=100, lr=1e-3,
                 batch_transform=binary.batch_transform, seed=0, progress=False,
                 devices=devices, strategy="ddp_fork")
    return result.history


# One thread per process in both runs: a comparison of processes, not of thread counts (with
# OMP_NUM_THREADS set, Lightning leaves the forked process torch's setting instead of cores / N).
threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"
histories = {devices: train_on_processes(devices) for devices in (1, 2)}
torch.set_num_threads(threads)
if omp is None:
    del os.environ["OMP_NUM_THREADS"]
else:
    os.environ["OMP_NUM_THREADS"] = omp
fig, ax = plt.subplots(figsize=(5, 3.2))
for devices, history in histories.items():
    ax.plot([row["epoch"] for row in history], [row["valid_elbo"] for row in history], "o-",
            label=f"{devices} process{'es' if devices > 1 else ''}")
ax.set_xlabel("epoch")
ax.set_ylabel("validation ELBO, nats/image")
ax.legend()
plt.show()
gap = max(abs(a["valid_elbo"] - b["valid_elbo"]) for a, b in zip(*histories.values(), strict=True))
print(f"largest gap between the two validation ELBO curves: {gap:.2f} nats/image")
for devices, history in histories.items():
    seconds = [row["seconds"] for row in history[1:]] or [history[0]["seconds"]]
    print(f"{devices} process(es): {sorted(seconds)[len(seconds) // 2]:.2f} s per epoch (median), "
          f"final validation ELBO {history[-1]['valid_elbo']:.2f}")

# %% [markdown]
# On a laptop or the course's 2-core machine two processes do not halve the epoch time for a
# network this small — here they are slower, 0.73-0.75 s per epoch against 0.40-0.44 s for one
# (two builds): each step now ends in an all-reduce of the gradients, and two processes
# share the cores with everything else (`results/scaling.md` has the measured table). The same
# code pays off where each process has a device of its own and enough work per step: a GPU node,
# or several. There one runs the command of section 9 with the devices named, e.g. four GPUs:
#
# ```
# bayeszoo fit vae --guide amortized --data mnist --data-root data --devices 4 --accelerator gpu
# ```
#
# and on two such nodes the same command on each, with node 0's address and a free port, and each
# node's number:
#
# ```
# MASTER_ADDR=node0 MASTER_PORT=29500 NODE_RANK=0 bayeszoo fit vae --guide amortized --data mnist \
#     --data-root data --devices 4 --num-nodes 2 --accelerator gpu      # NODE_RANK=1 on the other
# ```
#
# With the Python API: `fit(..., devices=4, accelerator="gpu")`; `batch_size` stays the global
# batch, so the numbers of a 4-GPU run mean what a one-process run's do.

# %%
print(f"chapter ran in {time.perf_counter() - started:.0f} s "
      f"({'smoke test' if SMOKE_TEST else 'full run'}, {torch.get_num_threads()} threads)")
