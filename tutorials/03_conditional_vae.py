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
# ---

# %% [markdown]
# # 3. The conditional VAE: generating what you ask for
#
# A VAE learns $p(x)$: ask it for a sample and you get *some* digit. Often we want a
# particular one ("draw a 7"), or we know part of the answer and want the rest ("here is the
# top-left corner of a digit; finish it"). Both are **conditional** problems: learn
# $p(x \mid c)$ for a condition $c$. This chapter builds the conditional VAE (CVAE) of
# Sohn, Lee & Yan (2015), *Learning Structured Output Representation using Deep Conditional
# Generative Models*, and uses it for
#
# 1. label-conditioned generation: $c$ is the class label, $x$ the image;
# 2. image completion, the paper's own MNIST experiment: $c$ is one observed quadrant, $x$
#    the other three. Here we compare with a deterministic network trained on the same loss,
#    and see why a latent variable matters when the answer is not unique.
#
# Everything runs on the CPU in a few minutes; set `SMOKE_TEST=1` for a quick check that the
# chapter runs end to end (the numbers are then meaningless).

# %%
import inspect
import os
import time

import matplotlib.pyplot as plt
import pyro
import torch
from pyro import poutine
from torch import nn

import models  # noqa: F401  (keeps each network's parameters local to its module)
from guides.amortized import AmortizedNormal
from inference.data import load_dataset
from inference.evaluate import importance_sampling
from inference.plots import image_grid, observation_mean
from inference.svi import fit
from models.vae import ConditionalVAE, label_inputs, quadrant_inputs

SMOKE_TEST = os.environ.get("SMOKE_TEST") == "1"
EPOCHS = 2 if SMOKE_TEST else 30
IS_SAMPLES = 10 if SMOKE_TEST else 1000  # K, importance samples per test image
SEED = 0
started = time.perf_counter()
pyro.set_rng_seed(SEED)

# %% [markdown]
# ## 1. Why condition, and what changes
#
# The CVAE keeps the VAE's latent variable $z$ and puts the condition $c$ into every
# distribution of the generative story:
#
# $$
# z \sim p_\theta(z \mid c), \qquad x \sim p_\theta(x \mid z, c), \qquad
# p_\theta(x \mid c) = \int p_\theta(x \mid z, c)\, p_\theta(z \mid c)\, dz .
# $$
#
# Three networks do the work (Sohn et al. call $c$ "x" and our $x$ "y"; we keep the names of
# the VAE chapter, so $x$ is always the image):
#
# * the **prior network** $p_\theta(z \mid c) = \mathcal N(\mu_\theta(c), \operatorname{diag}
#   \sigma^2_\theta(c))$: what the condition already says about $z$;
# * the **generation network** $p_\theta(x \mid z, c)$: independent Bernoulli pixels whose
#   logits a decoder computes from $z$ and $c$ together;
# * the **recognition network** $q_\phi(z \mid x, c)$: the amortized posterior; it sees the
#   answer $x$ *and* the condition.
#
# The same Jensen step as for the VAE gives the **conditional ELBO**, which we maximize:
#
# $$
# \log p_\theta(x \mid c) \;\ge\;
# \mathbb E_{q_\phi(z \mid x, c)}\big[\log p_\theta(x \mid z, c)\big]
# - \mathrm{KL}\big(q_\phi(z \mid x, c)\,\|\,p_\theta(z \mid c)\big).
# $$
#
# With the prior fixed to $\mathcal N(0, I)$ the KL term is the one on the course slide,
# $\mathrm{KL}(\mathcal N(\mu(x, c), \Sigma(x, c)) \,\|\, \mathcal N(0, I))$; `ConditionalVAE`
# offers both (`prior="standard"` or `"learned"`). At test time $x$ is unknown, so the
# recognition network is put away and we sample $z \sim p_\theta(z \mid c)$, then
# $x \sim p_\theta(x \mid z, c)$. The model in `models/vae.py` is exactly this story:

# %%
print(inspect.getsource(ConditionalVAE.forward))

