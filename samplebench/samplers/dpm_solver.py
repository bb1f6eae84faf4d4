"""DPM-Solver (noise prediction) and DPM-Solver++ (data prediction), multistep and singlestep.

Written on x = x_0 + sigma n with lambda = -log sigma (the VP half-logSNR), h = lambda' - lambda.
In this scale the VP updates lose their alpha ratios: DPM-Solver-1 is x' = x - (sigma - sigma') eps,
DPM-Solver++-1 is x' = (sigma'/sigma) x + (1 - sigma'/sigma) D. Sources: Lu et al. 2022,
arXiv:2206.00927 (DPM-Solver, Alg. 1-2 and the multistep variants of its repository,
LuChengTHU/dpm-solver `multistep_dpm_solver_*_update`), Lu et al. 2022, arXiv:2211.01095
(DPM-Solver++, Alg. 1-2), k-diffusion sample_dpmpp_2m / _2s_ancestral / _2m_sde / _3m_sde.

The step to sigma = 0 has h = infinity: every solver takes it first-order, which is exactly the
denoiser's output D (no extra evaluation).
"""

from __future__ import annotations

import math

import torch

from samplebench.samplers.base import Denoiser, noise_like
from samplebench.samplers.euler import _at, _levels

SOLVER_TYPES = ("midpoint", "heun")


def _order(order: int, i: int, steps: int, history: int, last_zero: bool, lower_order_final: bool) -> int:
    """The order of step i: warm-up from the history, lower near the end on short runs (diffusers'
    lower_order_final: the last two steps at order <= 1, 2 when N < 15), 1 for the step to 0."""
    o = min(order, history)
    if lower_order_final and steps < 15:
        o = min(o, steps - i)
    return 1 if last_zero else o


