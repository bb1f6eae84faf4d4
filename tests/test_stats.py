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


# The resampling bootstraps (means, paired differences, fd_exact) no longer materialise the resampled
# rows: each resample's draw counts weight the rows, a group of resamples at a time, and each group's
# arrays are bounded in elements. References below draw the resamples the way the former code did,
# rng.integers(0, n, (reps, n)), and compute the statistic of the materialised rows directly.
EPS = np.finfo(np.float64).eps


def _direct_draws(n, reps, seed):
    return np.random.default_rng(seed).integers(0, n, (reps, n))


def _sum_bound(n, scale):
    """Round-off bound of a mean of n float64 terms of size <= scale, for two summation orders: each
    is within (n - 1) eps sum|x_i| / n <= n eps scale of the exact mean, so they differ by <= twice that."""
    return 2 * n * EPS * scale


@pytest.mark.parametrize("n", [1, 2, 37, 200])
@pytest.mark.parametrize("chunk", [1, 100, 10**9])
def test_resampled_means_equal_the_materialised_bootstrap(n, chunk):
    values = np.random.default_rng(7).normal(3.0, 2.0, n)
    reps = 250  # not a multiple of any chunk's resample count
    direct = values[_direct_draws(n, reps, seed=11)].mean(axis=1)
    counted = stats.bootstrap_means(values, reps, seed=11, chunk_elements=chunk)
    np.testing.assert_allclose(counted, direct, rtol=0, atol=_sum_bound(n, np.abs(values).max()))


def test_mean_ci_and_paired_difference_equal_the_materialised_bootstrap():
    rng = np.random.default_rng(8)
    a, b = rng.exponential(2.0, 301), rng.exponential(2.1, 301)
    bound = _sum_bound(301, max(np.abs(a).max(), np.abs(b).max()) * 2)
    # A quantile interpolates two order statistics, so moving every mean by <= bound moves it by <= bound.
    means = a[_direct_draws(301, 1000, seed=0)].mean(axis=1)
    value, lo, hi = stats.mean_ci(a, 1000, seed=0, chunk_elements=4096)
    np.testing.assert_allclose([value, lo, hi], [a.mean(), *np.quantile(means, [0.025, 0.975])], atol=bound)
    diff = a - b
    means = diff[_direct_draws(301, 2000, seed=3)].mean(axis=1)
    r = stats.paired_difference(a, b, 2000, seed=3, chunk_elements=4096)
    np.testing.assert_allclose(
        [r["diff"], r["ci_low"], r["ci_high"]], [diff.mean(), *np.quantile(means, [0.025, 0.975])], atol=bound
    )
    assert r["p_value"] == min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean()))


@pytest.mark.parametrize("row_block", [10, 4096])  # rows in blocks of 10, 10, 10, 7; or one block
@pytest.mark.parametrize("chunk", [1, 5 * 37, 10**9])
def test_resampled_moments_equal_the_materialised_rows(chunk, row_block, monkeypatch):
    # Reference: mean and np.cov of each resample's rows.
    monkeypatch.setattr(stats, "ROW_BLOCK", row_block)
    rng = np.random.default_rng(9)
    n, d, reps = 37, 3, 23
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 5.0  # off-centre: the shift must not cost digits
    idx = _direct_draws(n, reps, seed=4)
    means, covs = (
        np.concatenate(parts) for parts in zip(*stats.bootstrap_moments(x, reps, 4, chunk), strict=True)
    )
    assert means.shape == (reps, d) and covs.shape == (reps, d, d)
    scale = np.abs(x - x.mean(0)).max()
    for r in range(reps):
        np.testing.assert_allclose(means[r], x[idx[r]].mean(0), rtol=0, atol=_sum_bound(n, np.abs(x).max()))
        # Sums of n products of centred coordinates (<= scale^2 each), over n - 1, plus the outer product of
        # the resample's offset from the sample mean: a few times the bound of one such sum.
        np.testing.assert_allclose(
            covs[r], np.cov(x[idx[r]], rowvar=False), rtol=0, atol=4 * _sum_bound(n, scale**2)
        )


FD_ABS = 1e-10  # round-off of one of these Frechet distances, with margin (derivation below)


def _fd_bootstrap_direct(x, gmm, reps, seed):
    """Former fd_exact: the Frechet distance of every materialised resample, and of the sample."""
    mean, cov = (t.numpy() for t in gmm.moments())
    idx = _direct_draws(len(x), reps, seed)
    boot = np.array([frechet_distance(x[i].mean(0), np.cov(x[i], rowvar=False), mean, cov) for i in idx])
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), mean, cov), boot


def test_fd_exact_equals_the_materialised_bootstrap(gmm):
    from samplebench.metrics.analytic import fd_exact, fd_resampled

    x = gmm.sample_data(301, seed=2)[0].numpy() * 1.1  # a distance well away from zero
    t, boot = _fd_bootstrap_direct(x, gmm, 250, seed=6)
    t_counted, boot_counted = fd_resampled(x, gmm, 250, seed=6, chunk_elements=301 * 16 * 7)
    # Round-off bound: covariance entries agree to about 2 n eps ~ 7e-14 relative (n = 301, test
    # above); the distance is tr C1 + tr C - 2 tr sqrt(...) with tr C1 ~ 150 here, so it moves by
    # <= ~3e-11 absolute (FD_ABS), <= ~1e-11 relative to these distances (>= 2.9). rel=1e-10 covers that
    # (measured on one machine: 4e-13) and is far below any change of draws (one resample moves T* by
    # ~1e-1). fd_exact's outputs, 2 T - (mean or quantile of T*), may lie near zero: compared absolutely.
    assert t_counted == pytest.approx(t, rel=1e-10)
    np.testing.assert_allclose(boot_counted, boot, rtol=1e-10)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    expected = (2 * t - boot.mean(), 2 * t - hi, 2 * t - lo)
    assert fd_exact(x, gmm, 250, seed=6) == pytest.approx(expected, rel=0, abs=3 * FD_ABS)


def test_chunk_size_does_not_change_the_bootstrap(gmm):
    # The draws are made one resample at a time in a fixed order, so how resamples are grouped changes
    # only the order of float sums inside a group's matrix products: round-off, bounded as above.
    from samplebench.metrics.analytic import fd_exact

    x = gmm.sample_data(200, seed=3)[0].numpy()
    results = [fd_exact(x, gmm, 120, seed=1, chunk_elements=c) for c in (1, 200 * 16 * 13, 10**9)]
    for r in results[1:]:
        assert r == pytest.approx(results[0], rel=0, abs=3 * FD_ABS)
    values = x[:, 0]
    cis = [stats.mean_ci(values, 500, seed=2, chunk_elements=c) for c in (1, 200 * 9, 10**9)]
    for ci in cis[1:]:
        np.testing.assert_allclose(ci, cis[0], rtol=0, atol=_sum_bound(200, np.abs(values).max()))


def test_fd_exact_of_float32_samples_sums_in_float64(gmm):
    # The metrics stage passes the stored float32 samples without a float64 copy: every sum must still
    # be taken in float64, so the result equals that of the converted (exactly representable) samples.
    from samplebench.metrics.analytic import fd_exact

    x32 = gmm.sample_data(300, seed=4)[0].numpy().astype(np.float32)
    assert fd_exact(x32, gmm, 100, seed=2) == pytest.approx(
        fd_exact(x32.astype(np.float64), gmm, 100, seed=2), rel=0, abs=3 * FD_ABS
    )
