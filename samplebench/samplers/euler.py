"""Samplers that step in sigma directly on x = x_0 + sigma n (EDM's ODE dx/dsigma = (x - D) / sigma).

Each takes (denoise, x at sigmas[0], sigmas ending at 0, generators, options) and returns x at 0.
Sources: Karras et al. 2022 (arXiv:2206.00364) Alg. 1 and NVlabs/edm `edm_sampler`; k-diffusion's
sampling.py (sample_euler, sample_euler_ancestral, sample_heun, sample_dpm_2, sample_lms); DDIM
(Song et al. 2021, arXiv:2010.02502, eq. 12).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from samplebench.samplers.base import Denoiser, noise_like


def _levels(sigmas: torch.Tensor) -> list[float]:
    return [float(s) for s in sigmas]


def _at(sigma: float) -> torch.Tensor:
    return torch.tensor(sigma, dtype=torch.float64)


def sample_euler(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generators=None) -> torch.Tensor:
    """Euler on dx/dsigma = d(x, sigma) = (x - D(x; sigma)) / sigma (EDM Alg. 1 without the corrector)."""
    s = _levels(sigmas)
    for i in range(len(s) - 1):
        d = (x - denoise(x, _at(s[i]))) / s[i]
        x = x + d * (s[i + 1] - s[i])
    return x


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up): a step to sigma_next split into a deterministic move to sigma_down and
    fresh noise of std sigma_up, sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion get_ancestral_step).
    sigma_up = eta sigma_next sqrt(1 - sigma_next^2 / sigma^2) is DDIM's sigma_t(eta) in this scale."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def sample_ddim(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generators=None, eta: float = 0.0
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) in the x = x_0 + sigma eps scale: predict x_0 and eps, then
    x' = x_0 + sqrt(sigma'^2 - s^2) eps + s z with s = eta sigma' sqrt(1 - sigma'^2 / sigma^2)
    (eq. 16's sigma_t(eta) divided by alpha_t'). eta = 0 is the deterministic DDIM (= Euler in sigma);
    eta = 1 is DDPM's ancestral sampler on the visited levels."""
    s = _levels(sigmas)
    for i in range(len(s) - 1):
        x0 = denoise(x, _at(s[i]))
        eps = (x - x0) / s[i]
        down, up = ancestral_step(s[i], s[i + 1], eta)
        x = x0 + down * eps
        if up > 0:
            x = x + up * noise_like(x, generators)
    return x


def sample_euler_ancestral(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generators=None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler ancestral (k-diffusion sample_euler_ancestral): an Euler step to sigma_down, then noise."""
    s = _levels(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(x, _at(s[i]))
        down, up = ancestral_step(s[i], s[i + 1], eta)
        x = x + (x - denoised) / s[i] * (down - s[i])
        if s[i + 1] > 0:
            x = x + noise_like(x, generators) * s_noise * up
    return x


def sample_heun(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generators=None) -> torch.Tensor:
    """EDM's deterministic sampler (Karras et al. 2022, Alg. 1, S_churn = 0): Euler, then the
    trapezoidal correction at sigma_{i+1}, except on the last step to 0 (2N - 1 evaluations). The next
    step evaluates the corrected state at sigma_{i+1} again: the one level the algorithm visits twice."""
    s = _levels(sigmas)
    for i in range(len(s) - 1):
        d = (x - denoise(x, _at(s[i]))) / s[i]
        dt = s[i + 1] - s[i]
        x_euler = x + d * dt
        if s[i + 1] == 0:
            x = x_euler
            continue
        d2 = (x_euler - denoise(x_euler, _at(s[i + 1]))) / s[i + 1]
        x = x + (d + d2) / 2 * dt
    return x


def sample_dpm2(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generators=None) -> torch.Tensor:
    """DPM2 (k-diffusion sample_dpm_2): the derivative at the log-sigma midpoint, which is DPM-Solver-2
    (noise prediction, r1 = 1/2) in this scale; an Euler step on the last step to 0 (2N - 1 evals)."""
    s = _levels(sigmas)
    for i in range(len(s) - 1):
        d = (x - denoise(x, _at(s[i]))) / s[i]
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - s[i])
            continue
        mid = math.exp(0.5 * (math.log(s[i]) + math.log(s[i + 1])))
        x_mid = x + d * (mid - s[i])
        d_mid = (x_mid - denoise(x_mid, _at(mid))) / mid
        x = x + d_mid * (s[i + 1] - s[i])
    return x


_GAUSS = np.polynomial.legendre.leggauss(8)  # exact for the polynomials of degree <= 15 below


def lms_coefficient(levels: list[float], i: int, j: int, order: int) -> float:
    """integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of sigma_{i-j} through
    sigma_i, ..., sigma_{i-order+1} (k-diffusion linear_multistep_coeff, which uses scipy quad)."""
    a, b = levels[i], levels[i + 1]
    nodes, weights = _GAUSS
    tau = 0.5 * (b - a) * nodes + 0.5 * (a + b)
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - levels[i - k]) / (levels[i - j] - levels[i - k])
    return float(0.5 * (b - a) * np.dot(weights, basis))


def sample_lms(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generators=None, order: int = 4
) -> torch.Tensor:
    """Linear multistep in sigma (k-diffusion sample_lms): Adams-Bashforth on the uneven grid, with
    the derivative history extrapolated by Lagrange polynomials; warm-up at lower order."""
    if order not in (1, 2, 3, 4):
        raise ValueError("sampler.order for lms must be 1, 2, 3 or 4")
    s = _levels(sigmas)
    ds: list[torch.Tensor] = []
    for i in range(len(s) - 1):
        ds.insert(0, (x - denoise(x, _at(s[i]))) / s[i])
        del ds[order:]
        cur = len(ds)
        x = x + sum(lms_coefficient(s, i, j, cur) * ds[j] for j in range(cur))
    return x
