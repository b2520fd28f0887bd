"""Bayesian linear regression with known noise: the exact posterior every weight-space method is
checked against, plus the CLI for every BNN guide.

Model: y = X w + b + eps, eps ~ N(0, sigma^2), (w, b) ~ N(0, s^2 I). With Xa = [X, 1] the
posterior is N(m, A^-1), A = Xa^T Xa / sigma^2 + I / s^2, m = A^-1 Xa^T y / sigma^2.
"""

import json

import pyro
import pytest
import torch
from pyro.infer import MCMC
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from bayeszoo.guides.map import MAPGuide
from bayeszoo.guides.tradi import TradiGuide
from bayeszoo.guides.weight_laplace import WeightLaplaceGuide
from bayeszoo.inference import cli, diagnostics, runs
from bayeszoo.inference.mcmc import pooled, run_nuts
from bayeszoo.inference.predictive import predictive
from bayeszoo.inference.svi import fit
from bayeszoo.inference.training import train
from bayeszoo.models.bnn import BayesianNeuralNetwork

N, D, SIGMA, PRIOR_SD = 30, 2, 0.5, 1.0


def _data(dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=generator, dtype=dtype)
    x[:, 1] += 0.8 * x[:, 0]  # correlated inputs: a posterior with real correlations
    noise = SIGMA * torch.randn(N, generator=generator, dtype=dtype)
    y = x @ torch.tensor([1.0, -2.0], dtype=dtype) + 0.3 + noise
    return x, y


def _exact(x, y):
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1).double()
    precision = xa.T @ xa / SIGMA**2 + torch.eye(D + 1, dtype=torch.float64) / PRIOR_SD**2
    covariance = torch.linalg.inv(precision)
    return covariance @ xa.T @ y.double() / SIGMA**2, covariance


def _model():
    return BayesianNeuralNetwork(nn.Linear(D, 1), (D,), "gaussian", prior="normal", prior_scale=PRIOR_SD,
                                 noise=SIGMA)


def _flat(draws: dict) -> torch.Tensor:
    weight, bias = draws["net.0.weight"], draws["net.0.bias"]
    return torch.cat([weight.reshape(len(weight), -1), bias.reshape(len(bias), -1)], 1).double()


def test_nuts_matches_the_exact_posterior():
    x, y = _data()
    mean, covariance = _exact(x, y)
    draws = run_nuts(_model(), {"x": x, "y": y}, num_samples=200, warmup=150, num_chains=2, progress=False)
    flat = _flat(pooled(draws))
    sd = covariance.diagonal().sqrt()
    # 400 draws with an ESS of a few hundred: the MC error of a mean is ~ sd / 14; allow ~4 of those.
    assert ((flat.mean(0) - mean).abs() / sd).max() < 0.27
    # Covariances on the correlation scale: with ~200 effective draws an estimated correlation has
    # a standard error of ~1/sqrt(200) = 0.07; allow 0.2. Variances: relative error ~ sqrt(2/200) = 10%;
    # allow 25%.
    error = (flat.T.cov() - covariance) / sd.outer(sd)
    assert error.abs().max() < 0.2
    assert (flat.T.cov().diagonal() / covariance.diagonal() - 1).abs().max() < 0.25
    # The exact posterior is strongly correlated (correlated inputs), so the check has teeth:
    assert (covariance / sd.outer(sd) - torch.eye(D + 1, dtype=torch.float64)).abs().max() > 0.5


def _map_and_laplace(x, y, structure="full"):
    """A converged MAP fit and the Laplace guide around it with the true prior precision 1/s^2:
    the GGN of a linear-Gaussian model is its exact Hessian."""
    model = _model()
    map_guide = MAPGuide(model)
    fit(model, map_guide, {"x": x, "y": y}, epochs=1500, batch_size=N, lr=0.05, progress=False)
    laplace = WeightLaplaceGuide(model, map_guide, {"x": x, "y": y}, structure=structure,
                           prior_precisions=torch.tensor([1 / PRIOR_SD**2]))
    return model, map_guide, laplace


