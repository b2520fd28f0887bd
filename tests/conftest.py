import os

import pyro
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

import models  # noqa: E402,F401  (module-local Pyro params, as in every bayeszoo program)


@pytest.fixture(autouse=True)
def fresh_pyro():
    """Every test starts from an empty param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
