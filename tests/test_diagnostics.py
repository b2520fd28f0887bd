"""Chain diagnostics (R-hat, ESS over every scalar) and the warnings a run gives from them."""

import math
import warnings

import arviz as az
import numpy as np
import pytest
import torch

from bayeszoo.inference import diagnostics
from bayeszoo.inference.runs import diagnostic_warnings


def _draws(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(2, 50, 3, generator=generator)
    stuck = torch.randn(2, 50, generator=generator) + torch.tensor([[0.0], [3.0]])  # chains apart
    return {"mixing": mixing, "stuck": stuck, "constant": torch.ones(2, 50, 2)}


@pytest.mark.parametrize("order", [["mixing", "stuck", "constant"], ["constant", "stuck", "mixing"]])
def test_extremes_are_over_every_defined_scalar_in_any_order(order):
    draws = _draws()
    data = diagnostics.inference_data({name: draws[name] for name in order})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a constant site's 0 / 0 stays inside
        rhat, ess = diagnostics.max_rhat(data), diagnostics.min_ess(data)
    # the stuck site (chains 3 sd apart) decides both, whichever site comes first
    stuck = az.from_dict(posterior={"stuck": draws["stuck"].numpy()})
    assert rhat == pytest.approx(float(az.rhat(stuck)["stuck"])) and rhat > 1.5
    assert ess == pytest.approx(float(az.ess(stuck, method="bulk")["stuck"])) and ess < 20


def test_too_few_draws_give_no_rhat_and_a_warning():
    data = diagnostics.inference_data({"w": torch.randn(2, 3, 4)})  # three draws per chain
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        rhat, ess = diagnostics.max_rhat(data), diagnostics.min_ess(data)
    assert math.isnan(rhat) and math.isnan(ess)
    (warning,) = diagnostic_warnings({"chains": {"count": 2, "max_rhat": rhat, "min_ess": ess}})
    assert warning.startswith("R-hat cannot be computed from these 2 chains")


@pytest.mark.parametrize(
    "metrics, starts",
    [
        ({"chains": {"count": 4, "max_rhat": 1.005, "min_ess": 1200.0}}, []),
        ({"chains": {"count": 4, "max_rhat": 1.02, "min_ess": 1200.0}}, ["R-hat is 1.020"]),
        ({"chains": {"count": 4, "max_rhat": 1.005, "min_ess": 399.0}}, ["the smallest effective"]),
        ({"chains": {"count": 2, "max_rhat": 2.39, "min_ess": 4.0}}, ["R-hat is 2.390", "the smallest"]),
        ({"test": {"khat_mean": 0.69}}, []),
        ({"test": {"khat_mean": 0.71}}, ["the mean PSIS k-hat is 0.71"]),
        ({"test": {"khat_mean": float("nan")}}, []),
    ],
)
def test_diagnostic_warnings_name_each_threshold_crossed(metrics, starts):
    found = diagnostic_warnings(metrics)
    assert len(found) == len(starts)
    assert all(sentence.startswith(start) for sentence, start in zip(found, starts, strict=True))


def test_inference_data_keeps_chain_and_draw_axes():
    data = diagnostics.inference_data({"w": torch.arange(24.0).reshape(2, 3, 4)})
    assert data.posterior["w"].shape == (2, 3, 4)
    np.testing.assert_array_equal(data.posterior["w"].values[1, 2], np.arange(20.0, 24.0))
