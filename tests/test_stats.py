"""Bootstrap helpers against direct computations and simulations."""

import numpy as np
import pytest

from samplebench.metrics import stats
from samplebench.metrics.analytic import frechet_distance


def test_fid_bootstrap_low_rank_path_equals_direct_fid_of_each_resample():
    # Reference: the textbook Frechet distance of each resample, computed in full d x d.
    rng = np.random.default_rng(0)
    d, n = 40, 25  # n < d takes the n x n path
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3
    a = rng.normal(size=(d, d))
    ref_sigma, ref_mu = a @ a.T / d + np.eye(d) * 0.1, rng.normal(size=d)
    fast = stats.fid_bootstrap(x, ref_mu, ref_sigma, reps=5, seed=3)
    draws = np.random.default_rng(3)
    for value in fast:
        idx = draws.integers(0, n, n)
        direct = frechet_distance(x[idx].mean(0), np.cov(x[idx], rowvar=False), ref_mu, ref_sigma)
        assert value == pytest.approx(direct, rel=1e-8)


def test_kid_bootstrap_is_centred_on_the_unbiased_mmd():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(60, 8)), rng.normal(0.5, 1, size=(70, 8))
    kxx, kyy, kxy = ((x @ x.T / 8 + 1) ** 3, (y @ y.T / 8 + 1) ** 3, (x @ y.T / 8 + 1) ** 3)
    mmd = (kxx.sum() - np.trace(kxx)) / (60 * 59) + (kyy.sum() - np.trace(kyy)) / (70 * 69) - 2 * kxy.mean()
    boot = stats.kid_bootstrap(x, y, reps=300)
    lo, hi = stats.percentile_interval(boot)
    assert lo < mmd < hi and mmd > 0


def test_mean_interval_covers_the_true_mean_at_about_the_nominal_rate():
    # Simulation: exponential data (skewed), true mean 2.
    rng = np.random.default_rng(2)
    covered = sum(
        lo <= 2.0 <= hi
        for _, lo, hi in (stats.mean_ci(rng.exponential(2.0, 200), 500, seed=k) for k in range(200))
    )
    assert 0.90 * 200 <= covered <= 0.985 * 200, covered


def test_paired_difference_detects_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(4)
    base = rng.normal(size=300)
    shifted = base + 0.1 + rng.normal(scale=0.05, size=300)  # paired: tiny noise, clear shift
    r = stats.paired_difference(shifted, base)
    assert r["p_value"] < 0.01 and r["ci_low"] > 0
    null = stats.paired_difference(base + rng.normal(scale=0.05, size=300), base)
    assert null["p_value"] > 0.01 and null["ci_low"] < 0 < null["ci_high"]


@pytest.mark.parametrize("n,splits", [(100, 5), (103, 10)])
def test_isc_bootstrap_is_torch_fidelitys_inception_score_of_each_resample(n, splits):
    """Reference: torch-fidelity's own Inception Score, torch_fidelity.metric_isc.isc_features_to_metric
    (0.4), on the rows of each resample (drawn again from the same seeded rng) in resample order
    (shuffle=False). Confident, varied predictions, so the KL term is far from 0 (IS ~ 3, not 1); 103
    rows in 10 splits checks torch-fidelity's split boundaries."""
    import torch
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    rng = np.random.default_rng(7)
    classes = 10
    logits = rng.normal(size=(n, classes)) * 2.0 + 4.0 * np.eye(classes)[rng.integers(0, classes, n)]
    boot = stats.isc_bootstrap(logits, splits=splits, reps=5, seed=11)
    draws = np.random.default_rng(11)
    for value in boot:
        rows = torch.from_numpy(logits[draws.integers(0, n, n)])
        ref = isc_features_to_metric(rows, splits=splits, shuffle=False)[KEY_METRIC_ISC_MEAN]
        # Both in float64. Ours takes log(p + 1e-12) where torch-fidelity takes log_softmax: each KL term
        # p log(1 + 1e-12 / p) moves by at most 1e-12, the KL by at most classes * 1e-12, the score by
        # that relative; float64 round-off is ~1e-15. A KL off by 1% moves the score by ~1% (KL ~ 1.1).
        assert value == pytest.approx(ref, rel=1e-9, abs=0)
        assert ref > 2.0


def test_low_rank_fid_equals_the_full_computation():
    # Reference: the textbook d x d formula with scipy's sqrtm (via frechet_distance's eigen form).
    rng = np.random.default_rng(5)
    d, n = 50, 20
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 2, d)
    a = rng.normal(size=(d, d))
    ref_sigma, ref_mu = a @ a.T / d, rng.normal(size=d)
    direct = frechet_distance(x.mean(0), np.cov(x, rowvar=False), ref_mu, ref_sigma)
    # The d x d form takes square roots of d - n round-off eigenvalues near zero (about 1e-8 each), so
    # the two agree to about 1e-6 relative; the low-rank form never sees those.
    assert stats.fid_low_rank(x, ref_mu, ref_sigma) == pytest.approx(direct, rel=1e-5)


def test_prc_indicators_average_to_torch_fidelity():
    # Reference: torch-fidelity's own precision/recall on the same features.
    import torch
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    rng = np.random.default_rng(6)
    gen, ref = rng.normal(size=(80, 16)), rng.normal(0.3, 1.2, size=(90, 16))
    inside_ref, inside_gen = stats.prc_indicators(gen, ref, 3)
    p, r = calculate_precision_recall_full(
        torch.from_numpy(gen.astype(np.float32)), torch.from_numpy(ref.astype(np.float32)), 3
    )
    assert inside_ref.mean() == pytest.approx(p) and inside_gen.mean() == pytest.approx(r)
    assert 0 < p < 1 and 0 < r < 1