def test_full_laplace_is_the_exact_posterior_in_float64():
    torch.set_default_dtype(torch.float64)
    try:
        x, y = _data(torch.float64)
        mean, covariance = _exact(x, y)
        model, map_guide, laplace = _map_and_laplace(x, y)
        sd = covariance.diagonal().sqrt()
        assert ((laplace.loc - mean).abs() / sd).max() < 1e-3  # Adam's MAP, converged
        fitted = laplace.scale_tril @ laplace.scale_tril.T
        assert torch.allclose(fitted, covariance, rtol=1e-4, atol=1e-8)
        # The diagonal structure keeps the exact precision's diagonal, not the covariance's.
        diagonal = WeightLaplaceGuide(model, map_guide, {"x": x, "y": y}, structure="diag",
                                prior_precisions=torch.tensor([1 / PRIOR_SD**2]))
        assert torch.allclose(diagonal.scale**-2, torch.linalg.inv(covariance).diagonal(), rtol=1e-4)
    finally:
        torch.set_default_dtype(torch.float32)


def test_laplace_glm_predictive_is_the_exact_predictive_of_linear_regression():
    x, y = _data()
    mean, covariance = _exact(x, y)
    model, _, laplace = _map_and_laplace(x, y)
    assert laplace.linearized  # the default
    torch.manual_seed(0)
    draws = predictive(model, laplace, x[:6], num_samples=20_000)
    xa = torch.cat([x[:6], torch.ones(6, 1)], 1).double()
    exact_mean, exact_var = xa @ mean, (xa @ covariance * xa).sum(1)
    # 20,000 draws: the mean is off by ~sd/140 and the variance by ~1% (one standard error); allow 4.
    assert ((draws["mean"].double().mean(0) - exact_mean).abs() / exact_var.sqrt()).max() < 0.03
    assert (draws["mean"].double().var(0) / exact_var - 1).abs().max() < 0.04
    assert torch.allclose(draws["variance"], torch.full_like(draws["variance"], SIGMA**2))


def test_laplace_glm_outputs_are_the_jacobian_times_the_weight_offsets():
    torch.manual_seed(0)
    x = torch.randn(7, 3)
    model = BayesianNeuralNetwork(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)), (3,),
                                  "categorical", prior="normal")
    map_guide = MAPGuide(model)
    laplace = WeightLaplaceGuide(model, map_guide, {"x": x, "y": torch.randint(0, 2, (7,))}, structure="full")
    torch.manual_seed(1)
    outputs = laplace.linearized_outputs(model, x, num_samples=4)
    torch.manual_seed(1)
    offsets = laplace.posterior().sample((4,)) - laplace.loc  # the same draws

    def network(flat):
        pieces = dict(zip(laplace.selected, flat.split(laplace.sizes), strict=True))
        weights = {n: pieces[n].reshape(laplace.point[n].shape) for n in laplace.selected}
        with pyro.poutine.block(), pyro.poutine.condition(data={**laplace.point, **weights}):
            return model.net(x)

    jacobian = torch.autograd.functional.jacobian(network, laplace.loc)  # (7, 2, d)
    expected = network(laplace.loc) + torch.einsum("nod,sd->sno", jacobian, offsets)
    assert outputs.shape == (4, 7, 2)
    assert torch.allclose(outputs, expected, atol=1e-5)
    # ... and not the nonlinear network at the sampled weights, which differs at this scale.
    sampled = torch.stack([network(laplace.loc + offset) for offset in offsets])
    assert (sampled - expected).abs().max() > 1e-3


def test_laplace_evidence_picks_a_prior_precision_inside_the_grid():
    x, y = _data()
    model = _model()
    map_guide = MAPGuide(model)
    fit(model, map_guide, {"x": x, "y": y}, epochs=300, batch_size=N, lr=0.05, progress=False)
    laplace = WeightLaplaceGuide(model, map_guide, {"x": x, "y": y}, structure="full")
    grid = laplace.evidence_curve["prior_precision"]
    assert grid[0] < laplace.prior_precision < grid[-1]
    # For 3 weights of size ~1-2 the evidence optimum is tau ~ d / |w*|^2: order one, not an edge.
    expected = 3 / float(laplace.loc.pow(2).sum())
    assert expected / 3 < laplace.prior_precision < expected * 3