# %% [markdown]
# `c` is a tensor with one row per image, `x_mask` (optional) says which pixels the
# likelihood scores. The guide `AmortizedNormal` is the recognition network: an MLP on the
# concatenation $[x, c]$ with a mean and a scale head. It is the same class as the VAE's
# encoder; it reads `x_dim` and `context_dim` off the model.
#
# **Data.** `mnist5k` holds 5,000 real MNIST digits (4,000 train / 500 valid / 500 test). We
# model binary pixels: training batches are binarized afresh every time they are drawn
# (`binarize="dynamic"`, a regularizer on such a small set), while the validation and test
# images are binarized once with a fixed seed (1234, the same as the `bayeszoo` command), so
# every score is computed on the same binary images.

# %%
dataset = load_dataset("mnist5k", binarize="dynamic")
SHAPE, N_CLASSES = dataset.image_shape, dataset.num_classes
generator = torch.Generator().manual_seed(1234)
valid = dataset.batch_transform(dataset.valid, generator)
test = dataset.batch_transform(dataset.test, generator)
train = dataset.train
if SMOKE_TEST:  # a small subset, so the chapter runs in seconds
    train = {k: v[:300] for k, v in train.items()}
    valid = {k: v[:100] for k, v in valid.items()}
    test = {k: v[:50] for k, v in test.items()}
print(dataset)
print(f"using {len(train['y'])} training, {len(valid['y'])} validation and "
      f"{len(test['y'])} test images")

# %% [markdown]
# ## 2. Label-conditioned generation
#
# Here $c$ is the one-hot label. A label says which digit, nothing about the handwriting, so
# we keep the prior at $\mathcal N(0, I)$ (`prior="standard"`): $z$ then has to carry
# everything *except* the class, that is the **style** (slant, stroke width, size), and the
# same $z$ means the same style for every label. `label_inputs` turns an image batch and its
# labels into the model's keyword inputs `{"x", "c"}`.
#
# `fit` runs SVI with Adam on the conditional ELBO. It takes the model inputs for training
# and validation, and a `batch_transform` that is applied to every training minibatch: here
# the dataset's own one, which redraws the binary image.

# %%
pyro.set_rng_seed(SEED)
label_cvae = ConditionalVAE(dataset.x_dim, N_CLASSES, z_dim=20, hidden=(400,),
                            prior="standard")
label_guide = AmortizedNormal(label_cvae, hidden=(400,))


def with_labels(split):
    return label_inputs(split["x"], split["y"], N_CLASSES)


t0 = time.perf_counter()
label_fit = fit(label_cvae, label_guide, with_labels(train), with_labels(valid),
                epochs=EPOCHS, batch_size=100, lr=1e-3, seed=SEED,
                batch_transform=dataset.batch_transform, progress=False)
last = label_fit.history[-1]
print(f"label CVAE: {len(label_fit.history)} epochs in {time.perf_counter() - t0:.0f} s; "
      f"last epoch: train ELBO {last['train_elbo']:.1f}, validation ELBO "
      f"{last['valid_elbo']:.1f} nats per image")

# %% [markdown]
# **Asking for a digit.** Each row below fixes the label $c$ and draws ten $z \sim
# \mathcal N(0, I)$; each image is the decoder's pixel probabilities $\mathbb E[x \mid z, c]$
# (the usual way to show a Bernoulli VAE's samples: a binary draw from them looks speckled).
# `observation_mean(model, **inputs)` without a guide samples $z$ from the prior.

# %%
pyro.set_rng_seed(SEED)
columns = 10
digits = torch.arange(N_CLASSES).repeat_interleave(columns)
one_hot = nn.functional.one_hot(digits, N_CLASSES).float()
means = observation_mean(label_cvae, c=one_hot)
fig = image_grid(list(means.split(columns)), SHAPE, [f"c = {d}" for d in range(N_CLASSES)],
                 size=0.8)
fig.suptitle(r"label CVAE: ten draws $z \sim p(z)$ per label, showing $E[x \mid z, c]$", y=1.01)
plt.show()

