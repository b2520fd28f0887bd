"""Generative models: pure Pyro programs, one family per file.

bayeszoo trains with plain torch optimizers over ``module.parameters()``, so every
``PyroModule`` keeps its parameters local to itself instead of in Pyro's global
param store. Without this, a model and a guide that both own an attribute called,
say, ``decoder`` would silently share one entry of the global store.
"""

import pyro

pyro.settings.set(module_local_params=True)
