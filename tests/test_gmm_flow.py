"""model=gmm_flow end to end (issue 14): its flow ODE is the gmm's probability-flow ODE, its denoiser is
the gmm's, and a sweep through the CLI scores it with traj_err and fd_exact against an exact solve.

References, each independent of the code under test: scipy's solve_ivp (DOP853) on the VP model's
noise prediction in sigma (GaussianMixtureModel.eps_ve, Tweedie's formula in VE coordinates) and on
the flow model's own closed-form velocity in flow time (FlowMixtureModel.velocity, a formula written in
flow coordinates, not derived from eps_ve).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from cli_run import cli_here
from scipy.integrate import solve_ivp

from samplebench import store
from samplebench.models.gmm import FlowMixtureModel, GaussianMixtureModel, MixtureSpec
from samplebench.seeds import initial_noise

SPEC = MixtureSpec(shift=3.0)
RTOL = 1e-11  # DOP853's tolerances below: both solves are accurate to ~1e-9, far under the 1e-7 asked


@pytest.fixture(scope="module")
def models():
    cpu = torch.device("cpu")
    return GaussianMixtureModel(SPEC, cpu), FlowMixtureModel(SPEC, cpu)


def _vp_solve(gmm, y0, labels, sigmas):
    """The gmm's ODE dy/dsigma = eps(y, sigma) through the decreasing levels `sigmas` (first = start);
    in u = log sigma (dy/du = sigma eps) while sigma > 1e-3, then in sigma itself down to a 0."""
    n, d = y0.shape

    def eps(y, s):
        return gmm.eps_ve(torch.from_numpy(y).view(n, d), torch.full((n,), s, dtype=torch.float64), labels)

    def rhs_log(u, flat):
        s = float(np.exp(u))
        return (s * eps(flat, s)).numpy().ravel()

    def rhs(s, flat):
        return eps(flat, s).numpy().ravel()

    out = {}
    pos = [s for s in sigmas[1:] if s >= 1e-3]
    low = [s for s in sigmas[1:] if s < 1e-3]
    cut = min(1e-3, pos[-1]) if pos else 1e-3
    u_eval = [float(np.log(s)) for s in pos]
    if not u_eval or u_eval[-1] != np.log(cut):
        u_eval.append(float(np.log(cut)))
    sol = solve_ivp(
        rhs_log, (np.log(sigmas[0]), np.log(cut)), y0.ravel(), "DOP853", rtol=RTOL, atol=RTOL, t_eval=u_eval
    )
    assert sol.success, sol.message
    for s, y in zip(pos, sol.y.T, strict=False):
        out[s] = y.reshape(n, d)
    if low:
        sol2 = solve_ivp(rhs, (cut, low[-1]), sol.y[:, -1], "DOP853", rtol=RTOL, atol=RTOL, t_eval=low)
        assert sol2.success, sol2.message
        for s, y in zip(low, sol2.y.T, strict=True):
            out[s] = y.reshape(n, d)
    return out


def _flow_solve(flow, x0, labels, times):
    """gmm_flow's ODE dx_t/dt = v(x_t, t) through the decreasing flow times `times` (first = start)."""
    n, d = x0.shape

    def rhs(t, flat):
        v = flow.velocity(torch.from_numpy(flat).view(n, d), torch.full((n,), t, dtype=torch.float64), labels)
        return v.numpy().ravel()

    sol = solve_ivp(rhs, (times[0], times[-1]), x0.ravel(), "DOP853", rtol=RTOL, atol=RTOL, t_eval=times[1:])
    assert sol.success, sol.message
    return {t: y.reshape(n, d) for t, y in zip(times[1:], sol.y.T, strict=True)}


def test_flow_ode_and_diffusion_ode_are_the_same_paths(models):
    """x_t = x / (1 + sigma), t = sigma / (1 + sigma) maps the gmm's diffusion ODE onto gmm_flow's flow
    ODE: both solved by scipy from matching starts (sigma 80, t = 80/81) agree at every intermediate
    level and at 0. Tolerance 1e-7 absolute on O(1) states: each solve is good to ~1e-9 (rtol 1e-11 over
    a few hundred steps), the map is a few float64 operations."""
    gmm, flow = models
    idx = list(range(12))
    labels = torch.tensor([-1, 0, 1, 2, 3, 4, 5, 6, 7, -1, 3, 5])
    x_T = initial_noise(0, idx, gmm.sample_shape, torch.float64, gmm.device).numpy()
    sigmas = [80.0, 10.0, 2.0, 0.5, 0.1, 0.01, 0.0]
    y = _vp_solve(gmm, x_T * (1 + sigmas[0]), labels, sigmas)
    x = _flow_solve(flow, x_T, labels, [s / (1 + s) for s in sigmas])
    for s in sigmas[1:]:
        mapped = x[s / (1 + s)] * (1 + s)
        np.testing.assert_allclose(mapped, y[s], rtol=0, atol=1e-7 * (1 + s), err_msg=f"sigma={s}")