# %% [markdown]
# **Same style, different digit.** Now hold $z$ fixed and change only the label. We take $z$
# from real test digits: the recognition network's mean $\mathbb E_q[z \mid x, c]$ of each
# digit in the left column, a summary of *how* it was written. Decoding that $z$ with each of
# the ten labels writes every digit in that hand. `poutine.condition` pins the sample site
# `z` to the chosen value, so the model itself does the decoding.

# %%
styles = with_labels({k: v[:6] for k, v in test.items()})
with torch.no_grad():
    z_style = label_guide.site_distributions(styles["x"], styles["c"])["z"].mean
rows = []
for i in range(len(z_style)):
    z = z_style[i].expand(N_CLASSES, -1)
    labels = nn.functional.one_hot(torch.arange(N_CLASSES), N_CLASSES).float()
    decoded = observation_mean(poutine.condition(label_cvae, data={"z": z}), c=labels)
    rows.append(torch.cat([styles["x"][i:i + 1], decoded]))
fig = image_grid(rows, SHAPE, [f"test digit {i}" for i in range(len(rows))], size=0.8)
for j, ax in enumerate(fig.axes[:N_CLASSES + 1]):
    ax.set_title("input" if j == 0 else f"c = {j - 1}", fontsize=9)
fig.suptitle(r"fix $z = E_q[z \mid x, c]$ of the input, vary the label $c$", y=1.01)
plt.show()

# %% [markdown]
# Reading across a row, the slant and stroke weight of the input carry over to all ten
# digits: the label and the style have come apart, without anyone telling the model what
# "style" is. This is also the first limit of the picture: $z$ is whatever the label does
# not explain, so an unusual input (a very thick or wide stroke) gives an unusual $z$, and
# the rarer combinations of that $z$ with a label come out less clean.
#
# ## 3. Completing an image from one quadrant
#
# Sohn et al. test the CVAE on a task with many right answers: show the network one quadrant
# of a digit and ask for the other three. The top-left corner of a 7 can also be the start of
# a 2, 3 or 9, so the conditional distribution $p(x \mid c)$ is **multi-modal**.
#
# `quadrant_inputs(x, image_shape, observed=0)` builds the inputs for the top-left quadrant:
# the context `c` is the image with the three hidden quadrants set to $-1$ (a value no pixel
# takes, so the network can tell "hidden" from "black"), and `x_mask` marks the hidden pixels,
# the only ones the likelihood scores. The objective is then the conditional likelihood of the
# hidden pixels, $\log p(x_{\text{hidden}} \mid c)$, as in the paper.
#
# Two models, each trained on the same images for the same number of epochs:
#
# * **deterministic baseline**: an MLP $f(c)$ that outputs one logit per pixel, trained with
#   the Bernoulli cross-entropy of the hidden pixels: $-\log p(x_{\text{hidden}} \mid c) =
#   -\sum_{d\ \text{hidden}} [x_d \log \sigma(f_d) + (1 - x_d) \log(1 - \sigma(f_d))]$. It is a
#   proper probabilistic model too, but with independent pixels given $c$, it can only say
#   "this pixel is on with probability 0.4", never "either a 7 or a 9".
# * **CVAE** with a learned prior network $p_\theta(z \mid c)$: here the condition says a lot
#   about $z$ (a corner with a horizontal bar makes a 7 likely), which is what the prior
#   network is for. The pixels are independent only *given* $z$; the mixture over $z$ can
#   make them depend on each other.

# %%
HIDDEN = 400


def quadrants(x):
    """Model inputs {"x", "c", "x_mask"} with the top-left quadrant observed."""
    return quadrant_inputs(x, SHAPE, observed=0)


def binarized_quadrants(batch, generator):
    """Training transform: a fresh binary image, then its observed quadrant as context."""
    return quadrants(dataset.batch_transform(batch, generator)["x"])


def show(x, mask):
    """For figures: hidden pixels drawn mid-grey, so the observed quadrant stands out."""
    return torch.where(mask, torch.full_like(x, 0.5), x)


