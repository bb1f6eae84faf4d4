"""The diffusers family: one adapter that drives any diffusers scheduler from our denoiser D.

What users run in diffusers can be benchmarked and checked against the native samplers. The
adapter fixes what would otherwise hide errors or waste evaluations:

1. Start: x_T is unit-variance noise, so a sigma-scaled scheduler starts at x_T sqrt(1 + sigma_0^2)
   (not x_T * init_noise_sigma = x_T sigma_0) and an alpha-scaled one at x_T.
2. The model is told the noise level the scheduler's update assumes (`solver_sigma`): diffusers
   passes Karras-spaced solvers a rounded timestep while stepping with the unrounded sigma.
3. DDIM and PNDM step from t to t - T // N whatever timesteps they were given, so they are built on
   the visited sub-schedule (`_visited_subschedule`): a scheduler whose training schedule *is* the
   N visited levels, stepping by one index.
4. A scheduler whose level list ends with a step of length zero (DPMSolverMultistep's
   final_sigmas_type='sigma_min' after a list that already ends at sigma_min) is not asked to take
   it: that evaluation denoises to 0 instead. One that stops at a positive level spends one more
   evaluation denoising to 0 (as the DPM-Solver reference code's denoise_to_zero).

Schedules: karras -> use_karras_sigmas, logsnr/exponential -> use_exponential_sigmas, linspace /
leading / trailing -> timestep_spacing (diffusers' own definition, which differs between
schedulers); any other schedule goes in as set_timesteps(sigmas=) or, rounded to integer training
timesteps, set_timesteps(timesteps=) where the scheduler accepts them, else it is a one-line error.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import diffusers
import numpy as np
import torch

from samplebench.errors import UsageError
from samplebench.models.base import NoiseSchedule
from samplebench.samplers.base import Denoiser, NfeRule
from samplebench.schedules import Grid

SPACINGS = ("linspace", "leading", "trailing")
SCHEDULE_FLAGS = {
    "karras": "use_karras_sigmas",
    "logsnr": "use_exponential_sigmas",
    "exponential": "use_exponential_sigmas",
}
_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")


def training_config(noise: NoiseSchedule) -> dict[str, Any]:
    """diffusers' constructor arguments for the model's training levels, eps-prediction (the adapter
    always hands the scheduler eps = (x - D) / sigma)."""
    abar = 1.0 / (1.0 + noise.train_sigmas.double() ** 2)
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    return dict(
        num_train_timesteps=noise.num_train_timesteps,
        trained_betas=betas.numpy(),
        prediction_type="epsilon",
    )


def _accepts(cls: type, method: str) -> set[str]:
    return set(inspect.signature(getattr(cls, method)).parameters)


def schedule_arguments(
    class_name: str, grid: Grid, subschedule: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(constructor arguments, set_timesteps arguments) that make `class_name` run grid.schedule."""
    cls = getattr(diffusers, class_name)
    init, setter = _accepts(cls, "__init__"), _accepts(cls, "set_timesteps")
    sched = grid.schedule
    name = str(sched.get("name"))
    off = {f: False for f in _FLAGS if f in init}
    if subschedule:
        return off, {}
    extra = sorted(k for k in sched if k not in ("name", "rho", "steps_offset") and sched[k] is not None)
    rho_ok = float(sched.get("rho", 7.0)) == 7.0
    if name in SPACINGS and "timestep_spacing" in init and not extra:
        offset = {"steps_offset": int(sched["steps_offset"])} if "steps_offset" in sched else {}
        return {**off, "timestep_spacing": name, **offset}, {}
    if name in SCHEDULE_FLAGS and SCHEDULE_FLAGS[name] in init and rho_ok and not extra:
        return {**off, SCHEDULE_FLAGS[name]: True}, {}
    if "sigmas" in setter and "use_flow_sigmas" not in init:
        return off, {"sigmas": grid.sigmas.numpy().astype(np.float64).tolist()}
    if "timesteps" in setter:
        return off, {"timesteps": integer_timesteps(grid)}
    takes = [n for n in SPACINGS if "timestep_spacing" in init] + [
        n for n, f in SCHEDULE_FLAGS.items() if f in init
    ]
    raise UsageError(
        f"diffusers' {class_name} cannot run schedule={name}"
        + (" with these options" if name in SPACINGS + tuple(SCHEDULE_FLAGS) else "")
        + f"; choose schedule={', '.join(takes) or '(none)'} for it, or use the native sampler"
    )


