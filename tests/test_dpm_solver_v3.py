"""DPM-Solver-v3 (Zheng et al. 2023, arXiv:2310.13268) and its empirical model statistics.

References: our DDIM and DPM-Solver++ samplers (the paper's Appendix A.2: l = 1, s = b = 0 reduces
v3 to DPM-Solver++), closed-form Gaussian statistics and the exact Gaussian flow map
(samplebench.samplers.teleport.gaussian_flow_map)."""

import math

import numpy as np
import pytest
import torch

from samplebench.errors import UsageError
from samplebench.models.gmm import GaussianMixtureModel, MixtureSpec
from samplebench.samplers.base import CountingDenoiser, SamplerContext, guided_denoiser
from samplebench.samplers.dpm_solver import sample_dpmpp_multistep
from samplebench.samplers.dpm_solver_v3 import EMS, sample_dpm_solver_v3
from samplebench.samplers.ems import compute_ems, ems_key, load_or_compute
from samplebench.samplers.euler import sample_ddim
from samplebench.samplers.teleport import gaussian_flow_map
from samplebench.schedules import make_grid
from samplebench.seeds import initial_noise

GRID = 2000  # EMS grid points for the trivial-statistics comparisons


@pytest.fixture(scope="module")
def setup(gmm):
    idx = list(range(16))
    x_T = initial_noise(0, idx, gmm.sample_shape, torch.float64, gmm.device)
    den = guided_denoiser(gmm, gmm.conditions(idx, 0), 1.0)
    noise = gmm.noise_schedule
    lams = np.linspace(-math.log(noise.sigma_max), -math.log(noise.sigma_min), GRID)
    return x_T, den, EMS.trivial(lams, gmm.sample_shape), lams


def _start(gmm, x_T, sigmas):
    return gmm.noise_schedule.initial_state(x_T, float(sigmas[0]))


# Trapezoid rule on a uniform lambda grid of spacing d: each integral of e^{L+S} = e^{lambda - lambda_T}
# has relative error <= d^2 / 12 (f''/f = 1); with GRID = 2000 points over the scaled_linear range
# (lambda in [-2.68, 3.51]) d = 3.1e-3, so 8e-7 relative per step coefficient. Over <= 20 steps on
# samples of scale ~7 the accumulated difference stays below 1e-4 absolute; the bound used is 2e-4.
TRAPEZOID_TOL = 2e-4


@pytest.mark.parametrize("schedule", ["karras", "logsnr", "time_uniform"])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_trivial_statistics_first_order_is_ddim(gmm, setup, schedule, steps):
    """Reference: sample_ddim (eta = 0). l = 1, s = b = 0 at order 1 without corrector is DDIM's
    x' = (sigma'/sigma) x + (1 - sigma'/sigma) D, up to the trapezoid error of I = int e^L."""
    x_T, den, ems, _ = setup
    grid = make_grid({"name": schedule}, gmm.noise_schedule, steps)
    x = _start(gmm, x_T, grid.sigmas)
    counter = CountingDenoiser(den)
    out = sample_dpm_solver_v3(counter, x, grid.sigmas, ems=ems, order=1, use_corrector=False)
    ref = sample_ddim(den, x, grid.sigmas)
    assert counter.calls == steps
    assert (out - ref).abs().max() < TRAPEZOID_TOL


@pytest.mark.parametrize("steps", [6, 10, 20])
def test_trivial_statistics_second_order_is_dpmpp_taylor(gmm, setup, steps):
    """Reference: sample_dpmpp_multistep(order=2, solver_type='heun') (the Taylor form phi_2 D1) on the
    same levels (v3 inserts the schedule's levels into its grid, so the levels are the same); both with
    lower_order_final off (our DPM-Solver++ lowers at < 15 steps counting the step to 0, v3 follows
    the official rule), up to the trapezoid error (bound above)."""
    x_T, den, ems, _ = setup
    grid = make_grid({"name": "karras"}, gmm.noise_schedule, steps)
    x = _start(gmm, x_T, grid.sigmas)
    out = sample_dpm_solver_v3(
        den, x, grid.sigmas, ems=ems, order=2, use_corrector=False, lower_order_final=False
    )
    ref = sample_dpmpp_multistep(den, x, grid.sigmas, order=2, solver_type="heun", lower_order_final=False)
    assert (out - ref).abs().max() < TRAPEZOID_TOL