train_q, valid_q, test_q = quadrants(train["x"]), quadrants(valid["x"]), quadrants(test["x"])
few = {k: v[:8] for k, v in test_q.items()}
fig = image_grid([show(few["x"], few["x_mask"]), few["x"]], SHAPE,
                 ["observed c", "truth x"], size=0.8)
fig.suptitle("the task: complete the image from its top-left quadrant (grey: hidden)", y=1.03)
plt.show()

# %% [markdown]
# The baseline is a few lines of plain PyTorch. Its loss is the negative log-likelihood of the
# hidden pixels, summed over pixels and averaged over images, so its numbers are in the same
# units (nats per image) as the CVAE's.

# %%
def hidden_log_likelihood(logits, inputs):
    """log p(x_hidden | c) of independent Bernoulli pixels, one value per image."""
    log_p = -nn.functional.binary_cross_entropy_with_logits(logits, inputs["x"], reduction="none")
    return (log_p * inputs["x_mask"]).sum(-1)


def train_baseline(train_x, valid_inputs, epochs, batch_size=100, lr=1e-3, seed=SEED):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(dataset.x_dim, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, dataset.x_dim))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        total = 0.0
        for index in torch.randperm(len(train_x), generator=generator).split(batch_size):
            batch = binarized_quadrants({"x": train_x[index]}, generator)
            loss = -hidden_log_likelihood(net(batch["c"]), batch).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        with torch.no_grad():
            valid_ll = hidden_log_likelihood(net(valid_inputs["c"]), valid_inputs).mean().item()
        history.append({"train": -total / len(train_x), "valid": valid_ll})
    return net.eval(), history


t0 = time.perf_counter()
baseline, baseline_history = train_baseline(train["x"], valid_q, EPOCHS)
print(f"baseline: {EPOCHS} epochs in {time.perf_counter() - t0:.0f} s; last epoch: train "
      f"{baseline_history[-1]['train']:.1f}, validation {baseline_history[-1]['valid']:.1f} "
      "nats per image (log-likelihood of the hidden pixels)")

# %% [markdown]
# The CVAE uses the library's model and guide. The prior network and the decoder both read the
# 784-dimensional context; the recognition network reads $[x, c]$. One practical detail: the
# decoder can already do a decent job from $c$ alone (it *is* the baseline when it ignores
# $z$), so early in training the cheapest way to raise the ELBO is to switch $z$ off and pay no
# KL. We therefore warm the KL term up from 0 to 1 over the first ten epochs
# (`kl_anneal_epochs`, Bowman et al. 2016), which gives the decoder time to find a use for $z$.

# %%
pyro.set_rng_seed(SEED)
cvae = ConditionalVAE(dataset.x_dim, context_dim=dataset.x_dim, z_dim=20, hidden=(HIDDEN,),
                      prior="learned")
