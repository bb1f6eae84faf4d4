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

Image models (`sampler.ems_data=<folder of reference images>`, compute_ems_images). The data x_0 are
the folder's images encoded to sampler states (samplers.reference: PIL bicubic resize to the model's
resolution, VAE posterior mean scaled as the pipeline does; pixels for pixel-space models); sample i is
image i mod (number of images), so `ems_samples` takes the first images, cycling when the folder holds
fewer (a cycled image gets its own z and v). A folder has no captions (the official Stable Diffusion
statistics pair COCO images with their captions), so the conditions are fixed and documented rather
than paired with the images: text models get samplebench's builtin prompt list (sample i: prompt
i mod 32), class models class i mod num_classes, unconditional models none. The statistics are of the
guided denoiser D_u + w (D_c - D_u) at the cell's guidance (samplers.base.guided_denoiser, the call the
sampler makes), so with w != 1 the condition/image mismatch is part of what is estimated; they describe
the sampler's field on reference-like states, not a per-prompt model.

Derivatives through the network. The x-directions (J_D v for l, J_D (dx/dlambda) for d eps/dlambda) are
exact forward-mode JVPs (torch.autograd.forward_ad dual tensors; torch.func.jvp cannot be used because
the model's sigma -> timestep map goes through numpy, which functorch's wrapped tensors refuse), with
scaled-dot-product attention forced to its math backend (the fused CPU/GPU kernels have no forward-AD
formula); the tangent is propagated in the network's dtype. The lambda-direction at fixed x cannot be
differentiated (the timestep is a numpy interpolation of log sigma, piecewise linear between training
levels), so d eps/dlambda = J_x eps (dx/dlambda) + (eps(x, lambda + h) - eps(x, lambda - h)) / (2 h)
with h = LAMBDA_STEP = 1e-2: truncation h^2/6 |d^3 eps/dlambda^3| ~ 2e-5 |d^3 eps/dlambda^3|, float32
rounding of the network ~ 6e-8 |eps| / (2 h) ~ 3e-6 |eps| (both far below the Monte Carlo error of a
few hundred samples). Cost per grid point and sample: two JVPs (about two evaluations each) and three
evaluations, times two under guidance. The cache key adds the folder's content and the encoder
(reference_digest), the hash of every weight of the pipeline (network, VAE, text encoders) and its
dtype, and the condition scheme.
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
LAMBDA_STEP = 1e-2  # central difference in lambda at fixed x (image models, module docstring)
IMAGE_BATCH = 16  # samples per network call for image models (x2 under guidance)
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


def ems_key(
    model: Any,
    guidance: float,
    grid_size: int,
    n_samples: int,
    seed: int = 0,
    data: str | Path | None = None,
) -> str:
    """Cache key: model identity + noise schedule + guidance + grid + sample count + seed + version, and for
    image models the reference data's identity (data_identity)."""
    payload: dict[str, Any] = {
        "model": model_identity(model),
        "guidance": float(guidance),
        "grid": int(grid_size),
        "samples": int(n_samples),
        "seed": int(seed),
        "version": VERSION,
    }
    if data is not None:  # absent for the analytic model, so its keys are unchanged
        payload["data"] = data_identity(model, data)
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return f"{model.name}-w{float(guidance):g}-g{grid_size}-n{n_samples}-{digest}"


def ems_path(cache_root: Path, key: str) -> Path:
    return Path(cache_root) / "ems" / f"{key}.npz"


def ems_lambdas(model: Any, grid_size: int) -> np.ndarray:
    """The EMS grid: grid_size points uniform in lambda over the model's training range."""
    noise = model.noise_schedule
    return np.linspace(-math.log(noise.sigma_max), -math.log(noise.sigma_min), int(grid_size))


def supports_ems(model: Any, data: str | Path | None = None) -> bool:
    """Statistics can be computed for models with exact data draws (the analytic model), and for image
    models given a reference image folder."""
    if data is not None:
        return hasattr(model, "encode_images")
    return hasattr(model, "sample_data")


def _weights_identity(model: Any) -> str:
    """sha256 of every weight of the pipeline (its torch modules' state dicts, raw bytes) and the
    network's dtype, once per loaded model."""
    known = getattr(model, "_ems_weights_sha", None)
    if known is None:
        h = hashlib.sha256(str(getattr(model, "model_dtype", "")).encode())
        pipe = getattr(model, "pipe", None)
        components = getattr(pipe, "components", None) or {}
        for name in sorted(components):
            module = components[name]
            if isinstance(module, torch.nn.Module):
                for key, tensor in sorted(module.state_dict().items()):
                    h.update(f"{name}.{key}".encode())
                    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                    h.update(raw.numpy().tobytes())
        known = h.hexdigest()[:16]
        model._ems_weights_sha = known
    return known


