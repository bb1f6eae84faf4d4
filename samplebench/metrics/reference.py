"""High-accuracy probability-flow ODE solutions for the analytic model (the traj_err reference).

Independent of every sampler under test: scipy's DOP853 (an 8th-order Runge-Kutta method with
adaptive steps) integrates dy/dsigma = eps_w(y, sigma) from the schedule's largest noise level to
sigma = 0, where eps_w = eps_u + w (eps_c - eps_u) is the exact guided noise prediction.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.integrate import solve_ivp

from samplebench.models.gmm import GaussianMixtureModel

# Rows of the ODE state whose exact eps is evaluated at a time. The exact eps is per sample, so blocks
# change no value; they keep the (rows, components, dim) temporaries of every right-hand side a few MB
# whatever the shard size (a whole 10k-sample shard made ~10 MB tensors per call, and the C heap grew
# over a shard's calls and from shard to shard: bench/bench_metrics_memory.py).
RHS_ROWS = 1024


class ReferenceSolveError(RuntimeError):
    """The exact probability-flow ODE could not be solved to tolerance (e.g. guidance so large that the
    guided ODE is too stiff for DOP853): there is no reference to measure traj_err against."""


def guided_eps_ve(model: GaussianMixtureModel, y: torch.Tensor, sigma: torch.Tensor, labels, guidance: float):
    eps_c = model.eps_ve(y, sigma, labels)
    if guidance == 1.0:
        return eps_c
    eps_u = model.eps_ve(y, sigma, torch.full_like(labels, -1))
    return eps_u + guidance * (eps_c - eps_u)


def _guided_eps_rows(
    model: GaussianMixtureModel, y: torch.Tensor, sigma: float, labels: torch.Tensor, guidance: float
) -> torch.Tensor:
    """guided_eps_ve at one noise level for every row of y, RHS_ROWS rows at a time."""
    out = torch.empty_like(y)
    for i in range(0, len(y), RHS_ROWS):
        rows = y[i : i + RHS_ROWS]
        s = torch.full((len(rows),), sigma, dtype=torch.float64, device=y.device)
        out[i : i + RHS_ROWS] = guided_eps_ve(model, rows, s, labels[i : i + RHS_ROWS], guidance)
    return out


def solve_probability_flow(
    model: GaussianMixtureModel,
    x_T: torch.Tensor,
    labels: torch.Tensor,
    guidance: float,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> torch.Tensor:
    """Clean samples reached by the exact ODE from unit-variance noise x_T at the largest level."""
    return solve_with_floor(model, x_T, labels, guidance, rtol, atol)[0]


def solve_with_floor(
    model: GaussianMixtureModel,
    x_T: torch.Tensor,
    labels: torch.Tensor,
    guidance: float,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    sigma_start: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact clean samples, and where an exact solve that stops at the schedule's smallest level
    sigma(t=0) and then jumps to 0 with the exact denoiser lands. Every sampler on the discrete
    schedule ends with such a jump, so as NFE grows it converges to the second point: their
    distance is the floor of traj_err. The solve starts where the cell's grid starts (sigma_start,
    by default the largest training level) from x_T sqrt(1 + sigma_start^2), as every sampler does."""
    sigma_max = float(((1 - model.alphas_cumprod[-1]) / model.alphas_cumprod[-1]).sqrt())
    if sigma_start is not None:
        sigma_max = float(sigma_start)
    sigma_min = float(((1 - model.alphas_cumprod[0]) / model.alphas_cumprod[0]).sqrt())
    n, d = x_T.shape
    labels = labels.to(model.device)

    def rhs(sigma: float, flat: np.ndarray) -> np.ndarray:
        y = torch.from_numpy(flat).to(model.device).view(n, d)
        return _guided_eps_rows(model, y, sigma, labels, guidance).cpu().numpy().ravel()

    y0 = (x_T.double().cpu() * np.sqrt(1 + sigma_max**2)).numpy().ravel()
    sol = solve_ivp(rhs, (sigma_max, 0.0), y0, method="DOP853", rtol=rtol, atol=atol, t_eval=[sigma_min, 0.0])
    if not sol.success:
        raise ReferenceSolveError(f"the exact ODE solve failed ({sol.message.rstrip('.')})")
    end = torch.from_numpy(sol.y[:, -1].reshape(n, d).copy())
    y_min = torch.from_numpy(sol.y[:, 0].reshape(n, d).copy())
    jump = (
        y_min - sigma_min * _guided_eps_rows(model, y_min.to(model.device), sigma_min, labels, guidance).cpu()
    )
    return end, jump
