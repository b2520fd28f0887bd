"""Generative models: pure Pyro programs (``PyroModule``), one family per file."""