def test_sgld_on_the_bnn_recovers_the_exact_posterior_mean():
    x, y = _data()
    mean, covariance = _exact(x, y)
    torch.manual_seed(0)
    guide, _ = train(_model(), "sgld", {"x": x, "y": y}, epochs=800, batch_size=N, lr=2e-3, seed=0,
                     progress=False, options={"burn_in_epochs": 200, "thin": 2, "chains": 2})
    flat = _flat(guide.stacked())
    sd = covariance.diagonal().sqrt()
    # 2 chains x 301 correlated draws; the Langevin step adds an O(lr) bias to the variance, not
    # the mean.
    assert ((flat.mean(0) - mean).abs() / sd).max() < 0.3
    assert ((flat.var(0) / covariance.diagonal()) - 1).abs().max() < 0.5
    # Two chains from different initialisations, kept apart for ArviZ: on this unimodal posterior
    # they agree (split R-hat near 1; 1.1 is the usual alarm).
    assert guide.chains["net.0.weight"].shape == (2, 301, 1, D)  # steps 200, 202, ..., 800
    assert diagnostics.max_rhat(diagnostics.inference_data(guide.chains)) < 1.1


def test_nuts_compiled_and_started_at_a_point_draws_what_the_eager_sampler_draws():
    x, y = _data()
    mean, covariance = _exact(x, y)
    start = {"net.0.weight": mean[:D].float().reshape(1, D), "net.0.bias": mean[D:].float()}
    settings = dict(num_samples=10, warmup=10, num_chains=1, progress=False, init_values=start)
    eager = run_nuts(_model(), {"x": x, "y": y}, **settings)
    compiled = run_nuts(_model(), {"x": x, "y": y}, jit_compile=True, **settings)
    # The same seed and the same potential: TorchScript changes the speed, not the chain (up to
    # float rounding in the leapfrog steps).
    for name in eager:
        assert torch.allclose(eager[name], compiled[name], atol=1e-4), name
    # Started at the posterior mean, ten warm-up steps leave the draws within a few sd of it
    # (from a prior draw they can be several sd away after so little warm-up).
    assert ((_flat(pooled(eager)).mean(0) - mean).abs() / covariance.diagonal().sqrt()).max() < 2


def test_sgld_samples_the_weights_and_optimizes_a_learned_noise():
    x, y = _data()
    model = BayesianNeuralNetwork(nn.Linear(D, 1), (D,), "gaussian", prior="normal", noise="learned")
    seen = []
    hook = register_optimizer_step_pre_hook(lambda opt, *_: seen.append(opt))
    try:
        train(model, "sgld", {"x": x, "y": y}, epochs=2, batch_size=N, lr=1e-3, seed=0, progress=False,
              options={"burn_in_epochs": 1, "thin": 1})
    finally:
        hook.remove()
    groups = seen[-1].param_groups
    temperatures = {id(p): g["temperature"] for g in groups for p in g["params"]}
    noise = [p for name, p in model.named_parameters() if "noise" in name]
    assert noise and all(temperatures[id(p)] == 0.0 for p in noise)  # gradient descent, no Langevin noise
    assert sum(t == 1.0 for t in temperatures.values()) == 2  # weight and bias are sampled


def test_tradi_guide_samples_different_weights_and_reports_its_memory():
    x, y = _data()
    torch.manual_seed(0)
    model = _model()
    guide, _ = train(model, "tradi", {"x": x, "y": y}, epochs=30, batch_size=10, lr=0.01, seed=0,
                     progress=False)
    assert isinstance(guide, TradiGuide)
    draws = predictive(model, guide, x[:5], num_samples=50)
    assert draws["mean"].shape == (50, 5)
    assert draws["mean"].std(0).min() > 0
    tracked = sum(p.numel() for p in guide.buffers())
    assert tracked == 2 * (D + 1)  # mean and variance of each of the three weights
    assert guide.tracker.memory_bytes() == 3 * (D + 1) * 4  # mu, sigma^2, E[g]; float32


@pytest.mark.parametrize("method", ["map", "meanfield", "lrt", "flipout", "mcdropout", "ensemble",
                                    "laplace", "sgld", "sghmc", "nuts", "tradi"])
