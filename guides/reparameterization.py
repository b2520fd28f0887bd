"""Local reparameterization and Flipout: effect handlers that lower the variance of the ELBO's
gradient for a factorised Gaussian guide, without touching model or guide.

    with local_reparameterization():
        loss = elbo.differentiable_loss(model, guide, x, y)

Both handlers watch the guide draw each weight from N(mu, sigma^2) (any guide whose weight
site is a Normal, e.g. ``MeanFieldGuide``) and then change how the model's ``linear`` /
``conv2d`` operation with that weight is evaluated. The weight sample still enters the ELBO's
log p(w) - log q(w) term, so the estimate stays unbiased; only the data term changes.

Local reparameterization (Kingma, Salimans & Welling, 2015). For a layer b = W x with
independent W_ij ~ N(mu_ij, sigma_ij^2), each pre-activation is Gaussian:

    b_i ~ N( sum_j mu_ij x_j,  sum_j sigma_ij^2 x_j^2 ),

so it is sampled directly, with independent noise for every example (and every weight sample
of a vectorized batch): the examples of a minibatch no longer share one weight draw, which is
what made their gradient contributions correlated.

Flipout (Wen et al., 2018). With a shared perturbation dW = W - mu (the guide's sample) and
random signs r_n (outputs) and s_n (inputs) per example,

    b_n = mu x_n + ( dW (x_n * s_n) ) * r_n,

each example sees the weight mu + dW * (r_n s_n^T): the same marginal distribution (dW is
symmetric about zero), pseudo-independent across examples, and only one weight sample is drawn.

Convolutions are handled the same way (the variance map is a convolution of x^2 with sigma^2).
"""

from __future__ import annotations

import torch
from pyro.poutine.messenger import Messenger

from bayeszoo.models.bnn import batched_conv2d, batched_linear


def _normal_parameters(fn):
    """(loc, scale) of a Normal weight distribution (possibly wrapped in Independent), else None."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    if type(fn).__name__ == "Normal":
        return fn.loc, fn.scale
    return None


class _GuideWeightMessenger(Messenger):
    """Remember, per weight site, the Normal the guide drew it from and the value drawn."""

    def __enter__(self):
        self._drawn = {}
        return super().__enter__()

    def _pyro_sample(self, msg):
        # A value already set here was replayed from the guide (the model's pass): keep the
        # guide's record. A fresh draw is the guide's own.
        if msg["value"] is None and not msg["is_observed"]:
            parameters = _normal_parameters(msg["fn"])
            if parameters is not None:
                self._fresh = (msg["name"], parameters)

    def _pyro_post_sample(self, msg):
        fresh = getattr(self, "_fresh", None)
        if fresh is not None and fresh[0] == msg["name"]:
            self._drawn[msg["name"]] = (fresh[1], msg["value"])
            self._fresh = None

    def _guide_normal(self, msg):
        """(loc, scale, sample) for the weight of a layer operation, if the guide drew it."""
        record = self._drawn.get(msg["name"])
        if record is None or not _same_tensor(record[1], msg["args"][1]):
            return None  # a weight the guide did not just draw (e.g. a stale record): leave it
        (loc, scale), sample = record
        return loc, scale, sample

    def _pyro_linear(self, msg):
        found = self._guide_normal(msg)
        if found is not None:
            x, _, bias = _arguments(msg)
            msg["value"], msg["done"] = self.linear(x, *found, bias), True

    def _pyro_conv2d(self, msg):
        found = self._guide_normal(msg)
        if found is not None:
            x, _, bias = _arguments(msg)
            conv = lambda inputs, weight: batched_conv2d(inputs, weight, None, **_conv_options(msg))
            msg["value"], msg["done"] = self.layer(conv, x, *found, bias, event_dims=3), True

    def linear(self, x, loc, scale, sample, bias):
        return self.layer(batched_linear, x, loc, scale, sample, bias, event_dims=1)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same values, possibly viewed with an extra singleton dimension (``as_global``)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.numel() == b.numel())


def _arguments(msg):
    args = list(msg["args"]) + [None] * (3 - len(msg["args"]))
    return args[0], args[1], msg["kwargs"].get("bias", args[2])


def _conv_options(msg) -> dict:
    names = ("stride", "padding", "dilation", "groups")
    options = dict(zip(names, msg["args"][3:], strict=False))
    options.update({k: v for k, v in msg["kwargs"].items() if k in names})
    return options


def _add_bias(out, bias, event_dims):
    if bias is None:
        return out
    return out + (bias[(...,) + (None,) * (event_dims - 1)] if event_dims > 1 else bias)


def _sample_shape(x, sample, layer_out, event_dims):
    """Output shape when x meets a weight sample: batch dims broadcast, event from the layer."""
    weight_batch = sample.shape[:sample.dim() - (2 if event_dims == 1 else 4)]
    batch = torch.broadcast_shapes(x.shape[:x.dim() - event_dims], weight_batch)
    return batch + layer_out.shape[layer_out.dim() - event_dims:]


class local_reparameterization(_GuideWeightMessenger):
    """Sample pre-activations b ~ N(mu x, sigma^2 x^2), independently per example."""

    def layer(self, op, x, loc, scale, sample, bias, event_dims):
        mean = op(x, loc)
        variance = op(x ** 2, scale ** 2)
        shape = _sample_shape(x, sample, mean, event_dims)
        noise = torch.randn(shape, dtype=mean.dtype, device=mean.device)
        return _add_bias(mean + variance.clamp(min=0).sqrt() * noise, bias, event_dims)


class flipout(_GuideWeightMessenger):
    """b_n = mu x_n + (dW (x_n * s_n)) * r_n with random signs s_n, r_n per example."""

    def layer(self, op, x, loc, scale, sample, bias, event_dims):
        mean = op(x, loc)
        perturbation = sample - loc
        shape = _sample_shape(x, sample, mean, event_dims)
        batch, spatial = shape[:len(shape) - event_dims], (1,) * (event_dims - 1)
        # One sign per input and output channel: a convolution's weight is shared across
        # positions, so flipping per pixel would change the weight an example sees.
        signs_in = _random_signs(batch + x.shape[x.dim() - event_dims:][:1] + spatial, x)
        flipped = op(x * signs_in, perturbation)
        signs_out = _random_signs(batch + shape[len(batch):][:1] + spatial, x)
        return _add_bias(mean + flipped * signs_out, bias, event_dims)


def _random_signs(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, 2, shape, device=like.device).to(like.dtype) * 2 - 1
