"""Benchmark (not a test): `samplebench generate` against a bare diffusers pipeline loop on the same
model, scheduler, NFE, batch size and seeds, measured side by side in one process.

Both sides start with the pipeline loaded and warm. samplebench's time is the whole `generate`
call (planning, its own untimed warm-up sample, sampling, decoding, shard and preview writing);
the bare loop calls the pipeline batch by batch with the same initial latents and prompts and
keeps the decoded images in memory. Repeats alternate the two sides; the ratio is reported on
medians and on best runs (the best run is least disturbed by other load on the machine).

    .venv/bin/python bench/bench_vs_diffusers.py [--images 64] [--batch 8] [--nfe 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import tiny_models  # noqa: E402  (tests/tiny_models.py builds the tiny pipeline)
from bench_generate import machine  # noqa: E402

from samplebench.config import plan  # noqa: E402
from samplebench.generate import generate  # noqa: E402
from samplebench.prompts import BUILTIN_PROMPTS  # noqa: E402
from samplebench.seeds import initial_noise  # noqa: E402


def bare_loop(pipe, scheduler_cls, options, images: int, batch: int, nfe: int, guidance: float, seed: int):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **options)
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    out = []
    for start in range(0, images, batch):
        idx = list(range(start, min(start + batch, images)))
        latents = initial_noise(seed, idx, shape, torch.float32, pipe.device)
        prompts = [BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)] for i in idx]
        out.append(
            pipe(
                prompt=prompts,
                num_inference_steps=nfe,
                guidance_scale=guidance,
                latents=latents,
                output_type="np",
            ).images
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--nfe", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_models.make_tiny_sd(Path(tmp) / "sd")
        import diffusers.utils.logging as dlog

        dlog.set_verbosity_error()
        pipe = DiffusionPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        options = dict(
            algorithm_type="dpmsolver++",
            solver_order=2,
            timestep_spacing="linspace",
            use_karras_sigmas=True,
            final_sigmas_type="zero",
            lower_order_final=True,
        )
        bare_loop(
            pipe, DPMSolverMultistepScheduler, options, args.batch, args.batch, args.nfe, args.guidance, 0
        )
        ours, bare = [], []
        for r in range(args.repeats):
            overrides = [
                "model=sd15",
                f"model.path={path}",
                "sampler=diffusers:dpmpp",
                "schedule=karras",
                f"nfe={args.nfe}",
                f"guidance={args.guidance}",
                f"num_images={args.images}",
                f"batch_size={args.batch}",
                f"shard_size={args.images}",
                f"results_dir={tmp}/results",
                f"run=r{r}",
            ]
            cells = plan(overrides)
            start = time.perf_counter()
            summary = generate(cells)
            ours.append(time.perf_counter() - start - summary.model_load_seconds["sd15"])
            start = time.perf_counter()
            bare_loop(
                pipe,
                DPMSolverMultistepScheduler,
                options,
                args.images,
                args.batch,
                args.nfe,
                args.guidance,
                0,
            )
            bare.append(time.perf_counter() - start)
    o, b = statistics.median(ours), statistics.median(bare)
    o_min, b_min = min(ours), min(bare)
    print(f"Machine: {machine()}\n")
    print(
        f"Tiny Stable-Diffusion-shaped pipeline (64 px), DPM-Solver++(2M) Karras, NFE {args.nfe}, "
        f"guidance {args.guidance}, {args.images} images in batches of {args.batch}, "
        f"{args.repeats} alternating repeats, median:\n"
    )
    print("| side | wall s (median) | all repeats |")
    print("|---|---:|---|")
    print(f"| samplebench generate (load excluded) | {o:.2f} | {', '.join(f'{x:.2f}' for x in ours)} |")
    print(f"| bare diffusers pipeline loop | {b:.2f} | {', '.join(f'{x:.2f}' for x in bare)} |")
    print(f"\n**ratio samplebench / diffusers: {o / b:.3f} on medians, {o_min / b_min:.3f} on best runs**")


if __name__ == "__main__":
    main()
