"""Noise-level schedules: (schedule, N, the model's noise schedule) -> the levels a sampler visits.

Every schedule gives N decreasing positive levels sigma_0 > ... > sigma_{N-1} and then a final 0,
so an N-step sampler takes N steps, the last one from sigma_{N-1} to 0 (a clean sample). Where the
last positive level sits is part of the schedule and is recorded as `ends` (for example
"sigma_min then 0": the model's smallest training level, then 0). Schedules are kept apart from
solvers, as in k-diffusion (get_sigmas_karras, get_sigmas_exponential) and DPM-Solver's
`get_time_steps(skip_type=...)`; conf/schedule/<name>.yaml holds their options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from samplebench.errors import UsageError
from samplebench.models.base import FLOW_T1_SIGMA, NoiseSchedule, flow_shift

# Align Your Steps (Sabour et al. 2024, arXiv:2404.14507): the published 10-step levels, as
# diffusers ships them in diffusers.schedulers.AysSchedules (the final 0 dropped here).
AYS_SIGMAS = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113),
}


@dataclass(frozen=True, eq=False)
class Grid:
    """The levels one cell's sampler visits: N positive levels then 0 (float64, length N + 1)."""

    sigmas: torch.Tensor
    schedule: dict[str, Any]
    ends: str
    noise: NoiseSchedule

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    title: str
    levels: Callable[[NoiseSchedule, int, dict[str, Any]], torch.Tensor]
    source: str
    # The model kinds it is defined for: the training-index schedules need a discrete VP model.
    kinds: tuple[str, ...] = ("vp_discrete", "flow")


def _karras(noise: NoiseSchedule, n: int, opts: dict[str, Any]) -> torch.Tensor:
    """EDM eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    rho = float(opts.get("rho", 7.0))
    if rho <= 0:
        raise UsageError(f"schedule.rho={rho} must be positive (EDM uses 7)")
    lo, hi = _range(noise, opts)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _time_uniform(noise: NoiseSchedule, n: int, opts: dict[str, Any]) -> torch.Tensor:
    """Uniform in the model's (fractional) training time from t = T-1 down to t = 0 (DPM-Solver's
    skip_type='time_uniform' on the discrete schedule, without diffusers' integer rounding)."""
    t = torch.linspace(noise.num_train_timesteps - 1, 0, n, dtype=torch.float64)
    return noise.t_to_sigma(t)


def _time_quadratic(noise: NoiseSchedule, n: int, opts: dict[str, Any]) -> torch.Tensor:
    """DPM-Solver's skip_type='time_quadratic': uniform in sqrt(t) for continuous t = (index+1)/T in
    [1/T, 1], dense near the data end (DDIM's quadratic spacing)."""
    T = noise.num_train_timesteps
    u = torch.linspace(1.0, (1.0 / T) ** 0.5, n, dtype=torch.float64) ** 2
    return noise.t_to_sigma(u * T - 1)


def _logsnr(noise: NoiseSchedule, n: int, opts: dict[str, Any]) -> torch.Tensor:
    """Uniform in logSNR lambda = -log sigma (DPM-Solver's skip_type='logSNR'; the same grid as
    k-diffusion's get_sigmas_exponential and diffusers' use_lu_lambdas / use_exponential_sigmas)."""
    lo, hi = _range(noise, opts)
    return torch.linspace(np.log(hi), np.log(lo), n, dtype=torch.float64).exp()


def _polyexponential(noise: NoiseSchedule, n: int, opts: dict[str, Any]) -> torch.Tensor:
    """k-diffusion's get_sigmas_polyexponential: log sigma interpolated with ramp^rho (rho = 1 is the
    exponential / logSNR grid; rho > 1 puts more levels at high noise)."""
    rho = float(opts.get("rho", 2.0))
    lo, hi = _range(noise, opts)
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    return (ramp * (np.log(hi) - np.log(lo)) + np.log(lo)).exp()


