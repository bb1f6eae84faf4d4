"""Empirical model statistics (EMS) for DPM-Solver-v3: estimate l, s, b on a logSNR grid, cache them.

Estimator (Zheng et al. 2023, arXiv:2310.13268, Sec. 3.2 and Appendix C.1.1; the official EMS script
compute_EMS_scoresde.py: compute_l, compute_l_d, compute_f, compute_sb), in our scale x = x_0 + sigma n
(x = x_vp / alpha, lambda = -log sigma, see dpm_solver_v3):

- l = E[sigma (J_eps v) * v] with Rademacher v (Hutchinson's estimate of the diagonal of the expected
  Jacobian sigma d eps / dx = I - dD/dx), by a forward-mode JVP of the (guided) denoiser in x;
- l_d = dl/dlambda by centred finite differences on the grid, smoothed over a window of 5 points on
  each side (compute_l_d);
- f = sigma eps - l x and f_d = df/dlambda along the probability-flow ODE,
  f_d = sigma ((l - 1) eps + d eps/dlambda) - l_d x, with d eps/dlambda a JVP of eps(x, lambda) along the
  ODE's tangent (dx/dlambda, 1) = (-sigma eps, 1) (get_noise_and_total_derivative);
- s = Cov(f, f_d) / Var(f), b = E f_d - s E f, element-wise (compute_sb).

The samples are real data pushed through q(x_sigma | x_0): x = x_0 + sigma z. For the analytic model
(model.sample_data) the data and their component labels are exact draws, and the labels are the
conditions the (guided) denoiser is evaluated with, so the statistics are of the denoiser the sampler
uses (with guidance w != 1, of D_u + w (D_c - D_u)). One difference from the official script: the same
x_0, z and v are used at every grid point (common random numbers), so l is a smooth function of lambda
for a fixed sample set and its finite differences carry little Monte Carlo noise; the official script
draws z and v afresh per grid point. Elements where Var(f) vanishes (f deterministic) get s = 0.

Image models would need a reference image set encoded to latents; that is not built yet, and asking
for their statistics is a one-line error naming what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samplebench import cache
from samplebench.errors import UsageError
from samplebench.samplers.dpm_solver_v3 import EMS

VERSION = 1  # bump when the estimator changes: old cache files are then not found
SMOOTH_WINDOW = 5  # compute_l_d's window
DEFAULT_GRID = 250  # the official Stable Diffusion statistics: 250 grid steps ("7.5_250_1024")
DEFAULT_SAMPLES = 256
_MEMO: dict[str, EMS] = {}


def model_identity(model: Any) -> dict[str, Any]:
    """What identifies a model's statistics: its name, its configuration and its training levels."""
    spec = getattr(model, "spec", None)
    ident: dict[str, Any] = {"name": model.name}
    if dataclasses.is_dataclass(spec):
        ident.update(dataclasses.asdict(spec))
    levels = model.noise_schedule.train_sigmas.double().cpu().numpy()
    ident["train_sigmas"] = hashlib.sha256(levels.tobytes()).hexdigest()[:16]
    return ident


