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
    name: str = "",
    models: str = "vp",
) -> torch.Tensor:
    """Sample with a diffusers scheduler. `x` is the start at grid.sigmas[0] on x = x_0 + sigma n;
    the scheduler's own first level decides where it really starts (it may differ by float32
    round-off, or by diffusers' own spacing when a spacing flag is used). A flow model goes to
    run_flow_scheduler (a scheduler made for the other kind of model is a one-line error)."""
    refusal = kind_refusal(name or class_name, models, grid.noise.is_flow)
    if refusal:
        raise UsageError(refusal)
    if grid.noise.is_flow:
        return run_flow_scheduler(
            denoise,
            x,
            grid,
            options,
            generators,
            class_name=class_name,
            fixed=fixed,
            step_options=step_options,
        )
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
    models: str = "vp",
):
    """The NFE rule of a diffusers entry: `per_step * N + offset`, plus one when the scheduler stops
    at a positive level and the adapter denoises to 0 (probed on a 10-step build). On a flow model
    every scheduler ends at t = 0 (build_flow: final_sigmas_type zero), so schedule=flow, the flow
    models' schedule, costs no extra evaluation for the entries that run flow models."""

    def rule(options: dict[str, Any], schedule: dict[str, Any]) -> NfeRule:
        if subschedule or models == "flow" or (models == "both" and schedule.get("name") == "flow"):
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


# -- flow-matching models ---------------------------------------------------------------------------
# The FlowMatch schedulers run flow models only; the registry marks the entries that run both kinds
# (DPM-Solver++ and UniPC, with use_flow_sigmas and flow_prediction: SamplerSpec `models`).
FLOW_ONLY = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def model_is_flow(model_cfg: dict[str, Any]) -> bool | None:
    """Whether a model config names a rectified-flow model, read without loading it: gmm_flow, or a
    pipeline folder / cached hub id whose model_index.json names a FlowMatch scheduler; None when
    that cannot be told before the model is loaded (the sampler checks again at generate time)."""
    import json
    from pathlib import Path

    name = str(model_cfg.get("name"))
    if name in ("gmm", "gmm_flow"):
        return name == "gmm_flow"
    index = None
    if model_cfg.get("path"):
        index = Path(str(model_cfg["path"])).expanduser() / "model_index.json"
    elif model_cfg.get("id"):
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(str(model_cfg["id"]), "model_index.json")
            index = Path(found) if isinstance(found, str) else None
        except ImportError:
            index = None
    if index is None or not index.is_file():
        return None
    try:
        scheduler = json.loads(index.read_text()).get("scheduler") or [None, None]
    except ValueError:
        return None
    return "FlowMatch" in str(scheduler[-1])


def kind_refusal(name: str, models: str, flow: bool) -> str | None:
    """The one-line refusal for a scheduler entry asked to run the other kind of model, or None.
    models: "vp" (discrete diffusion models only), "flow" (flow-matching models only) or "both"."""
    if flow and models == "vp":
        return (
            f"sampler={name} runs discrete diffusion (VP) models only, not a flow-matching model; use "
            "diffusers:flow_euler, diffusers:flow_heun, diffusers:dpmpp, diffusers:unipc or a native sampler"
        )
    if not flow and models == "flow":
        return (
            f"sampler={name} runs flow-matching models only, not a discrete diffusion (VP) model; use "
            "diffusers:euler / diffusers:heun or a native sampler"
        )
    return None


def kind_check(name: str, models: str) -> Any:
    """SamplerSpec.model_check: refuse the wrong model kind at plan time when the config tells it."""

    def check(options: dict[str, Any], model_cfg: dict[str, Any]) -> None:
        flow = model_is_flow(model_cfg)
        line = None if flow is None else kind_refusal(name, models, flow)
        if line:
            raise UsageError(line)

    return check


def _flow_shift(grid: Grid) -> float:
    """The static shift the grid's flow times were made with (schedule=flow: its shift, else the model's;
    a dynamic shift mu is the static shift e^mu: e^mu / (e^mu + 1/t - 1) = s t / (1 + (s - 1) t))."""
    sched, noise = grid.schedule, grid.noise
    if sched.get("shift") is not None:
        return float(sched["shift"])
    mu = sched.get("mu") if sched.get("mu") is not None else noise.mu
    return float(np.exp(float(mu))) if mu is not None else float(noise.shift)


def flow_times(grid: Grid) -> np.ndarray:
    """The grid's positive levels as flow times t = sigma / (1 + sigma) (FLOW_T1_SIGMA -> 1 - 1e-8)."""
    s = grid.sigmas.double().numpy()
    s = s[s > 0]
    return s / (1 + s)


