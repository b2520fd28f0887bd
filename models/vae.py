"""Variational autoencoders and deep latent Gaussian models.

Three generative stories, each a ``PyroModule`` whose ``forward`` is the model.
Every model takes the observed image ``x`` (``None`` means "generate"), keeps one
``pyro.plate("data")`` over images at dim -1, and declares its latent sample
sites in ``latent_sites`` so that any amortized guide can be built for it.
Networks act on the last dimension, so all models broadcast over leading sample
dimensions (vectorized particles, ``Predictive(parallel=True)``).

References: Kingma & Welling (2014), Rezende, Mohamed & Wierstra (2014),
Sohn, Lee & Yan (2015).
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from bayeszoo.models.nn import mlp

LIKELIHOODS = ("bernoulli", "gaussian")


class PixelLikelihood(nn.Module):
    """p(x | decoder output) for flattened images.

    ``bernoulli``: x_d ~ Bernoulli(sigmoid(a_d)).
    ``gaussian``: x_d ~ N(a_d, sigma^2) with one learned scalar sigma.
    ``mask`` (same shape as x) restricts the likelihood to the pixels that are scored.
    """

    def __init__(self, kind: str = "bernoulli"):
        super().__init__()
        if kind not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {kind!r}; choose one of {', '.join(LIKELIHOODS)}")
        self.kind = kind
        if kind == "gaussian":
            self.log_sigma = nn.Parameter(torch.tensor(-1.0))

    def forward(self, decoded: torch.Tensor, mask: torch.Tensor | None = None):
        if self.kind == "bernoulli":
            pixels = dist.Bernoulli(logits=decoded, validate_args=False)
        else:
            pixels = dist.Normal(decoded, self.log_sigma.exp())
        if mask is not None:
            pixels = pixels.mask(mask)
        return pixels.to_event(1)


def _standard_normal(template: torch.Tensor, dim: int):
    return dist.Normal(template.new_zeros(dim), template.new_ones(dim)).to_event(1)


def _with_context(z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Concatenate z (..., N, k) with a context (N, c) broadcast over z's sample dims."""
    return torch.cat([z, context.expand(*z.shape[:-1], context.shape[-1])], dim=-1)


class VAE(PyroModule):
    """Variational autoencoder.

        z_n ~ N(0, I_k)
        x_n ~ p(x | f_theta(z_n))        Bernoulli or Gaussian pixels
    """

    def __init__(self, x_dim: int, z_dim: int = 20, hidden: tuple[int, ...] = (400,),
                 likelihood: str = "bernoulli"):
        super().__init__()
        self.x_dim, self.z_dim, self.context_dim = x_dim, z_dim, 0
        self.latent_sites = {"z": z_dim}
        self.decoder = mlp([z_dim, *hidden, x_dim])
        self.likelihood = PixelLikelihood(likelihood)
        self.register_buffer("_anchor", torch.zeros(()))

    def forward(self, x: torch.Tensor | None = None, batch_size: int | None = None, **unused):
        with pyro.plate("data", x.shape[0] if x is not None else batch_size):
            z = pyro.sample("z", _standard_normal(self._anchor, self.z_dim))
            return pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)


class ConditionalVAE(PyroModule):
    """Conditional VAE (Sohn, Lee & Yan 2015): generate x given a context c.

        z_n ~ N(mu_prior(c_n), sigma_prior(c_n))      (or N(0, I) with prior="standard")
        x_n ~ p(x | f_theta(z_n, c_n))

    The context is a one-hot class label (generate a chosen digit) or the observed
    pixels of one image quadrant (complete the image; ``x_mask`` then marks the
    hidden pixels that the likelihood scores, see ``quadrant_inputs``).

    The context is passed as the keyword ``c``, not ``context``: Pyro's handlers call a
    wrapped model as ``_context_wrap(context, fn, *args, **kwargs)`` (pyro 1.9), so a
    keyword argument called ``context`` collides with it under ``poutine.replay``.
    """

    def __init__(self, x_dim: int, context_dim: int, z_dim: int = 20,
                 hidden: tuple[int, ...] = (400,), likelihood: str = "bernoulli",
                 prior: str = "learned"):
        super().__init__()
        if prior not in ("learned", "standard"):
            raise ValueError(f"unknown prior {prior!r}; choose 'learned' or 'standard'")
        self.x_dim, self.z_dim, self.context_dim = x_dim, z_dim, context_dim
        self.latent_sites = {"z": z_dim}
        self.prior_net = mlp([context_dim, *hidden, 2 * z_dim]) if prior == "learned" else None
        self.decoder = mlp([z_dim + context_dim, *hidden, x_dim])
        self.likelihood = PixelLikelihood(likelihood)

    def prior(self, context: torch.Tensor):
        if self.prior_net is None:
            return _standard_normal(context, self.z_dim)
        loc, raw_scale = self.prior_net(context).chunk(2, dim=-1)
        return dist.Normal(loc, nn.functional.softplus(raw_scale) + 1e-4).to_event(1)

    def forward(self, x: torch.Tensor | None = None, c: torch.Tensor | None = None,
                x_mask: torch.Tensor | None = None, **unused):
        if c is None:
            raise ValueError("ConditionalVAE needs a context c (a one-hot label or an observed quadrant)")
        with pyro.plate("data", c.shape[0]):
            z = pyro.sample("z", self.prior(c))
            decoded = self.decoder(_with_context(z, c))
            return pyro.sample("x", self.likelihood(decoded, x_mask), obs=x)


