"""Data-parallel ``fit`` (inference/distributed.py): two CPU processes on gloo against one.

Two processes on a global batch of B take the step one process takes on the same B examples:
with the guides' noise taken out (every latent at its guide's mean, ``at_mean``) the two runs
draw the same numbers and must agree to float64 rounding. SGD, not Adam, because Adam's step
hardly changes when every gradient is off by the same factor (the world size, say). 11 examples
in batches of 5 give slices of 3 and 2 and a last batch of one example, which leaves rank 1
without examples of its own.

The builders, guides and data live at module level: ``strategy="ddp"`` spawns processes that
unpickle them. Most tests fork (``ddp_fork``), which skips the children's imports of torch, Pyro
and Lightning; the resume test spawns, as the default does.
"""

from functools import partial

import pytest
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from bayeszoo.guides.amortized import AmortizedNormal
from bayeszoo.guides.mean_field import MeanFieldGuide
from bayeszoo.inference.svi import NonFiniteLossError, fit
from bayeszoo.models.bnn import BayesianNeuralNetwork
from bayeszoo.models.nn import mlp
from bayeszoo.models.vae import VAE

pytest.importorskip("lightning.fabric", reason="data-parallel fit needs Lightning Fabric")

NUM_TRAIN, BATCH = 11, 5


class at_mean(Messenger):
    """Every latent site takes its distribution's mean instead of a draw: a noise-free ELBO (the
    density log q(z) is still evaluated there, so every parameter gets a gradient)."""

    def _process_message(self, msg):
        if (msg["type"] == "sample" and not msg["is_observed"] and msg["value"] is None
                and not site_is_subsample(msg)):
            msg["value"] = msg["fn"].mean


class MeanAmortizedNormal(AmortizedNormal):
    def forward(self, *args, **kwargs):
        with at_mean():
            return super().forward(*args, **kwargs)


class MeanMeanField(MeanFieldGuide):
    def forward(self, *args, **kwargs):
        with at_mean():
            return super().forward(*args, **kwargs)


def vae_pair(noise: bool = False):
    torch.manual_seed(0)
    model = VAE(64, 2, (8,))
    return model, (AmortizedNormal if noise else MeanAmortizedNormal)(model, (8,))


def bnn_pair(noise: bool = False):
    torch.manual_seed(0)
    model = BayesianNeuralNetwork(mlp((1, 8, 1)), (1,))
    return model, (MeanFieldGuide if noise else MeanMeanField)(model)


def vae_data() -> dict:
    generator = torch.Generator().manual_seed(1)
    return {"x": torch.rand(NUM_TRAIN, 64, generator=generator).round()}


def bnn_data() -> dict:
    x = torch.randn(NUM_TRAIN, 1, generator=torch.Generator().manual_seed(1))
    return {"x": x, "y": torch.sin(3 * x[:, 0])}


PAIRS = {"vae": (vae_pair, vae_data), "bnn": (bnn_pair, bnn_data)}


