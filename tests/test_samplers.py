"""Contract tests every registered sampler must pass, on every schedule it takes (as diffusers'
test_schedulers.py does for its schedulers).

The reference for convergence is scipy's DOP853 solution of the exact probability-flow ODE
(samplebench.metrics.reference), independent of every sampler under test.
"""

import inspect
import itertools

import diffusers
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from samplebench.config import conf_dir
from samplebench.errors import UsageError
from samplebench.metrics.reference import solve_with_floor
from samplebench.samplers import SAMPLERS, get_sampler
from samplebench.samplers.base import CountingDenoiser, SamplerContext, guided_denoiser
from samplebench.schedules import SCHEDULES, make_grid
from samplebench.seeds import initial_noise, sampler_generators


def runs_on(name, model_name):
    """Whether the sampler takes this model (its plan-time model_check: the diffusers FlowMatch
    schedulers run flow models only; test_sampler_contracts.py runs them on gmm_flow)."""
    check = SAMPLERS[name].model_check
    if check is None or not name.startswith("diffusers:"):
        return True
    try:
        check({}, {"name": model_name})
    except UsageError:
        return False
    return True


VP_SAMPLERS = sorted(n for n in SAMPLERS if runs_on(n, "gmm"))  # every sampler the gmm (VP) model takes
ODE = [n for n, s in SAMPLERS.items() if s.kind == "ode" and n in VP_SAMPLERS]
NATIVE_ODE = [n for n in ODE if SAMPLERS[n].family == "native"]
SDE = [n for n, s in SAMPLERS.items() if s.kind == "sde" and n in VP_SAMPLERS]
N = 96
# Schedules a contract runs on; custom and ays need their own options or published lists.
GRID_SCHEDULES = [
    "karras",
    "time_uniform",
    "time_quadratic",
    "logsnr",
    "polyexponential",
    "linspace",
    "leading",
    "trailing",
    "ays",
]


def options(name):
    cfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / "sampler" / f"{name}.yaml"))
    assert cfg.pop("name") == name
    return cfg


def schedule_cfg(name):
    cfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / "schedule" / f"{name}.yaml"))
    return {k: v for k, v in cfg.items()}


def run(
    gmm,
    name,
    nfe,
    indices,
    guidance=1.0,
    opts=None,
    allow_lower=False,
    schedule="karras",
    record=False,
    sampler_seed=0,
):
    spec = SAMPLERS[name]
    opts = options(name) if opts is None else opts
    sched = schedule_cfg(schedule) if isinstance(schedule, str) else schedule
    x_T = initial_noise(0, indices, gmm.sample_shape, torch.float64, gmm.device)
    labels = gmm.conditions(indices, 0)
    counter = CountingDenoiser(guided_denoiser(gmm, labels, guidance), record=record)
    steps = spec.rule(opts, sched).steps(nfe, name, allow_lower)
    grid = make_grid(sched, gmm.noise_schedule, steps)
    x = gmm.noise_schedule.initial_state(x_T, float(grid.sigmas[0]))
    context = SamplerContext(gmm, labels, guidance)
    out = spec.run(counter, x, grid, opts, sampler_generators(sampler_seed, indices), context)
    return (out, counter.calls, counter, grid, x) if record else (out, counter.calls)


def takes(name, schedule):
    grids = SAMPLERS[name].grids
    return grids.startswith("any") or schedule in grids.split(",")


@pytest.fixture(scope="module")
def solution(gmm):
    idx = list(range(N))
    x_T = initial_noise(0, idx, gmm.sample_shape, torch.float64, gmm.device)
    return solve_with_floor(gmm, x_T, gmm.conditions(idx, 0), 1.0)


@pytest.fixture(scope="module")
def reference(solution):
    return solution[0]


def traj_err(x, ref):
    return ((x - ref) ** 2).mean(1).sqrt().mean().item()