def test_cli_fits_every_bnn_guide(tmp_path, method):
    lr = {"sgld": "1e-4", "sghmc": "1e-5"}.get(method, "0.01")
    argv = ["fit", "bnn", "--guide", method, "--data", "gap", "--epochs", "3", "--batch-size", "80",
            "--lr", lr, "--hidden", "8", "--out", str(tmp_path), "--no-progress",
            "--predictive-samples", "20"]
    if method == "nuts":
        # bounded cost: 16 steps per draw; the MAP start and the compiled potential wired through
        argv += ["--noise", "0.1", "--nuts-max-tree-depth", "4", "--nuts-init", "map", "--nuts-jit",
                 "--nuts-samples", "20", "--nuts-warmup", "20"]
    assert cli.main(argv) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test"]["rmse"] > 0 and metrics["posterior_bytes"] > 0
    assert (tmp_path / "predictive.png").exists()
    # `evaluate` rebuilds the posterior from posterior.pt alone and scores it as `fit` did
    assert cli.main(["evaluate", str(tmp_path), "--predictive-samples", "20"]) == 0
    assert json.loads((tmp_path / "evaluation.json").read_text()) == metrics["test"]


def test_cli_resumes_an_interrupted_bnn_run(tmp_path, capsys):
    def run(epochs, out, *extra):
        return cli.main(["fit", "bnn", "--guide", "meanfield", "--data", "gap", "--epochs", str(epochs),
                         "--batch-size", "40", "--hidden", "8", "--out", str(out), "--no-progress",
                         "--predictive-samples", "10", *extra])

    assert run(2, tmp_path / "cut") == 0
    first = json.loads((tmp_path / "cut" / "metrics.json").read_text())["history"]
    assert run(4, tmp_path / "cut") == cli.EXIT_USAGE  # an existing run is not overwritten silently
    assert "--resume" in capsys.readouterr().err
    assert run(4, tmp_path / "cut", "--resume") == 0
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())["history"]
    assert run(4, tmp_path / "whole") == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())["history"]
    assert [row["epoch"] for row in resumed] == [1, 2, 3, 4]
    assert [row["train_elbo"] for row in resumed[:2]] == [row["train_elbo"] for row in first]
    # the checkpoint carries the optimizer and both random streams: the resumed run is the whole run
    assert [row["train_elbo"] for row in resumed] == pytest.approx([row["train_elbo"] for row in whole],
                                                                   rel=1e-5)


def test_cli_reports_rhat_and_ess_for_several_sampler_chains(tmp_path, capsys):
    argv = ["fit", "bnn", "--guide", "sgld", "--data", "gap", "--epochs", "4", "--batch-size", "80",
            "--lr", "1e-4", "--hidden", "8", "--out", str(tmp_path), "--no-progress", "--chains", "2",
            "--predictive-samples", "10"]
    assert cli.main(argv) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    chains = metrics["chains"]
    # two short chains from different initialisations: R-hat is computed (finite, above 1 - noise)
    assert chains["count"] == 2 and chains["max_rhat"] > 0.9 and chains["min_ess"] > 0
    # ... and too short to trust: the run says so on stderr, as metrics.json records it
    assert any(warning.startswith("the smallest effective sample size") for warning in metrics["warnings"])
    stderr = capsys.readouterr().err
    assert all(f"bayeszoo: warning: {warning}" in stderr for warning in metrics["warnings"])


def _sampler_run(out, method: str, epochs: int, *extra) -> int:
    lr = {"sgld": "1e-4", "sghmc": "1e-5"}.get(method, "0.01")
    return cli.main(["fit", "bnn", "--guide", method, "--data", "gap", "--epochs", str(epochs),
                     "--batch-size", "80", "--lr", lr, "--hidden", "8", "--out", str(out), "--no-progress",
                     "--predictive-samples", "10", *extra])


def _posterior(run_dir) -> dict:
    return torch.load(run_dir / "posterior.pt", weights_only=True)["guide"]


@pytest.mark.parametrize("method, chains", [("sgld", "2"), ("sghmc", "1"), ("tradi", "1")])
def test_cli_resumes_a_sampler_or_tracker_run_to_the_uninterrupted_result(tmp_path, method, chains):
    """The checkpoints hold each chain's draws so far (and SGHMC's momentum) or TRADI's tracker:
    a run stopped after 2 epochs and resumed to 4 keeps exactly the draws of a 4-epoch run."""
    extra = ("--chains", chains) if method != "tradi" else ()
    assert _sampler_run(tmp_path / "cut", method, 2, *extra) == 0
    assert _sampler_run(tmp_path / "cut", method, 4, *extra, "--resume") == 0
    assert _sampler_run(tmp_path / "whole", method, 4, *extra) == 0
    resumed, whole = _posterior(tmp_path / "cut"), _posterior(tmp_path / "whole")
    assert resumed.keys() == whole.keys()
    if method != "tradi":  # 4 draws per chain: the last step of every epoch, the burn-in epoch's too
        assert all(len(value) == 4 * int(chains) for value in resumed.values())
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-5, atol=1e-7)