def label_inputs(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    """Model inputs for label-conditioned generation: the context is one_hot(y)."""
    return {"x": x, "c": nn.functional.one_hot(y, num_classes).to(x.dtype)}


def quadrant_inputs(x: torch.Tensor, image_shape: tuple[int, ...], observed: int = 0) -> dict:
    """Model inputs for image completion as in Sohn et al. (2015).

    One quadrant (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) is
    observed and given as context; the other pixels are set to -1 in the context,
    a value no pixel takes, so the network can tell "hidden" from "black". The
    likelihood scores only the hidden pixels (``x_mask``).
    """
    height, width = image_shape[-2:]
    rows = torch.arange(height).unsqueeze(1) >= height // 2
    cols = torch.arange(width).unsqueeze(0) >= width // 2
    seen = (rows == bool(observed // 2)) & (cols == bool(observed % 2))
    seen = seen.expand(image_shape).reshape(-1).to(x.device)
    context = torch.where(seen, x, torch.full_like(x, -1.0))
    return {"x": x, "c": context, "x_mask": (~seen).expand_as(x)}


class DeepLatentGaussianModel(PyroModule):
    """Deep latent Gaussian model with L stochastic layers (Rezende et al. 2014, eq. 2-4).

        xi_l ~ N(0, I),                 l = 1..L
        h_L  = G_L xi_L
        h_l  = T_l(h_{l+1}) + G_l xi_l, l = L-1..1
        x    ~ p(x | T_0(h_1))

    ``z_dims`` lists the layer sizes from the data upwards (k_1, ..., k_L). The
    noise xi_l is the latent variable (non-centred form), so h_l given h_{l+1}
    is N(T_l(h_{l+1}), G_l G_l^T) as in the paper.
    """

    def __init__(self, x_dim: int, z_dims: tuple[int, ...] = (20, 10), hidden: int = 200,
                 likelihood: str = "bernoulli"):
        super().__init__()
        if len(z_dims) < 2:
            raise ValueError("a deep latent Gaussian model needs at least two stochastic layers")
        self.x_dim, self.context_dim, self.z_dims = x_dim, 0, tuple(z_dims)
        depth = len(z_dims)
        self.latent_sites = {f"xi_{l}": z_dims[l - 1] for l in range(depth, 0, -1)}
        self.G = nn.ModuleList(nn.Linear(k, k, bias=False) for k in z_dims)
        self.T = nn.ModuleList(mlp([z_dims[l + 1], hidden, z_dims[l]]) for l in range(depth - 1))
        self.T0 = mlp([z_dims[0], hidden, x_dim])
        self.likelihood = PixelLikelihood(likelihood)
        self.register_buffer("_anchor", torch.zeros(()))

    def forward(self, x: torch.Tensor | None = None, batch_size: int | None = None, **unused):
        with pyro.plate("data", x.shape[0] if x is not None else batch_size):
            h = None
            for l in range(len(self.z_dims), 0, -1):
                xi = pyro.sample(f"xi_{l}", _standard_normal(self._anchor, self.z_dims[l - 1]))
                noise = self.G[l - 1](xi)
                h = noise if h is None else self.T[l - 1](h) + noise
            return pyro.sample("x", self.likelihood(self.T0(h)), obs=x)
