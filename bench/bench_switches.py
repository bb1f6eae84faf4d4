"""Benchmark (not a test): the speed switches on CPU, on the tiny Stable Diffusion pipeline of
tests/tiny_models.py.

Each configuration (switches off; each switch alone; all together) is planned from command-line
overrides (`model=sd15 model.path=<tiny pipeline> model.compile=true ...`, config.plan), its model
loaded through load_model (which applies the switches, speed.apply), and its batches run through
generate.run_batch, the call the generator times. After one untimed warm-up call per configuration
(where torch.compile compiles: its seconds are read from dynamo's counters, speed.compile_state), the
configurations' timed calls are interleaved round-robin (off, compile, channels_last, ..., off, ...),
so a load that comes and goes on the machine moves all of them alike; the figure is the median of each
configuration's sampling seconds and the ratio off / configuration (above 1: faster). The images are
those of the same batch (same x_T, prompts, seed); the difference is to the switches-off run.

    .venv/bin/python bench/bench_switches.py [--rounds 7] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# Cold compiles, as a fresh machine pays them: inductor's graph caches off and its compiled-kernel
# cache in a new, empty folder (else C++ kernels built by an earlier run are reused).
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-cold-"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import tiny_models  # noqa: E402
from bench_generate import machine, write_section  # noqa: E402

from samplebench import speed  # noqa: E402
from samplebench.config import plan  # noqa: E402
from samplebench.generate import CellConditions, batch_inputs, run_batch, steps_for  # noqa: E402
from samplebench.models import load_model  # noqa: E402

TITLE = "## Speed switches on CPU (bench/bench_switches.py)"
CONFIGS = {
    "off": [],
    "model.compile=true": ["model.compile=true"],
    "model.channels_last=true": ["model.channels_last=true"],
    "model.attention=math": ["model.attention=math"],
    "model.attention=flash": ["model.attention=flash"],
    "allow_tf32=true": ["allow_tf32=true"],
    "all (compile, channels_last, math, tf32)": [
        "model.compile=true",
        "model.channels_last=true",
        "model.attention=math",
        "allow_tf32=true",
    ],
}


def reading(summary: dict[str, dict[str, float | bool]]) -> list[str]:
    """What the table says, from its own figures (so a re-run on another machine reads right).
    summary: per configuration its median and fastest seconds, compile seconds, and whether its samples
    are bit-identical to switches-off (then it ran the same kernels, and its ratio is pure noise)."""
    off = summary["off"]
    ratio = {n: off["median"] / r["median"] for n, r in summary.items()}
    ratio_min = {n: off["min"] / r["min"] for n, r in summary.items()}
    same = [n for n, r in summary.items() if n != "off" and r["identical"]]
    out = []
    noise = 1.0
    if same:
        noise = max(max(ratio[n], 1 / ratio[n], ratio_min[n], 1 / ratio_min[n]) for n in same)
        out.append(
            f"Bit-identical to switches-off, so running the same kernels: {', '.join(same)} (on CPU "
            "allow_tf32 changes no kernel, and torch's default SDPA backend on CPU is the flash kernel). "
            f"Their ratios are noise alone: up to {noise:.2f}x either way in this run (other processes "
            "share the 2 cores), so only a ratio beyond that, in both the median and the fastest call, "
            "is a measured effect."
        )
    beyond = [
        n
        for n in summary
        if n != "off"
        and n not in same
        and (min(ratio[n], ratio_min[n]) > noise or max(ratio[n], ratio_min[n]) < 1 / noise)
    ]
    out.append("Beyond the noise: " + (", ".join(f"{n} ({ratio[n]:.2f}x)" for n in beyond) or "none") + ".")
    if "model.compile=true" in summary:
        c = summary["model.compile=true"]
        saved = off["median"] - c["median"]
        pays = f", repaid after ~{c['compile_s'] / saved:.0f} batches of this shape" if saved > 0 else ""
        out.append(
            f"torch.compile (inductor, C++ codegen on CPU) took {c['compile_s']:.0f} s to compile the UNet "
            f"for its one input shape (paid again for each new shape; the `all` row reuses kernels the "
            f"first compile built), then ran at {ratio['model.compile=true']:.2f}x eager{pays}: on this "
            "tiny network much of an eager call is per-op overhead, which compiled C++ removes."
        )
    out.append(
        "The differences are float32 reordering (channels_last's convolution algorithms, the math "
        "kernel's softmax, compile's fused kernels), ~1e-6 of the scale per network call; "
        "tests/test_speed_switches.py bounds them at 1e-4 of the sample's norm. Timed calls compiled "
        "nothing (column 5): compile time is all in the warm-up. GPU figures, where these switches are "
        "meant to pay, are bench/bench_gpu.py's."
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7, help="timed calls per configuration (interleaved)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--write", type=Path, default=None, help="replace or append the section in this file")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    pipe = tiny_models.make_tiny_sd(tmp / "sd15")
    base = [
        "model=sd15",
        f"model.path={pipe}",
        f"results_dir={tmp}",
        "sampler=dpmpp",
        f"nfe={args.nfe}",
        f"guidance={args.guidance:g}",
        f"batch_size={args.batch}",
        f"num_images={args.batch}",
    ]
    runs = {}
    for name, extra in CONFIGS.items():
        (cell,) = plan([*base, *extra])
        tf32 = speed.set_tf32(bool(cell.config.get("allow_tf32")))
        try:
            model = load_model(cell.model, "cpu")
        except Exception as e:  # e.g. a backend this CPU lacks: reported, not benchmarked
            print(f"{name}: skipped ({e})", file=sys.stderr)
            tf32.restore()
            continue
        conditions = CellConditions(model, cell.config)
        inputs = batch_inputs(model, cell, list(range(args.batch)), conditions)
        steps = steps_for(cell)
        graphs, compiled = speed.compile_state()
        start = time.perf_counter()
        warm = run_batch(model, cell, inputs, steps)  # untimed: compiles (model.compile) and warms up
        warm_s = time.perf_counter() - start
        graphs_after, compiled_after = speed.compile_state()
        tf32.restore()
        runs[name] = {
            "cell": cell,
            "model": model,
            "inputs": inputs,
            "steps": steps,
            "warmup_s": warm_s,
            "compile_s": compiled_after - compiled,
            "graphs": graphs_after - graphs,
            "samples": warm.samples,
            "images": warm.images,
            "seconds": [],
            "timed_compiles": 0,
        }
        print(f"{name}: warm-up {warm_s:.1f} s, compile {compiled_after - compiled:.1f} s", file=sys.stderr)
    for r in range(args.rounds):
        for run in runs.values():
            tf32 = speed.set_tf32(bool(run["cell"].config.get("allow_tf32")))
            out = run_batch(run["model"], run["cell"], run["inputs"], run["steps"])
            tf32.restore()
            run["seconds"].append(out.stats["seconds"])
            run["timed_compiles"] += int(out.stats["compiles"])
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    ref = runs["off"]
    off_median = float(np.median(ref["seconds"]))
    scale = float(ref["samples"].abs().max())
    lines = [
        TITLE,
        "",
        f"The tiny SD pipeline of tests/tiny_models.py (UNet 2 levels, latents 4 x 8 x 8, 64 px images), "
        f"`sampler=dpmpp nfe={args.nfe} guidance={args.guidance:g}`, one batch of {args.batch} images "
        f"(the UNet sees {2 * args.batch} with guidance), float32 on CPU. Each configuration is planned "
        "from its overrides and loaded through the user path (load_model applies the switches); after "
        "one untimed warm-up call each, the configurations' timed calls (generate.run_batch: the "
        f"sampler's run, as the generator times it) are interleaved round-robin, {args.rounds} rounds. "
        "Ratio: median seconds switches-off / median seconds of the configuration (above 1: faster); "
        "in brackets the same ratio of the fastest calls, less moved by other load on the machine. "
        "Compiles are cold (inductor's on-disk caches off). "
        "Difference: the same batch (same x_T, prompts, seed) against the switches-off run, sample "
        "max |diff| relative to the sample's max |value|, and decoded uint8 images.",
        "",
        f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}",
        "",
        "| configuration | median s / batch (min-max) | ratio off / this (of minimums) "
        "| compile s (warm-up s) | compiles in timed calls | max sample diff (rel.) "
        "| max image diff (levels) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        sec = np.asarray(run["seconds"])
        med = float(np.median(sec))
        diff = float((run["samples"] - ref["samples"]).abs().max()) / scale
        img = int(np.abs(run["images"].astype(int) - ref["images"].astype(int)).max())
        lines.append(
            f"| {name} | {med:.3f} ({sec.min():.3f}-{sec.max():.3f}) | {off_median / med:.2f} "
            f"({min(ref['seconds']) / sec.min():.2f}) "
            f"| {run['compile_s']:.1f} ({run['warmup_s']:.1f}) | {run['timed_compiles']} "
            f"| {diff:.1e} | {img} |"
        )
    skipped = [n for n in CONFIGS if n not in runs]
    lines += [
        "",
        *(
            ["Not run on this CPU: " + ", ".join(skipped) + " (one-line error at load).", ""]
            if skipped
            else []
        ),
    ]
    summary = {
        n: {
            "median": float(np.median(r["seconds"])),
            "min": float(min(r["seconds"])),
            "compile_s": r["compile_s"],
            "identical": bool(torch.equal(r["samples"], ref["samples"])),
        }
        for n, r in runs.items()
    }
    lines += ["Read: " + " ".join(reading(summary)), ""]
    section = "\n".join(lines)
    print(section)
    if args.write is not None:
        write_section(args.write, TITLE, section)


if __name__ == "__main__":
    main()
