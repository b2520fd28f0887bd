"""The bayeszoo command: every bad input is one clear line and exit status 2, before training."""

import json
from pathlib import Path

import pytest
import torch

from bayeszoo.inference.cli import main


def _fails(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    return err


def test_list_names_models_guides_pairs_and_datasets(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("vae", "cvae", "dlgm", "ppca", "amortized", "rank1", "delta", "denoising",
                 "digits", "mnist5k", "fashion-mnist", "valid pairs", "planar", "iaf", "laplace",
                 "dmm", "lgssm", "st-lr", "dks", "linear-gaussian", "jsb"):
        assert word in out


@pytest.mark.parametrize("argv, expected", [
    (["fit", "gan", "--guide", "amortized", "--data", "digits"], "valid models: vae, cvae"),
    (["fit", "vae", "--guide", "magic", "--data", "digits"], "valid guides: amortized"),
    (["fit", "vae", "--guide", "amortized", "--data", "imagenet"], "valid datasets: digits"),
    (["fit", "vae", "--guide", "amortized", "--data", "digits", "--lr", "-1"], "--lr"),
    (["fit", "vae", "--guide", "amortized", "--data", "mnist", "--data-root", "nowhere"],
     "--download"),
    (["fit", "dlgm", "--guide", "laplace", "--data", "digits"], "valid guides for dlgm"),
    (["fit", "dmm", "--guide", "amortized", "--data", "pendulum"], "valid guides for dmm: mf-l"),
    (["fit", "dmm", "--guide", "st-lr", "--data", "digits"], "valid datasets: linear-gaussian"),
    (["evaluate", "no/such/run"], "not a finished run folder"),
])
def test_bad_input_is_one_line_and_status_2(capsys, tmp_path, argv, expected):
    argv = [a if a != "nowhere" else str(tmp_path / "empty") for a in argv]
    assert expected in _fails(capsys, argv + (["--out", str(tmp_path / "run")]
                                              if argv[0] == "fit" else []))
    assert not (tmp_path / "run").exists()  # nothing was trained or written


def test_cuda_request_without_cuda_is_rejected(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    err = _fails(capsys, ["fit", "vae", "--guide", "amortized", "--data", "digits",
                          "--device", "cuda", "--out", str(tmp_path / "run")])
    assert "CUDA" in err


def test_fit_writes_a_run_folder_that_evaluate_reads(capsys, tmp_path):
    run = tmp_path / "run"
    argv = ["fit", "vae", "--guide", "rank1", "--data", "digits", "--epochs", "2", "--z-dim", "2",
            "--hidden", "32", "--is-samples", "20", "--no-progress", "--out", str(run)]
    assert main(argv) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["history"]) == 2
    assert metrics["test"]["is_samples"] == 20
    assert metrics["test"]["is_log_likelihood"] >= metrics["test"]["elbo"] - 0.5
    for figure in ("training.png", "reconstructions.png", "samples.png", "latent.png",
                   "manifold.png"):
        assert (run / figure).stat().st_size > 1000
    # a second fit into the same folder must not silently overwrite it
    capsys.readouterr()  # the first fit's epoch lines
    assert "--resume" in _fails(capsys, argv)
    assert main(["evaluate", str(run), "--is-samples", "20"]) == 0
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["num_points"] == 250
    assert abs(evaluation["elbo"] - metrics["test"]["elbo"]) < 1.0  # same weights, new samples


def test_resume_through_the_cli_reaches_the_requested_epochs(tmp_path):
    run = tmp_path / "run"
    base = ["fit", "vae", "--guide", "amortized", "--data", "digits", "--hidden", "16",
            "--is-samples", "5", "--no-progress", "--out", str(run)]
    assert main(base + ["--epochs", "1"]) == 0
    assert main(base + ["--epochs", "2", "--resume"]) == 0
    assert [row["epoch"] for row in json.loads((run / "metrics.json").read_text())["history"]] == [1, 2]


def test_state_space_fit_reports_nats_per_time_step(tmp_path):
    run = tmp_path / "run"
    argv = ["fit", "dmm", "--guide", "st-lr", "--data", "linear-gaussian", "--epochs", "1",
            "--rnn-dim", "8", "--z-dim", "2", "--is-samples", "4", "--no-progress", "--out", str(run)]
    assert main(argv) == 0
    test = json.loads((run / "metrics.json").read_text())["test"]
    # 500 test sequences of 25 steps: per-step numbers are the per-sequence ones / 25
    assert test["elbo_per_step"] == pytest.approx(test["elbo"] / 25, rel=1e-6)
    assert test["is_log_likelihood_per_step"] >= test["elbo_per_step"]
    assert (run / "training.png").exists()


# ---------------------------------------------------------------- every bad input: one line, exit 2


def _corrupt_run(tmp_path, what: str):
    run = tmp_path / what
    if what == "missing":
        return str(run)
    run.mkdir()
    if what == "malformed":
        (run / "config.json").write_text("{not json")
    elif what == "foreign":
        (run / "config.json").write_text(json.dumps({"model": "vae", "guide": "amortized"}))
    elif what == "unfinished":  # a valid config, no posterior
        from bayeszoo.inference.runs import plan

        (run / "config.json").write_text(json.dumps(plan("vae", "amortized", "digits")))
    elif what in _BROKEN_CONFIGS:  # a config.json naming what does not exist
        from bayeszoo.inference.runs import plan

        config = plan("vae", "amortized", "digits")
        section, key, value = _BROKEN_CONFIGS[what]
        (config[section] if section else config)[key] = value
        (run / "config.json").write_text(json.dumps(config))
    return str(run)


_BROKEN_CONFIGS = {
    "unknown-model": (None, "model", "gan"),
    "unknown-guide": (None, "guide", "magic"),
    "unknown-option": ("options", "wings", 2),
    "bad-value": ("fit", "epochs", "ten"),
    "out-of-range": ("fit", "lr", -1.0),
}


FIT = ["fit", "vae", "--guide", "amortized", "--data", "digits"]
BNN = ["fit", "bnn", "--guide", "map", "--data", "gap"]


@pytest.mark.parametrize("argv, expected", [
    ([*FIT, "--epochs", "three"], "--epochs"),                       # wrong type
    ([*FIT, "--epochs", "0"], "--epochs must be positive"),          # out of range
    ([*FIT, "--lr-decay", "1.5"], "--lr-decay"),
    ([*FIT, "--hidden", "16,x"], "--hidden"),
    ([*FIT, "--likelihood", "poisson"], "--likelihood"),
    ([*FIT, "--members", "3"], "--members does not apply to vae with guide amortized"),   # not applicable
    ([*FIT, "--laplace-structure", "full"], "does not apply"),
    (["fit", "ppca", "--guide", "amortized", "--data", "digits", "--likelihood", "bernoulli"],
     "does not apply"),
    ([*BNN, "--num-particles", "4"], "--num-particles does not apply to bnn with guide map"),
    ([*BNN, "--kl-anneal", "5"], "--kl-anneal does not apply"),
    ([*BNN, "--split", "25"], "--split must be in 0..19"),
    ([*BNN, "--noise", "-1"], "--noise"),
    ([*BNN, "--dropout", "0.1"], "--dropout does not apply"),
    (["fit", "bnn", "--guide", "nuts", "--data", "gap", "--noise", "learned"],
     "MCMC samples sample sites only"),
    ([*FIT, "--device", "gpu"], "--device must be cpu, cuda or cuda:N"),
    ([*FIT, "--device", "mps"], "--device must be cpu, cuda or cuda:N"),
    pytest.param([*FIT, "--devices", "2", "--accelerator", "gpu"], "needs 2 CUDA GPU(s) on this machine",
                 marks=pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="two GPUs here")),
    ([*FIT, "--devices", "0"], "--devices must be positive"),
    ([*FIT, "--strategy", "mpi"], "--strategy: invalid choice"),
    ([*FIT, "--num-nodes", "2"], "MASTER_ADDR"),                      # a second node, but no address
    (["evaluate", "MISSING"], "not a finished run folder"),           # missing file
    (["evaluate", "malformed"], "is not a bayeszoo run config"),      # corrupted run folder
    (["evaluate", "foreign"], "is not a bayeszoo run config"),
    (["evaluate", "unfinished"], "not a finished run folder"),
    (["evaluate", "unfinished", "--predictive-samples", "5"], "--predictive-samples does not apply"),
    ([*FIT, "--no-such-flag"], "unrecognized arguments"),
    (["fit", "vae", "--guide", "amortized"], "fit needs MODEL, --guide and --data, or --from RUN"),
    (["fit", "--from", "@missing"], "no such run folder"),                # fit --from a bad folder
    (["fit", "--from", "@empty"], "not a finished run folder (no config.json)"),
    (["fit", "--from", "@malformed"], "is not a bayeszoo run config"),
    (["fit", "--from", "@foreign"], "is not a bayeszoo run config"),
    (["fit", "--from", "@unknown-model"], "unknown model 'gan'"),
    (["fit", "--from", "@unknown-guide"], "unknown guide 'magic'"),
    (["fit", "--from", "@unknown-option"], "cannot be rerun: --wings does not apply to vae"),
    (["fit", "--from", "@bad-value"], "cannot be rerun: epochs is 'ten'"),
    (["fit", "--from", "@out-of-range"], "cannot be rerun: --lr must be positive"),
    (["fit", "--from", "@unfinished", "--members", "3"], "--members does not apply to vae"),
    (["fit", "--from", "@unfinished", "--guide", "nuts"], "guide 'nuts' does not fit model 'vae'"),
    (["fit", "--from", "@unfinished", "--epochs", "0"], "--epochs must be positive"),
])
def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, argv, expected):
    if argv[0] == "evaluate" and argv[1] != "MISSING":
        argv = ["evaluate", _corrupt_run(tmp_path, argv[1]), *argv[2:]]
    elif argv[0] == "evaluate":
        argv = ["evaluate", str(tmp_path / "missing")]
    argv = [_corrupt_run(tmp_path, a[1:]) if a.startswith("@") else a for a in argv]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    out = ["--out", str(tmp_path / "run")] if argv[0] == "fit" else []
    with _no_exit():
        code = main(argv + out)
        assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert expected in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no folder created or changed


