import os
import socket

import pyro
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

pyro.settings.set(module_local_params=True)  # as the bayeszoo CLI and the tutorials run


@pytest.fixture(autouse=True)
def fresh_pyro():
    """Every test starts from an empty param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """CI has no network: a test that tries to connect anywhere fails loudly here too."""

    def refuse(*args, **kwargs):
        raise RuntimeError("tests must not reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
