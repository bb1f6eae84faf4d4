"""What every sampler shares: its spec, its NFE rule, and the counted, guided denoiser it calls."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from samplebench.errors import UsageError

# A denoiser maps (x = x_0 + sigma n, sigma) to D(x; sigma) = E[x_0 | x] (EDM's parametrisation);
# sigma is a scalar or one entry per sample.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


# "Lu et al. 2022", "Zhang & Chen 2023 (ICLR)", "Wang & Vastola 2024 (TMLR)" at the start of a source
_PAPER = re.compile(r"^[A-Z][\w.'& -]*? (?P<year>(19|20)\d\d)( \([^)]*\))?")


@dataclass(frozen=True)
class SamplerContext:
    """What a few samplers need beyond the denoiser (teleportation: the data's Gaussian moments for
    these conditions under this guidance): the model, the batch's conditions and the guidance scale."""

    model: Any
    cond: Any
    guidance: float
    cache_root: Path | None = None  # <results_dir>/.cache, for statistics a sampler computes once and keeps


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: `run(denoise, x, grid, options, generators, context=None) -> x_0`.

    x is the start at grid.sigmas[0] (already scaled, x = x_T sqrt(1 + sigma_0^2)); options are the
    keys of conf/sampler/<name>.yaml. `grids` names the schedules it takes ("any" for every
    schedule); `repeats_levels` says the algorithm evaluates one level twice (Heun's corrector);
    `skips_levels` says its first evaluation is below grid.sigmas[0], the levels above being crossed
    without the network (teleportation); `needs_context` that it reads the SamplerContext."""

    name: str
    title: str
    # "ode" (deterministic, converges to the probability-flow ODE solution), "sde", or "shifted"
    # (deterministic, but moves its times off the schedule on purpose, so it converges to no ODE
    # solution as NFE grows: the time-shift samplers)
    kind: str
    nfe_rule: NfeRule | Callable[[dict[str, Any], dict[str, Any]], NfeRule]
    run: Callable[..., torch.Tensor]
    source: str
    family: str = "native"  # or "diffusers"
    grids: str = "any"
    repeats_levels: bool = False
    skips_levels: bool = False
    needs_context: bool = False
    step_options: tuple[str, ...] = field(default=())
    choices: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    # Checks that `choices` cannot list (a number in a range): raises a one-line UsageError.
    validate: Callable[[dict[str, Any]], None] | None = None
    # A plan-time check of the options against the cell's model config (one-line UsageError).
    model_check: Callable[[dict[str, Any], dict[str, Any]], None] | None = None
    # A plan-time check of the options against the cell's step count (one-line UsageError).
    steps_check: Callable[[dict[str, Any], int], None] | None = None

    @property
    def paper(self) -> str:
        """The paper as the source names it ("Authors Year (venue)"), or "" for code without a paper."""
        m = _PAPER.match(self.source)
        return "" if m is None else m.group(0).strip()

    @property
    def year(self) -> int | None:
        m = _PAPER.match(self.source)
        return None if m is None else int(m.group("year"))

    @property
    def code(self) -> str:
        """What the source says beyond the paper (arXiv id, algorithm, reference code)."""
        return self.source[len(self.paper) :].strip(" ,;")

    def check(self, options: dict[str, Any]) -> None:
        """A one-line error for an option value the sampler does not take."""
        for key, valid in self.choices.items():
            if key in options and options[key] not in valid:
                raise UsageError(
                    f"sampler.{key}={options[key]} is not valid for sampler={self.name}; "
                    f"choose one of {', '.join(map(str, valid))}"
                )
        if self.validate is not None:
            self.validate(options)

    def rule(self, options: dict[str, Any], schedule: dict[str, Any]) -> NfeRule:
        """The NFE rule for these options and this schedule (most samplers: a constant)."""
        return self.nfe_rule if isinstance(self.nfe_rule, NfeRule) else self.nfe_rule(options, schedule)


class CountingDenoiser:
    """Counts model evaluations per sample and the time spent in them.

    It wraps the guided denoiser, so a classifier-free-guidance step that batches the conditional
    and unconditional passes counts once (the DPM-Solver papers' convention). With record=True it
    keeps each call's (x, sigma) for the registry-wide contract tests.
    """

    def __init__(self, inner: Denoiser, synchronize: Callable[[], None] = lambda: None, record: bool = False):
        self.inner = inner
        self.calls = 0
        self.seconds = 0.0
        self._sync = synchronize
        self.record = record
        self.visits: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.inner(x, sigma)
        self._sync()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        if self.record:
            self.visits.append((x.detach().clone(), torch.as_tensor(sigma).detach().double().clone()))
        return out


# What `guidance=` means for a model (its attribute `guidance_kind`, default "cfg"):
#   "cfg"       classifier-free guidance D_u + w (D_c - D_u), the conditional and unconditional
#               passes batched into one model call (w == 1: one conditional pass);
#   "embedded"  the scale is an input of the network (FLUX-dev's guidance embedding, LCM's w
#               embedding): one conditional pass, the condition carrying w (model.with_guidance);
#   "none"      the model takes no guidance (SD-Turbo, FLUX-schnell, InstaFlow): one conditional pass;
#               the plan runs its cells at guidance=1 whatever the sweep asks of other models.
GUIDANCE_KINDS = ("cfg", "embedded", "none")


def guided_denoiser(model: Any, cond: Any, guidance: float) -> Denoiser:
    """The model's D under its kind of guidance (above). For "cfg", guiding D is guiding eps (or the
    velocity): D = x - sigma eps is affine in eps at fixed x and sigma."""
    kind = getattr(model, "guidance_kind", "cfg")
    if kind == "embedded":
        cond = model.with_guidance(cond, guidance)

    def conditional(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return model.denoise(x, _per_sample(sigma, x), cond)

    if kind != "cfg" or guidance == 1.0:
        return conditional
    both = model.cat_conditions(model.null_condition(cond), cond)

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x2 = torch.cat([x, x])
        s = _per_sample(sigma, x)  # a scalar or one level per sample (the time-shift samplers')
        uncond, cond_out = model.denoise(x2, torch.cat([s, s]), both).chunk(2)
        return uncond + guidance * (cond_out - uncond)

    return guided


def _per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    return sigma.reshape(-1).expand(x.shape[0])


def noise_like(x: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped like x, one row per sample from that sample's generator (drawn in
    float64 on the CPU, so results do not depend on batch size or device)."""
    if generators is None:
        raise ValueError("a stochastic sampler needs per-sample generators")
    rows = [torch.randn(x.shape[1:], generator=g, dtype=torch.float64) for g in generators]
    return torch.stack(rows).to(device=x.device, dtype=x.dtype)