def test_every_conf_file_is_registered_and_vice_versa():
    files = sorted(p.stem for p in (conf_dir() / "sampler").glob("*.yaml"))
    assert files == sorted(SAMPLERS)
    assert sorted(p.stem for p in (conf_dir() / "schedule").glob("*.yaml")) == sorted(SCHEDULES)


def test_native_and_diffusers_names_never_collide():
    for name, spec in SAMPLERS.items():
        assert (spec.family == "diffusers") == name.startswith("diffusers:"), name


# Values an option is tried at when SamplerSpec.choices does not list them (the diffusers entries'
# constructor arguments, keyed by option and conf default); other bools are tried at both values and
# other floats (eta, s_noise) at 0, 0.5 and 1. variance_type's "_log" forms are left out: they are the
# same variances computed through a log, equal to round-off.
OPTION_VALUES = {
    ("solver_order", 2): (1, 2, 3),
    ("order", 4): (1, 2, 3, 4),
    ("solver_type", "midpoint"): ("midpoint", "heun"),
    ("solver_type", "bh2"): ("bh1", "bh2"),
    ("variance_type", "fixed_small"): ("fixed_small", "fixed_large"),
    # The momentum samplers' beta lives in (0, 1] (1 = no momentum): at 0 heavy ball never updates its
    # velocity and GHVB's weights divide by beta, so 0 is refused (a UsageError) rather than tried.
    ("beta", 0.8): (0.5, 0.8, 1.0),
    ("skip", 2): (0, 1, 2, 3),
    # TCD's gamma (diffusers: eta), 0.3 by default: 0 is its deterministic end, 1 LCM's full re-noising.
    ("gamma", 0.3): (0.0, 0.3, 1.0),
    ("eta", 0.3): (0.0, 0.3, 1.0),
    # teleport's reference folder is for image models (the analytic model has exact moments): it is
    # exercised in test_paper_samplers_images.py on a tiny pipeline.
    ("moments", None): (None,),
    # DPM-Solver-v3's reference folder is for image models too (the analytic model draws exact data):
    # exercised in test_paper_samplers_images.py.
    ("ems_data", None): (None,),
    # time shift (ts_ddim, ts_dpmpp): off, the default, wider; cutoffs from everywhere to nowhere
    ("window", 30): (0, 30, 60),
    ("cutoff", 300): (0, 300, 999),
    # DPM-Solver-v3's statistics: grid points and data samples of the EMS estimate (each value is one
    # EMS computation on the analytic model, a few seconds, kept for the process).
    ("ems_grid", 250): (100, 250),
    ("ems_samples", 256): (64, 256),
    # dc_solver: its ratios (searched, or 1 = UniPC; cpr needs a coefficient file and lists one ratio
    # per step, tested in test_dc_solver.py) and the search's settings, each at a second value.
    ("ratios", "search"): ("search", "none"),
    ("calibration", 10): (3, 10),
    ("calibration_seed", 1): (1, 2),
    ("iterations", 20): (5, 20),
    ("lr", 0.1): (0.02, 0.1),
    ("reference_steps", 200): (10, 200),
}
SIGMA_MIN = {"final_sigmas_type": "sigma_min"}
# (sampler, option) -> (other options, schedule, NFE, why): where an option acts only away from the conf
# defaults, it is shown to act where it does, and the reason it does nothing at the defaults is given.
OPTION_SETTINGS = {
    ("dpm", "lower_order_final"): (
        {"order": 3},
        "karras",
        10,
        "at order 2 it lowers only the last step, which goes to sigma = 0 and is first-order anyway",
    ),
    ("unipc", "lower_order_final"): (
        {"order": 3},
        "karras",
        10,
        "at order 2 it lowers only the last step, which goes to sigma = 0 and is first-order anyway",
    ),
    ("diffusers:deis", "lower_order_final"): (
        {"solver_order": 3},
        "karras",
        10,
        "at order 2 it lowers only the last step, which on karras is the zero-length step from sigma_min "
        "to sigma_min that the adapter does not take (it denoises there instead)",
    ),
    ("diffusers:dpm", "lower_order_final"): (
        {"solver_order": 3},
        "karras",
        10,
        "as for diffusers:deis (final_sigmas_type=sigma_min is fixed for this entry)",
    ),
    ("diffusers:dpm", "euler_at_final"): (
        {"lower_order_final": False},
        "linspace",
        10,
        "it changes only the last step: on karras that is the skipped zero-length step, and with "
        "lower_order_final below 15 steps the last step is first-order already",
    ),
    **{
        (name, "euler_at_final"): (
            {**SIGMA_MIN, "lower_order_final": False},
            "linspace",
            10,
            "DPMSolverMultistepScheduler takes its last step first-order whenever final_sigmas_type='zero' "
            "(this entry's default); with sigma_min it acts on linspace, whose last step is not zero-length",
        )
        for name in ("diffusers:dpmpp", "diffusers:dpmpp_3m", "diffusers:dpmpp_sde")
    },
    **{
        (name, "lower_order_final"): (
            SIGMA_MIN,
            "linspace",
            10,
            "at order 2 it lowers only the last step, which is first-order whenever final_sigmas_type='zero' "
            "(this entry's default)",
        )
        for name in ("diffusers:dpmpp", "diffusers:dpmpp_sde")
    },
    ("diffusers:dpmpp_2s", "lower_order_final"): (
        SIGMA_MIN,
        "trailing",
        11,
        "DPMSolverSinglestepScheduler sets it back to true when final_sigmas_type='zero' (the default) or "
        "the step count is odd, and otherwise it lowers only the last step, zero-length on karras and "
        "linspace; trailing at 10 steps (11 evaluations with the one that denoises at sigma_min) it acts",
    ),
    ("diffusers:unipc", "solver_type"): (
        SIGMA_MIN,
        "karras",
        10,
        "bh1 with final_sigmas_type='zero' gives NaN in diffusers (test_sampler_references.UNIPC_BH1)",
    ),
    ("dpm_solver_v3", "p_pseudo"): (
        {},
        "karras",
        6,
        "it changes only third-order steps (divided differences and the Taylor system agree on two points): "
        "at 10 NFE it moves the samples by 7e-5 of their scale, at 5 NFE lower_order_final leaves no "
        "third-order step, at 6 NFE it moves them by 2.7e-4",
    ),
    ("dpm_solver_v3", "lower_order_final"): (
        {},
        "karras",
        5,
        "it lowers only the last two steps between positive levels: at 10 NFE that moves the samples by "
        "2.9e-5 of their scale, at 5 NFE by 1.3e-3",
    ),
    ("dc_solver", "reference_steps"): (
        {"reference": "solver"},
        "karras",
        10,
        "on the analytic model the reference is the exact ODE unless sampler.reference=solver",
    ),
    **{
        ("dc_solver", key): (
            {},
            "karras",
            6,
            "at 10 NFE the ratios searched for each value absorb most of the difference (dc_order 2 and 3: "
            "6e-5 of the sample scale apart, correct_first 4e-5, calibration 3 and 10 samples 9e-5, lr "
            "0.02 and 0.1 1.0e-4); at 6 NFE they are 3e-4 to 7e-4 apart",
        )
        for key in ("dc_order", "correct_first", "calibration", "lr")
    },
    ("ghvb", "beta"): (
        {},
        "karras",
        6,
        "GHVB keeps iPNDM's order at any beta: at 10 NFE on karras its samples are accurate enough that "
        "beta = 0.8 and 1 are only 3.5e-5 of their scale apart (2.6e-3 at 6 NFE)",
    ),
    ("diffusers:unipc", "lower_order_final"): (
        {**SIGMA_MIN, "solver_order": 3},
        "karras",
        10,
        "with final_sigmas_type='zero' turning it off puts a higher-order step on h = inf (inf samples, or a "
        "singular solve at order 3); at order 2 it lowers only the skipped zero-length last step",
    ),
}
# (sampler, option) -> why it cannot change anything at any setting the registry allows.
NO_EFFECT = {
    ("dpmpp", "lower_order_final"): (
        "DPM-Solver++(2M) is registered at order 2, where lower_order_final lowers only the last step, "
        "which goes to sigma = 0 and is D itself at any order (the key is shared with dpmpp_3m, where "
        "it acts)"
    ),
}
# A used option moves the samples by >= 6.7e-4 of their scale on this model (the smallest: UniPC's
# corrector on karras; then set_alpha_to_one, 7.6e-4); an ignored one leaves them bitwise equal (same
# code, no randomness beyond the seeded generators), and float32 round-off in diffusers is ~3e-7.
OPTION_EFFECT = 1e-4


