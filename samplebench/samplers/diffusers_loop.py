"""One loop that drives any diffusers scheduler, with two fixes that make its solutions exact.

1. The model is told the noise level the scheduler's update assumes (`solver_sigma`). diffusers
   passes Karras-spaced solvers a rounded timestep while stepping with the unrounded sigma, and
   interpolates fractional timesteps linearly in sigma; an exact model evaluated at the wrong
   sigma would hide a floor in the error.
2. DDIM and PNDM step from t to t - T // N whatever timesteps they were given, so when N does not
   divide T their updates disagree with the timesteps they visit. We build them on the visited
   sub-schedule instead (`_visited_subschedule`): a scheduler whose training schedule *is* the N
   visited noise levels, stepping by one index, so every update uses the levels it visits.
"""

from __future__ import annotations

import inspect
from typing import Any

import diffusers
import numpy as np
import torch

from samplebench.samplers.base import Denoiser, to_epsilon


def make_scheduler(class_name: str, schedule: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """A diffusers scheduler built from the model's training schedule and the sampler's options."""
    cls = getattr(diffusers, class_name)
    return cls(**{**schedule, **kwargs})


def solver_sigma(scheduler: Any, t: torch.Tensor) -> torch.Tensor:
    """The VE noise level the scheduler's next update assumes for the model call at timestep t."""
    if hasattr(scheduler, "sigmas") and hasattr(scheduler, "step_index"):
        i = scheduler.step_index if scheduler.step_index is not None else 0
        if getattr(scheduler, "state_in_first_order", True) is False and hasattr(
            scheduler, "sigmas_interpol"
        ):
            return scheduler.sigmas_interpol[i].double()
        return scheduler.sigmas[i].double()
    ac = scheduler.alphas_cumprod[int(t)].double()
    return ((1 - ac) / ac).sqrt()


class _VisitedSubschedule:
    """Maps the timesteps of a scheduler built on a visited sub-schedule back to the real ones."""

    def __init__(self, scheduler: Any, real_timesteps: np.ndarray, real_alphas_cumprod: torch.Tensor):
        self.scheduler = scheduler
        self.real = torch.as_tensor(real_timesteps)  # real timestep of virtual index j (ascending)
        self.real_alphas_cumprod = real_alphas_cumprod

    def real_t(self, t: torch.Tensor) -> torch.Tensor:
        return self.real[int(t)]

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        ac = self.real_alphas_cumprod[int(self.real_t(t))].double()
        return ((1 - ac) / ac).sqrt()


def _visited_subschedule(class_name: str, schedule: dict[str, Any], kwargs: dict[str, Any], steps: int):
    """Build `class_name` so that its own training schedule is exactly the N levels it will visit."""
    real = make_scheduler(class_name, schedule, kwargs)
    real.set_timesteps(steps)
    visited = np.unique(real.timesteps.numpy())  # ascending
    if len(visited) != steps:
        raise ValueError(f"{class_name} visits {len(visited)} distinct timesteps for {steps} steps")
    abar = real.alphas_cumprod.double()[visited]
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    virtual_kwargs = {
        **schedule,
        **kwargs,
        "num_train_timesteps": steps,
        "trained_betas": betas.numpy(),
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }
    for key in ("beta_start", "beta_end", "beta_schedule"):
        virtual_kwargs.pop(key, None)
    virtual = getattr(diffusers, class_name)(**virtual_kwargs)
    # The virtual schedule's alphas_cumprod is a float32 product; pin it to the real values.
    virtual.alphas_cumprod = real.alphas_cumprod[visited].clone()
    virtual.final_alpha_cumprod = real.final_alpha_cumprod  # the level after the last step, as configured
    virtual.set_timesteps(steps)
    return _VisitedSubschedule(virtual, visited, real.alphas_cumprod)


def run_scheduler(
    denoise: Denoiser,
    x_T: torch.Tensor,
    steps: int,
    options: dict[str, Any],
    generators: list[torch.Generator] | None,
    schedule: dict[str, Any],
    *,
    class_name: str,
    fixed: dict[str, Any],
    step_options: tuple[str, ...] = (),
    subschedule: bool = False,
    denoise_to_zero: bool = False,
) -> torch.Tensor:
    """Sample with a diffusers scheduler from x_T (unit variance) and return the clean sample."""
    ctor = {k: v for k, v in options.items() if k not in step_options}
    step_kwargs = {k: v for k, v in options.items() if k in step_options}
    ctor.update(fixed)
    mapper = None
    if subschedule:
        mapper = _visited_subschedule(class_name, schedule, ctor, steps)
        scheduler = mapper.scheduler
    else:
        scheduler = make_scheduler(class_name, schedule, ctor)
        scheduler.set_timesteps(steps, device=x_T.device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    if generators is not None and "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generators
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        if mapper is not None:
            sigma, model_t = mapper.sigma(t), mapper.real_t(t)
        else:
            sigma, model_t = solver_sigma(scheduler, t), t
        x_in = scheduler.scale_model_input(x, t)
        out = denoise(x_in, model_t, sigma)
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    if denoise_to_zero:  # one more evaluation turns the sample at the last noise level into a clean one
        sigma = (
            solver_sigma(scheduler, scheduler.timesteps[-1])
            if scheduler.step_index is None
            else (scheduler.sigmas[scheduler.step_index].double())
        )
        t_last = scheduler.timesteps[-1]
        eps = to_epsilon(denoise(x, t_last, sigma), x, sigma, scheduler.config.prediction_type)
        x = (x - sigma / (1 + sigma**2).sqrt() * eps) * (1 + sigma**2).sqrt()
    return x