def integer_timesteps(grid: Grid) -> list[int]:
    """The grid's positive levels as integer training timesteps (rounded: diffusers' timesteps are ints)."""
    noise = grid.noise
    t = np.round(noise.sigma_to_t(grid.sigmas[:-1]).numpy()).astype(np.int64)
    if len(np.unique(t)) != len(t):
        raise UsageError(
            f"schedule={grid.schedule.get('name')} at {grid.steps} steps rounds to repeated integer "
            "timesteps for this diffusers scheduler; use fewer steps or the native sampler"
        )
    return [int(v) for v in t]


def solver_sigma(scheduler: Any, t: torch.Tensor) -> float:
    """The noise level the scheduler's next update assumes for the model call at timestep t."""
    if hasattr(scheduler, "sigmas") and hasattr(scheduler, "step_index"):
        i = scheduler.step_index if scheduler.step_index is not None else 0
        if getattr(scheduler, "state_in_first_order", True) is False and hasattr(
            scheduler, "sigmas_interpol"
        ):
            return float(scheduler.sigmas_interpol[i])
        return float(scheduler.sigmas[i])
    ac = scheduler.alphas_cumprod[int(t)].double()
    return float(((1 - ac) / ac).sqrt())


class _VisitedSubschedule:
    """A scheduler built on the visited levels, and the real training timestep of each virtual index."""

    def __init__(self, scheduler: Any, real_timesteps: np.ndarray, real_alphas_cumprod: torch.Tensor):
        self.scheduler = scheduler
        self.real = torch.as_tensor(real_timesteps)  # ascending
        self.real_alphas_cumprod = real_alphas_cumprod

    def sigma(self, t: torch.Tensor) -> float:
        ac = self.real_alphas_cumprod[int(self.real[int(t)])].double()
        return float(((1 - ac) / ac).sqrt())


def _visited_subschedule(class_name: str, kwargs: dict[str, Any], grid: Grid) -> _VisitedSubschedule:
    """`class_name` built so that its own training schedule is exactly the grid's N levels, rounded
    to integer training timesteps (diffusers' spacings are integer timesteps already)."""
    real = getattr(diffusers, class_name)(**kwargs)
    visited = np.asarray(sorted(integer_timesteps(grid)))
    abar = real.alphas_cumprod.double()[visited]
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    virtual_kwargs = {
        **kwargs,
        "num_train_timesteps": len(visited),
        "trained_betas": betas.numpy(),
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }
    virtual = getattr(diffusers, class_name)(**virtual_kwargs)
    virtual.alphas_cumprod = real.alphas_cumprod[
        visited
    ].clone()  # pin the float32 product to the real values
    virtual.final_alpha_cumprod = real.final_alpha_cumprod
    virtual.set_timesteps(len(visited))
    return _VisitedSubschedule(virtual, visited, real.alphas_cumprod)


def build(
    class_name: str, grid: Grid, options: dict[str, Any], fixed: dict[str, Any], subschedule: bool
) -> tuple[Any, _VisitedSubschedule | None]:
    """The scheduler (set to the grid's steps) and, for DDIM/PNDM, its visited-sub-schedule map."""
    import warnings

    import diffusers.utils.logging as dlog

    dlog.set_verbosity_error()  # deprecation notes and "custom timesteps" advice, not results
    ctor_sched, set_kwargs = schedule_arguments(class_name, grid, subschedule)
    kwargs = {**training_config(grid.noise), **options, **ctor_sched, **fixed}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if subschedule:
            mapper = _visited_subschedule(class_name, kwargs, grid)
            return mapper.scheduler, mapper
        scheduler = getattr(diffusers, class_name)(**kwargs)
        if set_kwargs:
            scheduler.set_timesteps(**set_kwargs)
        else:
            scheduler.set_timesteps(grid.steps)
    return scheduler, None


