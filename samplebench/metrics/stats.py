"""Confidence intervals: percentile bootstrap over samples, with a fixed seed so reruns agree."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

# Resampling bootstraps (means, paired differences, fd_exact's moments) never hold the resampled rows:
# each resample is the count of draws of every row (the multinomial bootstrap), and resamples are taken
# a group at a time, k of them with k * n <= CHUNK_ELEMENTS (32 MiB of counts; k >= 1), so memory does
# not grow with reps x n. Each resample's draws are rng.integers(0, n, n), made one resample after
# another, so the group size changes no draw; they are the draws of rng.integers(0, n, (reps, n)).
CHUNK_ELEMENTS = 1 << 22
# Rows of per-row features (a row's coordinates and their products) built at a time for moments.
ROW_BLOCK = 4096


def resample_counts(
    rng: np.random.Generator, n: int, reps: int, chunk_elements: int = CHUNK_ELEMENTS
) -> Iterator[np.ndarray]:
    """(k, n) float64 arrays, one per group of k consecutive resamples: how often each of n rows is
    drawn (with replacement, n draws) in each resample; k * n <= chunk_elements, k >= 1."""
    per = max(1, chunk_elements // max(1, n))
    for start in range(0, reps, per):
        counts = np.empty((min(per, reps - start), n))
        for row in counts:
            row[:] = np.bincount(rng.integers(0, n, n), minlength=n)
        yield counts


def bootstrap_means(
    values: np.ndarray, reps: int, seed: int = 0, chunk_elements: int = CHUNK_ELEMENTS
) -> np.ndarray:
    """Means of `reps` resamples (with replacement) of the 1-d `values`, from draw counts."""
    x = np.asarray(values, np.float64)
    n = len(x)
    rng = np.random.default_rng(seed)
    parts = [counts @ x / n for counts in resample_counts(rng, n, reps, chunk_elements)]
    return np.concatenate(parts) if parts else np.empty(0)


def bootstrap_moments(
    x: np.ndarray, reps: int, seed: int = 0, chunk_elements: int = CHUNK_ELEMENTS
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Mean (k, d) and covariance (k, d, d; n - 1 denominator, as np.cov) of the rows of each of `reps`
    resamples of the (n, d) array x, a group of k resamples at a time.

    Both come from one matrix product per block of rows: draw counts (k, rows) times the rows' features
    (rows, d + d(d+1)/2), each row's coordinates and the upper triangle of their outer product. The
    coordinates are taken about the sample's own mean: the resamples' means lie near it, so subtracting
    their outer products from the second moments loses no digits. Work is in float64 whatever x's
    dtype, a block of rows at a time (no float64 or centred copy of x is made)."""
    x = np.asarray(x)
    n, d = x.shape
    centre = x.mean(0, dtype=np.float64)
    iu, ju = np.triu_indices(d)  # row-major upper triangle, the order the features below are written in
    features = np.empty((min(n, ROW_BLOCK), d + len(iu)))
    rng = np.random.default_rng(seed)
    for counts in resample_counts(rng, n, reps, chunk_elements):
        sums = np.zeros((d + len(iu), len(counts)))
        for b in range(0, n, ROW_BLOCK):
            f = features[: min(ROW_BLOCK, n - b)]
            rows = np.subtract(x[b : b + ROW_BLOCK], centre, out=f[:, :d], dtype=np.float64)
            col = d
            for i in range(d):  # products x_i x_j, j >= i
                np.multiply(rows[:, i : i + 1], rows[:, i:], out=f[:, col : col + d - i])
                col += d - i
            sums += f.T @ counts[:, b : b + ROW_BLOCK].T
        offset = sums[:d].T / n  # (k, d): each resample's mean minus the sample's
        second = np.empty((len(counts), d, d))  # sum over a resample's draws of xc xc^T
        second[:, iu, ju] = second[:, ju, iu] = sums[d:].T
        cov = (second - n * offset[:, :, None] * offset[:, None, :]) / (n - 1)
        yield centre + offset, cov


def bootstrap_ci(
    data: np.ndarray,
    statistic: Callable[[np.ndarray], float],
    reps: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    basic: bool = False,
) -> tuple[float, float]:
    """Bootstrap interval of `statistic` over resamples (with replacement) of the rows of data.

    `basic=True` gives the reverse-percentile ("basic") interval [2 T - q_hi, 2 T - q_lo], which
    corrects for a statistic's bias to first order: Frechet distances are biased upward, and a
    plain percentile interval of one would sit entirely above the true value.
    """
    rng = np.random.default_rng(seed)
    n = len(data)
    stats = np.array([statistic(data[rng.integers(0, n, n)]) for _ in range(reps)])
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    if basic:
        t = statistic(data)
        return float(2 * t - hi), float(2 * t - lo)
    return float(lo), float(hi)