def option_values(name, key, default):
    spec = SAMPLERS[name]
    if key in spec.choices:
        return spec.choices[key]
    if (key, default) in OPTION_VALUES:
        return OPTION_VALUES[key, default]
    if isinstance(default, bool):
        return (False, True)
    if isinstance(default, float):
        return (0.0, 0.5, 1.0)
    assert (key, default) in OPTION_VALUES, f"{name}: no values to try for sampler.{key}; add them above"
    return OPTION_VALUES[key, default]


@pytest.mark.parametrize("name", VP_SAMPLERS)
def test_options_are_real_arguments(gmm, name):
    """Every key of conf/sampler/<name>.yaml reaches the algorithm: each value it is tried at (its
    SamplerSpec.choices, or OPTION_VALUES) gives other samples, or another counted NFE, than every
    other value, on the analytic model; OPTION_SETTINGS names the settings where an option acts only
    away from the conf defaults, and NO_EFFECT the options that cannot act, each with the reason."""
    run_fn = SAMPLERS[name].run
    keywords = getattr(run_fn, "keywords", None)
    if keywords is None and hasattr(run_fn, "accepts"):  # composed samplers say which options they read
        accepted = set(run_fn.accepts)
    elif keywords is None:  # native: the options are keyword arguments of the sampling function
        accepted = set(inspect.signature(run_fn.__wrapped__).parameters)
    else:
        cls = getattr(diffusers, keywords["class_name"])
        accepted = set(inspect.signature(cls.__init__).parameters) | set(SAMPLERS[name].step_options)
    assert set(options(name)) <= accepted
    idx = list(range(8))
    for key, default in options(name).items():
        values = option_values(name, key, default)
        assert default in values, (name, key, default, values)
        other, schedule, target, why = OPTION_SETTINGS.get((name, key), ({}, "karras", 10, ""))
        results = []
        for value in values:
            opts = {**options(name), **other, key: value}
            out, calls = run(
                gmm, name, _feasible(name, target, schedule, opts), idx, opts=opts, schedule=schedule
            )
            assert torch.isfinite(out).all(), f"{name} with {key}={value}: non-finite samples"
            results.append((value, out, calls))
        for (a, out_a, calls_a), (b, out_b, calls_b) in itertools.combinations(results, 2):
            change = float((out_a - out_b).abs().max() / out_b.abs().max())
            if (name, key) in NO_EFFECT:
                assert change == 0 and calls_a == calls_b, f"{name}.{key}: {NO_EFFECT[name, key]}"
                continue
            assert calls_a != calls_b or change > OPTION_EFFECT, (
                f"{name}: sampler.{key}={a} and {key}={b} give the same samples ({change:.1e} apart) and "
                f"NFE ({calls_a}) on {schedule} with {other or 'the conf defaults'}"
                + (f" (set there because {why})" if why else "")
            )