class ReplicaGap:
    """After every optimizer step, the largest difference between any rank's parameters and this
    rank's (all-gathered): 0 while the replicas agree. A checkpoint extra, so rank 0's comes back."""

    def __init__(self):
        self.gap, self.steps = 0.0, 0

    def watch(self, optimizer, *_):
        flat = torch.cat([p.detach().flatten() for group in optimizer.param_groups for p in group["params"]])
        gathered = [torch.empty_like(flat) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, flat)
        self.gap = max(self.gap, *((other - flat).abs().max().item() for other in gathered))
        self.steps += 1

    def state_dict(self) -> dict:
        return {"gap": torch.tensor(self.gap), "steps": torch.tensor(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        self.gap, self.steps = state["gap"].item(), state["steps"].item()


class NoisySGD(torch.optim.Optimizer):
    """w <- w - lr grad + 0.01 eps, eps ~ N(0, I): gradient steps with noise, as SGLD takes."""

    def __init__(self, params, lr, watcher: ReplicaGap):
        super().__init__(params, {"lr": lr})
        self.register_step_post_hook(watcher.watch)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"]).add_(torch.randn_like(p), alpha=0.01)


@pytest.fixture(autouse=True)
def one_thread_float64(monkeypatch):
    """One torch thread per process (OMP_NUM_THREADS reaches spawned ones), float64 everywhere
    (spawned processes take the default dtype from fit), rendezvous on 127.0.0.1."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


def _state(model, guide) -> dict:
    return {**{f"model.{k}": v.clone() for k, v in model.state_dict().items()},
            **{f"guide.{k}": v.clone() for k, v in guide.state_dict().items()}}


def _sgd_run(pair: str, devices: int, **options):
    build, data = PAIRS[pair]
    model, guide = build()
    train = data()
    result = fit(model, guide, train, train, epochs=2, batch_size=BATCH, lr=0.01, optimizer=torch.optim.SGD,
                 devices=devices, strategy="ddp_fork", progress=False, **options)
    return _state(model, guide), result.history


@pytest.mark.parametrize("pair", ["vae", "bnn"])
def test_two_processes_step_as_one_does_on_the_global_batch(pair):
    one, one_history = _sgd_run(pair, devices=1)
    two, two_history = _sgd_run(pair, devices=2)
    start = _state(*PAIRS[pair][0]())
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 0.05  # six steps that move
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-12, atol=1e-12,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for row_one, row_two in zip(one_history, two_history, strict=True):
        for key in ("train_elbo", "valid_elbo"):
            assert row_two[key] == pytest.approx(row_one[key], rel=1e-12)


def test_a_nonfinite_loss_on_one_rank_stops_every_rank_at_the_step_one_process_stops():
    train = bnn_data()
    order = torch.randperm(NUM_TRAIN, generator=torch.Generator().manual_seed(0))  # fit's first epoch
    train["y"][order[BATCH + 3]] = float("inf")  # second step, second slice of 3 + 2: rank 1's
    stopped = {}
    for devices in (1, 2):
        model, guide = bnn_pair()
        with pytest.raises(NonFiniteLossError) as error:
            fit(model, guide, train, epochs=2, batch_size=BATCH, lr=0.01, optimizer=torch.optim.SGD,
                devices=devices, strategy="ddp_fork", progress=False)
        stopped[devices] = (error.value.step, _state(model, guide))
    assert stopped[1][0] == stopped[2][0] == 2
    for name, value in stopped[1][1].items():  # both keep the weights after step 1
        torch.testing.assert_close(stopped[2][1][name], value, rtol=1e-12, atol=1e-12,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_an_optimizer_that_draws_noise_draws_alike_on_every_rank():
    """DistributedDataParallel averages gradients only: a step that drew different noise on each
    rank would leave the replicas apart."""
    model, guide = bnn_pair(noise=True)
    gap = ReplicaGap()
    fit(model, guide, bnn_data(), epochs=2, batch_size=BATCH, lr=0.01, checkpoint_extras={"gap": gap},
        optimizer=partial(NoisySGD, watcher=gap), devices=2, strategy="ddp_fork", progress=False)
    assert gap.steps == 6
    assert gap.gap == 0.0


def test_two_process_run_resumed_after_one_epoch_equals_the_run_never_stopped(tmp_path):
    """The first epoch of the interrupted run spawns its processes (the default), the rest fork:
    how processes start changes nothing either."""
    train = vae_data()
    options = {"batch_size": BATCH, "lr": 0.01, "devices": 2, "progress": False}
    finals = {}
    for name, runs in (("stopped", ((1, "ddp"), (2, "ddp_fork"))), ("straight", ((2, "ddp_fork"),))):
        model, guide = vae_pair(noise=True)
        for index, (epochs, strategy) in enumerate(runs):
            result = fit(model, guide, train, train, epochs=epochs, run_dir=tmp_path / name, resume=index > 0,
                         strategy=strategy, **options)
        finals[name] = (_state(model, guide), result.history,
                        torch.load(tmp_path / name / "weights.pt", weights_only=True))
    (stopped, stopped_history, stopped_file), (straight, straight_history, straight_file) = \
        finals["stopped"], finals["straight"]
    for name in straight:
        assert torch.equal(stopped[name], straight[name]), name
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in stopped_history] == \
        [{k: v for k, v in row.items() if k != "seconds"} for row in straight_history]
    for part in ("model", "guide"):
        for name, value in straight_file[part].items():
            assert torch.equal(stopped_file[part][name], value)
            assert torch.equal(value, straight[f"{part}.{name}"])


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has two GPUs")
def test_gpus_this_machine_lacks_are_a_value_error_before_anything_starts(tmp_path):
    model, guide = vae_pair()
    with pytest.raises(ValueError, match=r"accelerator='gpu' with devices=2 needs 2 CUDA GPU\(s\)"):
        fit(model, guide, vae_data(), devices=2, accelerator="gpu", run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_what_spawned_processes_cannot_unpickle_is_a_value_error_before_anything_starts(tmp_path):
    model, guide = vae_pair()
    with pytest.raises(ValueError, match=r"must pickle optimizer.*strategy='ddp_fork'"):
        fit(model, guide, vae_data(), devices=2, optimizer=lambda params, lr: torch.optim.SGD(params, lr),
            run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
