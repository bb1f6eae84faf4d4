"""Gaussian teleportation (issue 13, item 3), pinned by exact properties on the analytic model.

References: scipy's DOP853 on the model's own exact denoiser (for a component label the data are
Gaussian, so the Gaussian flow map must equal the exact probability-flow ODE solution), and dense
numpy linear algebra for the guided Gaussian field; the base samplers themselves for skip = 0.
"""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from test_samplers import options, run

from samplebench.errors import UsageError
from samplebench.samplers import SAMPLERS
from samplebench.samplers.base import CountingDenoiser, SamplerContext, guided_denoiser
from samplebench.samplers.teleport import BASES, gaussian_flow_map, guided_gaussian_flow, teleport
from samplebench.schedules import make_grid
from samplebench.seeds import initial_noise

IDX = list(range(12))


def _exact_flow(gmm, x, labels, sigma, sigma_to, guidance=1.0):
    """Exact PF-ODE of the model (its own Tweedie denoiser, mixture and components) in u = log sigma,
    DOP853 at rtol 1e-12, row by row in float64."""
    den = guided_denoiser(gmm, labels, guidance)

    def field(u, y):
        yt = torch.tensor(y.reshape(x.shape), dtype=torch.float64)
        return (yt - den(yt, torch.tensor(np.exp(u)))).numpy().reshape(-1)

    sol = solve_ivp(
        field, (np.log(sigma), np.log(sigma_to)), x.numpy().reshape(-1), "DOP853", rtol=1e-12, atol=1e-12
    )
    return torch.tensor(sol.y[:, -1].reshape(x.shape))


@pytest.mark.parametrize("base", BASES)
def test_skip_zero_is_the_base_sampler_bit_for_bit(gmm, base):
    for guidance in (1.0, 3.0):
        ours, calls = run(
            gmm, "teleport", 10, IDX, guidance=guidance, opts={"base": base, "skip": 0}, allow_lower=True
        )
        ref, ref_calls = run(gmm, base, calls, IDX, guidance=guidance)
        assert calls == ref_calls
        assert torch.equal(ours, ref)


def test_teleport_is_exact_for_gaussian_data(gmm):
    """Given its component the analytic model's data are Gaussian: teleporting to any level equals the
    exact ODE solution there (DOP853 on the model's exact denoiser), to the solver's tolerance."""
    x_T = initial_noise(0, IDX, gmm.sample_shape, torch.float64, gmm.device)
    labels = gmm.conditions(IDX, 0)
    s_max = gmm.noise_schedule.sigma_max
    x = gmm.noise_schedule.initial_state(x_T, s_max)
    ctx = SamplerContext(gmm, labels, 1.0)
    for level in (8.0, 2.0, 0.5, 0.05):
        ours = teleport(x, s_max, level, ctx)
        ref = _exact_flow(gmm, x, labels, s_max, level)
        assert float((ours - ref).abs().max()) < 1e-8 * float(ref.abs().max()), level


def test_teleport_then_solve_equals_solving_from_the_exact_state(gmm):
    """Teleport over 40 of 80 Karras steps, then Heun: the same as Heun on the last 40 steps started
    from the exact ODE state at that level (DOP853), since the teleport itself is exact here."""
    labels = gmm.conditions(IDX, 0)
    x_T = initial_noise(0, IDX, gmm.sample_shape, torch.float64, gmm.device)
    grid = make_grid({"name": "karras", "rho": 7.0}, gmm.noise_schedule, 80)
    x = gmm.noise_schedule.initial_state(x_T, float(grid.sigmas[0]))
    ctx = SamplerContext(gmm, labels, 1.0)
    counter = CountingDenoiser(guided_denoiser(gmm, labels, 1.0))
    out = SAMPLERS["teleport"].run(counter, x, grid, {"base": "heun", "skip": 40}, None, ctx)
    assert counter.calls == 2 * 40 - 1
    exact = _exact_flow(gmm, x, labels, float(grid.sigmas[0]), float(grid.sigmas[40]))
    rest = make_grid({"name": "karras", "rho": 7.0}, gmm.noise_schedule, 80)
    rest = type(rest)(grid.sigmas[40:], rest.schedule, rest.ends, rest.noise)
    ref = SAMPLERS["heun"].run(
        CountingDenoiser(guided_denoiser(gmm, labels, 1.0)), exact, rest, {}, None, ctx
    )
    assert float((out - ref).abs().max()) < 1e-8 * float(ref.abs().max())


