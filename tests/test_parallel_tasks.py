"""Independent work over processes (``inference.distributed.run_tasks``): an ensemble's members,
SG-MCMC chains and NUTS chains on two CPU processes give the posterior one process gives.

One process trains member blocks and chains one after the other; two processes (gloo, forked,
one torch thread each) share them out. Each task depends only on its number, so the draws and
weights must agree: exactly for chains (the same arithmetic in the same order), to float
rounding for the ensemble (a block's batched matrix products have fewer members).
"""

import pickle

import pytest
import torch

from bayeszoo.inference.distributed import launch, run_tasks
from bayeszoo.inference.training import train
from bayeszoo.models.bnn import BayesianNeuralNetwork
from bayeszoo.models.nn import mlp

pytest.importorskip("lightning.fabric", reason="processes start through Lightning Fabric")

TWO = {"devices": 2, "strategy": "ddp_fork"}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def regression(noise=0.1):
    torch.manual_seed(0)
    x = torch.randn(40, 1)
    data = {"x": x, "y": torch.sin(3 * x[:, 0]) + 0.1 * torch.randn(40)}
    return BayesianNeuralNetwork(mlp((1, 8, 1)), (1,), noise=noise), data


def _train(guide: str, options: dict, processes: dict, tmp_path=None, **budget):
    model, data = regression(**budget.pop("model", {}))
    run_dir = {"run_dir": tmp_path} if tmp_path is not None else {}
    posterior, result = train(model, guide, data, data, options=options, epochs=3, batch_size=10, seed=3,
                              progress=False, **run_dir, **processes, **budget)
    return model, posterior, result


def test_ensemble_members_split_over_two_processes_train_as_in_one():
    _, one, one_result = _train("ensemble", {"members": 5}, {}, lr=0.01)
    _, two, two_result = _train("ensemble", {"members": 5}, TWO, lr=0.01)
    for name, members in one.stacked().items():
        torch.testing.assert_close(two.stacked()[name], members, rtol=1e-5, atol=1e-6)
        assert not torch.equal(members[0], members[-1])  # five different networks, not one copied
    for row_one, row_two in zip(one_result.history, two_result.history, strict=True):
        assert row_two["train_elbo"] == pytest.approx(row_one["train_elbo"], rel=1e-5)
        assert row_two["valid_elbo"] == pytest.approx(row_one["valid_elbo"], rel=1e-5)


def test_an_ensemble_sharing_a_learned_noise_scale_is_refused_before_processes_start():
    with pytest.raises(ValueError, match="share the model's own parameters"):
        _train("ensemble", {"members": 4}, TWO, model={"noise": "learned"})


@pytest.mark.parametrize("guide", ["sgld", "sghmc"])
def test_sgmcmc_chains_split_over_two_processes_draw_what_one_process_draws(guide, tmp_path):
    options = {"chains": 3, "burn_in_epochs": 1, "thin": 2}
    one_model, one, _ = _train(guide, options, {}, tmp_path / "one", lr=1e-4)
    two_model, two, _ = _train(guide, options, TWO, tmp_path / "two", lr=1e-4)
    for name, draws in one.chains.items():
        assert draws.shape[0] == 3
        assert torch.equal(two.chains[name], draws), name
        assert not torch.equal(draws[0], draws[1])  # chains start apart
    assert (tmp_path / "two" / "chain1" / "checkpoint.pt").exists()  # every chain resumable


def test_nuts_chains_split_over_two_processes_draw_what_one_process_draws():
    options = {"chains": 2, "nuts_samples": 4, "nuts_warmup": 4, "nuts_max_tree_depth": 3}
    _, one, _ = _train("nuts", options, {}, model={"noise": "prior"})
    _, two, _ = _train("nuts", options, TWO, model={"noise": "prior"})
    for name, draws in one.chains.items():
        assert torch.equal(two.chains[name], draws), name


def _square(index: int, device, shows_progress: bool) -> dict:
    return {"index": index, "value": torch.full((2,), float(index)) ** 2, "shows": shows_progress}


def test_tasks_come_back_in_order_whichever_rank_ran_them():
    here = run_tasks(_square, 5)
    there = run_tasks(_square, 5, **TWO)
    assert [task["index"] for task in there] == list(range(5))
    for a, b in zip(here, there, strict=True):
        assert torch.equal(a["value"], b["value"])
    assert [task["shows"] for task in there] == [True, False, True, False, True]  # only rank 0's bars


def _large(fabric) -> dict:
    return {"weights": torch.arange(300_000, dtype=torch.float32)}  # 1.2 MB: far over a pipe's buffer


def test_an_outcome_larger_than_a_pipe_buffer_comes_back():
    outcome = launch(_large, (), (), devices=2, num_nodes=1, accelerator="cpu", strategy="ddp_fork")
    assert torch.equal(outcome["weights"], torch.arange(300_000, dtype=torch.float32))


def test_training_transforms_travel_to_spawned_processes_without_the_data():
    """A spawned rank unpickles its batch transform; it must carry the dataset's shapes and
    binarization, not its images (each rank would get a copy)."""
    from bayeszoo.inference import runs
    from bayeszoo.inference.tradi import WeightTracker
    from bayeszoo.inference.training import _TrackedAdam

    config = runs.plan("vae", "amortized", "digits", binarize="dynamic")
    dataset = runs.load_data(config)
    _, _, inputs = runs.build(config, dataset)
    transform = runs._family(config).training_data(dataset, inputs)["batch_transform"]
    data_bytes = dataset.train["x"].numel() * dataset.train["x"].element_size()
    assert len(pickle.dumps(transform)) < data_bytes / 100
    batch = {k: v[:7] for k, v in dataset.train.items()}
    torch.testing.assert_close(pickle.loads(pickle.dumps(transform))(batch, torch.Generator().manual_seed(0)),
                               transform(batch, torch.Generator().manual_seed(0)))
    weight = torch.nn.Parameter(torch.zeros(3))
    pickle.dumps(_TrackedAdam(WeightTracker({"w": weight}, burn_in_steps=0, variance_decay=0.9)))
