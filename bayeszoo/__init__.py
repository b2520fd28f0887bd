"""bayeszoo: a Pyro model zoo for Bayesian deep learning (the public API is filled in by the seam work)."""

__version__ = "0.1.0"
