"""Native samplers against independent implementations of the same algorithms, on the exact GMM.

Part 1, k-diffusion (Crowson, k-diffusion 0.1.1, `k_diffusion/sampling.py`): each native sampler
and its k-diffusion function start from the same x on the same float64 grid and call the same exact
denoiser, so they may differ by round-off only. REF_RTOL = 1e-12 of the sample scale max|x|: the
observed differences are <= 3e-15 (a few float64 ulps times the ~20 operations per step), so the
bound has a 300x margin, while an algorithmic difference is far larger on this model: 2.5e-5 for
the form of a single warm-up step, 1e-2 to 3e-3 for lower-order final steps or another order
(test_reference_comparison_has_teeth).

Part 2, diffusers (the registry's `diffusers:<name>` entries, run through the adapter exactly as a
sweep runs them): see the tolerance notes above TWIN_RTOL. Not compared, and why:
- ipndm: neither library has iPNDM (diffusers' PNDM warms up with a Heun step and one more
  evaluation); dpm (multistep, noise prediction), unipc and deis have no k-diffusion counterpart.
- hb, ghvb, dpmpp_hb (momentum): neither library has them; test_momentum.py checks them against
  float64 transcriptions of the official code (sWizad/momentum-diffusion) and their base solvers.
- dpmpp_2s vs DPMSolverSinglestepScheduler: diffusers takes the intermediate level from the grid
  (orders 1, 2, 1, 2, ...), DPM-Solver++(2S) the log-midpoint of each step: different algorithms.
- euler_a on karras/logsnr: EulerAncestralDiscreteScheduler takes diffusers' spacings only.
- DPMSolverMultistep / UniPC / DEIS on linspace and leading: diffusers spaces N + 1 points and drops
  the last (levels up to 19x apart at 5 steps); on the spacings DEIS and `diffusers:dpm`
  (final_sigmas_type=sigma_min) also add a step to sigma_min (N + 1 evaluations). Only trailing is
  the same grid, for DPM-Solver++ and UniPC.
- Euler-family linspace when (T - 1) / (N - 1) is not an integer: diffusers interpolates fractional
  timesteps, our linspace rounds them (levels up to 4.6e-3 apart); N = 10 (step 111) is exact.
- ddim on karras/logsnr: the adapter rounds DDIM's levels to integer timesteps (up to 4.5e-2 off
  the grid), so it is compared on the rounded levels.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from samplebench.config import conf_dir
from samplebench.samplers import SAMPLERS
from samplebench.samplers import diffusers_loop as adapter
from samplebench.samplers.base import CountingDenoiser, guided_denoiser, noise_like
from samplebench.schedules import make_grid
from samplebench.seeds import initial_noise, sampler_generators

INDICES = list(range(16))
STEPS = (5, 10, 20)
REF_RTOL = 1e-12


def load_k_diffusion_sampling() -> types.ModuleType:
    """k_diffusion/sampling.py alone: importing the package pulls in its training stack (skimage,
    wandb, ...). It is loaded as `_kdiff_ref.sampling` under a bare package whose path is the
    installed k_diffusion folder, so its `from . import utils` finds the real utils.py; torchdiffeq
    and torchsde are stubbed when absent (only log_likelihood and the Brownian-tree noise sampler
    use them, and every call below passes its own noise_sampler); the stubs and the bare package
    leave sys.modules again once it is loaded."""
    found = importlib.util.find_spec("k_diffusion")
    if found is None or not found.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)")
    root = Path(list(found.submodule_search_locations)[0])
    stubs = {"_kdiff_ref": types.ModuleType("_kdiff_ref")}
    stubs["_kdiff_ref"].__path__ = [str(root)]
    for missing in ("torchdiffeq", "torchsde"):
        if importlib.util.find_spec(missing) is None:
            stubs[missing] = types.ModuleType(missing)
            stubs[missing].odeint = None  # torchdiffeq's one name it imports
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location("_kdiff_ref.sampling", root / "sampling.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        for name in [*stubs, "_kdiff_ref.utils", "_kdiff_ref.sampling"]:
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def kd() -> types.ModuleType:
    try:
        return load_k_diffusion_sampling()
    except ImportError as e:
        pytest.skip(f"k-diffusion reference unavailable: {e}")


def conf_options(name: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / "sampler" / f"{name}.yaml"))
    assert cfg.pop("name") == name
    return cfg


def start(gmm, grid):
    """(x at grid.sigmas[0], labels): the registry's start for samples INDICES at seed 0."""
    x_T = initial_noise(0, INDICES, gmm.sample_shape, torch.float64, gmm.device)
    return gmm.noise_schedule.initial_state(x_T, float(grid.sigmas[0])), gmm.conditions(INDICES, 0)