def _dpmpp3_taylor(den, x, sigmas):
    """Third-order multistep DPM-Solver++ in the exact Taylor form: x' = (sigma'/sigma) x +
    sum_k int_0^h e^{u - h} u^k du * c_k with D(lambda_s + u) ~ c_0 + c_1 u + c_2 u^2 through the last
    three evaluations (Newton divided differences re-expanded at lambda_s). Written here because our
    sample_dpmpp_multistep(order=3), like the official DPM-Solver and k-diffusion's 3M, weights the
    second-derivative term by phi_3 = h^2/6 + ..., half of the Taylor weight int u^2 = h^3/3 (see the
    report for this branch); at order 2 the two agree."""
    s = [float(v) for v in sigmas]
    hist = []
    for i in range(len(s) - 1):
        d = den(x, torch.tensor(s[i], dtype=torch.float64))
        hist.insert(0, (-math.log(s[i]), d))
        del hist[3:]
        if s[i + 1] == 0:
            return d
        h = math.log(s[i] / s[i + 1])
        m = [
            -math.expm1(-h),  # int_0^h e^{u-h} du
            h - 1 + math.exp(-h),  # int_0^h e^{u-h} u du
            h * h - 2 * h + 2 - 2 * math.exp(-h),  # int_0^h e^{u-h} u^2 du
        ]
        lam0 = hist[0][0]
        c = [hist[0][1]]
        if len(hist) >= 2:
            f01 = (hist[0][1] - hist[1][1]) / (hist[0][0] - hist[1][0])
            c.append(f01)
        if len(hist) == 3:
            f12 = (hist[1][1] - hist[2][1]) / (hist[1][0] - hist[2][0])
            f012 = (f01 - f12) / (hist[0][0] - hist[2][0])
            c[1] = f01 + f012 * (lam0 - hist[1][0])
            c.append(f012)
        x = (s[i + 1] / s[i]) * x + sum(mk * ck for mk, ck in zip(m, c, strict=False))
    return x


@pytest.mark.parametrize("steps", [6, 10, 20])
def test_trivial_statistics_third_order_is_dpmpp_taylor(gmm, setup, steps):
    """Reference: third-order multistep DPM-Solver++ in the Taylor form (_dpmpp3_taylor above), up to
    the trapezoid error; and the pseudo-order predictor differs from it (it uses divided differences)."""
    x_T, den, ems, _ = setup
    grid = make_grid({"name": "karras"}, gmm.noise_schedule, steps)
    x = _start(gmm, x_T, grid.sigmas)
    kw = dict(ems=ems, order=3, use_corrector=False, lower_order_final=False)
    out = sample_dpm_solver_v3(den, x, grid.sigmas, **kw)
    ref = _dpmpp3_taylor(den, x, grid.sigmas)
    assert (out - ref).abs().max() < TRAPEZOID_TOL
    pseudo = sample_dpm_solver_v3(den, x, grid.sigmas, p_pseudo=True, **kw)
    assert (pseudo - ref).abs().max() > 10 * TRAPEZOID_TOL


def _gaussian(rotated: bool) -> GaussianMixtureModel:
    model = GaussianMixtureModel(MixtureSpec(components=1, seed=3), torch.device("cpu"))
    if not rotated:  # covariance diagonal in x's coordinates
        model.rotations = torch.eye(model.spec.dim, dtype=torch.float64)[None]
    return model


