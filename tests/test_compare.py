"""``bayeszoo compare``: equal terms for every guide, the table, figure and CSV, early failures,
and the PSIS k-hat against weights whose tail index is known."""

import csv
import json
import math

import pytest
import torch

from bayeszoo.inference import runs, training
from bayeszoo.inference.compare import CompareError, compare
from bayeszoo.inference.diagnostics import MIN_PSIS_SAMPLES, psis_khat
from bayeszoo.inference.evaluate import evaluate, importance_sampling
from bayeszoo.inference.registry import RegistryError
from bayeszoo.inference.report import LATENT_TABLE as TABLE
from bayeszoo.inference.svi import NonFiniteLossError

GUIDES = ["amortized", "rank1", "planar"]
TINY = {"options": {"z_dim": 2, "hidden": [16], "flow_length": 2},
        "fit_options": {"epochs": 1, "batch_size": 100, "seed": 3}, "is_samples": 30, "progress": False}


# --------------------------------------------------------------------------- PSIS k-hat


def test_equal_log_weights_give_the_lowest_khat():
    # q equal to the posterior: every weight is p(x); float rounding must not read as a heavy tail
    # (ArviZ alone returns +inf here: it finds no tail to fit).
    equal = torch.full((100, 4), -350.25)
    rounded = equal + 1e-6 * torch.randn(100, 4)
    for log_weights in (equal, rounded, torch.zeros(100)):
        khat = psis_khat(log_weights)
        assert khat.shape == log_weights.shape[1:]
        assert (khat <= 0.5).all() and (khat == float("-inf")).all()


def test_bounded_weights_have_a_negative_khat():
    # proposal N(0, 2^2) wider than the target N(0, 1): w = p / q is bounded, so k < 0
    z = 2 * torch.randn(2000, 20, dtype=torch.float64)
    log_weights = torch.distributions.Normal(0, 1).log_prob(z) - torch.distributions.Normal(0, 2).log_prob(z)
    assert (psis_khat(log_weights) < 0).all()


@pytest.mark.parametrize("tail_index", [0.25, 0.5, 1.0])
def test_khat_recovers_the_tail_index_of_pareto_weights(tail_index):
    # w ~ Pareto(alpha = 1 / k): P(w > t) = t^(-1/k), so log w = k * Exponential(1). With S = 2000
    # samples ArviZ fits the largest 135; one column's k-hat has a standard deviation of about
    # 0.1-0.2 (and a prior pulls it slightly toward 0.5), so: the mean of 100 columns within 0.06
    # of the truth, every column within 0.5.
    generator = torch.Generator().manual_seed(0)
    log_weights = tail_index * torch.empty(2000, 100, dtype=torch.float64).exponential_(generator=generator)
    khat = psis_khat(log_weights)
    assert khat.shape == (100,)
    assert abs(khat.mean().item() - tail_index) < 0.06
    assert (khat - tail_index).abs().max() < 0.5


