"""Probabilistic PCA is the exact oracle of the latent-variable family.

The model is held fixed at a known W with strongly correlated columns, so the exact
posterior p(z | x) = N(M^-1 W^T (x - mu), sigma^2 M^-1) has a clear off-diagonal
covariance. A linear encoder can represent it exactly; the guides are then scored
against the closed form on held-out points.
"""

import copy

import pytest
import torch

from bayeszoo.guides.amortized import AmortizedNormal, AmortizedRank1Normal
from bayeszoo.inference.data import load_dataset
from bayeszoo.inference.evaluate import importance_sampling
from bayeszoo.inference.svi import fit
from bayeszoo.models.ppca import PPCA

X_DIM, Z_DIM = 6, 2


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(1)
    model = PPCA(X_DIM, Z_DIM, sigma=1.0)
    with torch.no_grad():
        w = torch.randn(X_DIM)
        model.W.copy_(torch.stack([w, w + 0.5 * torch.randn(X_DIM)], dim=1))
        model.mu.copy_(torch.randn(X_DIM))
    model.requires_grad_(False)
    train = model.marginal().sample((1000,))
    held_out = model.marginal().sample((200,))
    return model, train, held_out


def _fit_guide(guide_class, model, train):
    torch.manual_seed(0)
    guide = guide_class(model, hidden=())  # linear encoder: exact for pPCA
    fit(model, guide, {"x": train}, epochs=300, batch_size=250, lr=0.02, lr_decay=0.99,
        num_particles=16, progress=False)
    return guide


@pytest.fixture(scope="module")
def diagonal(problem):
    model, train, _ = problem
    return _fit_guide(AmortizedNormal, model, train)


@pytest.fixture(scope="module")
def rank1(problem):
    model, train, _ = problem
    return _fit_guide(AmortizedRank1Normal, model, train)


def test_posterior_is_correlated(problem):
    """Guard: the oracle must be a case a diagonal covariance cannot represent."""
    model, _, held_out = problem
    cov = model.posterior(held_out[:1]).covariance_matrix[0]
    correlation = cov[0, 1] / (cov[0, 0] * cov[1, 1]).sqrt()
    assert correlation.abs() > 0.4


def test_exact_posterior_matches_bayes_rule(problem):
    """p(z | x) from the closed form equals p(x | z) p(z) / p(x) on a grid point."""
    model, _, held_out = problem
    x, z = held_out[:3], torch.randn(3, Z_DIM)
    log_joint = (torch.distributions.Normal(0, 1).log_prob(z).sum(-1)
                 + torch.distributions.Normal(z @ model.W.T + model.mu, model.sigma)
                 .log_prob(x).sum(-1))
    bayes = log_joint - model.log_marginal(x)
    torch.testing.assert_close(model.posterior(x).log_prob(z), bayes, atol=1e-4, rtol=1e-4)


def test_diagonal_guide_mean_matches_exact_posterior(problem, diagonal):
    """KL(q || p) with a diagonal Gaussian q recovers the exact posterior mean and the
    reciprocal of the diagonal of the posterior precision as its variances."""
    model, _, held_out = problem
    exact = model.posterior(held_out)
    q = diagonal.site_distributions(held_out)["z"]
    scale = exact.covariance_matrix[0].diagonal().sqrt()
    assert ((q.mean - exact.mean).abs() / scale).max() < 0.15  # within 0.15 posterior sd
    optimal_variance = 1.0 / torch.linalg.inv(exact.covariance_matrix[0]).diagonal()
    torch.testing.assert_close(q.base_dist.scale.pow(2).mean(0), optimal_variance, rtol=0.1, atol=0)


def test_rank1_guide_covariance_matches_exact_posterior(problem, rank1, diagonal):
    model, _, held_out = problem
    exact = model.posterior(held_out)
    q = rank1.site_distributions(held_out)["z"]
    norm = exact.covariance_matrix.norm(dim=(-2, -1))
    error = (q.covariance_matrix - exact.covariance_matrix).norm(dim=(-2, -1)) / norm
    assert error.median() < 0.1 and error.max() < 0.35
    scale = exact.covariance_matrix[0].diagonal().sqrt()
    assert ((q.mean - exact.mean).abs() / scale).max() < 0.15
    # The same criterion rejects the diagonal guide: the test can tell the two apart.
    q_diag = diagonal.site_distributions(held_out)["z"]
    diag_cov = torch.diag_embed(q_diag.base_dist.scale.pow(2))
    diag_error = (diag_cov - exact.covariance_matrix).norm(dim=(-2, -1)) / norm
    assert diag_error.median() > 0.2


def test_importance_sampling_within_a_tenth_of_a_nat(problem, rank1):
    model, _, held_out = problem
    estimate = importance_sampling(model, rank1, {"x": held_out}, num_samples=1000)
    error = (estimate["log_likelihood"] - model.log_marginal(held_out)).abs()
    assert error.max() < 0.1
    # The ELBO is a bound: below the exact value on average, and the IS estimate is tighter.
    exact = model.log_marginal(held_out)
    assert estimate["elbo"].mean() < exact.mean()
    assert (exact - estimate["log_likelihood"]).mean() < (exact - estimate["elbo"]).mean()


