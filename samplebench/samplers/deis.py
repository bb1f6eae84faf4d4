"""DEIS (Zhang & Chen 2023, arXiv:2204.13902, "Fast Sampling of Diffusion Models with Exponential
Integrator"), the multistep rho-AB variant its authors contributed to diffusers
(DEISMultistepScheduler, algorithm_type='deis'): on y = x_0 + rho n (rho = sigma) the
probability-flow ODE is dy/drho = eps, and each step integrates a Lagrange polynomial through the
last `order` noise predictions, polynomial in log rho, exactly:

    y' = y + sum_j eps_j integral_rho^rho' L_j(log tau) dtau.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.polynomial import polynomial as P

from samplebench.samplers.base import Denoiser
from samplebench.samplers.dpm_solver import _order
from samplebench.samplers.euler import _at, _levels


def _exp_poly_antiderivative(coefs: np.ndarray, u: float) -> float:
    """F(u) with F' = p(u) e^u for p = sum_k coefs[k] u^k: e^u sum_k c_k sum_m (-1)^(k-m) k!/m! u^m."""
    total = 0.0
    for k, c in enumerate(coefs):
        total += c * sum((-1) ** (k - m) * math.factorial(k) / math.factorial(m) * u**m for m in range(k + 1))
    return math.exp(u) * total


def deis_coefficients(rho: float, rho_next: float, nodes: list[float]) -> list[float]:
    """integral over [rho, rho_next] of each Lagrange basis polynomial in u = log tau through the
    nodes' log values (nodes[0] = rho, the newest)."""
    logs = [math.log(n) for n in nodes]
    out = []
    for j, lj in enumerate(logs):
        others = [lk for k, lk in enumerate(logs) if k != j]
        basis = P.polyfromroots(others) / np.prod([lj - lk for lk in others]) if others else np.array([1.0])
        out.append(
            _exp_poly_antiderivative(basis, math.log(rho_next)) - _exp_poly_antiderivative(basis, logs[0])
        )
    return out


def sample_deis(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generators=None,
    order: int = 3,
    lower_order_final: bool = True,
) -> torch.Tensor:
    """rho-AB DEIS of order 1-3 (order 1 is DDIM); warm-up and lower_order_final as in diffusers; the
    step to 0 is first-order, y' = y - rho eps = D."""
    if order not in (1, 2, 3):
        raise ValueError("sampler.order for deis must be 1, 2 or 3")
    s = _levels(sigmas)
    steps = len(s) - 1
    eps_hist: list[torch.Tensor] = []
    for i in range(steps):
        sig, nxt = s[i], s[i + 1]
        eps_hist.insert(0, (x - denoise(x, _at(sig))) / sig)
        del eps_hist[3:]
        o = _order(order, i, steps, len(eps_hist), nxt == 0, lower_order_final)
        if o == 1:
            x = x + (nxt - sig) * eps_hist[0]
            continue
        coefs = deis_coefficients(sig, nxt, s[i - o + 1 : i + 1][::-1])
        x = x + sum(c * e for c, e in zip(coefs, eps_hist[:o], strict=True))
    return x
