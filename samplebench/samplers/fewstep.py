"""Few-step samplers of consistency-distilled models, on the denoiser contract: LCM's multistep
consistency sampling (Luo et al. 2023, arXiv:2310.04378, Alg. 3; diffusers LCMScheduler.step) and
TCD's strategic stochastic sampling (Zheng et al. 2024, arXiv:2402.19159, eq. 7; diffusers
TCDScheduler.step).

Both read D(x; sigma) as the model's jump to the data: on an LCM model D *is* the consistency
function f(x, t) (the adapter applies LCM's boundary condition c_skip x + c_out x0 inside its
denoiser, models/diffusers_models.py); on any other model it is E[x0 | x]. Re-noising to the next
level in EDM's x = x0 + sigma n is x0 + sigma' z: the VP form sqrt(abar') x0 + sqrt(1 - abar') z divided
by sqrt(abar'). Fresh noise comes from each sample's own generator (noise_like), so results do not
depend on the batch. The last step, to sigma = 0, returns D: LCMScheduler's last step returns its
`denoised` too; TCDScheduler's last step returns the noised prediction at training timestep 0
(sigma_min), which samplebench's grids replace by the clean end (the difference is sigma_min * eps).
"""

from __future__ import annotations

import math

import torch

from samplebench.errors import UsageError
from samplebench.models.base import NoiseSchedule
from samplebench.samplers.base import Denoiser, noise_like


def sample_lcm(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generators=None) -> torch.Tensor:
    """x0 = D(x; sigma_i), then x = x0 + sigma_{i+1} z with fresh z (LCMScheduler.step, step 7)."""
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        x0 = denoise(x, torch.tensor(s[i], dtype=torch.float64))
        if s[i + 1] == 0:
            return x0
        x = x0 + s[i + 1] * noise_like(x, generators)
    return x


def _tcd_level(noise: NoiseSchedule, sigma_next: float, gamma: float) -> float:
    """TCD's intermediate level s = floor((1 - gamma) t') in training timesteps (TCDScheduler.step,
    computed as it does: float32 product of (1 - gamma) and the integer timestep, then floor). A
    non-integer t' (a continuous schedule) is floored in float64; a flow model's time is continuous
    (no floor)."""
    if gamma == 0:
        return sigma_next
    t = float(noise.sigma_to_t(torch.tensor([sigma_next], dtype=torch.float64))[0])
    if noise.is_flow:
        return float(noise.t_to_sigma(torch.tensor([(1 - gamma) * t], dtype=torch.float64))[0])
    if abs(t - round(t)) < 1e-6:
        t_s = int(torch.floor((1 - gamma) * torch.tensor(round(t))).long())
    else:
        t_s = math.floor((1 - gamma) * t)
    return float(noise.train_sigmas[max(t_s, 0)])


def sample_tcd(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generators=None,
    gamma: float = 0.3,
    noise: NoiseSchedule | None = None,
) -> torch.Tensor:
    """x0 = D(x; sigma), eps = (x - x0) / sigma; the DDIM jump to x_s = x0 + sigma_s eps at
    s = floor((1 - gamma) t'); then forward noise from s to t': x' = x_s + sqrt(sigma'^2 - sigma_s^2) z
    (TCDScheduler.step with eta = gamma; gamma = 0 is DDIM, deterministic)."""
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        x0 = denoise(x, torch.tensor(s[i], dtype=torch.float64))
        if s[i + 1] == 0:
            return x0
        eps = (x - x0) / s[i]
        level = _tcd_level(noise, s[i + 1], float(gamma))
        x = x0 + level * eps
        if gamma > 0:
            x = x + math.sqrt(max(s[i + 1] ** 2 - level**2, 0.0)) * noise_like(x, generators)
    return x


def validate_gamma(options: dict) -> None:
    g = options.get("gamma", 0.3)
    if isinstance(g, bool) or not isinstance(g, int | float) or not 0 <= g <= 1:
        raise UsageError(
            f"sampler.gamma={g} must be a number in [0, 1] (0 = deterministic, TCD's default 0.3)"
        )