def condition_scheme(model: Any) -> str:
    """The conditions image-model statistics use (module docstring)."""
    kind = getattr(model, "condition_kind", "none")
    if kind == "text":
        from samplebench.prompts import load_prompts

        prompts = load_prompts({"kind": "builtin"}, 1)
        return f"builtin-prompts:{prompts.fingerprint()}:negative={getattr(model, 'negative_prompt', None)}"
    if kind == "class":
        return f"classes-cycled:{model.num_classes}"
    return str(kind)


def data_identity(model: Any, folder: str | Path) -> dict[str, str]:
    """The reference images (content and encoder), the pipeline's weights and the condition scheme."""
    from samplebench.samplers.reference import reference_digest, reference_paths

    paths = reference_paths(folder, "sampler.ems_data", at_least=2)
    return {
        "images": reference_digest(model, paths),
        "weights": _weights_identity(model),
        "conditions": condition_scheme(model),
    }


def _image_conditions(model: Any, indices: list[int]) -> Any:
    """Sample i's condition: builtin prompt i (cycled), class i mod num_classes, or None."""
    kind = getattr(model, "condition_kind", "none")
    if kind == "text":
        from samplebench.prompts import load_prompts

        texts, _ = load_prompts({"kind": "builtin"}, len(indices)).for_indices(indices)
        return model.encode(texts)
    if kind == "class":
        return model.encode([i % model.num_classes for i in indices])
    return None


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
    _check_sizes(grid_size, n_samples)
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
    return _finish(lams, l_est, f, f_d, ff, ffd)


def _check_sizes(grid_size: int, n_samples: int) -> None:
    if grid_size < 2 * SMOOTH_WINDOW + 2 or n_samples < 2:
        raise UsageError(
            f"sampler.ems_grid={grid_size} must be >= {2 * SMOOTH_WINDOW + 2} and ems_samples >= 2"
        )


def _finish(lams, l_est, f, f_d, ff, ffd) -> EMS:
    """s = Cov(f, f_d) / Var(f) (0 where Var(f) vanishes), b = E f_d - s E f, from grid means."""
    var = ff - f * f
    cov = ffd - f * f_d
    tiny = 1e-12 * np.maximum(ff, 1e-300)
    s = np.where(var > tiny, cov / np.where(var > tiny, var, 1.0), 0.0)
    b = f_d - s * f
    return EMS(lams, l_est, s, b)


def _forward_jvp(den, x: torch.Tensor, sigma: torch.Tensor, tangent: torch.Tensor):
    """(D(x), J_D tangent) by forward-mode AD, attention on its math backend (module docstring)."""
    import torch.autograd.forward_ad as fwad
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with fwad.dual_level(), sdpa_kernel(SDPBackend.MATH):
        out = den(fwad.make_dual(x, tangent), sigma)
        primal, jd = fwad.unpack_dual(out)
    if jd is None:  # an output that does not depend on x
        jd = torch.zeros_like(primal)
    return primal, jd


def reference_data(model: Any, folder: str | Path, n_samples: int) -> torch.Tensor:
    """x_0 of the image-model statistics: sample i is reference image i mod (number of images), float64
    on the model's device."""
    from samplebench.samplers.reference import encoded_reference, reference_paths

    paths = reference_paths(folder, "sampler.ems_data", at_least=2)
    images = encoded_reference(model, paths)
    return images[[i % len(paths) for i in range(n_samples)]].to(model.device)


