"""NUTS for small Bayesian neural networks: the gold standard the other guides are measured by.

``run_nuts`` runs ``num_chains`` independent chains of Pyro's No-U-Turn sampler (Hoffman &
Gelman, 2014), one after the other with their own seeds (``run_nuts_chain`` runs one: the
training code spreads chains over processes with ``inference.distributed.run_tasks``, which
gives the same draws), and returns the draws per chain. Model parameters that are not sample
sites (e.g. a ``noise="learned"`` point estimate) stay at their current values: give the
noise a prior or a known value when running NUTS.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_sample, init_to_value

from bayeszoo.inference.svi import save_atomically


def run_nuts(model, train: dict, num_samples: int = 500, warmup: int = 500, num_chains: int = 2,
             seed: int = 0, target_accept: float = 0.8, max_tree_depth: int = 10,
             progress: bool = True, jit_compile: bool = False,
             init_values: dict[str, torch.Tensor] | None = None, run_dir: str | os.PathLike | None = None,
             resume: bool = False) -> dict[str, torch.Tensor]:
    """Draws per chain: site name -> (num_chains, num_samples, *site shape).

    Chains start from a draw of the prior (Pyro's default, uniform in (-2, 2) in unconstrained
    space, puts a wide network far out on its likelihood surface, where the step size adapts to
    almost nothing), or all from ``init_values`` (e.g. the MAP point: warm-up is then spent
    adapting rather than travelling, but chains with one start make R-hat less telling).
    ``max_tree_depth`` caps the leapfrog steps per draw at 2^depth. ``jit_compile`` traces the
    potential with TorchScript once per chain: each gradient then costs about a third (measured
    on the 1-50-1 gap network: 2.1 ms instead of 6.1 ms), after a compile of a few seconds.

    With a ``run_dir`` every finished chain's draws go to ``run_dir/nuts-chain<c>.pt``; with
    ``resume=True`` the chains found there are read back instead of run again (an interrupted
    run loses at most the chain it was in).
    """
    chains = [run_nuts_chain(model, train, chain, num_samples, warmup, seed, target_accept, max_tree_depth,
                             progress, jit_compile, init_values, run_dir, resume)
              for chain in range(num_chains)]
    return {name: torch.stack([chain[name] for chain in chains]) for name in chains[0]}


def run_nuts_chain(model, train: dict, chain: int, num_samples: int = 500, warmup: int = 500, seed: int = 0,
                   target_accept: float = 0.8, max_tree_depth: int = 10, progress: bool = True,
                   jit_compile: bool = False, init_values: dict[str, torch.Tensor] | None = None,
                   run_dir: str | os.PathLike | None = None, resume: bool = False) -> dict[str, torch.Tensor]:
    """Chain ``chain`` of ``run_nuts``: site name -> (num_samples, *site shape). It depends on its
    number (its seed is seed + chain), not on the chains before it, so chains can run anywhere."""
    path = Path(run_dir) / f"nuts-chain{chain}.pt" if run_dir is not None else None
    if resume and path is not None and path.exists():
        return torch.load(path, weights_only=True)
    pyro.set_rng_seed(seed + chain)
    init = init_to_sample if init_values is None else init_to_value(values=init_values)
    kernel = NUTS(model, target_accept_prob=target_accept, max_tree_depth=max_tree_depth,
                  init_strategy=init, jit_compile=jit_compile, ignore_jit_warnings=True,
                  max_plate_nesting=1)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, num_chains=1,
                disable_progbar=not progress)
    with warnings.catch_warnings():
        # torch 2.14 deprecates torch.jit, which Pyro's compiled potential uses: the user asked for
        # a faster sampler, not for notes on torch's internals.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        mcmc.run(**train)
    draws = mcmc.get_samples()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomically(draws, path)
    return draws


def pooled(draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All chains' draws in one sample dimension: name -> (chains * draws, *shape)."""
    return {name: value.reshape(-1, *value.shape[2:]) for name, value in draws.items()}