def _flow(noise: NoiseSchedule, n: int, opts: dict[str, Any]) -> torch.Tensor:
    """Flow matching's own spacing, as the pipelines run it: t uniform from 1 (pure noise, the stand-in
    FLOW_T1_SIGMA) down to the smallest training time (SD3, FlowMatchEulerDiscreteScheduler.set_timesteps:
    that end is the shifted 1/T, and the whole line is shifted again, as diffusers does) or to 1/N
    (schedule.end=1/N, FluxPipeline), then shifted: SD3's static shift (schedule.shift, default the
    model's) or FLUX's dynamic shift (schedule.mu, default the model's at its resolution).
    schedule.start=train starts at 1 - 1/T instead of 1: with end=1/N that is diffusers'
    use_flow_sigmas grid (DPMSolverMultistepScheduler, UniPCMultistepScheduler), whose logSNR
    solvers cannot start at t = 1 (lambda = -infinity).
    On a VP model the same times are used as flow times (sigma = t / (1 - t))."""
    shift = float(opts["shift"]) if opts.get("shift") is not None else noise.shift
    mu = opts.get("mu")
    mu = (noise.mu if opts.get("shift") is None else None) if mu is None else float(mu)
    end = str(opts.get("end") or noise.flow_end)
    if shift <= 0:
        raise UsageError(f"schedule.shift={shift} must be positive (SD3 uses 3.0, 1 is no shift)")
    start = str(opts.get("start") or "1")
    T = noise.num_train_timesteps if noise.is_flow else 1000
    if start not in ("1", "train"):
        raise UsageError(
            f"schedule.start={start} is unknown; choose 1 (pure noise, FlowMatchEuler) or train "
            "(1 - 1/T, diffusers' use_flow_sigmas for DPM-Solver++ and UniPC)"
        )
    first = 1.0 if start == "1" else 1.0 - 1.0 / T
    if end == "train":
        last = 1.0 / T if mu is not None else float(flow_shift(1.0 / T, shift))
        base = np.linspace(first, last, n)
    elif end == "1/N":
        base = np.linspace(first, 0.0, n + 1)[:-1]
    else:
        raise UsageError(f"schedule.end={end} is unknown; choose train (SD3's spacing) or 1/N (FLUX's)")
    t = np.asarray(flow_shift(base, shift, mu), dtype=np.float64)
    with np.errstate(divide="ignore"):
        sigmas = np.where(t >= 1.0, FLOW_T1_SIGMA, t / (1 - t))
    return torch.as_tensor(sigmas)


