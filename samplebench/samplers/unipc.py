"""UniPC (Zhao et al. 2023, arXiv:2302.04867): the unified predictor UniP-p and corrector UniC-p with
data prediction, B(h) = h ("bh1") or e^h - 1 ("bh2"), as in the authors' code (wl-zhao/UniPC
`multistep_uni_pc_bh_update`) and diffusers' UniPCMultistepScheduler.

On x = x_0 + sigma n with lambda = -log sigma the VP alphas cancel: the predictor is
x' = (sigma'/sigma) x - (e^{-h} - 1) D_0 - B(-h) sum_k rho^p_k D1_k, D1_k = (D_{-k} - D_0) / r_k,
and the corrector re-does the step once the model has been evaluated at x' (that evaluation is
the next step's first one, so the corrector costs nothing; the last step is not corrected).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from samplebench.samplers.base import Denoiser
from samplebench.samplers.euler import _at, _levels

VARIANTS = ("bh1", "bh2")


def _coefficients(
    h: float, rks: list[float], order: int, variant: str
) -> tuple[np.ndarray, np.ndarray, float]:
    """R (order x order, rows r_k^(i-1)), b_i = h phi_{i+1}(hh) i! / B(hh) with hh = -h, and B(hh)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    r = np.asarray(rks + [1.0], dtype=np.float64)
    rows, b = [], []
    factorial = 1
    for i in range(1, order + 1):
        rows.append(r ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return np.stack(rows), np.asarray(b), b_h


def predictor_step(x, sig: float, nxt: float, d_hist, lam_hist, order: int, variant: str) -> torch.Tensor:
    """UniP-p from level sig to nxt, d_hist[0] = D at sig (newest first, lam_hist its -log sigma); the
    step to nxt = 0 is D itself. Shared by sample_unipc and DC-Solver (which edits d_hist[0] first)."""
    d, lam = d_hist[0], lam_hist[0]
    if nxt == 0:
        return d
    h = -math.log(nxt) - lam
    rks = [(lam_hist[k] - lam) / h for k in range(1, order)]
    x_next = (nxt / sig) * x - math.expm1(-h) * d
    if order > 1:
        R, b, b_h = _coefficients(h, rks, order, variant)
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
        res = sum(float(rhos[k - 1]) * (d_hist[k] - d) / rks[k - 1] for k in range(1, order))
        x_next = x_next - b_h * res
    return x_next


def corrector_step(prev_x, prev_sig: float, sig: float, d, d_hist, lam_hist, order: int, variant: str):
    """UniC-p: the step prev_sig -> sig again from prev_x, now with d = D at the predicted state (d_hist,
    lam_hist: the history the predictor used, newest first)."""
    h = -math.log(sig) - lam_hist[0]
    rks = [(lam_hist[k] - lam_hist[0]) / h for k in range(1, order)]
    R, b, b_h = _coefficients(h, rks, order, variant)
    rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
    res = sum(float(rhos[k - 1]) * (d_hist[k] - d_hist[0]) / rks[k - 1] for k in range(1, order))
    res = res + float(rhos[-1]) * (d - d_hist[0])
    return (sig / prev_sig) * prev_x - math.expm1(-h) * d_hist[0] - b_h * res


def sample_unipc(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generators=None,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
    corrector: bool = True,
) -> torch.Tensor:
    """UniPC-p: predictor of order min(p, history), corrector of the same order after every step but
    the last; lower_order_final lowers the order of the last steps to min(p, N - i) as diffusers does,
    and the step to sigma = 0 (h = infinity) is first-order, i.e. D itself."""
    if order not in (1, 2, 3):
        raise ValueError("sampler.order for unipc must be 1, 2 or 3")
    if variant not in VARIANTS:
        raise ValueError(f"sampler.variant must be one of {', '.join(VARIANTS)}")
    s = _levels(sigmas)
    steps = len(s) - 1
    d_hist: list[torch.Tensor] = []  # newest first
    lam_hist: list[float] = []
    prev_x, prev_order = None, 0
    for i in range(steps):
        sig, nxt = s[i], s[i + 1]
        d = denoise(x, _at(sig))
        if corrector and prev_x is not None:
            # UniC: the step from the previous level to this one again, now with D at this level.
            x = corrector_step(prev_x, s[i - 1], sig, d, d_hist, lam_hist, prev_order, variant)
        d_hist.insert(0, d)
        lam_hist.insert(0, -math.log(sig))
        del d_hist[order:], lam_hist[order:]
        this_order = min(order, steps - i) if lower_order_final else order
        this_order = min(this_order, len(d_hist))
        prev_x, prev_order = x, this_order
        x = predictor_step(x, sig, nxt, d_hist, lam_hist, this_order, variant)
    return x