def _feasible(name, target, schedule="karras", opts=None):
    rule = SAMPLERS[name].rule(options(name) if opts is None else opts, schedule_cfg(schedule))
    return rule.nfe(rule.steps(target, name, allow_lower=True))


@pytest.mark.parametrize("name", VP_SAMPLERS)
def test_counted_nfe_equals_requested(gmm, name):
    for schedule in ("karras", "linspace"):
        if not takes(name, schedule):
            continue
        for target in (5, 10, 21):
            nfe = _feasible(name, target, schedule)
            _, calls = run(gmm, name, nfe, [0, 1, 2], schedule=schedule)
            assert calls == nfe, f"{name} on {schedule}: asked for {nfe}, counted {calls}"
            _, calls = run(gmm, name, nfe, [0, 1, 2], guidance=3.0, schedule=schedule)
            assert calls == nfe  # a batched guided step counts once


def test_nfe_a_sampler_cannot_spend_is_an_error():
    heun = get_sampler("heun").rule({}, {"name": "karras"})
    with pytest.raises(UsageError, match="cannot spend exactly nfe=10"):
        heun.steps(10, "heun", allow_lower=False)
    assert heun.steps(10, "heun", allow_lower=True) == 5  # 9 evaluations
    with pytest.raises(UsageError, match="too small"):
        get_sampler("diffusers:pndm").rule({}, {"name": "karras"}).steps(
            1, "diffusers:pndm", allow_lower=True
        )