def _final_levels(scheduler: Any) -> tuple[float, float] | None:
    """(level of the last model call, level after the last step) for sigma-list schedulers."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or not hasattr(scheduler, "step_index") or len(sigmas) < 2:
        return None
    return float(sigmas[-2]), float(sigmas[-1])


def run_scheduler(
    denoise: Denoiser,
    x: torch.Tensor,
    grid: Grid,
    options: dict[str, Any],
    generators: list[torch.Generator] | None,
    context: Any = None,
    *,
    class_name: str,
    fixed: dict[str, Any],
    step_options: tuple[str, ...] = (),
    subschedule: bool = False,
) -> torch.Tensor:
    """Sample with a diffusers scheduler. `x` is the start at grid.sigmas[0] on x = x_0 + sigma n;
    the scheduler's own first level decides where it really starts (it may differ by float32
    round-off, or by diffusers' own spacing when a spacing flag is used)."""
    ctor = {k: v for k, v in options.items() if k not in step_options}
    step_kwargs = {k: v for k, v in options.items() if k in step_options}
    scheduler, mapper = build(class_name, grid, ctor, fixed, subschedule)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    if generators is not None and "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generators
    sigma_scaled = float(scheduler.init_noise_sigma) != 1.0
    x_T = x / math.sqrt(1 + float(grid.sigmas[0]) ** 2)  # back to the unit-variance draw
    timesteps = list(scheduler.timesteps)
    first = mapper.sigma(timesteps[0]) if mapper else solver_sigma(scheduler, timesteps[0])
    state = x_T * math.sqrt(1 + first**2) if sigma_scaled else x_T
    ends = _final_levels(scheduler)
    zero_length_last = ends is not None and ends[0] == ends[1] and ends[1] > 0
    if zero_length_last:
        timesteps = timesteps[:-1]  # its last step would have length zero: denoise to 0 there instead
    for t in timesteps:
        sigma = mapper.sigma(t) if mapper else solver_sigma(scheduler, t)
        x_in = scheduler.scale_model_input(state, t)
        y = state if sigma_scaled else x_in * math.sqrt(1 + sigma**2)
        d = denoise(y, torch.tensor(sigma, dtype=torch.float64))
        eps = (y - d) / sigma
        state = scheduler.step(eps, t, state, **step_kwargs).prev_sample
    if zero_length_last:
        sigma = ends[0]
    elif ends is not None and ends[1] > 0:
        sigma = ends[1]  # it stopped at a positive level: one more evaluation denoises to 0
    else:
        return state
    y = state if sigma_scaled else state * math.sqrt(1 + sigma**2)
    return denoise(y, torch.tensor(sigma, dtype=torch.float64))


def diffusers_nfe_rule(
    class_name: str,
    per_step: int,
    offset: int,
    subschedule: bool,
    fixed: dict[str, Any],
    step_options: tuple[str, ...],
):
    """The NFE rule of a diffusers entry: `per_step * N + offset`, plus one when the scheduler stops
    at a positive level and the adapter denoises to 0 (probed on a 10-step build)."""

    def rule(options: dict[str, Any], schedule: dict[str, Any]) -> NfeRule:
        if subschedule:
            return NfeRule(per_step, offset)
        from samplebench.schedules import make_grid

        noise = NoiseSchedule("vp_discrete", _probe_sigmas())
        if schedule.get("name") not in SPACINGS + tuple(SCHEDULE_FLAGS):
            schedule = {"name": "time_uniform"}  # how the levels are given decides the end, not their values
        grid = make_grid(schedule, noise, 10)
        ctor = {k: v for k, v in options.items() if k not in step_options}
        scheduler, _ = build(class_name, grid, ctor, fixed, False)
        ends = _final_levels(scheduler)
        extra = 1 if ends is not None and ends[1] > 0 and ends[0] != ends[1] else 0
        return NfeRule(per_step, offset + extra)

    return rule


def _probe_sigmas() -> torch.Tensor:
    """Training levels of SD's scaled-linear schedule: only used to see how a scheduler ends."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    return ((1 - abar) / abar).sqrt()
