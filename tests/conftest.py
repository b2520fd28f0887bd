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
    """CI has no network: a test that tries to connect anywhere fails loudly here too. Unix
    sockets stay open: they are how DataLoader workers pass their batches' shared memory."""

    def refuse(*args, **kwargs):
        raise RuntimeError("tests must not reach the network")

    local_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family == getattr(socket, "AF_UNIX", None):
            return local_connect(sock, address)
        return refuse()

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", refuse)