def _diffusers_spacing(kind: str) -> Callable[[NoiseSchedule, int, dict[str, Any]], torch.Tensor]:
    def levels(noise: NoiseSchedule, n: int, opts: dict[str, Any]) -> torch.Tensor:
        """diffusers' timestep_spacing (DDIMScheduler.set_timesteps), integer training timesteps."""
        T = noise.num_train_timesteps
        offset = int(opts.get("steps_offset", 0))
        if kind == "leading":
            t = (np.arange(0, n) * (T // n)).round()[::-1] + offset
        elif kind == "trailing":
            t = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        else:
            t = np.linspace(0, T - 1, n).round()[::-1]
        t = np.clip(t.astype(np.int64), 0, T - 1)
        return noise.train_sigmas[torch.as_tensor(t.copy())].double()

    return levels


def _lcm(noise: NoiseSchedule, n: int, opts: dict[str, Any]) -> torch.Tensor:
    """LCM's skipping-step grid (Luo et al. 2023, arXiv:2310.04378; diffusers LCMScheduler.set_timesteps,
    which TCDScheduler.set_timesteps repeats): the distillation timesteps t_j = j k - 1, j = 1 .. K, with
    K = schedule.original_steps (50) and k = T // K, then N of them taken at floor(linspace(0, K, N,
    endpoint=False)) from the top (999, 759, 499, 259 for N = 4). TCDScheduler's default is the same
    grid; given original_inference_steps it takes all T timesteps instead: original_steps = T."""
    T = noise.num_train_timesteps
    K = int(opts.get("original_steps") or 50)
    if not 1 <= K <= T:
        raise UsageError(f"schedule.original_steps={K} must be between 1 and {T} (LCM distils on 50)")
    if n > K:
        raise UsageError(
            f"schedule=lcm takes at most schedule.original_steps={K} steps, not {n}; lower nfe or raise "
            "schedule.original_steps"
        )
    origin = (np.arange(1, K + 1) * (T // K) - 1)[::-1]
    t = origin[np.floor(np.linspace(0, K, num=n, endpoint=False)).astype(np.int64)]
    return noise.train_sigmas[torch.as_tensor(t.copy())].double()


def loglinear_interp(levels: np.ndarray, n: int) -> np.ndarray:
    """The AYS paper's interpolation to n levels: linear in log sigma over an evenly spaced index."""
    xs = np.linspace(0, 1, len(levels))
    ys = np.log(np.asarray(levels, dtype=np.float64)[::-1])
    return np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy()


def _ays(noise: NoiseSchedule, n: int, opts: dict[str, Any]) -> torch.Tensor:
    """Align Your Steps: the published 10-step levels for `schedule.model` (sd15, sdxl), log-linearly
    interpolated to N as in the paper's code. They were optimised for those models' schedule
    (sigma_max 14.615); on another model they are used as published."""
    key = str(opts.get("model", "sd15"))
    if key not in AYS_SIGMAS:
        raise UsageError(
            f"schedule.model={key} has no published AYS levels; choose one of {', '.join(AYS_SIGMAS)}"
        )
    published = np.asarray(AYS_SIGMAS[key])
    out = published if n == len(published) else loglinear_interp(published, n)
    return torch.as_tensor(out, dtype=torch.float64)


def _custom(noise: NoiseSchedule, n: int, opts: dict[str, Any]) -> torch.Tensor:
    """schedule.sigmas=[...]: decreasing positive levels (a trailing 0 is allowed and dropped); with
    schedule.interpolate=true they are log-linearly interpolated to N like AYS."""
    raw = opts.get("sigmas") or []
    try:
        given = [float(v) for v in raw]
    except (TypeError, ValueError) as e:
        raise UsageError(
            "schedule.sigmas must be a list of numbers, e.g. schedule.sigmas=[14.6,3,0.5,0.03]"
        ) from e
    if given and given[-1] == 0:
        given = given[:-1]
    arr = np.asarray(given, dtype=np.float64)
    if len(arr) == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 0) or np.any(np.diff(arr) >= 0):
        raise UsageError(
            "schedule=custom needs schedule.sigmas=[...]: strictly decreasing positive levels "
            "(a final 0 may be given), e.g. schedule.sigmas=[14.6,3,0.5,0.03]"
        )
    if len(arr) != n:
        if not opts.get("interpolate", False):
            raise UsageError(
                f"schedule=custom gives {len(arr)} levels but this cell takes {n} steps; give {n} levels "
                "or set schedule.interpolate=true to interpolate them log-linearly"
            )
        arr = loglinear_interp(arr, n)
    return torch.as_tensor(arr)


def _range(noise: NoiseSchedule, opts: dict[str, Any]) -> tuple[float, float]:
    """(sigma_min, sigma_max): the model's training range unless schedule.sigma_min/max are set."""
    lo = opts.get("sigma_min")
    hi = opts.get("sigma_max")
    lo = noise.sigma_min if lo is None else float(lo)
    hi = noise.sigma_max if hi is None else float(hi)
    if not 0 < lo < hi:
        raise UsageError(f"schedule.sigma_min={lo} and sigma_max={hi} must satisfy 0 < sigma_min < sigma_max")
    return lo, hi


SCHEDULES: dict[str, ScheduleSpec] = {
    s.name: s
    for s in [
        ScheduleSpec("karras", "Karras (rho)", _karras, "Karras et al. 2022, arXiv:2206.00364, eq. 5"),
        ScheduleSpec(
            "time_uniform",
            "uniform in time",
            _time_uniform,
            "Lu et al. 2022, arXiv:2206.00927 (time_uniform)",
            kinds=("vp_discrete",),
        ),
        ScheduleSpec(
            "time_quadratic",
            "quadratic in time",
            _time_quadratic,
            "Song et al. 2021 (DDIM quadratic); DPM-Solver skip_type=time_quadratic",
            kinds=("vp_discrete",),
        ),
        ScheduleSpec("logsnr", "uniform in logSNR", _logsnr, "Lu et al. 2022, arXiv:2206.00927 (logSNR)"),
        ScheduleSpec(
            "exponential",
            "exponential (= logSNR)",
            _logsnr,
            "k-diffusion get_sigmas_exponential; identical to logsnr in sigma",
        ),
        ScheduleSpec(
            "polyexponential",
            "polyexponential (rho)",
            _polyexponential,
            "k-diffusion get_sigmas_polyexponential",
        ),
        ScheduleSpec(
            "linspace",
            "diffusers linspace",
            _diffusers_spacing("linspace"),
            "diffusers timestep_spacing",
            kinds=("vp_discrete",),
        ),
        ScheduleSpec(
            "leading",
            "diffusers leading",
            _diffusers_spacing("leading"),
            "diffusers timestep_spacing",
            kinds=("vp_discrete",),
        ),
        ScheduleSpec(
            "trailing",
            "diffusers trailing",
            _diffusers_spacing("trailing"),
            "Lin et al. 2024, arXiv:2305.08891",
            kinds=("vp_discrete",),
        ),
        ScheduleSpec(
            "ays", "Align Your Steps", _ays, "Sabour et al. 2024, arXiv:2404.14507", kinds=("vp_discrete",)
        ),
        ScheduleSpec(
            "lcm",
            "LCM skipping-step",
            _lcm,
            "Luo et al. 2023, arXiv:2310.04378; diffusers LCMScheduler.set_timesteps",
            kinds=("vp_discrete",),
        ),
        ScheduleSpec("custom", "custom levels", _custom, "schedule.sigmas=[...]"),
        ScheduleSpec(
            "flow",
            "flow matching (shift)",
            _flow,
            "Esser et al. 2024, arXiv:2403.03206 (SD3 shift); diffusers FlowMatchEulerDiscreteScheduler",
        ),
    ]
}


def get_schedule(name: str) -> ScheduleSpec:
    if name not in SCHEDULES:
        raise UsageError(f"schedule={name} is unknown; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def describe_end(levels: torch.Tensor, noise: NoiseSchedule) -> str:
    """How a grid ends: at the model's smallest training level or elsewhere, then 0."""
    last = float(levels[-1])
    if abs(last - noise.sigma_min) <= 1e-6 * noise.sigma_min:
        return "sigma_min then 0"
    return f"sigma={last:.4g} then 0"


def make_grid(schedule: dict[str, Any], noise: NoiseSchedule, steps: int) -> Grid:
    """The N + 1 levels (N positive, then 0) of `schedule` for an N-step sampler."""
    if steps < 1:
        raise UsageError(f"a schedule needs at least one step, got {steps}")
    spec = get_schedule(str(schedule.get("name")))
    if noise.kind not in spec.kinds:
        fits = [n for n, sp in SCHEDULES.items() if noise.kind in sp.kinds]
        raise UsageError(
            f"schedule={spec.name} is defined on a discrete diffusion model's training timesteps, not on "
            f"this {noise.kind} model; choose schedule={', '.join(fits)}"
        )
    opts = {k: v for k, v in schedule.items() if k != "name"}
    levels = spec.levels(noise, steps, opts).double().reshape(-1)
    if len(levels) != steps:
        raise AssertionError(f"schedule {spec.name} made {len(levels)} levels for {steps} steps")
    if bool((levels[1:] >= levels[:-1]).any()):
        raise UsageError(
            f"schedule={spec.name} gives repeated levels at {steps} steps (integer timesteps collide); "
            "use fewer steps or a continuous schedule such as karras or logsnr"
        )
    return Grid(torch.cat([levels, levels.new_zeros(1)]), dict(schedule), describe_end(levels, noise), noise)