class ExactPosteriorGuide(torch.nn.Module):
    """q(z | x) = p(z | x): every importance weight equals p(x), so IS is exact for any K."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, **unused):
        import pyro

        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.model.posterior(x))


def test_importance_sampling_is_exact_under_the_true_posterior(problem):
    model, _, held_out = problem
    estimate = importance_sampling(model, ExactPosteriorGuide(model), {"x": held_out},
                                   num_samples=5, chunk_size=2)
    exact = model.log_marginal(held_out)
    torch.testing.assert_close(estimate["log_likelihood"], exact, atol=1e-3, rtol=0)
    torch.testing.assert_close(estimate["elbo"], exact, atol=1e-3, rtol=0)


def test_maximum_likelihood_solution_beats_perturbations(problem):
    model, train, _ = problem
    ml = PPCA(X_DIM, Z_DIM).set_maximum_likelihood(train)
    best = ml.log_marginal(train).mean()
    for _ in range(5):
        perturbed = PPCA(X_DIM, Z_DIM)
        with torch.no_grad():
            perturbed.W.copy_(ml.W + 0.05 * torch.randn_like(ml.W))
            perturbed.mu.copy_(ml.mu)
            perturbed.log_sigma.copy_(ml.log_sigma + 0.05 * torch.randn(()))
        assert perturbed.log_marginal(train).mean() < best
    assert best >= model.log_marginal(train).mean()  # the MLE is at least as good as the truth


# --- Precision of the exact evaluators on digits-sized data (d = 64) ------------------------------
#
# log_marginal works through the k x k matrix M = W^T W + sigma^2 I (Woodbury, determinant lemma).
# Measured on digits at k = 10, maximum over the 250 test images of |float32 - float64| / |float64|:
# sigma = 0.01: 2.8e-7 (2.2e-3 nats), where the d x d covariance route below gives 1.3e-4 (1.5 nats);
# sigma = 1: 6.3e-8. The tolerances sit a few times above the measured errors.
DIGITS_Z_DIM = 10
FLOAT32_RTOL = {0.01: 1e-6, 1.0: 3e-7}


def full_covariance_log_marginal(model, x):
    """The d x d route log N(x; mu, W W^T + sigma^2 I) that log_marginal replaced: the reference."""
    eye = torch.eye(model.x_dim, dtype=model.W.dtype)
    covariance = model.W @ model.W.T + model.sigma**2 * eye
    return torch.distributions.MultivariateNormal(model.mu, covariance).log_prob(x)


def inverse_posterior(model, x):
    """p(z | x) from an explicit inverse of M, as posterior computed it before: the reference."""
    m = model.W.T @ model.W + model.sigma**2 * torch.eye(model.z_dim, dtype=model.W.dtype)
    mean = torch.linalg.solve(m, model.W.T @ (x - model.mu).T).T
    return mean, model.sigma**2 * torch.linalg.inv(m)


@pytest.fixture(scope="module")
def digits():
    """Maximum-likelihood pPCA on digits, in float64, and the test images in float64."""
    data = load_dataset("digits")
    fitted = PPCA(data.x_dim, DIGITS_Z_DIM).double().set_maximum_likelihood(data.train["x"].double())
    fitted.requires_grad_(False)

    def at_sigma(sigma):
        model = copy.deepcopy(fitted)
        model.log_sigma.fill_(torch.tensor(sigma, dtype=torch.float64).log())
        return model

    return at_sigma, data.test["x"].double()


@pytest.mark.parametrize("sigma", [0.01, 1.0])
def test_log_marginal_is_as_exact_in_float32_as_float64(digits, sigma):
    at_sigma, x = digits
    model64 = at_sigma(sigma)
    model32 = PPCA(model64.x_dim, DIGITS_Z_DIM)
    model32.load_state_dict({name: value.float() for name, value in model64.state_dict().items()})
    exact = model64.log_marginal(x)
    float32 = model32.log_marginal(x.float()).double()
    torch.testing.assert_close(float32, exact, rtol=FLOAT32_RTOL[sigma], atol=0)
    if sigma == 0.01:
        # The tolerance is tight enough to reject the d x d covariance route: the test can fail.
        old = full_covariance_log_marginal(model32, x.float()).double()
        assert ((old - exact).abs() / exact.abs()).max() > 10 * FLOAT32_RTOL[sigma]


@pytest.mark.parametrize("sigma", [0.01, 1.0])
def test_k_by_k_evaluators_equal_the_d_by_d_formulas_in_float64(digits, sigma):
    at_sigma, x = digits
    model = at_sigma(sigma)
    torch.testing.assert_close(model.log_marginal(x), full_covariance_log_marginal(model, x),
                               rtol=1e-10, atol=0)
    posterior = model.posterior(x)
    mean, covariance = inverse_posterior(model, x)
    torch.testing.assert_close(posterior.mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(posterior.covariance_matrix[0], covariance, rtol=1e-10, atol=1e-16)
    # Any batch shape, as MultivariateNormal.log_prob allowed: one image, and images in a grid.
    torch.testing.assert_close(model.log_marginal(x[0]), model.log_marginal(x)[0])
    torch.testing.assert_close(model.log_marginal(x.reshape(2, -1, model.x_dim)),
                               model.log_marginal(x).reshape(2, -1))