guide = AmortizedNormal(cvae, hidden=(HIDDEN,))
t0 = time.perf_counter()
cvae_fit = fit(cvae, guide, train_q, valid_q, epochs=EPOCHS, batch_size=100, lr=1e-3,
               kl_anneal_epochs=min(10, EPOCHS // 2), seed=SEED,
               batch_transform=binarized_quadrants, progress=False)
last = cvae_fit.history[-1]
print(f"quadrant CVAE: {len(cvae_fit.history)} epochs in {time.perf_counter() - t0:.0f} s; "
      f"last epoch: train ELBO {last['train_elbo']:.1f}, validation ELBO "
      f"{last['valid_elbo']:.1f} nats per image")

# %% [markdown]
# ### Completions
#
# For the first eight test images (no selection), the figure shows the observed quadrant, the
# truth, the baseline's prediction, and five completions from the CVAE, each for a fresh
# $z \sim p_\theta(z \mid c)$. All predictions are pixel probabilities ($\mathbb E[x \mid c]$
# for the baseline, $\mathbb E[x \mid z, c]$ for the CVAE), pasted around the observed
# quadrant: the networks' output for the observed pixels is never scored, so it means nothing.

# %%
def paste(prediction, inputs):
    return torch.where(inputs["x_mask"], prediction, inputs["x"])


pyro.set_rng_seed(SEED)
with torch.no_grad():
    baseline_mean = torch.sigmoid(baseline(few["c"]))
cvae_draws = [observation_mean(cvae, c=few["c"], x_mask=few["x_mask"]) for _ in range(5)]
rows = [show(few["x"], few["x_mask"]), few["x"], paste(baseline_mean, few)]
rows += [paste(draw, few) for draw in cvae_draws]
titles = ["observed", "truth", "baseline"] + [f"CVAE {s + 1}" for s in range(len(cvae_draws))]
fig = image_grid(rows, SHAPE, titles, size=0.9)
fig.suptitle("completing the top-left quadrant: baseline mean vs CVAE samples", y=1.01)
plt.show()

# %% [markdown]
# ### Conditional log-likelihood on the test set
#
# Sohn et al. (Table 1) compare models by the conditional log-likelihood of the hidden pixels
# on the test set. For the baseline it is exact: the sum of its Bernoulli log-probabilities.
# For the CVAE the integral over $z$ has no closed form; we estimate it by importance sampling
# with the recognition network as proposal (Burda et al. 2016),
#
# $$
# \log p_\theta(x \mid c) \approx \log \frac{1}{K} \sum_{k=1}^{K}
# \frac{p_\theta(x \mid z_k, c)\, p_\theta(z_k \mid c)}{q_\phi(z_k \mid x, c)}, \qquad
# z_k \sim q_\phi(z \mid x, c),
# $$
#
# a stochastic lower bound that tightens as $K$ grows. `importance_sampling` returns it per
# test image, with the ELBO and the KL term. The likelihood site is masked, so "$x$" here is
# the hidden pixels only.

# %%
pyro.set_rng_seed(SEED)
t0 = time.perf_counter()
scores = importance_sampling(cvae, guide, test_q, num_samples=IS_SAMPLES)
with torch.no_grad():
    baseline_ll = hidden_log_likelihood(baseline(test_q["c"]), test_q)
print(f"importance sampling with K = {IS_SAMPLES}: {time.perf_counter() - t0:.0f} s\n")


def mean_se(values):
    return f"{values.mean():8.2f} ± {values.std() / len(values) ** 0.5:.2f}"


n_test = len(test_q["x"])
print(f"log p(x_hidden | c) on {n_test} test images, top-left quadrant observed "
      "(nats per image, mean ± standard error)")
print(f"  deterministic baseline (exact)             {mean_se(baseline_ll)}")
print(f"  CVAE, importance sampled, K = {IS_SAMPLES:<5d}       {mean_se(scores['log_likelihood'])}")
print(f"  CVAE conditional ELBO (a lower bound)      {mean_se(scores['elbo'])}")
print(f"  CVAE KL(q(z | x, c) || p(z | c))           {mean_se(scores['kl'])}")
difference = scores["log_likelihood"] - baseline_ll
print(f"\nCVAE minus baseline, paired over test images: {mean_se(difference)} nats; "
      f"the CVAE is better on {(difference > 0).float().mean():.0%} of the images")

# %% [markdown]
# **What came out.** (Written for the full run; the smoke run's numbers mean nothing.)
# TODO after the full run.
#
# ## 4. What the CVAE buys, and what it does not
#
# TODO
#
# **References.** K. Sohn, H. Lee, X. Yan (2015), *Learning Structured Output Representation
# using Deep Conditional Generative Models*, NeurIPS. D. P. Kingma, M. Welling (2014),
# *Auto-Encoding Variational Bayes*, ICLR. Y. Burda, R. Grosse, R. Salakhutdinov (2016),
# *Importance Weighted Autoencoders*, ICLR. S. R. Bowman et al. (2016), *Generating Sentences
# from a Continuous Space*, CoNLL.

# %%
print(f"chapter ran in {time.perf_counter() - started:.0f} s")
