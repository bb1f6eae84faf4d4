"""Metrics with exact references for the analytic (Gaussian-mixture) model.

fd_exact: Frechet distance between the generated samples (their mean and covariance) and the true
    mixture, whose mean and covariance are known in closed form. The plug-in estimate is biased
    upward at small n, so the value is bootstrap bias-corrected and the interval is the basic
    bootstrap interval; both can dip below zero when the distance is within noise of none.
traj_err: per sample, the RMS over dimensions of the distance to the exact probability-flow ODE
    solution from the same x_T and condition (guided ODE when guidance != 1); the value is the
    mean over samples. References are cached per shard under <results_dir>/.cache/traj/.
mmd_exact: squared maximum mean discrepancy (Gaussian kernel) between the generated samples and exact
    samples drawn with the same seeds: the exact ODE's endpoints from the same x_T and condition (the
    traj_err reference), which are draws of the exact model's own distribution. Because the two sets
    are coupled sample by sample, the first-order sampling noise of the estimate cancels: its standard
    error is a fixed fraction of its value (about 1/sqrt(n)) however close the sampler is, where an
    estimate against independent exact samples (or fd_exact) has noise that swamps small differences.
    Unbiased (the U-statistic over pairs i != j, in which x_i and y_j are independent), per sample
    (psi_i below; their mean is the estimate), so samplers compare with paired tests on the same seeds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from samplebench import cache
from samplebench.metrics.reference import solve_with_floor
from samplebench.metrics.stats import CHUNK_ELEMENTS, bootstrap_moments, mean_ci
from samplebench.models.gmm import GaussianMixtureModel
from samplebench.seeds import initial_noise

LOWER_IS_BETTER = {"fd_exact": True, "traj_err": True, "mmd_exact": True}
# Rows of the kernel matrices of mmd_exact computed at a time (4 blocks of ROWS x n float64).
MMD_ROWS = 1024


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C2^1/2 C1 C2^1/2)^1/2), via a symmetric eigen-decomposition."""
    w2, v2 = np.linalg.eigh(cov2)
    root2 = (v2 * np.sqrt(np.clip(w2, 0, None))) @ v2.T
    inner = np.linalg.eigvalsh(root2 @ cov1 @ root2)
    return float(
        ((mu1 - mu2) ** 2).sum()
        + np.trace(cov1)
        + np.trace(cov2)
        - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
    )