@pytest.mark.parametrize("name", ODE)
def test_ode_samplers_converge_to_the_exact_solution(gmm, solution, name):
    reference, floor_points = solution
    # DDIM and PNDM round levels to integer timesteps: Karras levels collide there at 100+ steps.
    schedule = "time_uniform" if name in ("diffusers:ddim", "diffusers:pndm") else "karras"
    budgets = [_feasible(name, n, schedule) for n in (10, 20, 40, 100, 400)]
    xs = [run(gmm, name, nfe, list(range(N)), schedule=schedule)[0] for nfe in budgets]
    errs = [traj_err(x, reference) for x in xs]
    # No level lies between sigma(t=0) and 0, so every sampler's last step is a jump whose error
    # does not shrink with NFE: errors fall until they reach this floor (about 6e-4 here).
    floor = traj_err(floor_points, reference)
    assert 1e-4 < floor < 2e-3
    for a, b in zip(errs, errs[1:], strict=False):
        assert b <= a + 2 * floor, f"{name}: traj_err grew from {a:.2e} to {b:.2e} ({errs})"
    # Down to the floor: the distance to where the exact solve to sigma_min plus the final jump lands
    # falls at least like a first-order method's (40x at 40x the NFE; 20x required).
    # (LMS extrapolates its derivatives over the last step instead of jumping, so it heads for the
    # exact solution itself: the nearer of the two end points is the one it converges to.)
    to_floor = [min(traj_err(x, floor_points), traj_err(x, reference)) for x in (xs[0], xs[-1])]
    assert to_floor[1] < 0.05 * to_floor[0], f"{name}: distance to the floor points {to_floor}"


@pytest.mark.parametrize("name", NATIVE_ODE)
@pytest.mark.parametrize("schedule", ["time_uniform", "logsnr"])
def test_native_ode_samplers_converge_on_other_schedules(gmm, solution, name, schedule):
    reference, floor_points = solution  # both grids end at sigma_min, so the floor points are the same
    idx = list(range(N))
    xs = [run(gmm, name, _feasible(name, n, schedule), idx, schedule=schedule)[0] for n in (10, 400)]
    to_floor = [min(traj_err(x, floor_points), traj_err(x, reference)) for x in xs]
    assert to_floor[1] < 0.05 * to_floor[0], f"{name} on {schedule}: distance to the floor points {to_floor}"


def test_dpmpp_beats_ddim_at_10_nfe(gmm, reference):
    idx = list(range(N))
    assert traj_err(run(gmm, "dpmpp", 10, idx)[0], reference) < traj_err(
        run(gmm, "ddim", 10, idx)[0], reference
    )


