"""What every sampler shares: its spec, its NFE rule, and the counted, guided denoiser it calls."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from samplebench.errors import UsageError

# A denoiser maps (x_t in VP scale, scheduler timestep, solver sigma) to the model's native prediction.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class NfeRule:
    """How many model evaluations N solver steps cost: evals = per_step * N + offset."""

    per_step: int = 1
    offset: int = 0

    def __str__(self) -> str:
        n = "N" if self.per_step == 1 else f"{self.per_step}N"
        return n if self.offset == 0 else f"{n}{self.offset:+d}"

    def nfe(self, steps: int) -> int:
        return self.per_step * steps + self.offset

    def steps(self, nfe: int, sampler: str, allow_lower: bool) -> int:
        """Steps that spend exactly `nfe`, or the nearest lower budget when allowed."""
        steps, rest = divmod(nfe - self.offset, self.per_step)
        if steps < 1:
            raise UsageError(
                f"nfe={nfe} is too small for sampler={sampler} (it spends {self} evaluations for N steps); "
                f"use nfe>={self.nfe(1)}"
            )
        if rest and not allow_lower:
            options = f"{self.nfe(steps)} or {self.nfe(steps + 1)}"
            raise UsageError(
                f"sampler={sampler} cannot spend exactly nfe={nfe} (it spends {self} for N steps); "
                f"use nfe={options}, or allow_lower_nfe=true to run {self.nfe(steps)}"
            )
        return steps


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler. `run(denoise, x_T, steps, options, generators, schedule) -> x_0`."""

    name: str
    title: str
    kind: str  # "ode" (deterministic, converges to the probability-flow ODE solution) or "sde"
    nfe_rule: NfeRule
    run: Callable[..., torch.Tensor]
    source: str
    step_options: tuple[str, ...] = field(default=())


class CountingDenoiser:
    """Counts model evaluations per sample and the time spent in them.

    It wraps the guided denoiser, so a classifier-free-guidance step that batches the conditional
    and unconditional passes counts once (the DPM-Solver papers' convention).
    """

    def __init__(self, inner: Denoiser, synchronize: Callable[[], None] = lambda: None):
        self.inner = inner
        self.calls = 0
        self.seconds = 0.0
        self._sync = synchronize

    def __call__(self, x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.inner(x, t, sigma)
        self._sync()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def guided_denoiser(model: Any, cond: Any, guidance: float) -> Denoiser:
    """The model under classifier-free guidance: u + w (c - u) in one batched call; w == 1 is one pass."""

    def conditional(x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return model.predict(x, t, _per_sample(sigma, x), cond)

    if guidance == 1.0:
        return conditional
    both = model.cat_conditions(model.null_condition(cond), cond)

    def guided(x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x2 = torch.cat([x, x])
        uncond, cond_out = model.predict(x2, t, _per_sample(sigma, x2), both).chunk(2)
        return uncond + guidance * (cond_out - uncond)

    return guided


def _per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    return sigma.reshape(-1).expand(x.shape[0])


def to_epsilon(
    pred: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Convert a native prediction at VP input x and VE noise level sigma to a noise prediction."""
    if prediction_type == "epsilon":
        return pred
    alpha = (1 + sigma**2) ** -0.5
    s = sigma * alpha
    if prediction_type == "v_prediction":  # v = alpha * eps - s * x0, x = alpha * x0 + s * eps
        return alpha * pred + s * x
    if prediction_type == "sample":
        return (x - alpha * pred) / s
    raise ValueError(f"unknown prediction type {prediction_type}")