def _draws(x0: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z (standard normal) and v (Rademacher) shaped like x0, on the CPU generator of seed + 1."""
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64).to(x0.device)
    v = (torch.randint(0, 2, x0.shape, generator=g) * 2 - 1).to(torch.float64).to(x0.device)
    return z, v


def compute_ems_images(
    model: Any,
    folder: str | Path,
    guidance: float = 1.0,
    grid_size: int = DEFAULT_GRID,
    n_samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    batch_size: int = IMAGE_BATCH,
) -> EMS:
    """Estimate l, s, b of an image model's guided denoiser from the reference images in `folder` (module
    docstring: conditions, forward-mode JVPs in x, a central difference in lambda)."""
    from samplebench.samplers.base import guided_denoiser

    if not supports_ems(model, folder):
        raise UsageError(missing_message(model, guidance))
    _check_sizes(grid_size, n_samples)
    lams = ems_lambdas(model, grid_size)
    x0 = reference_data(model, folder, n_samples)
    z, v = _draws(x0, seed)
    batches = [list(range(b, min(n_samples, b + batch_size))) for b in range(0, n_samples, batch_size)]
    dens = [guided_denoiser(model, _image_conditions(model, idx), float(guidance)) for idx in batches]

    def level(lam: float) -> tuple[torch.Tensor, float]:
        sigma = math.exp(-lam)
        return torch.tensor(sigma, dtype=torch.float64, device=x0.device), sigma

    l_est = np.zeros((grid_size, *x0.shape[1:]))
    with torch.no_grad():
        for j, lam in enumerate(lams):
            sig_t, sigma = level(lam)
            acc = torch.zeros(x0.shape[1:], dtype=torch.float64, device=x0.device)
            for idx, den in zip(batches, dens, strict=True):
                x = x0[idx] + sigma * z[idx]
                _, jd = _forward_jvp(den, x, sig_t, v[idx])
                acc += (v[idx] * (v[idx] - jd.double())).sum(0)  # sigma (J_eps v) v = (v - J_D v) v
            l_est[j] = (acc / n_samples).cpu().numpy()
    l_d = _smoothed_derivative(l_est, lams)

    sums = {k: np.zeros_like(l_est) for k in ("f", "f_d", "ff", "ffd")}
    with torch.no_grad():
        for j, lam in enumerate(lams):
            sig_t, sigma = level(lam)
            (sig_p, s_p), (sig_m, s_m) = level(lam + LAMBDA_STEP), level(lam - LAMBDA_STEP)
            l_j = torch.as_tensor(l_est[j], device=x0.device)
            ld_j = torch.as_tensor(l_d[j], device=x0.device)
            for idx, den in zip(batches, dens, strict=True):
                x = x0[idx] + sigma * z[idx]
                eps = (x - den(x, sig_t).double()) / sigma
                dx = -sigma * eps  # dx/dlambda along the probability-flow ODE
                _, jd = _forward_jvp(den, x, sig_t, dx)
                eps_x = (dx - jd.double()) / sigma  # J_x eps (dx/dlambda)
                eps_p = (x - den(x, sig_p).double()) / s_p
                eps_m = (x - den(x, sig_m).double()) / s_m
                eps_d = eps_x + (eps_p - eps_m) / (2 * LAMBDA_STEP)
                f = sigma * eps - l_j * x
                f_d = sigma * ((l_j - 1) * eps + eps_d) - ld_j * x
                for name, a in (("f", f), ("f_d", f_d), ("ff", f * f), ("ffd", f * f_d)):
                    sums[name][j] += a.sum(0).cpu().numpy()
    f, f_d, ff, ffd = (sums[k] / n_samples for k in ("f", "f_d", "ff", "ffd"))
    return _finish(lams, l_est, f, f_d, ff, ffd)


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


def missing_message(model: Any, guidance: float | None = None) -> str:
    """The one-line refusal for an image model without sampler.ems_data (`model` or its name)."""
    name = getattr(model, "name", model)
    at = "" if guidance is None else f" at guidance {guidance:g}"
    return (
        f"sampler=dpm_solver_v3 on model={name} needs empirical model statistics{at}, computed from a "
        "reference image set: set sampler.ems_data=<folder of reference images>"
    )


def load_or_compute(
    model: Any,
    guidance: float,
    grid_size: int,
    n_samples: int,
    cache_root: Path | None,
    compute: bool = True,
    seed: int = 0,
    data: str | Path | None = None,
) -> tuple[EMS, float]:
    """The statistics from this process's memo, the cache file, or (compute=True) computed now (the
    analytic model's exact draws, or an image model's reference folder `data`) and saved; with the
    seconds spent computing (0 when found)."""
    key = ems_key(model, guidance, grid_size, n_samples, seed, data)
    if key in _MEMO:
        return _MEMO[key], 0.0
    path = ems_path(cache_root, key) if cache_root is not None else None
    if path is not None:
        arrays = cache.load(path, ("lambdas", "l", "s", "b"))
        if arrays is not None:
            _MEMO[key] = EMS(arrays["lambdas"], arrays["l"], arrays["s"], arrays["b"])
            return _MEMO[key], 0.0
    if not supports_ems(model, data):
        raise UsageError(missing_message(model, guidance))
    if not compute:
        more = f" sampler.ems_data={data}" if data is not None else ""
        raise UsageError(
            f"no empirical model statistics for sampler=dpm_solver_v3 (model={model.name}, guidance="
            f"{guidance:g}, ems_grid={grid_size}, ems_samples={n_samples}) at {path}; make them with: "
            f"samplebench ems model={model.name} guidance={guidance:g} sampler.ems_grid={grid_size} "
            f"sampler.ems_samples={n_samples}{more}"
        )
    start = time.perf_counter()
    if data is not None:
        ems = compute_ems_images(model, data, guidance, grid_size, n_samples, seed)
    else:
        ems = compute_ems(model, guidance, grid_size, n_samples, seed)
    seconds = time.perf_counter() - start
    if path is not None:
        # the one-time cost is kept with the statistics (it is in no cell's timing or NFE)
        cache.save(path, lambdas=ems.lambdas, l=ems.l, s=ems.s, b=ems.b, compute_seconds=np.asarray(seconds))
    _MEMO[key] = ems
    return ems, seconds
