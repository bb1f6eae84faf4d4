"""Metrics with exact references for the analytic (Gaussian-mixture) model.

fd_exact: Frechet distance between the generated samples (their mean and covariance) and the true
    mixture, whose mean and covariance are known in closed form. The plug-in estimate is biased
    upward at small n, so the value is bootstrap bias-corrected and the interval is the basic
    bootstrap interval; both can dip below zero when the distance is within noise of none.
traj_err: per sample, the RMS over dimensions of the distance to the exact probability-flow ODE
    solution from the same x_T and condition (guided ODE when guidance != 1); the value is the
    mean over samples. References are cached per shard under <results_dir>/.cache/traj/.
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

LOWER_IS_BETTER = {"fd_exact": True, "traj_err": True}


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