def test_the_flow_map_composes(gmm):
    """Semigroup: T -> a -> b equals T -> b, and the identity map at equal levels."""
    labels = gmm.conditions(IDX, 0)
    mean, vectors, values = gmm.gaussian_moments(labels)
    x = (
        torch.randn(len(IDX), gmm.spec.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        * 14
    )
    direct = gaussian_flow_map(x, 14.6, 0.3, mean, vectors, values)
    two = gaussian_flow_map(
        gaussian_flow_map(x, 14.6, 3.0, mean, vectors, values), 3.0, 0.3, mean, vectors, values
    )
    torch.testing.assert_close(two, direct, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gaussian_flow_map(x, 2.0, 2.0, mean, vectors, values), x, rtol=0, atol=1e-13)


def test_moments_are_the_models_own(gmm):
    """Component labels give the component (mean, U diag(lam) U^T); -1 gives the mixture's moments."""
    labels = torch.tensor([0, 3, -1, -1])
    mean, vectors, values = gmm.gaussian_moments(labels)
    cov = vectors @ torch.diag_embed(values) @ vectors.transpose(-1, -2)
    mix_mean, mix_cov = gmm.moments()
    for i, k in enumerate(labels.tolist()):
        if k >= 0:
            torch.testing.assert_close(mean[i], gmm.means[k])
            torch.testing.assert_close(cov[i], gmm.covariances()[k])
        else:
            torch.testing.assert_close(mean[i], mix_mean)
            torch.testing.assert_close(cov[i], mix_cov)
    # The mixture's closed-form moments against 400k exact draws (standard error ~ spread / 630).
    data, _ = gmm.sample_data(400_000, seed=5)
    torch.testing.assert_close(data.mean(0), mix_mean, rtol=0, atol=0.05)
    torch.testing.assert_close(torch.cov(data.T), mix_cov, rtol=0.03, atol=0.15)


def _dense_guided_flow(mean_u, cov_u, mean_c, cov_c, w, x, sigma, sigma_to):
    """The guided Gaussian field with dense solves, DOP853 in log sigma (one sample)."""
    eye = np.eye(len(x))

    def d(mu, cov, y, s):
        return mu + cov @ np.linalg.solve(cov + s**2 * eye, y - mu)

    def field(u, y):
        s = np.exp(u)
        du, dc = d(mean_u, cov_u, y, s), d(mean_c, cov_c, y, s)
        return y - (du + w * (dc - du))

    return solve_ivp(field, (np.log(sigma), np.log(sigma_to)), x, "DOP853", rtol=1e-12, atol=1e-12).y[:, -1]


def test_guided_gaussian_flow_matches_a_dense_solve_and_the_closed_form(gmm):
    labels = gmm.conditions(IDX[:4], 0)
    cond = gmm.gaussian_moments(labels)
    uncond = gmm.gaussian_moments(gmm.null_condition(labels))
    x = torch.randn(4, gmm.spec.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 14
    # guidance 1: the RK4 integrator reproduces the closed form (its only error is RK4's, h <= 0.01)
    rk = guided_gaussian_flow(x, 14.6, 0.4, uncond, cond, 1.0)
    torch.testing.assert_close(rk, gaussian_flow_map(x, 14.6, 0.4, *cond), rtol=1e-8, atol=1e-8)
    # guidance 4: against dense numpy solves of the same field
    ours = guided_gaussian_flow(x, 14.6, 0.4, uncond, cond, 4.0)
    mix_mean, mix_cov = gmm.moments()
    for i, k in enumerate(labels.tolist()):
        ref = _dense_guided_flow(
            mix_mean.numpy(),
            mix_cov.numpy(),
            gmm.means[k].numpy(),
            gmm.covariances()[k].numpy(),
            4.0,
            x[i].numpy(),
            14.6,
            0.4,
        )
        np.testing.assert_allclose(ours[i].numpy(), ref, rtol=1e-7, atol=1e-7 * np.abs(ref).max())


def test_the_first_evaluation_is_at_the_teleport_target_and_nfe_is_the_request(gmm):
    for base in ("dpmpp", "heun", "unipc"):
        opts = {"base": base, "skip": 3}
        rule = SAMPLERS["teleport"].rule(opts, {"name": "karras"})
        steps = rule.steps(9 if base == "heun" else 10, "teleport", allow_lower=False)
        out, calls, counter, grid, _ = run(gmm, "teleport", rule.nfe(steps), IDX, opts=opts, record=True)
        assert calls == rule.nfe(steps) == SAMPLERS[base].rule({}, {"name": "karras"}).nfe(steps - 3)
        assert float(counter.visits[0][1].reshape(-1)[0]) == pytest.approx(float(grid.sigmas[3]), rel=1e-12)
        assert torch.isfinite(out).all()


def test_bad_options_are_one_line_errors(gmm):
    with pytest.raises(UsageError, match="sampler.base=euler_a cannot follow a teleport"):
        SAMPLERS["teleport"].rule({"base": "euler_a", "skip": 1}, {"name": "karras"})
    with pytest.raises(UsageError, match="sampler.skip=-1 must be a whole number"):
        SAMPLERS["teleport"].rule({"base": "dpmpp", "skip": -1}, {"name": "karras"})
    assert options("teleport") == {"base": "dpmpp", "skip": 2, "moments": None}