def test_ems_estimator_reproduces_gaussian_l():
    """Reference: for Gaussian data N(mu, S), D = mu + S (S + sigma^2 I)^-1 (x - mu), so
    sigma d eps/dx = I - dD/dx = sigma^2 (S + sigma^2 I)^-1 for every x, and l* is its diagonal
    (sigma^2 / (c + sigma^2) per eigen-direction when S = diag(c)). The Hutchinson estimate with n
    Rademacher probes has standard error sqrt(sum_{j != i} M_ij^2 / n) (the diagonal term is exact);
    every grid point and element is within 5 standard errors (+1e-12)."""
    n = 512
    for rotated in (False, True):
        model = _gaussian(rotated)
        ems = compute_ems(model, 1.0, grid_size=40, n_samples=n)
        cov = model.covariances()[0].numpy()
        for j, lam in enumerate(ems.lambdas):
            s2 = math.exp(-2 * lam)
            m = s2 * np.linalg.inv(cov + s2 * np.eye(len(cov)))
            se = np.sqrt(((m - np.diag(np.diag(m))) ** 2).sum(1) / n)
            np.testing.assert_array_less(np.abs(ems.l[j] - np.diag(m)), 5 * se + 1e-12)
        if not rotated:  # exact: no off-diagonal terms, l = sigma^2 / (c + sigma^2)
            c = model.eigenvalues[0].numpy()
            exact = np.exp(-2 * ems.lambdas)[:, None] / (c + np.exp(-2 * ems.lambdas)[:, None])
            np.testing.assert_allclose(ems.l, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [2, 3, 7, 15])
def test_first_order_with_exact_statistics_is_exact_on_gaussian_data(steps):
    """Reference: gaussian_flow_map (the exact PF-ODE map of N(mu, diag(c)) data). With l the exact
    sigma^2 / (c + sigma^2), f = sigma eps - l x = -l mu is a function of lambda alone, so s = 0 and
    b = df/dlambda = -l' mu make g constant and the first-order step exact for any step count, up to
    the trapezoid error of L, I and B on the grid (4000 points, spacing d = 1.5e-3: d^2 / 12 = 2e-7
    relative, on samples of scale <= 10 below 5e-6 absolute). Compared at the
    last positive level (sigmas ending at sigma_min, no step to D)."""
    model = _gaussian(rotated=False)
    noise = model.noise_schedule
    lams = np.linspace(-math.log(noise.sigma_max), -math.log(noise.sigma_min), 4000)
    c = model.eigenvalues[0].numpy()
    mu = model.means[0].numpy()
    s2 = np.exp(-2 * lams)[:, None]
    l_exact = s2 / (c + s2)
    l_prime = -2 * c * s2 / (c + s2) ** 2  # d/dlambda of sigma^2 / (c + sigma^2), sigma^2 = e^{-2 lambda}
    ems = EMS(lams, l_exact, np.zeros_like(l_exact), -l_prime * mu)
    idx = list(range(32))
    labels = torch.zeros(len(idx), dtype=torch.long)
    den = guided_denoiser(model, labels, 1.0)
    sigmas = torch.linspace(math.log(noise.sigma_max), math.log(noise.sigma_min), steps + 1).exp()
    x_T = initial_noise(0, idx, model.sample_shape, torch.float64, model.device)
    x = noise.initial_state(x_T, float(sigmas[0]))
    counter = CountingDenoiser(den)
    out = sample_dpm_solver_v3(counter, x, sigmas, ems=ems, order=1, use_corrector=False)
    mean, vectors, values = model.gaussian_moments(labels)
    exact = gaussian_flow_map(x, float(sigmas[0]), float(sigmas[-1]), mean, vectors, values)
    assert counter.calls == steps
    assert (out - exact).abs().max() < 5e-6
    # the trivial statistics (DDIM) are not exact at few steps on the same data
    ddim = sample_dpm_solver_v3(den, x, sigmas, ems=EMS.trivial(lams, (16,)), order=1, use_corrector=False)
    if steps <= 7:
        assert (ddim - exact).abs().max() > 1e-3