def run_registry(gmm, name, grid, overrides=None, record=False):
    """A registry run (conf/sampler/<name>.yaml plus overrides): (x_0, its CountingDenoiser)."""
    x, labels = start(gmm, grid)
    counter = CountingDenoiser(guided_denoiser(gmm, labels, 1.0), record=record)
    out = SAMPLERS[name].run(
        counter, x, grid, {**conf_options(name), **(overrides or {})}, sampler_generators(0, INDICES)
    )
    return out, counter


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| relative to the sample scale max |ref|."""
    return float((a - ref).abs().max() / ref.abs().max())


def grid_of(gmm, schedule: str, steps: int):
    return make_grid({"name": schedule}, gmm.noise_schedule, steps)


# ---------------------------------------------------------------------------------------------
# Part 1: k-diffusion
# ---------------------------------------------------------------------------------------------


def run_k_diffusion(kd, gmm, grid, function: str, stochastic: bool, **kwargs):
    """k-diffusion's `function` from the registry's start on grid.sigmas (float64): (x_0, calls).
    A stochastic one gets a noise_sampler drawing from a second, identically seeded set of
    per-sample generators, so it sees the native sampler's noise in the same order; a deterministic
    one that takes a noise_sampler gets zeros (it multiplies them by sigma_up = 0)."""
    x, labels = start(gmm, grid)
    calls = 0

    def model(y, sigma):
        nonlocal calls
        calls += 1
        return gmm.denoise(y, sigma, labels)

    fn = getattr(kd, function)
    if stochastic:
        generators = sampler_generators(0, INDICES)
        kwargs["noise_sampler"] = lambda sigma, sigma_next: noise_like(x, generators)
    elif "noise_sampler" in inspect.signature(fn).parameters:
        kwargs["noise_sampler"] = lambda sigma, sigma_next: torch.zeros_like(x)
    out = fn(model, x.clone(), grid.sigmas.clone(), disable=True, **kwargs)
    return out, calls


# (native sampler, option overrides, k-diffusion function, its keyword arguments, stochastic)
K_PAIRS = [
    ("euler", {}, "sample_euler", {}, False),
    ("heun", {}, "sample_heun", {}, False),
    ("dpm2", {}, "sample_dpm_2", {}, False),
    ("lms", {"order": 4}, "sample_lms", {"order": 4}, False),
    ("dpmpp", {}, "sample_dpmpp_2m", {}, False),
    ("dpmpp_2s", {}, "sample_dpmpp_2s_ancestral", {"eta": 0.0}, False),
    # k-diffusion's 3M warms up with the Taylor ('heun') second-order step and has no lower-order final
    (
        "dpmpp_3m",
        {"solver_type": "heun", "lower_order_final": False},
        "sample_dpmpp_3m_sde",
        {"eta": 0.0},
        False,
    ),
    ("ddim", {"eta": 0.0}, "sample_euler", {}, False),  # DDIM eta = 0 is Euler in sigma
    ("ddim", {"eta": 1.0}, "sample_euler_ancestral", {"eta": 1.0}, True),  # same sigma_up
    ("euler_a", {}, "sample_euler_ancestral", {"eta": 1.0}, True),
    ("dpmpp_sde", {}, "sample_dpmpp_2m_sde", {"eta": 1.0, "solver_type": "midpoint"}, True),
    ("dpm_single", {"order": 2}, "sample_dpm_2", {}, False),  # DPM-Solver-2 (r1 = 1/2) is DPM2 here
]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("schedule", ["karras", "logsnr", "time_uniform", "ays"])
@pytest.mark.parametrize(
    "native,overrides,function,kwargs,stochastic",
    K_PAIRS,
    ids=[f"{p[0]}{''.join(f'-{k}={v}' for k, v in p[1].items())}-vs-{p[2]}" for p in K_PAIRS],
)
def test_native_matches_k_diffusion(
    kd, gmm, native, overrides, function, kwargs, stochastic, schedule, steps
):
    """Reference: k-diffusion 0.1.1 sampling.<function> (named in the test id), same x, same grid,
    same noise; equal to round-off (REF_RTOL) and with the same number of model calls."""
    grid = grid_of(gmm, schedule, steps)
    out, counter = run_registry(gmm, native, grid, overrides)
    ref, calls = run_k_diffusion(kd, gmm, grid, function, stochastic, **kwargs)
    assert counter.calls == calls
    assert rel_err(out, ref) <= REF_RTOL


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("schedule", ["karras", "logsnr", "time_uniform", "ays"])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_singlestep_matches_k_diffusion_dpm_solver_steps(kd, gmm, order, schedule, steps):
    """Reference: k-diffusion's DPMSolver.dpm_solver_2_step (r1 = 1/2) / dpm_solver_3_step
    (r1 = 1/3, r2 = 2/3), DPM-Solver Alg. 1-2 (arXiv:2206.00927), one step per grid interval in
    t = -log sigma; the step to sigma = 0 (h = infinity) is the denoiser's output, as in every
    k-diffusion sampler."""
    grid = grid_of(gmm, schedule, steps)
    out, counter = run_registry(gmm, "dpm_single", grid, {"order": order})
    x, labels = start(gmm, grid)
    calls = 0

    def model(y, sigma):
        nonlocal calls
        calls += 1
        return gmm.denoise(y, sigma, labels)

    solver = kd.DPMSolver(model)
    step = solver.dpm_solver_2_step if order == 2 else solver.dpm_solver_3_step
    s = grid.sigmas
    for i in range(len(s) - 1):
        if s[i + 1] == 0:
            x = model(x, s[i] * x.new_ones(x.shape[0]))
        else:
            x, _ = step(x, solver.t(s[i]), solver.t(s[i + 1]))
    assert counter.calls == calls
    assert rel_err(out, x) <= REF_RTOL


def test_reference_comparison_has_teeth(kd, gmm):
    """The comparisons separate algorithms that differ in one warm-up step or in their last steps:
    DPM-Solver++(3M) with the midpoint second-order warm-up (2.5e-5 here) or with its conf defaults
    (also lower-order final steps, 1.2e-2) is not k-diffusion's 3M, and LMS of order 3 is not order
    4 (3.2e-3): all far above REF_RTOL, and the smallest still 10x above TWIN_RTOL."""
    grid = grid_of(gmm, "karras", 10)
    ref, _ = run_k_diffusion(kd, gmm, grid, "sample_dpmpp_3m_sde", False, eta=0.0)
    out, _ = run_registry(gmm, "dpmpp_3m", grid, {"lower_order_final": False})
    assert rel_err(out, ref) > 10 * TWIN_RTOL
    out, _ = run_registry(gmm, "dpmpp_3m", grid)
    assert rel_err(out, ref) > 1e-3
    out, _ = run_registry(gmm, "lms", grid, {"order": 3})
    ref, _ = run_k_diffusion(kd, gmm, grid, "sample_lms", False, order=4)
    assert rel_err(out, ref) > 1e-3


# ---------------------------------------------------------------------------------------------
# Part 2: the diffusers twins
# ---------------------------------------------------------------------------------------------

# TWIN_RTOL: diffusers keeps its sigma table in float32 (and its alphas_cumprod is a float32 cumprod
# of the trained betas), so the levels it visits differ from our float64 grid by up to 1.5e-7
# relative on karras/logsnr and 1.7e-6 on the integer spacings; Euler's and DPMSolverMultistep's
# step() also cast the sample to float32. The observed differences are <= 3.1e-7 of the sample
# scale (DPM-Solver at 20 steps; test_native_matches_float64_diffusers shows they vanish to round-off
# once the table is float64, where the scheduler does not cast), so 2e-6 leaves a 6x margin,
# while a different grid, warm-up form or final-step rule shows up as >= 2.5e-5
# (test_reference_comparison_has_teeth; module docstring). DEIS order 3 gets DEIS3_RTOL:
# diffusers evaluates its closed-form Lagrange integrals (ind_fn) in float32, with cancellation
# growing as the steps shrink: 2.3e-7 at 5 steps, 1.1e-6 at 10, 8.4e-6 at 20 on karras; with a
# float64 table the difference is 2e-15, and that comparison is the sharp one for DEIS.
TWIN_RTOL = 2e-6
DEIS3_RTOL = 2e-5

# diffusers' UniPC with solver_type='bh1' returns NaN samples with its default final_sigmas_type='zero'
# (scheduling_unipc_multistep.py, multistep_uni_p_bh_update: on the first-order step to sigma = 0,
# B_h = hh = -inf multiplies pred_res = 0). With 'sigma_min' its table ends at sigma_min twice and
# the adapter denoises there instead: the native step to 0, which is D itself.
UNIPC_BH1 = {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}

# (native, native overrides, diffusers overrides): the same algorithm with these options.
FLAG_TWINS = [
    ("euler", {}, {}),
    ("heun", {}, {}),
    ("dpm2", {}, {}),
    ("lms", {"order": 4}, {"order": 4}),
    ("dpmpp", {}, {}),
    ("dpmpp", {"solver_type": "heun"}, {"solver_type": "heun"}),
    ("dpmpp_3m", {}, {}),
    ("dpmpp_3m", {"lower_order_final": False}, {"lower_order_final": False}),
    ("dpm", {}, {}),
    ("dpm", {"order": 3, "solver_type": "heun"}, {"solver_order": 3, "solver_type": "heun"}),
    ("unipc", {}, {}),
    ("unipc", {"order": 3}, {"solver_order": 3}),
    ("unipc", {"variant": "bh1"}, UNIPC_BH1),
    ("deis", {"order": 2}, {"solver_order": 2}),  # conf defaults differ: native 3, diffusers 2
    ("deis", {"order": 3}, {"solver_order": 3}),
]


def _twin_id(twin) -> str:
    name, native, _ = twin
    return name + "".join(f"-{k}={v}" for k, v in native.items())


def assert_twins(gmm, name, grid, native_overrides, diffusers_overrides, rtol=TWIN_RTOL):
    out, counter = run_registry(gmm, name, grid, native_overrides)
    ref, theirs = run_registry(gmm, f"diffusers:{name}", grid, diffusers_overrides)
    assert counter.calls == theirs.calls
    err = rel_err(out, ref)
    assert err <= rtol, f"{name} vs diffusers:{name}: {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("schedule", ["karras", "logsnr"])
@pytest.mark.parametrize("twin", FLAG_TWINS, ids=[_twin_id(t) for t in FLAG_TWINS])
def test_native_matches_diffusers_twin(gmm, twin, schedule, steps):
    """Reference: diffusers' scheduler (`diffusers:<name>`, built with use_karras_sigmas /
    use_exponential_sigmas) with the same algorithm options, the same start and the same exact
    denoiser; equal to diffusers' float32 precision (TWIN_RTOL), same number of evaluations."""
    name, native, theirs = twin
    rtol = DEIS3_RTOL if name == "deis" and native.get("order") == 3 else TWIN_RTOL
    assert_twins(gmm, name, grid_of(gmm, schedule, steps), native, theirs, rtol)