def test_cli_resumes_nuts_from_its_finished_chains(tmp_path, monkeypatch):
    argv = ("--noise", "0.1", "--nuts-max-tree-depth", "3", "--nuts-samples", "10", "--nuts-warmup", "10",
            "--chains", "2")
    assert _sampler_run(tmp_path, "nuts", 1, *argv) == 0
    finished = _posterior(tmp_path)
    # stopped during the second chain: its draws and the posterior were never written
    (tmp_path / "nuts-chain1.pt").unlink(), (tmp_path / "posterior.pt").unlink()
    runs = []
    original = MCMC.run
    monkeypatch.setattr(MCMC, "run", lambda self, *a, **k: runs.append(1) or original(self, *a, **k))
    assert _sampler_run(tmp_path, "nuts", 1, *argv, "--resume") == 0
    assert len(runs) == 1  # only the unfinished chain ran again, with its own seed: the same draws
    for key, value in finished.items():
        torch.testing.assert_close(_posterior(tmp_path)[key], value)


def test_cli_evaluate_refuses_a_run_folder_without_a_posterior(tmp_path, capsys):
    assert _sampler_run(tmp_path, "map", 1) == 0
    (tmp_path / "posterior.pt").unlink()
    assert cli.main(["evaluate", str(tmp_path)]) == cli.EXIT_USAGE
    assert "posterior.pt" in capsys.readouterr().err


def test_cli_rejects_an_invalid_bnn_pair(capsys):
    assert cli.main(["fit", "bnn", "--guide", "iaf", "--data", "gap"]) == cli.EXIT_USAGE
    assert "valid guides for bnn" in capsys.readouterr().err


def test_cli_compares_bnn_guides_from_the_same_start(tmp_path):
    argv = ["compare", "bnn", "--guides", "map,meanfield,tradi", "--data", "gap", "--epochs", "3",
            "--batch-size", "80", "--lr", "0.01", "--hidden", "8", "--out", str(tmp_path), "--no-progress",
            "--predictive-samples", "20"]
    assert cli.main(argv) == 0
    table = (tmp_path / "compare.md").read_text()
    for guide in ("map", "meanfield", "tradi"):
        assert f"| {guide} |" in table
    rows = (tmp_path / "compare.csv").read_text().splitlines()
    assert rows[0].startswith("guide,rmse,nll") and len(rows) == 4
    # every guide ran in its own run folder: `evaluate` rescores it
    assert cli.main(["evaluate", str(tmp_path / "map"), "--predictive-samples", "20"]) == 0


def test_cli_compare_bnn_resumes_an_interrupted_comparison(tmp_path, capsys, monkeypatch):
    argv = ["compare", "bnn", "--guides", "map,sgld", "--data", "gap", "--epochs", "3", "--batch-size", "80",
            "--lr", "1e-4", "--hidden", "8", "--out", str(tmp_path), "--no-progress",
            "--predictive-samples", "10"]
    assert cli.main(argv) == 0
    finished = (tmp_path / "compare.csv").read_text()
    # stopped after SGLD's last epoch, before it was saved and scored
    (tmp_path / "sgld" / "posterior.pt").unlink(), (tmp_path / "sgld" / "metrics.json").unlink()
    assert cli.main(argv) == cli.EXIT_USAGE  # nothing is overwritten without --resume
    assert "--resume" in capsys.readouterr().err
    trained = []
    original = runs.fit_run
    monkeypatch.setattr(runs, "fit_run", lambda config, *a, **k: trained.append(config["guide"]) or original(
        config, *a, **k))
    assert cli.main(argv + ["--resume"]) == 0
    assert trained == ["sgld"]  # MAP was read back; SGLD continued from its checkpoint (its draws in it)
    assert _scores_of((tmp_path / "compare.csv").read_text()) == _scores_of(finished)


def _scores_of(csv_text: str) -> list[list[str]]:
    """guide, RMSE, NLL, posterior bytes and status of every row (not the times)."""
    rows = (line.split(",") for line in csv_text.splitlines())
    return [[cells[i] for i in (0, 1, 2, 5, 6)] for cells in rows]
