"""Benchmark (not a test): schedules x samplers on the analytic model, and the per-step overhead of
the native samplers against their diffusers twins, measured side by side in one process.

Part 1: traj_err (mean over samples of the RMS distance to the exact probability-flow ODE solution
from the same x_T, scipy DOP853 rtol 1e-10) for native samplers x schedules x NFE 5/10/20 on the
default mixture. A sampler that cannot spend an NFE exactly runs the nearest lower budget (marked).

Part 2: solver overhead per step, without the model: the denoiser is a fixed linear map on a
batch shaped like SD 1.5 latents (8 x 4 x 64 x 64, float32), so what is timed is each sampler's own
arithmetic and bookkeeping. Native and diffusers twins alternate; medians of the repeats.

    .venv/bin/python bench/bench_schedules.py [--samples 256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import machine  # noqa: E402

from samplebench.metrics.reference import solve_with_floor  # noqa: E402
from samplebench.models.gmm import GaussianMixtureModel, MixtureSpec  # noqa: E402
from samplebench.samplers import SAMPLERS  # noqa: E402
from samplebench.samplers.base import CountingDenoiser, guided_denoiser  # noqa: E402
from samplebench.schedules import make_grid  # noqa: E402
from samplebench.seeds import initial_noise, sampler_generators  # noqa: E402

SAMPLER_NAMES = ["ddim", "heun", "dpm", "dpmpp", "dpmpp_3m", "unipc", "ipndm", "deis"]
SCHEDULE_NAMES = ["karras", "time_uniform", "time_quadratic", "logsnr", "ays", "trailing"]
TWINS = ["euler", "heun", "lms", "dpm", "dpmpp", "dpmpp_3m", "unipc", "deis", "ddim"]


def _options(name: str, extra: dict | None = None) -> dict:
    """conf/sampler/<name>.yaml's options, with `extra` on top."""
    from omegaconf import OmegaConf

    from samplebench.config import conf_dir

    cfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / "sampler" / f"{name}.yaml"))
    cfg.pop("name")
    return {**cfg, **(extra or {})}


def run(
    model,
    name: str,
    schedule: str | dict,
    nfe: int,
    idx: list[int],
    denoise=None,
    x_T=None,
    options: dict | None = None,
):
    """One cell through the sampler registry, as the generation worker runs it (the nearest lower NFE
    when `nfe` cannot be spent exactly): samples, NFE spent, steps. `schedule` is a name or a schedule
    config; `options` go over the sampler's conf file."""
    spec, opts = SAMPLERS[name], _options(name, options)
    sched = {"name": schedule} if isinstance(schedule, str) else dict(schedule)
    rule = spec.rule(opts, sched)
    steps = rule.steps(nfe, name, allow_lower=True)
    grid = make_grid(sched, model.noise_schedule, steps)
    if x_T is None:
        x_T = initial_noise(0, idx, model.sample_shape, torch.float64, model.device)
    denoise = denoise or CountingDenoiser(guided_denoiser(model, model.conditions(idx, 0), 1.0))
    x = model.noise_schedule.initial_state(x_T, float(grid.sigmas[0]))
    return spec.run(denoise, x, grid, opts, sampler_generators(0, idx)), rule.nfe(steps), steps


def traj_table(samples: int) -> str:
    gmm = GaussianMixtureModel(MixtureSpec(), torch.device("cpu"))
    idx = list(range(samples))
    x_T = initial_noise(0, idx, gmm.sample_shape, torch.float64, gmm.device)
    ref, floor_points = solve_with_floor(gmm, x_T, gmm.conditions(idx, 0), 1.0)

    def err(x):
        return ((x - ref) ** 2).mean(1).sqrt().mean().item()

    lines = [
        f"traj_err, {samples} samples, default mixture (16-d, 8 components, SD's scaled-linear schedule); "
        f"the sigma_min floor is {err(floor_points):.2e}.",
        "",
        "| sampler | schedule | NFE 5 | NFE 10 | NFE 20 |",
        "|---|---|---|---|---|",
    ]
    for name in SAMPLER_NAMES:
        for schedule in SCHEDULE_NAMES:
            cells = []
            for nfe in (5, 10, 20):
                x, spent, _ = run(gmm, name, schedule, nfe, idx, x_T=x_T)
                cells.append(f"{err(x):.2e}" + ("" if spent == nfe else f" ({spent})"))
            lines.append(f"| {name} | {schedule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class Linear:
    """A stand-in denoiser with no model cost: D(x; sigma) = x / (1 + sigma^2)."""

    def __call__(self, x, sigma):
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        return x * (1.0 / (1.0 + s * s))


def overhead_table(repeats: int) -> str:
    gmm = GaussianMixtureModel(MixtureSpec(), torch.device("cpu"))  # only its noise schedule is used
    shape = (8, 4, 64, 64)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    steps_nfe = 20
    lines = [
        f"Solver overhead per step (ms), batch {shape} float32, {steps_nfe} NFE on karras, "
        f"median of {repeats} alternating repeats; ratio = native / diffusers.",
        "",
        "| sampler | native ms/step | diffusers ms/step | ratio |",
        "|---|---|---|---|",
    ]
    for name in TWINS:
        times: dict[str, list[float]] = {name: [], f"diffusers:{name}": []}
        steps = {}
        for _ in range(repeats):
            for which in times:
                start = time.perf_counter()
                _, _, steps[which] = run(
                    gmm, which, "karras", steps_nfe, list(range(shape[0])), Linear(), x_T
                )
                times[which].append(time.perf_counter() - start)
        native = statistics.median(times[name]) / steps[name] * 1e3
        twin = statistics.median(times[f"diffusers:{name}"]) / steps[f"diffusers:{name}"] * 1e3
        lines.append(f"| {name} | {native:.2f} | {twin:.2f} | {native / twin:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(f"Machine: {machine()}\n")
    print(traj_table(args.samples))
    print()
    print(overhead_table(args.repeats))


if __name__ == "__main__":
    main()
