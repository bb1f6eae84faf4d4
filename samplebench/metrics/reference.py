"""High-accuracy probability-flow ODE solutions for the analytic models (the traj_err reference).

Independent of every sampler under test: scipy's DOP853 (an 8th-order Runge-Kutta method with
adaptive steps) integrates, for `gmm`, dy/dsigma = eps_w(y, sigma) from the schedule's largest noise
level to sigma = 0, where eps_w = eps_u + w (eps_c - eps_u) is the exact guided noise prediction;
for `gmm_flow`, dx_t/dt = v_w(x_t, t) = v_u + w (v_c - v_u) in flow time from the cell's first level
t0 = sigma_0 / (1 + sigma_0) (x_t = x_T there) to t = 0, with the model's exact velocity
(FlowMixtureModel.velocity, its own closed form; t is bounded, so the solve never sees sigma = 1e8).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.integrate import solve_ivp

from samplebench.models.gmm import FlowMixtureModel, GaussianMixtureModel

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


def guided_velocity(
    model: FlowMixtureModel, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float
) -> torch.Tensor:
    """The exact guided velocity v_u + w (v_c - v_u) of the flow model at flow times t (one per row)."""
    v_c = model.velocity(x_t, t, labels)
    if guidance == 1.0:
        return v_c
    v_u = model.velocity(x_t, t, torch.full_like(labels, -1))
    return v_u + guidance * (v_c - v_u)


def _guided_velocity_rows(
    model: FlowMixtureModel, x_t: torch.Tensor, t: float, labels: torch.Tensor, guidance: float
) -> torch.Tensor:
    """guided_velocity at one flow time for every row of x_t, RHS_ROWS rows at a time."""
    out = torch.empty_like(x_t)
    for i in range(0, len(x_t), RHS_ROWS):
        rows = x_t[i : i + RHS_ROWS]
        tt = torch.full((len(rows),), t, dtype=torch.float64, device=x_t.device)
        out[i : i + RHS_ROWS] = guided_velocity(model, rows, tt, labels[i : i + RHS_ROWS], guidance)
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
    sigma_floor: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact clean samples, and where an exact solve that stops at the schedule's smallest level
    sigma(t=0) and then jumps to 0 with the exact denoiser lands. Every sampler on the discrete
    schedule ends with such a jump, so as NFE grows it converges to the second point: their
    distance is the floor of traj_err. The solve starts where the cell's grid starts (sigma_start,
    by default the largest training level) from x_T sqrt(1 + sigma_start^2), as every sampler does.
    A flow model (gmm_flow) is solved in flow time instead (solve_flow_with_floor; sigma_floor is
    its floor level, ignored for gmm, whose floor is the smallest training level)."""
    if getattr(model.noise_schedule, "is_flow", False):
        return solve_flow_with_floor(model, x_T, labels, guidance, rtol, atol, sigma_start, sigma_floor)
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


def solve_flow_with_floor(
    model: FlowMixtureModel,
    x_T: torch.Tensor,
    labels: torch.Tensor,
    guidance: float,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    sigma_start: float | None = None,
    sigma_floor: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """gmm_flow's exact clean samples and its floor point.

    DOP853 integrates dx_t/dt = v_w(x_t, t) from t0 = sigma_start / (1 + sigma_start) (default: the
    largest training level, as for gmm; schedule=flow's t = 1 is sigma = FLOW_T1_SIGMA, t0 = 1 - 1e-8)
    with x_t(t0) = x_T, as every sampler starts (NoiseSchedule.initial_state), to t = 0.

    The floor: a flow schedule ends at t = 0 exactly after its last positive level t_f (the cell's
    sigma_floor, default the smallest training level). Every flow sampler's last step, from t_f to 0,
    is the Euler step x_t - t_f v = D, the exact denoiser's jump; so on grids that keep t_f fixed as N
    grows (schedule=flow end=train: SD3's spacing ends at shift(shift(1/T)) for every N) they
    converge to the exact solve to t_f followed by that jump, and traj_err cannot go below its
    distance to the exact solution. On grids whose t_f shrinks with N (end=1/N) the floor of a cell
    is the one at its own t_f, and it vanishes as N grows."""
    s0 = float(model.noise_schedule.sigma_max if sigma_start is None else sigma_start)
    s_f = float(model.noise_schedule.sigma_min if sigma_floor is None else sigma_floor)
    t0, t_f = s0 / (1 + s0), s_f / (1 + s_f)
    n, d = x_T.shape
    labels = labels.to(model.device)

    def rhs(t: float, flat: np.ndarray) -> np.ndarray:
        x_t = torch.from_numpy(flat).to(model.device).view(n, d)
        return _guided_velocity_rows(model, x_t, t, labels, guidance).cpu().numpy().ravel()

    y0 = x_T.double().cpu().numpy().ravel()
    sol = solve_ivp(rhs, (t0, 0.0), y0, method="DOP853", rtol=rtol, atol=atol, t_eval=[t_f, 0.0])
    if not sol.success:
        raise ReferenceSolveError(f"the exact flow ODE solve failed ({sol.message.rstrip('.')})")
    end = torch.from_numpy(sol.y[:, -1].reshape(n, d).copy())
    x_f = torch.from_numpy(sol.y[:, 0].reshape(n, d).copy())
    jump = x_f - t_f * _guided_velocity_rows(model, x_f.to(model.device), t_f, labels, guidance).cpu()
    return end, jump