@pytest.mark.parametrize("name", VP_SAMPLERS)
def test_samples_do_not_depend_on_batch_composition(gmm, name):
    # Sample i starts from noise of (seed, i) and draws its own sampler noise: a batch of one and a
    # batch of many give the same sample to float round-off.
    schedule = "karras" if takes(name, "karras") else "linspace"
    nfe = _feasible(name, 10, schedule)
    together, _ = run(gmm, name, nfe, list(range(8)), schedule=schedule)
    alone = torch.cat([run(gmm, name, nfe, [i], schedule=schedule)[0] for i in (0, 5, 7)])
    torch.testing.assert_close(alone, together[[0, 5, 7]], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", SDE)
def test_stochastic_samplers_are_stochastic(gmm, name):
    """The sampler's own noise, from the same x_T: the same sampler seed gives the same samples
    bitwise, and another sampler seed moves every sample by far more than round-off (the noise
    injected along the way, not x_T, is what differs). Its size is pinned by
    test_euler_ancestral_injects_k_diffusions_noise (euler_a) and test_sampler_references (the others)."""
    idx = list(range(8))
    schedule = "karras" if takes(name, "karras") else "linspace"
    nfe = _feasible(name, 10, schedule)
    a, _ = run(gmm, name, nfe, idx, schedule=schedule, sampler_seed=0)
    again, _ = run(gmm, name, nfe, idx, schedule=schedule, sampler_seed=0)
    other, _ = run(gmm, name, nfe, idx, schedule=schedule, sampler_seed=1)
    assert torch.isfinite(a).all() and torch.isfinite(other).all()
    assert torch.equal(a, again)
    # Per sample: at eta = 1 the injected noise moves a sample by O(1) of its scale (0.17 at the least
    # here); round-off, the only thing a sampler that ignored its generators could differ by, is 1e-15.
    moved = (a - other).abs().amax(1) / a.abs().amax(1)
    assert (moved > 1e-2).all(), f"{name}: samples the sampler seed does not move: {moved}"


def ancestral_reference(gmm, sigmas, indices, sampler_seed, eta, s_noise, noise_scale=1.0):
    """Float64 transcription of k-diffusion 0.1.1's sample_euler_ancestral with get_ancestral_step
    (k_diffusion/sampling.py): an Euler step to sigma_down, then noise of std sigma_up, with
    sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)), sigma_down^2 + sigma_up^2 =
    sigma'^2, and no noise on the step to 0. Its noise is drawn per sample from the registry's sampler
    generators (float64 standard normal, one draw per noisy step), the stream euler_a is given."""
    x_T = initial_noise(0, indices, gmm.sample_shape, torch.float64, gmm.device)
    labels = gmm.conditions(indices, 0)
    s = [float(v) for v in sigmas]
    x = x_T * (1 + s[0] ** 2) ** 0.5
    generators = sampler_generators(sampler_seed, indices)
    for sigma, nxt in zip(s, s[1:], strict=False):
        denoised = gmm.denoise(x, torch.full((len(indices),), sigma, dtype=torch.float64), labels)
        up = min(nxt, eta * (nxt**2 * (sigma**2 - nxt**2) / sigma**2) ** 0.5) if eta else 0.0
        down = (nxt**2 - up**2) ** 0.5
        x = x + (x - denoised) / sigma * (down - sigma)
        if nxt > 0:
            z = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float64) for g in generators])
            x = x + z * s_noise * up * noise_scale
    return x


@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.5)])
def test_euler_ancestral_injects_k_diffusions_noise(gmm, eta, s_noise):
    """Reference: ancestral_reference, a float64 transcription of k-diffusion's sample_euler_ancestral
    and get_ancestral_step, with the same noise draws: euler_a equals it to float64 round-off, so its
    noise has the reference's size sigma_up * s_noise at every step (the transcription with its noise
    scaled by 0.99 is more than 1e6 times the tolerance away)."""
    idx = list(range(8))
    opts = {"eta": eta, "s_noise": s_noise}
    out, calls, _, grid, _ = run(gmm, "euler_a", 10, idx, opts=opts, sampler_seed=3, record=True)
    ref = ancestral_reference(gmm, grid.sigmas, idx, 3, eta, s_noise)
    # The same float64 operations in the same order (bitwise equal here); 1e-12 of the sample scale
    # leaves room for a re-associated sum (a few ulps per step over 10 steps, ~1e-15), while an error
    # of 1% in the noise size is ~1e-3 of the scale.
    rtol = 1e-12
    assert calls == 10
    err = float((out - ref).abs().max() / ref.abs().max())
    assert err <= rtol, f"euler_a is {err:.2e} of the sample scale from the k-diffusion transcription"
    off = ancestral_reference(gmm, grid.sigmas, idx, 3, eta, s_noise, noise_scale=0.99)
    assert float((out - off).abs().max() / ref.abs().max()) > 1e6 * rtol