def test_fit_from_a_run_reruns_its_config_with_the_flags_given_beside_it(tmp_path, monkeypatch):
    first = tmp_path / "first"
    assert main(["fit", "vae", "--guide", "planar", "--data", "digits", "--epochs", "1", "--z-dim", "2",
                 "--hidden", "16", "--flow-length", "2", "--binarize", "fixed", "--is-samples", "5",
                 "--lr", "0.002", "--no-progress", "--out", str(first)]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--from", "first", "--epochs", "2", "--no-progress"]) == 0
    rerun = tmp_path / "runs" / "vae-planar-digits-seed0"  # the default folder, not RUN's
    saved = json.loads((first / "config.json").read_text())
    again = json.loads((rerun / "config.json").read_text())
    assert again["fit"].pop("epochs") == 2 and saved["fit"].pop("epochs") == 1
    assert again == saved
    assert len(json.loads((rerun / "metrics.json").read_text())["history"]) == 2


@pytest.mark.parametrize("model, guide, data, options", [
    ("vae", "amortized", "digits", {"binarize": "none", "hidden": (32, 16)}),  # a settled None
    ("vae", "iaf", "digits", {"likelihood": "gaussian", "flow_length": 3, "seed": 4}),
    ("bnn", "nuts", "boston", {"split": 3, "hidden": (20,), "nuts_jit": True}),
    ("dmm", "st-lr", "pendulum", {"rnn_dim": 8, "patience": 2, "is_samples": 7}),
])
def test_a_saved_config_replans_to_itself(tmp_path, model, guide, data, options):
    from bayeszoo.inference import runs

    config = runs.plan(model, guide, data, **options)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert runs.replan(tmp_path) == json.loads(json.dumps(config))
    changed = runs.replan(tmp_path, seed=9)
    assert changed["fit"].pop("seed") == 9 and config["fit"].pop("seed") != 9
    assert json.loads(json.dumps(changed)) == json.loads(json.dumps(config))


def test_fit_from_with_another_guide_keeps_only_the_options_it_has(tmp_path):
    from bayeszoo.inference import runs

    saved = runs.plan("vae", "iaf", "digits", flow_length=3, z_dim=4)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = runs.replan(tmp_path, guide="rank1")
    assert config["guide"] == "rank1" and config["options"]["z_dim"] == 4
    assert "flow_length" not in config["options"]


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is SystemExit:  # argparse's own errors exit 2 with one line
            assert value.code == 2
            return True
        return False


def test_version_and_help_name_every_default(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    from bayeszoo import __version__

    assert capsys.readouterr().out.strip() == f"bayeszoo {__version__}"
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    for flag in ("--epochs", "--batch-size", "--lr", "--seed", "--device", "--guide", "--data",
                 "--flow-length", "--members", "--nuts-jit"):
        assert flag in text
    assert "default: 10" in text and "applies to" in text


def test_the_figures_a_run_writes_are_readable(tmp_path, monkeypatch):
    """Titles, axis labels and legends on every figure `fit` saves, for images and for a 1-D BNN."""
    from matplotlib.figure import Figure
    from test_plots import readability_problems

    problems, saved = {}, []
    original = Figure.savefig

    def checked_savefig(figure, path, *args, **kwargs):
        saved.append(Path(path).name)
        problems[Path(path).name] = readability_problems(figure)
        return original(figure, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", checked_savefig)
    assert main(["fit", "vae", "--guide", "amortized", "--data", "digits", "--epochs", "2", "--z-dim", "2",
                 "--hidden", "16", "--is-samples", "5", "--no-progress", "--out", str(tmp_path / "vae")]) == 0
    assert main(["fit", "bnn", "--guide", "meanfield", "--data", "gap", "--epochs", "2", "--hidden", "8",
                 "--predictive-samples", "10", "--no-progress", "--out", str(tmp_path / "bnn")]) == 0
    assert {"training.png", "reconstructions.png", "samples.png", "latent.png", "manifold.png",
            "predictive.png"} <= set(saved)
    assert all(not found for found in problems.values()), problems


def test_no_progress_hides_the_bars_but_keeps_the_epoch_lines(capsys, tmp_path):
    argv = ["fit", "vae", "--guide", "amortized", "--data", "digits", "--epochs", "2", "--hidden", "16",
            "--is-samples", "5", "--out", str(tmp_path / "run")]
    assert main([*argv, "--no-progress"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2"]
    assert all("train ELBO" in line and "valid ELBO" in line for line in lines)
    assert "it/s" not in err and "\r" not in err and "%|" not in err  # no tqdm bar
    import logging

    assert not any(isinstance(h, logging.StreamHandler) for h in logging.getLogger("bayeszoo").handlers)


def test_torch_jit_future_warnings_do_not_reach_the_command_line(monkeypatch):
    """Torch's own torch.jit deprecation notes are hidden; a FutureWarning from anywhere else shows."""
    import warnings

    import torch

    from bayeszoo.inference import cli

    def fit_that_warns(args):
        torch.jit.wait(torch.jit.fork(abs, -1))  # each warns from torch.jit._async
        warnings.warn("a note of the user's own", FutureWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cli, "_fit", fit_that_warns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", "vae", "--guide", "amortized", "--data", "digits"]) == 0
    assert [str(w.message) for w in caught] == ["a note of the user's own"]
    with warnings.catch_warnings(record=True) as caught:  # the same call outside the command warns
        warnings.simplefilter("always")
        torch.jit.wait(torch.jit.fork(abs, -1))
    assert [w.category for w in caught] == [FutureWarning, FutureWarning]


def test_the_nile_through_the_command_line_gives_chapter_10s_fit(tmp_path):
    """`fit local-level --guide kalman --data nile` is the chapter's maximum-likelihood fit: Durbin &
    Koopman (2012, ch. 2) report sigma2_eps = 15099, sigma2_eta = 1469.1, log L = -632.54."""
    run = tmp_path / "nile"
    assert main(["fit", "local-level", "--guide", "kalman", "--data", "nile", "--out", str(run)]) == 0
    test = json.loads((run / "metrics.json").read_text())["test"]
    assert test["fitted"]["R"] == pytest.approx(15099, rel=2e-4)       # sigma2_eps
    assert test["fitted"]["Q"] == pytest.approx(1469.1, rel=1e-3)      # sigma2_eta
    assert test["log_likelihood"] == pytest.approx(-632.54, abs=0.01)
    assert test["steps_scored"] == 99 and test["exact"] and "in-sample" in test["note"]
    assert main(["evaluate", str(run)]) == 0  # the saved model scores the same again
    assert json.loads((run / "evaluation.json").read_text())["log_likelihood"] == test["log_likelihood"]
