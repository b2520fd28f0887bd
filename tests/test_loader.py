"""Training minibatches through a DataLoader (``fit(num_workers=N)``): the numbers of num_workers=0.

The loop draws each epoch's permutation and runs the batch transform (dynamic binarization,
from the data generator) in the training process; the workers only gather rows. So every
parameter after training must be bit-for-bit the one the in-process loop gives, on one process
and on two, resumed or not. Batches that come from worker processes arrive in shared memory,
which tells the tests that the DataLoader path ran (the setup trace's first batch is indexed in
the training process).
"""

import json
import multiprocessing
import struct

import numpy as np
import pytest
import torch

from bayeszoo.guides.amortized import AmortizedNormal
from bayeszoo.guides.mean_field import MeanFieldGuide
from bayeszoo.inference.cli import main
from bayeszoo.inference.data import load_dataset
from bayeszoo.inference.svi import NonFiniteLossError, fit
from bayeszoo.models.bnn import BayesianNeuralNetwork
from bayeszoo.models.nn import mlp
from bayeszoo.models.vae import VAE


class Binarize:
    """Dynamic binarization from the data generator; records whether each batch it saw was in
    shared memory (sent by a DataLoader worker)."""

    def __init__(self):
        self.shared = []

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        self.shared.append(batch["x"].is_shared())
        return {"x": torch.bernoulli(batch["x"], generator=generator)}


def vae_pair():
    torch.manual_seed(0)
    model = VAE(16, 2, (8,))
    return model, AmortizedNormal(model, (8,))


def vae_data(n=70):
    return {"x": torch.rand(n, 16, generator=torch.Generator().manual_seed(1))}


def bnn_pair():
    torch.manual_seed(0)
    model = BayesianNeuralNetwork(mlp((1, 8, 1)), (1,))
    return model, MeanFieldGuide(model)


def bnn_data(n=70):
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(1))
    return {"x": x, "y": torch.sin(3 * x[:, 0])}


def _state(model, guide) -> dict:
    return {**{f"model.{k}": v.clone() for k, v in model.state_dict().items()},
            **{f"guide.{k}": v.clone() for k, v in guide.state_dict().items()}}


def _assert_same(one: dict, other: dict) -> None:
    assert one.keys() == other.keys()
    for name in one:
        assert torch.equal(one[name], other[name]), name


def _run(pair: str, num_workers: int, epochs: int = 1, **options):
    """(parameters, history, whether each transformed batch came from a worker)."""
    model, guide = vae_pair() if pair == "vae" else bnn_pair()
    data = vae_data() if pair == "vae" else bnn_data()
    transform = Binarize() if pair == "vae" else None
    result = fit(model, guide, data, data, epochs=epochs, batch_size=16, batch_transform=transform,
                 num_workers=num_workers, progress=False, **options)
    history = [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]
    return _state(model, guide), history, transform.shared if transform else None


@pytest.mark.parametrize("pair", ["vae", "bnn"])
def test_two_workers_train_to_the_parameters_of_none(pair):
    start = _state(*(vae_pair() if pair == "vae" else bnn_pair()))
    alone, alone_history, alone_shared = _run(pair, 0)
    workers, workers_history, workers_shared = _run(pair, 2)
    assert any(not torch.equal(alone[k], start[k]) for k in start)  # the epoch moved the weights
    _assert_same(workers, alone)
    assert workers_history == alone_history
    if pair == "vae":  # the setup trace's first batch, then 70 examples in 5 batches of 16
        assert alone_shared == [False] * 6 and workers_shared == [False] + [True] * 5
    assert multiprocessing.active_children() == []  # the workers stopped with fit


@pytest.mark.parametrize("pair", ["vae", "bnn"])
def test_two_processes_with_a_worker_each_train_as_two_processes_without(pair):
    """The VAE's ranks load whole global batches (the transform sees them all), the BNN's ranks
    their slices only."""
    ranks = {"devices": 2, "strategy": "ddp_fork"}
    alone, alone_history, _ = _run(pair, 0, **ranks)
    workers, workers_history, _ = _run(pair, 1, **ranks)
    _assert_same(workers, alone)
    assert workers_history == alone_history


def test_a_run_with_workers_resumed_equals_the_run_never_stopped(tmp_path):
    straight, straight_history, _ = _run("vae", 2, epochs=2, run_dir=tmp_path / "straight")
    _run("vae", 2, epochs=1, run_dir=tmp_path / "split")
    resumed, resumed_history, shared = _run("vae", 2, epochs=2, run_dir=tmp_path / "split", resume=True)
    _assert_same(resumed, straight)
    assert resumed_history == straight_history
    assert shared == [False] + [True] * 5  # the resumed epoch's batches came from the workers


def test_a_nonfinite_loss_stops_at_the_same_step_and_the_workers_stop():
    train = bnn_data()
    train["y"][torch.randperm(70, generator=torch.Generator().manual_seed(0))[20]] = float("inf")
    steps = {}
    for workers in (0, 2):
        model, guide = bnn_pair()
        with pytest.raises(NonFiniteLossError) as error:
            fit(model, guide, train, epochs=1, batch_size=16, num_workers=workers, progress=False)
        steps[workers] = error.value.step
        assert multiprocessing.active_children() == []
    assert steps == {0: 2, 2: 2}  # example 20 of the first permutation is in the second batch


@pytest.mark.parametrize("num_workers", [-1, 1.5])
def test_num_workers_must_be_a_non_negative_integer(tmp_path, num_workers):
    with pytest.raises(ValueError, match="num_workers must be a non-negative integer"):
        fit(*vae_pair(), vae_data(), num_workers=num_workers, run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_the_cli_trains_with_workers(tmp_path):
    run = tmp_path / "run"
    assert main(["fit", "vae", "--guide", "amortized", "--data", "digits", "--epochs", "1",
                 "--num-workers", "2", "--z-dim", "2", "--hidden", "16", "--is-samples", "5", "--no-progress",
                 "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["config"]["fit"]["num_workers"] == 2
    assert len(metrics["history"]) == 1


def _write_idx(path, magic: int, array: np.ndarray) -> None:
    """IDX: big-endian int32 magic number and dimension sizes, then the uint8 values."""
    path.write_bytes(struct.pack(">" + "i" * (1 + array.ndim), magic, *array.shape) + array.tobytes())


def test_mnist_files_from_a_data_root_train_through_the_workers(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 40), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", 2051, rng.integers(0, 256, (count, 28, 28), np.uint8))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, rng.integers(0, 10, count, np.uint8))
    dataset = load_dataset("mnist", root=tmp_path, binarize="dynamic")
    train = {"x": dataset.train["x"]}  # 36 images, 4 held out for validation
    finals = {}
    for workers in (0, 2):
        torch.manual_seed(0)
        model = VAE(dataset.x_dim, 2, (8,))
        guide = AmortizedNormal(model, (8,))
        shared = []

        def binarize(batch, generator, shared=shared):
            shared.append(batch["x"].is_shared())
            return dataset.batch_transform(batch, generator)

        fit(model, guide, train, epochs=1, batch_size=10, batch_transform=binarize, num_workers=workers,
            progress=False)
        finals[workers] = (_state(model, guide), shared)
    _assert_same(finals[2][0], finals[0][0])
    assert finals[0][1] == [False] * 5 and finals[2][1] == [False] + [True] * 4  # setup trace, 4 batches