def mean_ci(
    values: np.ndarray, reps: int = 1000, seed: int = 0, chunk_elements: int = CHUNK_ELEMENTS
) -> tuple[float, float, float]:
    """Mean with a percentile-bootstrap interval (means of resamples, from draw counts in bounded groups)."""
    means = bootstrap_means(values, reps, seed, chunk_elements)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(np.mean(values)), float(lo), float(hi)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def fid_bootstrap(
    gen: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, reps: int, seed: int = 0
) -> np.ndarray:
    """FID of `reps` resamples (with replacement) of the generated features against fixed reference
    statistics. With n generated rows and d features, tr sqrt(S_r^1/2 S_g S_r^1/2) needs only the
    eigenvalues of the n x n matrix P G[I, I] P / (n - 1), G = X S_r X^T, so each resample costs an
    n x n eigen-decomposition instead of a d x d one when n < d."""
    x = np.asarray(gen, dtype=np.float64)
    n, d = x.shape
    rng = np.random.default_rng(seed)
    tr_ref = float(np.trace(ref_sigma))
    out = np.empty(reps)
    if n <= d:
        gram = x @ ref_sigma @ x.T
        sq = (x**2).sum(1)
        for r in range(reps):
            idx = rng.integers(0, n, n)
            g = gram[np.ix_(idx, idx)]
            g = g - g.mean(0, keepdims=True) - g.mean(1, keepdims=True) + g.mean()
            inner = np.linalg.eigvalsh(g / (n - 1))
            mu = x[idx].mean(0)
            tr_gen = (sq[idx].sum() - n * (mu**2).sum()) / (n - 1)
            out[r] = ((mu - ref_mu) ** 2).sum() + tr_gen + tr_ref - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
        return out
    w, v = np.linalg.eigh(ref_sigma)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    for r in range(reps):
        idx = rng.integers(0, n, n)
        mu = x[idx].mean(0)
        cov = np.cov(x[idx], rowvar=False)
        inner = np.linalg.eigvalsh(root @ cov @ root)
        out[r] = (
            ((mu - ref_mu) ** 2).sum() + np.trace(cov) + tr_ref - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
        )
    return out


def fid_low_rank(gen: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
    """FID of n < d generated features in O(n^2 d): the non-zero eigenvalues of S_g^1/2 S_r S_g^1/2 are
    those of X_c S_r X_c^T / (n - 1) (X_c: centred features). Equal to the d x d computation up to
    round-off, without its d^3 eigen-decomposition (seconds per cell for d = 2048 on a CPU)."""
    x = np.asarray(gen, dtype=np.float64)
    n = len(x)
    mu = x.mean(0)
    xc = x - mu
    inner = np.linalg.eigvalsh(xc @ ref_sigma @ xc.T / (n - 1))
    tr_gen = float((xc**2).sum() / (n - 1))
    return float(
        ((mu - ref_mu) ** 2).sum() + tr_gen + np.trace(ref_sigma) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
    )


def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel (Binkowski et al. 2018; torch-fidelity's defaults): (x.y / d + 1)^3."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def kid_bootstrap(gen: np.ndarray, ref: np.ndarray, reps: int, seed: int = 0) -> np.ndarray:
    """Unbiased MMD^2 with KID's kernel over resamples of the generated rows (reference fixed), from
    kernel matrices computed once. Each value uses the whole set, not KID's random subsets."""
    x, y = np.asarray(gen, np.float64), np.asarray(ref, np.float64)
    n, m = len(x), len(y)
    kxx, kxy, kyy = _poly_kernel(x, x), _poly_kernel(x, y), _poly_kernel(y, y)
    term_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    rng = np.random.default_rng(seed)
    out = np.empty(reps)
    for r in range(reps):
        idx = rng.integers(0, n, n)
        sub = kxx[np.ix_(idx, idx)]
        # Off-diagonal pairs of distinct draws; a row drawn twice pairs with itself off the diagonal,
        # as in any bootstrap of a U-statistic.
        term_x = (sub.sum() - np.trace(sub)) / (n * (n - 1))
        out[r] = term_x + term_y - 2 * kxy[idx].mean()
    return out


def isc_bootstrap(logits: np.ndarray, splits: int, reps: int, seed: int = 0) -> np.ndarray:
    """Inception Score (mean over splits, as torch-fidelity computes it) over resampled images.

    Split k holds rows [k n // splits, (k + 1) n // splits) of the resample, torch-fidelity's
    boundaries (np.array_split puts the spare rows first instead, another partition when splits does
    not divide n)."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    rng = np.random.default_rng(seed)
    n = len(p)
    out = np.empty(reps)
    for r in range(reps):
        q = p[rng.integers(0, n, n)]
        scores = []
        for part in (q[k * n // splits : (k + 1) * n // splits] for k in range(splits)):
            marginal = part.mean(0, keepdims=True)
            kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(1).mean()
            scores.append(np.exp(kl))
        out[r] = np.mean(scores)
    return out


def paired_difference(
    a: np.ndarray, b: np.ndarray, reps: int = 2000, seed: int = 0, chunk_elements: int = CHUNK_ELEMENTS
) -> dict[str, float]:
    """Mean of a - b over the same images, a 95% bootstrap interval and a two-sided bootstrap p-value
    (twice the share of resampled means on the far side of zero)."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    means = bootstrap_means(diff, reps, seed, chunk_elements)
    lo, hi = percentile_interval(means)
    p = 2 * min((means <= 0).mean(), (means >= 0).mean())
    return {"diff": float(diff.mean()), "ci_low": lo, "ci_high": hi, "p_value": float(min(1.0, p))}


def prc_indicators(gen: np.ndarray, ref: np.ndarray, neighborhood: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample membership behind improved precision and recall (Kynkaanniemi et al. 2019), computed as
    torch-fidelity's metric_prc does (Euclidean k-NN balls, k+1-th distance including the point itself):
    (generated sample inside the reference manifold, reference sample inside the generated manifold).
    Their means are torch-fidelity's precision and recall; resampling them gives the intervals, with the
    manifolds held fixed."""
    import torch

    g, r = torch.from_numpy(np.asarray(gen, np.float32)), torch.from_numpy(np.asarray(ref, np.float32))
    radius_g = torch.cdist(g, g).kthvalue(neighborhood + 1).values
    radius_r = torch.cdist(r, r).kthvalue(neighborhood + 1).values
    precision = (torch.cdist(g, r) <= radius_r).any(dim=1).numpy()
    recall = (torch.cdist(r, g) <= radius_g).any(dim=1).numpy()
    return precision.astype(np.float64), recall.astype(np.float64)