# Samplers whose diffusers scheduler takes our integer-timestep spacings as the same levels. The
# stochastic ones (euler_a, ddim eta = 1) are comparable sample by sample: diffusers draws their
# noise with randn_tensor from the same per-sample generators, in float64, once per step, in the
# native order (its extra draw on the last step, scaled by 0, comes after every used one).
SPACING_TWINS = [
    ("euler", {}, {}),
    ("heun", {}, {}),
    ("dpm2", {}, {}),
    ("lms", {"order": 4}, {"order": 4}),
    ("euler_a", {}, {}),
    ("ddim", {"eta": 0.0}, {"eta": 0.0}),
    ("ddim", {"eta": 1.0}, {"eta": 1.0}),
]
SPACING_CASES = [("leading", n) for n in STEPS] + [("trailing", n) for n in STEPS] + [("linspace", 10)]


@pytest.mark.parametrize("schedule,steps", SPACING_CASES)
@pytest.mark.parametrize("twin", SPACING_TWINS, ids=[_twin_id(t) for t in SPACING_TWINS])
def test_native_matches_diffusers_twin_on_spacings(gmm, twin, schedule, steps):
    """Reference: diffusers' Euler/Heun/KDPM2/LMS/EulerAncestral (timestep_spacing) and DDIM (built
    on the visited sub-schedule) on diffusers' own spacings; linspace only at N = 10, where its
    fractional timesteps are integers (module docstring)."""
    name, native, theirs = twin
    assert_twins(gmm, name, grid_of(gmm, schedule, steps), native, theirs)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize(
    "twin",
    [
        ("dpmpp", {}, {}),
        ("dpmpp_3m", {}, {}),
        ("unipc", {}, {}),
        ("unipc", {"order": 3}, {"solver_order": 3}),
    ],
    ids=_twin_id,
)
def test_native_matches_diffusers_multistep_on_trailing(gmm, twin, steps):
    """Reference: DPMSolverMultistepScheduler / UniPCMultistepScheduler with
    timestep_spacing='trailing', the one diffusers spacing they share with ours."""
    name, native, theirs = twin
    assert_twins(gmm, name, grid_of(gmm, "trailing", steps), native, theirs)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("schedule", ["karras", "logsnr"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_native_ddim_matches_diffusers_on_integer_levels(gmm, eta, schedule, steps):
    """Reference: diffusers' DDIMScheduler (eta as a step option) on karras/logsnr levels rounded to
    integer training timesteps, which is what the adapter gives DDIM; the native sampler runs the
    same rounded levels (schedule=custom)."""
    rounded = adapter.integer_timesteps(grid_of(gmm, schedule, steps))
    levels = gmm.noise_schedule.train_sigmas[torch.tensor(rounded)].tolist()
    grid = make_grid({"name": "custom", "sigmas": levels}, gmm.noise_schedule, steps)
    assert_twins(gmm, "ddim", grid, {"eta": eta}, {"eta": eta})


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("schedule", ["karras", "logsnr", "trailing"])
def test_native_dpmpp_sde_matches_diffusers_with_float64_noise(gmm, monkeypatch, schedule, steps):
    """Reference: DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++'), whose update is
    DPM-Solver++(2M) SDE with eta = 1. diffusers draws that noise in float32 (randn_tensor(...,
    dtype=torch.float32)), a different stream from the native float64 draws, so its randn_tensor is
    replaced here by float64 draws from the same per-sample generators, cast to its float32; it
    draws once per step, the last one (scaled by 0) after every used one, as the native sampler."""
    import diffusers.schedulers.scheduling_dpmsolver_multistep as dpms

    def float64_randn(shape, generator=None, device=None, dtype=None, **_):
        rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float64) for g in generator]
        return torch.stack(rows).to(device=device, dtype=dtype)

    monkeypatch.setattr(dpms, "randn_tensor", float64_randn)
    assert_twins(gmm, "dpmpp_sde", grid_of(gmm, schedule, steps), {}, {})