def _check(order: int, solver_type: str, max_order: int = 3) -> None:
    if order not in range(1, max_order + 1):
        raise ValueError(f"sampler.order must be 1..{max_order}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"sampler.solver_type must be one of {', '.join(SOLVER_TYPES)}")


def sample_dpm_multistep(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generators=None,
    order: int = 2,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
) -> torch.Tensor:
    """Multistep DPM-Solver with noise prediction eps = (x - D) / sigma (DPM-Solver repo,
    algorithm_type='dpmsolver'): x' = x - sigma' phi_1 eps_0 - sigma' (...) D1 - sigma' phi_3 D2,
    phi_1 = e^h - 1, phi_2 = phi_1/h - 1, phi_3 = phi_2/h - 1/2. solver_type 'midpoint' is the
    repository's 'dpmsolver' second-order form (1/2 phi_1 D1), 'heun' its 'taylor' form (phi_2 D1)."""
    _check(order, solver_type)
    s = _levels(sigmas)
    steps = len(s) - 1
    eps_hist: list[torch.Tensor] = []  # newest first
    lam_hist: list[float] = []
    for i in range(steps):
        sig, nxt = s[i], s[i + 1]
        eps = (x - denoise(x, _at(sig))) / sig
        eps_hist.insert(0, eps)
        lam_hist.insert(0, -math.log(sig))
        del eps_hist[3:], lam_hist[3:]
        o = _order(order, i, steps, len(eps_hist), nxt == 0, lower_order_final)
        if o == 1:
            x = x - (sig - nxt) * eps
            continue
        h = -math.log(nxt) - lam_hist[0]
        phi1 = math.expm1(h)
        r0 = (lam_hist[0] - lam_hist[1]) / h
        d1_0 = (eps_hist[0] - eps_hist[1]) / r0
        if o == 2:
            coef = 0.5 * phi1 if solver_type == "midpoint" else phi1 / h - 1
            x = x - nxt * phi1 * eps - nxt * coef * d1_0
            continue
        r1 = (lam_hist[1] - lam_hist[2]) / h
        d1_1 = (eps_hist[1] - eps_hist[2]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi2 = phi1 / h - 1
        phi3 = phi2 / h - 0.5
        x = x - nxt * phi1 * eps - nxt * phi2 * d1 - nxt * phi3 * d2
    return x


def sample_dpmpp_multistep(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generators=None,
    order: int = 2,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
) -> torch.Tensor:
    """Multistep DPM-Solver++ (2M, 3M) with data prediction D: x' = (sigma'/sigma) x - phi_1 D0
    [- 1/2 phi_1 D1 | + phi_2 D1] (+ phi_2 D1 - phi_3 D2 at third order), phi_1 = e^{-h} - 1,
    phi_2 = phi_1/h + 1, phi_3 = phi_2/h - 1/2 (DPM-Solver++ Alg. 2; k-diffusion sample_dpmpp_2m is
    the 'midpoint' 2M, sample_dpmpp_3m_sde with eta = 0 the 3M with a 'heun' warm-up)."""
    _check(order, solver_type)
    s = _levels(sigmas)
    steps = len(s) - 1
    d_hist: list[torch.Tensor] = []
    lam_hist: list[float] = []
    for i in range(steps):
        sig, nxt = s[i], s[i + 1]
        d = denoise(x, _at(sig))
        d_hist.insert(0, d)
        lam_hist.insert(0, -math.log(sig))
        del d_hist[3:], lam_hist[3:]
        o = _order(order, i, steps, len(d_hist), nxt == 0, lower_order_final)
        if nxt == 0:
            x = d
            continue
        h = -math.log(nxt) - lam_hist[0]
        phi1 = math.expm1(-h)
        x_next = (nxt / sig) * x - phi1 * d
        if o >= 2:
            r0 = (lam_hist[0] - lam_hist[1]) / h
            d1_0 = (d_hist[0] - d_hist[1]) / r0
            phi2 = phi1 / h + 1
            if o == 2:
                x_next = x_next - 0.5 * phi1 * d1_0 if solver_type == "midpoint" else x_next + phi2 * d1_0
            else:
                r1 = (lam_hist[1] - lam_hist[2]) / h
                d1_1 = (d_hist[1] - d_hist[2]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi3 = phi2 / h - 0.5
                x_next = x_next + phi2 * d1 - phi3 * d2
        x = x_next
    return x


def sample_dpm_singlestep(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generators=None, order: int = 3
) -> torch.Tensor:
    """Singlestep DPM-Solver-2 / -3 with noise prediction (DPM-Solver Alg. 1 with r1 = 1/2, Alg. 2 with
    r1 = 1/3, r2 = 2/3): `order` evaluations per step inside [sigma_i, sigma_{i+1}], the last step to
    0 first-order, so N steps cost order (N - 1) + 1 evaluations."""
    if order not in (2, 3):
        raise ValueError("sampler.order for dpm_single must be 2 or 3")
    s = _levels(sigmas)

    def eps_at(y: torch.Tensor, sig: float) -> torch.Tensor:
        return (y - denoise(y, _at(sig))) / sig

    for i in range(len(s) - 1):
        sig, nxt = s[i], s[i + 1]
        eps = eps_at(x, sig)
        if nxt == 0:
            x = x - sig * eps
            continue
        h = math.log(sig / nxt)
        if order == 2:  # sigma_s1 e^{h/2} = sigma: u = x - (sigma - sigma_s1) eps
            s1 = sig * math.exp(-0.5 * h)
            u = x - (sig - s1) * eps
            x = x - (sig - nxt) * eps - (sig - nxt) * (eps_at(u, s1) - eps)
            continue
        r1, r2 = 1 / 3, 2 / 3
        s1, s2 = sig * math.exp(-r1 * h), sig * math.exp(-r2 * h)
        u1 = x - (sig - s1) * eps
        d1_1 = eps_at(u1, s1) - eps
        # sigma_s2 ((e^{r2 h} - 1) / (r2 h) - 1) = (sigma - sigma_s2) / (r2 h) - sigma_s2
        u2 = x - (sig - s2) * eps - (r2 / r1) * ((sig - s2) / (r2 * h) - s2) * d1_1
        d1_2 = eps_at(u2, s2) - eps
        x = x - (sig - nxt) * eps - (1 / r2) * ((sig - nxt) / h - nxt) * d1_2
    return x


def sample_dpmpp_2s(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generators=None
) -> torch.Tensor:
    """DPM-Solver++(2S) (DPM-Solver++ Alg. 1, r = 1/2; k-diffusion sample_dpmpp_2s_ancestral with
    eta = 0): an intermediate data prediction at the log-sigma midpoint, then the full step with it;
    the step to 0 is D itself (2N - 1 evaluations)."""
    s = _levels(sigmas)
    for i in range(len(s) - 1):
        sig, nxt = s[i], s[i + 1]
        d = denoise(x, _at(sig))
        if nxt == 0:
            x = d
            continue
        h = math.log(sig / nxt)
        mid = sig * math.exp(-0.5 * h)
        u = (mid / sig) * x - math.expm1(-0.5 * h) * d
        x = (nxt / sig) * x - math.expm1(-h) * denoise(u, _at(mid))
    return x


def sample_dpmpp_2m_sde(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generators=None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (DPM-Solver++ Sec. 5 / k-diffusion sample_dpmpp_2m_sde): the data-prediction
    multistep update of the SDE with noise eta, fresh noise sigma' sqrt(1 - e^{-2 eta h}) z per step."""
    _check(2, solver_type)
    s = _levels(sigmas)
    old, h_last = None, None
    for i in range(len(s) - 1):
        sig, nxt = s[i], s[i + 1]
        d = denoise(x, _at(sig))
        if nxt == 0:
            x = d
        else:
            h = math.log(sig / nxt)
            eta_h = eta * h
            x = (nxt / sig) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * d
            if old is not None:
                r = h_last / h
                if solver_type == "midpoint":
                    x = x - 0.5 * math.expm1(-h - eta_h) * (1 / r) * (d - old)
                else:
                    x = x + (-math.expm1(-h - eta_h) / (-h - eta_h) + 1) * (1 / r) * (d - old)
            if eta:
                x = x + noise_like(x, generators) * nxt * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
            h_last = h
        old = d
    return x