def build_flow(class_name: str, grid: Grid, options: dict[str, Any], fixed: dict[str, Any]) -> Any:
    """A diffusers scheduler set up to run grid's flow times on a flow model.

    FlowMatchEulerDiscreteScheduler and UniPCMultistepScheduler take the times as
    set_timesteps(sigmas=t), built with shift 1 so the (already shifted) times are not shifted again
    (UniPC moves a first t = 1 to 1 - 1e-6, its own guard against log(0)). FlowMatchHeunDiscreteScheduler
    and DPMSolverMultistepScheduler take no list of times: they run their own spacing (Heun:
    schedule=flow's default, linspace(1, shift(1/T)) shifted; DPM-Solver: use_flow_sigmas,
    schedule=flow start=train end=1/N), built with the grid's shift, and the grid must be that spacing
    (to float32 rounding) or it is a one-line error."""
    import warnings

    import diffusers.utils.logging as dlog

    dlog.set_verbosity_error()
    T = grid.noise.num_train_timesteps
    t = flow_times(grid)
    shift = _flow_shift(grid)
    base = {"num_train_timesteps": T, **options, **fixed}
    solver = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "final_sigmas_type": "zero"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        cls = getattr(diffusers, class_name)
        if class_name == "FlowMatchEulerDiscreteScheduler":
            scheduler = cls(**{**base, "shift": 1.0})
            scheduler.set_timesteps(sigmas=t.tolist())
        elif class_name == "UniPCMultistepScheduler":
            scheduler = cls(**{**base, **solver, "flow_shift": 1.0})
            scheduler.set_timesteps(sigmas=t.copy())  # an array: it shifts (and edits) it in place
        elif class_name == "FlowMatchHeunDiscreteScheduler":
            scheduler = cls(**{**base, "shift": shift})
            scheduler.set_timesteps(grid.steps)
            _require_own_spacing(class_name, scheduler.sigmas[:-1:2], t, "schedule=flow (start=1, end=train)")
        else:  # DPMSolverMultistepScheduler
            scheduler = cls(**{**base, **solver, "flow_shift": shift})
            scheduler.set_timesteps(grid.steps)
            _require_own_spacing(
                class_name, scheduler.sigmas[:-1], t, "schedule=flow schedule.start=train schedule.end=1/N"
            )
    return scheduler


def _require_own_spacing(class_name: str, own: torch.Tensor, t: np.ndarray, fits: str) -> None:
    """The scheduler's own flow times must be the grid's, to float32 rounding (relative 2^-23 each,
    2e-6 leaves room for the shift's few float64 operations on float32 inputs)."""
    own = own.double().numpy()
    if len(own) != len(t) or not np.allclose(own, t, rtol=2e-6, atol=0):
        raise UsageError(
            f"diffusers' {class_name} runs a flow model only on its own spacing, {fits}, with the "
            "model's shift; use that schedule, or diffusers:flow_euler / diffusers:unipc / a native sampler"
        )


def run_flow_scheduler(
    denoise: Denoiser,
    x: torch.Tensor,
    grid: Grid,
    options: dict[str, Any],
    generators: list[torch.Generator] | None,
    *,
    class_name: str,
    fixed: dict[str, Any],
    step_options: tuple[str, ...] = (),
) -> torch.Tensor:
    """Sample a flow model with a diffusers scheduler: the scheduler's sample is the rectified-flow state
    x_t, and the model output it is handed is the velocity v = (x_t - D) / t of our denoiser D at
    x = x_t (1 + sigma), sigma = t / (1 - t), t the scheduler's own level for that call (float32; t = 1
    is FLOW_T1_SIGMA). The start is x_t = x_T (x / (1 + sigma_0)) whatever the scheduler's first t.
    Every flow scheduler here ends at t = 0, its last update landing on x_0 (no extra evaluation)."""
    from samplebench.models.base import FLOW_T1_SIGMA

    ctor = {k: v for k, v in options.items() if k not in step_options}
    step_kwargs = {k: v for k, v in options.items() if k in step_options}
    scheduler = build_flow(class_name, grid, ctor, fixed)
    scheduler.set_begin_index(0)
    if generators is not None and "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generators
    state = x / (1.0 + float(grid.sigmas[0]))  # x_T
    for t in list(scheduler.timesteps):
        i = scheduler.step_index if scheduler.step_index is not None else 0
        level = float(scheduler.sigmas[i])
        sigma = FLOW_T1_SIGMA if level >= 1.0 else level / (1.0 - level)
        t_model = sigma / (1.0 + sigma)
        d = denoise(state * (1.0 + sigma), torch.tensor(sigma, dtype=torch.float64))
        v = (state - d) / t_model
        state = scheduler.step(v, t, state, **step_kwargs).prev_sample
    last = float(scheduler.sigmas[-1])
    if last > 0:  # not reached by the schedulers above (final sigma 0); kept for a scheduler that stops early
        sigma = last / (1.0 - last)
        return denoise(state * (1.0 + sigma), torch.tensor(sigma, dtype=torch.float64))
    return state
