"""The analytic model against independent computations."""

import numpy as np
import pytest
import scipy.linalg
import torch

from samplebench.metrics.analytic import fd_exact, frechet_distance
from samplebench.models.gmm import GaussianMixtureModel, MixtureSpec


def _reference_log_density(model, y, sigma):
    """log p_sigma(y) built with torch.distributions (independent of the model's own algebra)."""
    cov = model.covariances() + sigma**2 * torch.eye(model.spec.dim, dtype=torch.float64)
    comps = torch.distributions.MultivariateNormal(model.means, covariance_matrix=cov)
    mix = torch.distributions.Categorical(probs=model.weights)
    return torch.distributions.MixtureSameFamily(mix, comps).log_prob(y)


@pytest.mark.parametrize("sigma", [0.03, 0.3, 1.0, 5.0, 14.6])
def test_exact_eps_equals_autograd_score(gmm, sigma):
    # Reference: eps = -sigma * grad_y log p_sigma(y), by autograd through torch.distributions.
    g = torch.Generator().manual_seed(1)
    y = (torch.randn(64, gmm.spec.dim, generator=g, dtype=torch.float64) * (3 + sigma)).requires_grad_(True)
    logp = _reference_log_density(gmm, y, sigma).sum()
    (score,) = torch.autograd.grad(logp, y)
    s = torch.full((64,), sigma, dtype=torch.float64)
    eps = gmm.eps_ve(y.detach(), s, torch.full((64,), -1))
    torch.testing.assert_close(eps, -sigma * score, rtol=1e-9, atol=1e-10)
    assert torch.allclose(gmm.log_density(y.detach(), s), _reference_log_density(gmm, y.detach(), sigma))


def test_conditional_eps_is_the_component_score(gmm):
    sigma = 0.7
    y = torch.randn(8, gmm.spec.dim, dtype=torch.float64)
    labels = torch.arange(8) % gmm.spec.components
    cov = gmm.covariances()[labels] + sigma**2 * torch.eye(gmm.spec.dim, dtype=torch.float64)
    expected = sigma * torch.linalg.solve(cov, (y - gmm.means[labels])[..., None])[..., 0]
    eps = gmm.eps_ve(y, torch.full((8,), sigma, dtype=torch.float64), labels)
    torch.testing.assert_close(eps, expected)


def test_predict_takes_vp_input(gmm):
    # predict() gets x_t = y / sqrt(1 + sigma^2); the answer must equal eps_ve at y.
    sigma = torch.tensor(2.0, dtype=torch.float64)
    y = torch.randn(5, gmm.spec.dim, dtype=torch.float64)
    labels = torch.full((5,), -1)
    out = gmm.predict(y / (1 + sigma**2).sqrt(), torch.tensor(500), sigma.expand(5), labels)
    torch.testing.assert_close(out, gmm.eps_ve(y, sigma.expand(5), labels))


def test_moments_match_monte_carlo(gmm):
    x, _ = gmm.sample_data(200_000, seed=3)
    mean, cov = gmm.moments()
    assert torch.allclose(x.mean(0), mean, atol=0.05)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.25)


def test_frechet_distance_equals_scipy_sqrtm():
    # Reference: the textbook formula with scipy.linalg.sqrtm.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    c1, c2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    expected = ((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-9)


def test_fd_exact_of_true_samples_is_within_noise_of_zero(gmm):
    x, _ = gmm.sample_data(4000, seed=5)
    value, lo, hi = fd_exact(x.numpy(), gmm, reps=200)
    assert lo <= 0.0 <= hi  # the bias-correcting interval covers the true distance, zero
    assert lo <= value <= hi
    plug_in = frechet_distance(
        x.numpy().mean(0), np.cov(x.numpy(), rowvar=False), *(t.numpy() for t in gmm.moments())
    )
    assert abs(value) < plug_in  # the correction removes most of the plug-in's upward bias
    # A mixture whose means moved by 0.3 is clearly told apart at the same sample size.
    shifted = x.numpy() + 0.3
    v2, lo2, _ = fd_exact(shifted, gmm, reps=200)
    assert lo2 > hi and v2 > 5 * value


def test_bad_beta_schedule_is_a_usage_error():
    from samplebench.errors import UsageError

    with pytest.raises(UsageError, match="beta_schedule"):
        GaussianMixtureModel(MixtureSpec(beta_schedule="cosine"), torch.device("cpu"))


def test_fd_exact_interval_covers_the_true_distance_at_about_the_nominal_rate(gmm):
    # Simulation: draws from the mixture shifted by delta have true Frechet distance |delta|^2
    # (covariances unchanged). The 95% basic-bootstrap interval should cover it about 95% of the time.
    delta = np.full(gmm.spec.dim, 0.1)
    true_fd = float((delta**2).sum())
    covered = 0
    trials = 60
    for k in range(trials):
        x, _ = gmm.sample_data(600, seed=100 + k)
        _, lo, hi = fd_exact(x.numpy() + delta, gmm, reps=200, seed=k)
        covered += lo <= true_fd <= hi
    assert 0.85 * trials <= covered <= trials, covered


def test_reference_solve_in_row_blocks_equals_one_block(gmm, monkeypatch):
    # The exact-ODE reference evaluates eps a block of rows at a time (bounded temporaries). Each
    # sample's arithmetic is the same either way (bit-identical on the development machine); a BLAS
    # that blocks by batch size could change the right-hand side by round-off, which moves the adaptive
    # solve by at most about its tolerance (1e-10 here).
    from samplebench.metrics import reference
    from samplebench.seeds import initial_noise

    idx = list(range(13))
    x_T = initial_noise(0, idx, gmm.sample_shape, torch.float64, gmm.device)
    labels = gmm.conditions(idx, 0)
    one = reference.solve_with_floor(gmm, x_T, labels, 2.0)
    monkeypatch.setattr(reference, "RHS_ROWS", 4)  # blocks of 4, 4, 4, 1
    blocks = reference.solve_with_floor(gmm, x_T, labels, 2.0)
    for a, b in zip(one, blocks, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