# Schedulers whose arithmetic follows the dtype of their sigma table (no float32 cast of the sample).
FLOAT64_TWINS = [
    ("heun", {}, {}),
    ("lms", {"order": 4}, {"order": 4}),
    ("unipc", {}, {}),
    ("unipc", {"order": 3}, {"solver_order": 3}),
    ("unipc", {"variant": "bh1"}, UNIPC_BH1),
    ("deis", {"order": 2}, {"solver_order": 2}),
    ("deis", {"order": 3}, {"solver_order": 3}),
]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("schedule", ["karras", "logsnr"])
@pytest.mark.parametrize("twin", FLOAT64_TWINS, ids=[_twin_id(t) for t in FLOAT64_TWINS])
def test_native_matches_float64_diffusers(gmm, monkeypatch, twin, schedule, steps):
    """Reference: the same diffusers schedulers with their sigma table upcast to float64 after
    set_timesteps, against the native sampler on the levels diffusers visited: equal to round-off
    (REF_RTOL): for these schedulers the float32 table is the only difference behind TWIN_RTOL."""
    name, native, theirs = twin
    build = adapter.build

    def float64_build(*args, **kwargs):
        scheduler, mapper = build(*args, **kwargs)
        scheduler.sigmas = scheduler.sigmas.to(torch.float64)
        return scheduler, mapper

    monkeypatch.setattr(adapter, "build", float64_build)
    grid = grid_of(gmm, schedule, steps)
    ref, theirs_counter = run_registry(gmm, f"diffusers:{name}", grid, theirs, record=True)
    visited = list(dict.fromkeys(float(sigma.reshape(-1)[0]) for _, sigma in theirs_counter.visits))
    levels = make_grid({"name": "custom", "sigmas": visited}, gmm.noise_schedule, len(visited))
    assert levels.steps == steps
    out, counter = run_registry(gmm, name, levels, native)
    assert counter.calls == theirs_counter.calls
    assert rel_err(out, ref) <= REF_RTOL