def fd_resampled(
    samples: np.ndarray,
    model: GaussianMixtureModel,
    reps: int,
    seed: int = 0,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[float, np.ndarray]:
    """The plug-in Frechet distance T of the samples' mean and covariance to the mixture's, and T* of
    `reps` bootstrap resamples of the samples (rows weighted by draw counts, a bounded group at a time:
    memory does not grow with reps x n)."""
    mean, cov = (t.cpu().numpy() for t in model.moments())
    w2, v2 = np.linalg.eigh(cov)
    root = (v2 * np.sqrt(np.clip(w2, 0, None))) @ v2.T

    def distances(mu: np.ndarray, c1: np.ndarray) -> np.ndarray:  # mu: (k, d), c1: (k, d, d)
        inner = np.linalg.eigvalsh(root @ c1 @ root)
        trace_sqrt = np.sqrt(np.clip(inner, 0, None)).sum(axis=1)
        return ((mu - mean) ** 2).sum(1) + np.trace(c1, axis1=1, axis2=2) + np.trace(cov) - 2 * trace_sqrt

    x = np.asarray(samples)  # float32 or float64; every sum below is taken in float64
    value = float(
        distances(x.mean(0, dtype=np.float64)[None], np.cov(x, rowvar=False, dtype=np.float64)[None])[0]
    )
    parts = [distances(mu, c1) for mu, c1 in bootstrap_moments(x, reps, seed, chunk_elements)]
    return value, np.concatenate(parts) if parts else np.empty(0)


def fd_exact(
    samples: np.ndarray,
    model: GaussianMixtureModel,
    reps: int,
    seed: int = 0,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[float, float, float]:
    """Bias-corrected Frechet distance to the true mixture, with a basic bootstrap interval.

    The plug-in distance is biased upward (by about tr(C)/n and more); the bootstrap estimates that
    bias, so the value is 2 T - mean(T*) and the interval [2 T - q97.5, 2 T - q2.5], both about the
    true distance (they may dip below zero when the distance is within noise of none).
    """
    value, boot = fd_resampled(samples, model, reps, seed, chunk_elements)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return float(2 * value - boot.mean()), float(2 * value - hi), float(2 * value - lo)


def _cache_key(
    model: GaussianMixtureModel,
    model_cfg: dict,
    seed: int,
    guidance: float,
    indices: np.ndarray,
    rtol: float,
    sigma_start: float | None = None,
    sigma_floor: float | None = None,
) -> str:
    ident = {
        "model": model_cfg,
        **({} if sigma_start is None else {"sigma_start": float(sigma_start)}),
        **({} if sigma_floor is None else {"sigma_floor": float(sigma_floor)}),
        "seed": seed,
        "guidance": guidance,
        "rtol": rtol,
        "indices": hashlib.sha256(indices.tobytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def reference_solution(
    model: GaussianMixtureModel,
    model_cfg: dict,
    seed: int,
    guidance: float,
    indices: np.ndarray,
    labels: np.ndarray,
    cache_dir: Path,
    rtol: float,
    sigma_start: float | None = None,
    sigma_floor: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ODE endpoints for these samples (from the cell's first level) and the floor points (for a
    flow model, at the cell's last positive level sigma_floor: reference.solve_flow_with_floor);
    computed once, cached with a checksum (a damaged or altered cache file is named and recomputed)."""
    key = _cache_key(model, model_cfg, seed, guidance, indices, rtol, sigma_start, sigma_floor)
    path = cache_dir / f"{key}.npz"
    found = cache.load(path, ("reference", "floor"))
    if found is not None:
        return found["reference"], found["floor"]
    x_T = initial_noise(seed, indices.tolist(), model.sample_shape, torch.float64, model.device)
    ref, floor = solve_with_floor(
        model,
        x_T,
        torch.as_tensor(labels),
        guidance,
        rtol=rtol,
        atol=rtol,
        sigma_start=sigma_start,
        sigma_floor=sigma_floor,
    )
    cache.save(path, reference=ref.numpy(), floor=floor.numpy())
    return ref.numpy(), floor.numpy()


def per_sample_traj_err(samples: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.sqrt(((samples - reference) ** 2).reshape(len(samples), -1).mean(axis=1))


def traj_err(errors: np.ndarray, reps: int) -> tuple[float, float, float]:
    return mean_ci(errors, reps)


def mmd_bandwidth(model: GaussianMixtureModel) -> float:
    """mmd_exact's default kernel width h, with h^2 = 2 sum_k pi_k tr(S_k): the mean squared distance
    between two draws of one component. The kernel then resolves structure inside a component (a
    sample pushed off its component's shape is seen), not only which component a sample lands in."""
    return float(np.sqrt(2 * (model.weights * model.eigenvalues.sum(1)).sum().item()))


def _gauss_kernel(a: np.ndarray, b: np.ndarray, h: float) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.exp(-np.clip(sq, 0, None) / (2 * h * h))


def coupled_mmd(
    samples: np.ndarray, exact: np.ndarray, bandwidth: float, rows: int = MMD_ROWS
) -> tuple[float, np.ndarray]:
    """Unbiased MMD^2 between the rows of `samples` (x_i) and of `exact` (y_i, drawn with the same seeds),
    and per-sample values psi_i whose mean is that estimate.

    MMD^2_u = 1/(n(n-1)) sum_{i != j} H_ij with H_ij = k(x_i,x_j) + k(y_i,y_j) - k(x_i,y_j) - k(y_i,x_j)
    (Gretton et al. 2012, JMLR 13, eq. 3, with the cross term over i != j only, so that each term pairs
    independent draws even though x_i and y_i are coupled). psi_i = 2 m_i - MMD^2_u, m_i the mean of
    row i of H off the diagonal, is the estimate plus its influence function at sample i (Hoeffding's
    projection of a U-statistic of order 2): the percentile bootstrap of their mean gives the
    estimate's interval, and differences of psi between samplers on the same seeds give paired tests.
    Sums are in float64, a block of rows at a time."""
    x = np.asarray(samples, np.float64).reshape(len(samples), -1)
    y = np.asarray(exact, np.float64).reshape(len(exact), -1)
    n = len(x)
    if n < 2:
        raise ValueError("mmd_exact needs at least two samples")
    row_sums = np.empty(n)
    for i in range(0, n, rows):
        xi, yi = x[i : i + rows], y[i : i + rows]
        h = (
            _gauss_kernel(xi, x, bandwidth)
            + _gauss_kernel(yi, y, bandwidth)
            - _gauss_kernel(xi, y, bandwidth)
            - _gauss_kernel(yi, x, bandwidth)
        )
        diag = h[np.arange(len(xi)), np.arange(i, i + len(xi))]
        row_sums[i : i + rows] = h.sum(1) - diag
    m = row_sums / (n - 1)
    value = float(m.mean())
    return value, 2 * m - value
