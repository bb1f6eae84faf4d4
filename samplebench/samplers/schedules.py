"""Noise-level grids for the native samplers, kept apart from the solvers (as in k-diffusion)."""

from __future__ import annotations

import numpy as np
import torch

from samplebench.errors import UsageError

SIGMA_SCHEDULES = ("karras", "trailing", "linspace")


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """EDM's time steps (Karras et al. 2022, eq. 5): n levels from sigma_max to sigma_min."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_grid(train_sigmas: torch.Tensor, steps: int, kind: str, rho: float = 7.0) -> torch.Tensor:
    """`steps` decreasing noise levels on the model's training range, then a final 0."""
    n_train = len(train_sigmas)
    if kind == "karras":
        levels = karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), steps, rho)
    elif kind == "trailing":  # diffusers' trailing spacing: starts at the last training timestep
        t = np.round(np.arange(n_train, 0, -n_train / steps)).astype(np.int64) - 1
        levels = train_sigmas[torch.as_tensor(t)]
    elif kind == "linspace":
        t = np.linspace(0, n_train - 1, steps)[::-1].copy()
        levels = sigma_at(train_sigmas, torch.as_tensor(t))
    else:
        raise UsageError(f"sampler.schedule={kind} is unknown; choose one of {', '.join(SIGMA_SCHEDULES)}")
    return torch.cat([levels.double(), levels.new_zeros(1, dtype=torch.float64)])


def sigma_to_t(train_sigmas: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Fractional training timestep of a noise level, linear in log sigma (k-diffusion's convention)."""
    log_sigmas = train_sigmas.double().log().numpy()
    s = np.log(np.clip(sigma.double().numpy(), np.exp(log_sigmas[0]), np.exp(log_sigmas[-1])))
    return torch.as_tensor(np.interp(s, log_sigmas, np.arange(len(log_sigmas))))


def sigma_at(train_sigmas: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Noise level at a fractional timestep, linear in log sigma (the inverse of sigma_to_t)."""
    log_sigmas = train_sigmas.double().log().numpy()
    return torch.as_tensor(np.exp(np.interp(t.double().numpy(), np.arange(len(log_sigmas)), log_sigmas)))