def test_visited_subschedule_fixes_ddim_when_steps_do_not_divide_1000(gmm, reference):
    # diffusers' DDIM steps by t - 1000 // N; driven directly at N=400 its updates disagree with the
    # timesteps it visits. Through our adapter it converges like any first-order solver.
    err_400 = traj_err(run(gmm, "diffusers:ddim", 400, list(range(N)), schedule="linspace")[0], reference)
    err_40 = traj_err(run(gmm, "diffusers:ddim", 40, list(range(N)), schedule="linspace")[0], reference)
    assert err_400 < err_40 / 5


# -- the faults of issue 11, each pinned ------------------------------------------------------------


@pytest.mark.parametrize("name", ["diffusers:euler", "diffusers:heun", "diffusers:lms", "diffusers:dpm2"])
def test_sigma_scaled_diffusers_samplers_start_from_x_T_sqrt_1_plus_sigma_max_squared(gmm, name):
    # Fault 1: x_T * init_noise_sigma (= sigma_max) started these at about 0.998 of the right point.
    _, _, counter, grid, x0 = run(gmm, name, _feasible(name, 10), [0, 1, 2], schedule="karras", record=True)
    first_x, first_sigma = counter.visits[0]
    x_T = x0 / np.sqrt(1 + float(grid.sigmas[0]) ** 2)
    s0 = float(first_sigma.reshape(-1)[0])
    torch.testing.assert_close(first_x, x_T * np.sqrt(1 + s0**2), rtol=1e-9, atol=0)
    assert not torch.allclose(first_x, x_T * s0, rtol=1e-4)


@pytest.mark.parametrize("order", [2, 3])
def test_diffusers_dpm_spends_no_evaluation_on_a_zero_length_step(gmm, reference, order):
    # Fault 2: final_sigmas_type=sigma_min after a Karras list that already ends at sigma_min made the
    # last step zero-length (NFE n gave the result of n-1) and divided by zero at solver_order=3.
    opts = {**options("diffusers:dpm"), "solver_order": order}
    for nfe in range(16, 31, 7):
        out, calls, counter, grid, _ = run(gmm, "diffusers:dpm", nfe, list(range(N)), opts=opts, record=True)
        assert calls == nfe and torch.isfinite(out).all()
        levels = [float(s.reshape(-1)[0]) for _, s in counter.visits]
        assert len(set(levels)) == len(levels)
        native, _ = run(gmm, "dpm", nfe, list(range(N)), opts={**options("dpm"), "order": order})
        # Same grid, same algorithm: they agree to diffusers' float32 level arithmetic.
        assert traj_err(out, native) < 1e-3 * traj_err(native, torch.zeros_like(native))


def test_linspace_ends_where_the_readme_says(gmm):
    # Fault 3: the native linspace grid is N training timesteps from T-1 down to 0, then 0.
    grid = make_grid({"name": "linspace"}, gmm.noise_schedule, 5)
    assert float(grid.sigmas[-2]) == pytest.approx(gmm.noise_schedule.sigma_min)
    assert grid.ends == "sigma_min then 0"
    t = gmm.noise_schedule.sigma_to_t(grid.sigmas[:-1])
    np.testing.assert_allclose(t.numpy(), [999, 749, 500, 250, 0], atol=1e-6)
