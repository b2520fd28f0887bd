"""The bayeszoo command: every bad input is one clear line and exit status 2, before training."""

import json

import pytest

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
