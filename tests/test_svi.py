"""The training loop: seeds, resume, the NaN guard and errors before training."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from bayeszoo.guides.amortized import AmortizedNormal
from bayeszoo.inference.svi import (
    CHECKPOINT,
    FINAL_WEIGHTS,
    NonFiniteLossError,
    fit,
    kl_weight,
    scale_latents,
)
from bayeszoo.models.vae import VAE


def _data(n=120, d=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.bernoulli(torch.full((n, d), 0.3), generator=generator)}


def _pair(seed=0, d=16):
    torch.manual_seed(seed)
    model = VAE(d, z_dim=3, hidden=(8,))
    return model, AmortizedNormal(model, hidden=(8,))


def _losses(result):
    return [row["train_elbo"] for row in result.history]


def test_same_seed_gives_identical_losses():
    data = _data()
    first = fit(*_pair(), data, epochs=3, batch_size=32, seed=7, progress=False)
    second = fit(*_pair(), data, epochs=3, batch_size=32, seed=7, progress=False)
    other = fit(*_pair(), data, epochs=3, batch_size=32, seed=8, progress=False)
    assert _losses(first) == _losses(second)
    assert _losses(first) != _losses(other)


def test_resume_continues_to_the_uninterrupted_result(tmp_path):
    data, valid = _data(), _data(40, seed=1)
    kwargs = dict(batch_size=32, seed=3, progress=False, kl_anneal_epochs=3, lr_decay=0.9,
                  batch_transform=lambda batch, gen: {"x": torch.bernoulli(batch["x"] * 0.9,
                                                                           generator=gen)})
    model, guide = _pair()
    straight = fit(model, guide, data, valid, epochs=4, run_dir=tmp_path / "straight", **kwargs)

    interrupted_model, interrupted_guide = _pair()
    fit(interrupted_model, interrupted_guide, data, valid, epochs=2, run_dir=tmp_path / "split",
        **kwargs)
    resumed_model, resumed_guide = _pair(seed=99)  # fresh weights: everything must come from disk
    resumed = fit(resumed_model, resumed_guide, data, valid, epochs=4, run_dir=tmp_path / "split",
                  resume=True, **kwargs)

    assert [r["train_elbo"] for r in resumed.history] == [r["train_elbo"] for r in straight.history]
    assert [r["valid_elbo"] for r in resumed.history] == [r["valid_elbo"] for r in straight.history]
    for a, b in zip(model.state_dict().values(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_loads_without_unpickling_objects(tmp_path):
    fit(*_pair(), _data(), epochs=1, run_dir=tmp_path, progress=False)
    for name in (CHECKPOINT, FINAL_WEIGHTS):
        state = torch.load(tmp_path / name, weights_only=True)
        assert "model" in state and "guide" in state


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fit(*_pair(), _data(), epochs=1, run_dir=tmp_path, resume=True, progress=False)


class ExplodingModel(VAE):
    """A VAE whose likelihood turns NaN from the 4th call on."""

    calls = 0

    def forward(self, x=None, **unused):
        ExplodingModel.calls += 1
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            logits = self.decoder(z)
            if ExplodingModel.calls > 4:
                logits = logits * float("nan")
            pyro.sample("x", dist.Normal(logits, 1.0).to_event(1), obs=x)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    ExplodingModel.calls = 0
    model = ExplodingModel(16, z_dim=3, hidden=(8,))
    guide = AmortizedNormal(model, hidden=(8,))
    # call 1: plate-nesting trace; calls 2-4: the three steps of epoch 1; call 5: step 1 of epoch 2
    with pytest.raises(NonFiniteLossError, match=r"at step 4 \(epoch 2\)") as info:
        fit(model, guide, _data(96), epochs=3, batch_size=32, run_dir=tmp_path, progress=False)
    assert info.value.step == 4
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["epoch"] == 0  # epoch 1 was saved and not overwritten
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("bad, message", [
    ({"x": torch.full((10, 16), float("nan"))}, "NaN"),
    ({"x": torch.ones(10, 15)}, "16"),
    ({"x": torch.ones(10, 16, dtype=torch.long)}, "float"),
    ({"x": torch.ones(10, 16), "y": torch.ones(9)}, "disagree on their first"),
])
def test_bad_data_is_rejected_before_training(bad, message):
    model, guide = _pair()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        fit(model, guide, bad, epochs=1, x_dim=16, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_early_stopping_restores_the_best_epoch():
    model, guide = _pair()
    result = fit(model, guide, _data(), _data(40, seed=1), epochs=30, lr=0.05, patience=2,
                 progress=False)
    best = max(row["valid_elbo"] for row in result.history)
    assert result.history[result.best_epoch]["valid_elbo"] == best
    assert result.stopped_early == (len(result.history) < 30)


def test_kl_annealing_scales_only_latent_sites():
    model, guide = _pair()
    data = _data(8)
    full = pyro.poutine.trace(guide).get_trace(**data)
    replayed = pyro.poutine.trace(pyro.poutine.replay(model, trace=full)).get_trace(**data)
    with scale_latents(0.25):
        scaled = pyro.poutine.trace(pyro.poutine.replay(model, trace=full)).get_trace(**data)
    assert scaled.nodes["z"]["scale"] == 0.25 and replayed.nodes["z"]["scale"] == 1.0
    assert scaled.nodes["x"]["scale"] == 1.0
    assert [kl_weight(e, 4) for e in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_clip_norm_bounds_every_step():
    data = _data()

    def one_sgd_step(clip_norm):
        model, guide = _pair()
        before = torch.cat([p.detach().flatten().clone() for p in [*model.parameters(), *guide.parameters()]])
        fit(model, guide, data, epochs=1, batch_size=len(data["x"]), lr=1.0, optimizer=torch.optim.SGD,
            clip_norm=clip_norm, progress=False)
        after = torch.cat([p.detach().flatten() for p in [*model.parameters(), *guide.parameters()]])
        return (after - before).norm().item()

    # one plain SGD step of lr 1 moves the parameters by exactly the (clipped) gradient norm
    assert one_sgd_step(None) > 1.0
    assert one_sgd_step(0.01) == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(ValueError, match="clip_norm"):
        fit(*_pair(), data, clip_norm=0.0, progress=False)


def test_every_epoch_is_one_log_record_without_a_progress_bar(caplog):
    import logging

    data, valid = _data(), _data(40, seed=1)
    with caplog.at_level(logging.INFO, logger="bayeszoo"):
        result = fit(*_pair(), data, valid, epochs=3, batch_size=32, progress=False)
    records = [r for r in caplog.records if r.name == "bayeszoo.inference.svi"]
    assert [r.levelno for r in records] == [logging.INFO] * 3
    for record, row in zip(records, result.history, strict=True):
        message = record.getMessage()
        assert message.startswith(f"epoch {row['epoch']}: train ELBO {row['train_elbo']:.2f}, ")
        assert f"valid ELBO {row['valid_elbo']:.2f} nats/point" in message
    # the library leaves where the lines go to the application: no handler of its own but a null one
    assert all(isinstance(h, logging.NullHandler) for h in logging.getLogger("bayeszoo").handlers)