def test_corrector_and_final_step_contract(gmm, setup):
    """Reference: the registry contract (N evaluations for N steps, first at grid.sigmas[0] on the
    given x, no level twice); with the corrector on, the first order and every order still spend N."""
    x_T, den, ems, _ = setup
    grid = make_grid({"name": "karras"}, gmm.noise_schedule, 8)
    x = _start(gmm, x_T, grid.sigmas)
    for order in (1, 2, 3):
        for pseudo in (False, True):
            counter = CountingDenoiser(den, record=True)
            out = sample_dpm_solver_v3(counter, x, grid.sigmas, ems=ems, order=order, c_pseudo=pseudo)
            assert counter.calls == 8 and torch.isfinite(out).all()
            levels = [float(s) for _, s in counter.visits]
            assert levels == [float(v) for v in grid.sigmas[:-1]]
            torch.testing.assert_close(counter.visits[0][0], x)


def test_ems_cache_round_trip_and_missing_message(tmp_path):
    """Reference: samplebench.cache (checksummed .npz): a computed EMS is saved under
    <cache_root>/ems/<key>.npz and read back bitwise; compute=False without a file is a one-line
    UsageError naming the command that makes them; the key changes with guidance, grid and n."""
    model = _gaussian(rotated=True)
    ems, seconds = load_or_compute(model, 2.0, 20, 8, tmp_path, seed=5)
    assert seconds > 0
    files = list((tmp_path / "ems").glob("*.npz"))
    assert len(files) == 1 and files[0].stem == ems_key(model, 2.0, 20, 8, 5)
    from samplebench import cache

    arrays = cache.load(files[0], ("lambdas", "l", "s", "b"))
    np.testing.assert_array_equal(arrays["l"], ems.l)
    keys = {ems_key(model, w, g, n) for w, g, n in [(1.0, 20, 8), (2.0, 20, 8), (1.0, 30, 8), (1.0, 20, 9)]}
    assert len(keys) == 4
    with pytest.raises(UsageError, match="samplebench ems model=gmm guidance=1.5") as e:
        load_or_compute(model, 1.5, 20, 8, tmp_path, compute=False, seed=5)
    assert "\n" not in str(e.value)


def test_registry_entry_reads_statistics_through_the_context(gmm):
    """Reference: the registry run with SamplerContext equals sample_dpm_solver_v3 with the statistics
    load_or_compute gives for (model, guidance, ems_grid, ems_samples)."""
    from samplebench.samplers import get_sampler

    idx = list(range(4))
    labels = gmm.conditions(idx, 0)
    den = guided_denoiser(gmm, labels, 1.0)
    grid = make_grid({"name": "karras"}, gmm.noise_schedule, 6)
    x_T = initial_noise(0, idx, gmm.sample_shape, torch.float64, gmm.device)
    x = _start(gmm, x_T, grid.sigmas)
    opts = {"order": 2, "ems_grid": 30, "ems_samples": 16}
    out = get_sampler("dpm_solver_v3").run(den, x, grid, opts, None, SamplerContext(gmm, labels, 1.0))
    ems, _ = load_or_compute(gmm, 1.0, 30, 16, None)
    ref = sample_dpm_solver_v3(den, x, grid.sigmas, ems=ems, order=2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_cli_ems_then_sweep_finds_them_and_image_models_are_refused(tmp_path):
    """Reference: the CLI contract (one-line error, exit 2). `samplebench ems` writes the statistics
    under <results_dir>/.cache/ems/; a generate with the same options finds them (no "computed" line);
    an image model is refused before anything is loaded."""
    from cli_run import cli_here

    res = str(tmp_path / "res")
    common = ["sampler.ems_grid=30", "sampler.ems_samples=8", f"results_dir={res}"]
    made = cli_here("ems", "model=gmm", "guidance=1.5", *common)
    assert made.returncode == 0, made.stderr
    assert "computed" in made.stderr and len(list((tmp_path / "res" / ".cache" / "ems").glob("*.npz"))) == 1
    gen = cli_here(
        "generate",
        "sampler=dpm_solver_v3",
        "nfe=5",
        "guidance=1.5",
        "num_images=4",
        "batch_size=4",
        "shard_size=4",
        "run=v3",
        *common,
    )
    assert gen.returncode == 0, gen.stderr
    assert "computed" not in gen.stderr
    refused = cli_here("generate", "sampler=dpm_solver_v3", "model=sd15", "nfe=5", f"results_dir={res}")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "reference image set" in refused.stderr