def ems_key(model: Any, guidance: float, grid_size: int, n_samples: int, seed: int = 0) -> str:
    """Cache key: model identity + noise schedule + guidance + grid + sample count + seed + version."""
    payload = {
        "model": model_identity(model),
        "guidance": float(guidance),
        "grid": int(grid_size),
        "samples": int(n_samples),
        "seed": int(seed),
        "version": VERSION,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return f"{model.name}-w{float(guidance):g}-g{grid_size}-n{n_samples}-{digest}"


def ems_path(cache_root: Path, key: str) -> Path:
    return Path(cache_root) / "ems" / f"{key}.npz"


def ems_lambdas(model: Any, grid_size: int) -> np.ndarray:
    """The EMS grid: grid_size points uniform in lambda over the model's training range."""
    noise = model.noise_schedule
    return np.linspace(-math.log(noise.sigma_max), -math.log(noise.sigma_min), int(grid_size))


def supports_ems(model: Any) -> bool:
    """Statistics can be computed here for models with exact data draws (the analytic model)."""
    return hasattr(model, "sample_data")


def _guided(model: Any, labels: torch.Tensor, guidance: float):
    """D(x, lambda) of the guided model, differentiable in x and in lambda (per row)."""
    null = model.null_condition(labels)

    def denoise(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        sigma = torch.exp(-lam)
        d_c = model.denoise(x, sigma, labels)
        if guidance == 1.0:
            return d_c
        d_u = model.denoise(x, sigma, null)
        return d_u + guidance * (d_c - d_u)

    return denoise


def compute_ems(
    model: Any,
    guidance: float = 1.0,
    grid_size: int = DEFAULT_GRID,
    n_samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    chunk: int = 65536,
) -> EMS:
    """Estimate l, s, b of the (guided) analytic model on `grid_size` logSNR points from `n_samples` exact
    data draws (module docstring). Rows (grid point x sample) go through the model `chunk` at a time."""
    if not supports_ems(model):
        raise UsageError(missing_message(model, guidance))
    if grid_size < 2 * SMOOTH_WINDOW + 2 or n_samples < 2:
        raise UsageError(
            f"sampler.ems_grid={grid_size} must be >= {2 * SMOOTH_WINDOW + 2} and ems_samples >= 2"
        )
    from torch.func import jvp

    lams = ems_lambdas(model, grid_size)
    x0, labels = model.sample_data(n_samples, seed)
    x0 = x0.to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64).to(x0.device)
    v = (torch.randint(0, 2, x0.shape, generator=g) * 2 - 1).to(torch.float64).to(x0.device)
    per = max(1, chunk // n_samples)  # grid points per model call
    dims = (-1,) + (1,) * (x0.dim() - 1)

    def rows(j0: int, j1: int):
        lam = torch.as_tensor(lams[j0:j1], dtype=torch.float64, device=x0.device).repeat_interleave(n_samples)
        sigma = torch.exp(-lam).reshape(dims)
        k = j1 - j0
        x = x0.repeat(k, *([1] * (x0.dim() - 1))) + sigma * z.repeat(k, *([1] * (x0.dim() - 1)))
        return lam, sigma, x, labels.repeat(k)

    def grid_mean(a: torch.Tensor, k: int) -> np.ndarray:
        return a.reshape(k, n_samples, *a.shape[1:]).mean(1).cpu().numpy()

    l_parts = []
    for j0 in range(0, grid_size, per):
        j1 = min(grid_size, j0 + per)
        lam, sigma, x, lab = rows(j0, j1)
        den = _guided(model, lab, guidance)
        vv = v.repeat(j1 - j0, *([1] * (v.dim() - 1)))
        _, jd = jvp(lambda y, den=den, lam=lam: den(y, lam), (x,), (vv,))
        l_parts.append(grid_mean(vv * (vv - jd), j1 - j0))  # sigma (J_eps v) v = (v - J_D v) v
    l_est = np.concatenate(l_parts)
    l_d = _smoothed_derivative(l_est, lams)

    sums = {k: [] for k in ("f", "f_d", "ff", "ffd")}
    for j0 in range(0, grid_size, per):
        j1 = min(grid_size, j0 + per)
        lam, sigma, x, lab = rows(j0, j1)
        den = _guided(model, lab, guidance)

        def eps_fn(y: torch.Tensor, lm: torch.Tensor, den=den) -> torch.Tensor:
            return (y - den(y, lm)) / torch.exp(-lm).reshape(dims)

        eps = eps_fn(x, lam)
        _, eps_d = jvp(eps_fn, (x, lam), (-sigma * eps, torch.ones_like(lam)))
        k = j1 - j0
        l_t = torch.as_tensor(l_est[j0:j1], device=x.device).repeat_interleave(n_samples, dim=0)
        ld_t = torch.as_tensor(l_d[j0:j1], device=x.device).repeat_interleave(n_samples, dim=0)
        f = sigma * eps - l_t * x
        f_d = sigma * ((l_t - 1) * eps + eps_d) - ld_t * x
        for name, a in (("f", f), ("f_d", f_d), ("ff", f * f), ("ffd", f * f_d)):
            sums[name].append(grid_mean(a, k))
    f, f_d, ff, ffd = (np.concatenate(sums[k]) for k in ("f", "f_d", "ff", "ffd"))
    var = ff - f * f
    cov = ffd - f * f_d
    tiny = 1e-12 * np.maximum(ff, 1e-300)
    s = np.where(var > tiny, cov / np.where(var > tiny, var, 1.0), 0.0)
    b = f_d - s * f
    return EMS(lams, l_est, s, b)


def _smoothed_derivative(y: np.ndarray, lams: np.ndarray) -> np.ndarray:
    """dl/dlambda by centred differences (one-sided at the ends), then a moving average over
    SMOOTH_WINDOW points on each side, truncated at the ends (compute_l_d)."""
    d = np.gradient(y, lams, axis=0, edge_order=1)
    n, w = len(y), SMOOTH_WINDOW
    csum = np.concatenate([np.zeros_like(d[:1]), np.cumsum(d, axis=0)])
    lo = np.clip(np.arange(n) - w, 0, n)
    hi = np.clip(np.arange(n) + w + 1, 0, n)
    width = (hi - lo).reshape((-1,) + (1,) * (y.ndim - 1))
    return (csum[hi] - csum[lo]) / width


def missing_message(model: Any, guidance: float) -> str:
    return (
        f"sampler=dpm_solver_v3 needs empirical model statistics for model={model.name} at guidance="
        f"{guidance:g}, and computing them needs real data: samplebench has exact data only for model=gmm "
        "(an image model would need a reference image set encoded to latents, not built yet)"
    )


def load_or_compute(
    model: Any,
    guidance: float,
    grid_size: int,
    n_samples: int,
    cache_root: Path | None,
    compute: bool = True,
    seed: int = 0,
) -> tuple[EMS, float]:
    """The statistics from this process's memo, the cache file, or (compute=True, analytic model)
    computed now and saved; with the seconds spent computing (0 when found)."""
    key = ems_key(model, guidance, grid_size, n_samples, seed)
    if key in _MEMO:
        return _MEMO[key], 0.0
    path = ems_path(cache_root, key) if cache_root is not None else None
    if path is not None:
        arrays = cache.load(path, ("lambdas", "l", "s", "b"))
        if arrays is not None:
            _MEMO[key] = EMS(arrays["lambdas"], arrays["l"], arrays["s"], arrays["b"])
            return _MEMO[key], 0.0
    if not supports_ems(model):
        raise UsageError(missing_message(model, guidance))
    if not compute:
        raise UsageError(
            f"no empirical model statistics for sampler=dpm_solver_v3 (model={model.name}, guidance="
            f"{guidance:g}, ems_grid={grid_size}, ems_samples={n_samples}) at {path}; make them with: "
            f"samplebench ems model={model.name} guidance={guidance:g} sampler.ems_grid={grid_size} "
            f"sampler.ems_samples={n_samples}"
        )
    start = time.perf_counter()
    ems = compute_ems(model, guidance, grid_size, n_samples, seed)
    seconds = time.perf_counter() - start
    if path is not None:
        cache.save(path, lambdas=ems.lambdas, l=ems.l, s=ems.s, b=ems.b)
    _MEMO[key] = ems
    return ems, seconds