def test_khat_needs_enough_samples_and_finite_weights():
    with pytest.raises(ValueError, match=f"at least {MIN_PSIS_SAMPLES}"):
        psis_khat(torch.randn(MIN_PSIS_SAMPLES - 1, 3))
    bad = torch.randn(50, 3)
    bad[4, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        psis_khat(bad)


# --------------------------------------------------------------------------- scoring


def test_one_pass_of_weights_gives_every_score_from_the_same_draws():
    from bayeszoo.guides.amortized import AmortizedNormal
    from bayeszoo.inference.evaluate import log_weight_terms
    from bayeszoo.inference.svi import max_plate_nesting
    from bayeszoo.models.vae import VAE

    model, guide = VAE(16, 2, (8,)), AmortizedNormal(VAE(16, 2, (8,)), (8,))
    data = {"x": torch.bernoulli(torch.full((20, 16), 0.3))}
    torch.manual_seed(1)
    got = importance_sampling(model, guide, data, num_samples=25, batch_size=20, chunk_size=10)
    # by hand: the same three chunks of draws (10, 10, 5), every score from their log weights
    torch.manual_seed(1)
    nesting = max_plate_nesting(model, guide, data)  # the pass starts with one trace, as here
    terms = [log_weight_terms(model, guide, data, k, nesting) for k in (10, 10, 5)]
    log_w = torch.cat([likelihood + prior_ratio for likelihood, prior_ratio in terms])
    torch.testing.assert_close(got["log_likelihood"], torch.logsumexp(log_w, 0) - math.log(25))
    torch.testing.assert_close(got["elbo"], log_w.mean(0))
    torch.testing.assert_close(got["kl"], -torch.cat([ratio for _, ratio in terms]).mean(0))
    torch.testing.assert_close(got["khat"], psis_khat(log_w))
    assert torch.isfinite(got["khat"]).all() and got["khat"].shape == (20,)
    # too few samples for a k-hat: NaN, not ArviZ's +inf
    assert importance_sampling(model, guide, data, num_samples=5)["khat"].isnan().all()


def test_a_point_mass_guide_gets_no_is_estimate_and_no_khat():
    from bayeszoo.guides.amortized import AmortizedDelta
    from bayeszoo.models.vae import VAE

    model = VAE(16, 2, (8,))
    data = {"x": torch.bernoulli(torch.full((30, 16), 0.3))}
    scores = evaluate(model, AmortizedDelta(model, (8,)), data, num_samples=25)
    assert scores["point_mass"] and math.isfinite(scores["elbo"])
    assert math.isnan(scores["is_log_likelihood"]) and math.isnan(scores["khat_mean"])


# --------------------------------------------------------------------------- the comparison


def test_tiny_comparison_writes_table_csv_figure_from_equal_starts(tmp_path, monkeypatch):
    initial = {}
    real_fit = training.fit

    def recording_fit(model, guide, *args, **kwargs):
        initial[kwargs["run_dir"].name] = {k: v.clone() for k, v in model.state_dict().items()}
        return real_fit(model, guide, *args, **kwargs)

    monkeypatch.setattr(training, "fit", recording_fit)
    out = tmp_path / "cmp"
    rows = compare("vae", ",".join(GUIDES), "digits", out=out, **TINY)

    # same decoder initialisation for every guide
    assert list(initial) == GUIDES
    first = initial["amortized"]
    assert any(k.startswith("decoder") for k in first)
    for name in GUIDES[1:]:
        assert initial[name].keys() == first.keys()
        for key, value in first.items():
            assert torch.equal(initial[name][key], value), (name, key)

    # one row per guide, every column, sensible numbers
    assert [row["guide"] for row in rows] == GUIDES
    for row in rows:
        assert row["status"] == "ok" and row["is_samples"] == 30 and row["epochs"] == 1
        assert row["is_log_likelihood"] >= row["elbo"] - 0.5  # IS tightens the bound
        assert row["kl"] >= 0 and row["seconds_per_epoch"] > 0 and row["parameters"] > 0
        assert -2 < row["khat_mean"] < 2 and 0 <= row["khat_above"] <= 1
    assert rows[2]["parameters"] > rows[0]["parameters"]  # the flow's extra heads

    markdown = (out / "compare.md").read_text()
    assert "`vae` on `digits`" in markdown and "K = 30" in markdown
    assert "1 epochs" in markdown and "seed 3" in markdown and "CPU threads" in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| guide"))
    assert "IS log-likelihood (K=30)" in header and "mean k-hat" in header and "k-hat > 0.7" in header
    assert sum(line.startswith(f"| {g} |") for line in markdown.splitlines() for g in GUIDES) == 3

    with open(out / "compare.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["guide"] for r in table] == GUIDES
    assert set(key for key, _ in TABLE) <= set(table[0])
    assert float(table[1]["is_log_likelihood"]) == pytest.approx(rows[1]["is_log_likelihood"])
    assert (out / "compare.png").stat().st_size > 5000

    # every guide's run folder is a `bayeszoo fit` run folder
    for name in GUIDES:
        config = json.loads((out / name / "config.json").read_text())
        assert config["guide"] == name and config["fit"]["epochs"] == 1
        assert (out / name / "weights.pt").exists() and (out / name / "metrics.json").exists()

    # the folder holds runs now: no silent overwrite; resume reuses the finished runs
    with pytest.raises(CompareError, match="resume"):
        compare("vae", GUIDES, "digits", out=out, **TINY)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(training, "fit", no_training)
    # a folder written before a fit option existed (here: clip_norm) resumes too: it had the default
    config_path = out / GUIDES[0] / "config.json"
    older = json.loads(config_path.read_text())
    del older["fit"]["clip_norm"]
    config_path.write_text(json.dumps(older))
    again = compare("vae", GUIDES, "digits", out=out, resume=True, **TINY)
    assert [r["is_log_likelihood"] for r in again] == [r["is_log_likelihood"] for r in rows]
    other = {**TINY, "fit_options": {"epochs": 2, "seed": 3}}
    with pytest.raises(CompareError, match="another configuration"):
        compare("vae", GUIDES, "digits", out=out, resume=True, **other)


def test_guides_trained_two_at_a_time_in_two_processes_give_the_same_comparison(tmp_path):
    # Each guide is its own run, seeded by the config: which process trains it must not matter.
    alone = compare("vae", GUIDES, "digits", out=tmp_path / "one", **TINY)
    spread = compare("vae", GUIDES, "digits", out=tmp_path / "two",
                     **{**TINY, "fit_options": {**TINY["fit_options"], "devices": 2, "strategy": "ddp_fork"}})
    timings = {"seconds_per_epoch", "train_seconds", "method_seconds"}
    assert [row["guide"] for row in spread] == GUIDES
    for one, two in zip(alone, spread, strict=True):
        assert {k: v for k, v in one.items() if k not in timings} == {
            k: v for k, v in two.items() if k not in timings}
    for name in GUIDES:  # every guide's folder is a one-process run, written by the process that trained it
        config = json.loads((tmp_path / "two" / name / "config.json").read_text())
        assert config["fit"]["devices"] == 1
        trained = [torch.load(tmp_path / folder / name / "weights.pt", weights_only=True)
                   for folder in ("one", "two")]
        # the same draws; a weight may differ in its last bits (4.7e-10 seen: memory alignment in
        # another process can change the vector code path), while a seed off would move it by 1e-2
        torch.testing.assert_close(trained[0], trained[1], rtol=0, atol=1e-6, msg=name)
    assert (tmp_path / "two" / "compare.png").stat().st_size > 5000
    assert (tmp_path / "two" / "compare.csv").exists()


@pytest.mark.parametrize("model, guides, data, extra, message", [
    ("vae", ["amortized", "magic"], "digits", {}, "valid guides: amortized"),
    ("dlgm", ["amortized", "laplace"], "digits", {}, "valid guides for dlgm"),
    ("vae", ["amortized"], "imagenet", {}, "valid datasets"),
    ("gan", ["amortized"], "digits", {}, "valid models"),
    ("vae", ["amortized", "amortized"], "digits", {}, "named twice"),
    ("vae", [], "digits", {}, "no guides"),
    ("vae", ["amortized"], "digits", {"fit_options": {"epoch": 3}}, "unknown fit option"),
    ("vae", ["amortized"], "digits", {"is_samples": 0}, "is.samples"),  # is_samples or --is-samples
    ("vae", ["amortized"], "digits", {"fit_options": {"devices": 2, "accelerator": "gpu"}}, "CUDA GPU"),
    ("vae", ["amortized"], "digits", {"fit_options": {"devices": 0}}, "positive integers"),
])
def test_bad_input_fails_before_data_or_training(tmp_path, monkeypatch, model, guides, data, extra,
                                                 message):
    def forbidden(*args, **kwargs):
        raise AssertionError("data were loaded or a model was trained")

    monkeypatch.setattr(runs, "load_data", forbidden)
    monkeypatch.setattr(training, "fit", forbidden)
    with pytest.raises((RegistryError, CompareError), match=message):
        compare(model, guides, data, out=tmp_path / "cmp", **{**TINY, **extra})
    assert not (tmp_path / "cmp").exists()


def test_a_guide_whose_loss_turns_nan_is_reported_and_the_others_carry_on(tmp_path, monkeypatch):
    real_fit = training.fit

    def failing_rank1(model, guide, *args, **kwargs):
        if kwargs["run_dir"].name == "rank1":
            raise NonFiniteLossError(7, 0, float("nan"), None)
        return real_fit(model, guide, *args, **kwargs)

    monkeypatch.setattr(training, "fit", failing_rank1)
    rows = compare("vae", ["rank1", "amortized"], "digits", out=tmp_path / "cmp", **TINY)
    assert rows[0]["status"].startswith("stopped: loss became nan at step 7")
    assert rows[1]["status"] == "ok"
    markdown = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| rank1 | — |" in markdown and "step 7" in markdown


def test_sequence_models_are_compared_per_time_step(tmp_path, monkeypatch):
    from bayeszoo.inference.sequences import linear_gaussian_dataset

    monkeypatch.setattr(runs, "load_data",
                        lambda *args, **kwargs: linear_gaussian_dataset(sizes=(20, 10, 10), num_steps=5))
    rows = compare("dmm", ["mf-l", "st-lr"], "linear-gaussian", out=tmp_path / "cmp",
                   options={"z_dim": 2, "rnn_dim": 8}, fit_options={"epochs": 1, "batch_size": 10},
                   is_samples=25, progress=False)
    for row in rows:
        assert row["status"] == "ok"
        assert row["elbo_per_step"] == pytest.approx(row["elbo"] / 5, rel=1e-6)  # 5 steps each
    markdown = (tmp_path / "cmp" / "compare.md").read_text()
    assert "Nats per observed time step" in markdown and "active units" not in markdown
    assert not (tmp_path / "cmp" / "compare.png").exists()  # images only