def test_flow_reference_matches_the_vp_solve_from_t_1(models):
    """The traj_err reference of gmm_flow (metrics.reference.solve_flow_with_floor: flow time, from the
    schedule's t = 1 stand-in) lands where the gmm's diffusion ODE solved in log sigma from the same
    sigma = 1e8 lands, and its floor point is that ODE stopped at the floor level and denoised."""
    from samplebench.metrics.reference import solve_flow_with_floor
    from samplebench.models.base import FLOW_T1_SIGMA

    gmm, flow = models
    idx = list(range(8))
    labels = flow.conditions(idx, 0)
    x_T = initial_noise(0, idx, gmm.sample_shape, torch.float64, gmm.device)
    s_f = float(flow.noise_schedule.sigma_min)
    end, floor = solve_flow_with_floor(flow, x_T, labels, 1.0, sigma_start=FLOW_T1_SIGMA, sigma_floor=s_f)
    y = _vp_solve(gmm, x_T.numpy() * (1 + FLOW_T1_SIGMA), labels, [FLOW_T1_SIGMA, s_f, 0.0])
    np.testing.assert_allclose(end.numpy(), y[0.0], rtol=0, atol=1e-7)
    d = gmm.denoise(torch.from_numpy(y[s_f]), torch.tensor(s_f), labels).numpy()
    np.testing.assert_allclose(floor.numpy(), d, rtol=0, atol=1e-7)


def test_flow_denoiser_is_the_gmm_denoiser(models):
    """gmm_flow's D (velocity -> D, models.base.flow_denoise) equals the gmm's Tweedie D at the same
    x and sigma: both are E[x_0 | x_0 + sigma n = x] of one mixture. 1e-9 absolute: O(1) values from a
    few dozen float64 operations, with x up to 1e3 (sigma 1e3) divided down before the difference."""
    gmm, flow = models
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([-1, 0, 3, 7, -1, 2])
    for sigma in (1e-3, 0.1, 1.0, 7.0, 1e3):
        x = gmm.sample_data(6, 1)[0] + sigma * torch.randn(6, SPEC.dim, generator=g, dtype=torch.float64)
        s = torch.full((6,), sigma, dtype=torch.float64)
        torch.testing.assert_close(flow.denoise(x, s, labels), gmm.denoise(x, s, labels), rtol=0, atol=1e-9)


def test_sweep_scores_gmm_flow_with_traj_err_and_fd_exact(tmp_path, models):
    """A sweep through the CLI: gmm_flow on schedule=flow gives traj_err, fd_exact and mmd_exact rows; the
    flow_euler cell's traj_err is the RMS distance of its stored samples to the gmm's diffusion ODE
    solved independently here (log sigma, from sigma = 1e8), to 1e-6 relative (the reference solves
    agree to ~1e-8, traj_err is ~0.1)."""
    from samplebench.models.base import FLOW_T1_SIGMA

    r = cli_here(
        "sweep",
        "model=gmm_flow",
        "model.shift=3.0",
        "schedule=flow",
        "sampler=flow_euler,diffusers:flow_euler",
        "nfe=6",
        "num_images=24",
        "metrics.bootstrap=50",
        "run=f",
        f"results_dir={tmp_path}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = pd.read_csv(tmp_path / "f" / "metrics.csv")
    m = m[m.model.str.startswith("gmm_flow")]
    assert set(m.metric) == {"traj_err", "fd_exact", "mmd_exact"}
    assert np.isfinite(m.value).all() and len(m) == 6
    gmm, flow = models
    cell = next(
        c for c in store.find_cells(tmp_path / "f") if c.info["sampler_label"].split(" ")[0] == "flow_euler"
    )
    shard = store.read_shard(cell.shards()[0][2], ("samples", "indices", "labels"))
    seed = int(cell.info["config"]["seed"])
    x_T = initial_noise(seed, shard["indices"].tolist(), gmm.sample_shape, torch.float64, gmm.device)
    start = x_T.numpy() * (1 + FLOW_T1_SIGMA)
    y = _vp_solve(gmm, start, torch.as_tensor(shard["labels"]), [FLOW_T1_SIGMA, 0.0])
    mine = np.sqrt(((shard["samples"] - y[0.0]) ** 2).mean(axis=1)).mean()
    row = m[(m.metric == "traj_err") & (m.sampler.str.startswith("flow_euler"))]
    assert float(row.value.iloc[0]) == pytest.approx(mine, rel=1e-6)
    diff = m[(m.metric == "traj_err") & (m.sampler.str.startswith("diffusers:flow_euler"))]
    assert float(diff.value.iloc[0]) == pytest.approx(mine, rel=1e-4)  # float32 steps in diffusers


def test_flow_reference_starts_where_the_grid_starts(models):
    """The metrics stage passes no start for a grid that starts at the largest training level (karras,
    logsnr on gmm_flow: t = shift(1 - 1/T)): the flow solve then starts there, not at t = 1 (the two
    differ by ~1e-3 here, far above the 1e-12 asked of the same solve twice)."""
    from samplebench.metrics.reference import solve_flow_with_floor

    _, flow = models
    idx = list(range(4))
    labels = flow.conditions(idx, 0)
    x_T = initial_noise(0, idx, flow.sample_shape, torch.float64, flow.device)
    top = float(flow.noise_schedule.sigma_max)
    default, _ = solve_flow_with_floor(flow, x_T, labels, 1.0)
    explicit, _ = solve_flow_with_floor(flow, x_T, labels, 1.0, sigma_start=top)
    from_one, _ = solve_flow_with_floor(flow, x_T, labels, 1.0, sigma_start=1e8)
    torch.testing.assert_close(default, explicit, rtol=0, atol=1e-12)
    assert float((from_one - default).abs().max()) > 1e-4
