"""Benchmark (not a test): the default sweep end to end, and per cell the wall time of sampling and
the share of it spent inside model calls (the rest is solver overhead: scheduler arithmetic,
noise, guidance bookkeeping). Prints markdown for BENCHMARKS.md.

    .venv/bin/python bench/bench_generate.py [extra overrides...]
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from samplebench import store
from samplebench.metrics.run import timing_row


def machine() -> str:
    """The line BENCHMARKS.md records with each figure: CPU, cores, torch threads, GPU, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), {gpu}, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace BENCHMARKS.md's section headed `heading` (up to the next `## ` heading) with `section`, or
    append it at the end: every benchmark rewrites only its own figures."""
    old = path.read_text().splitlines() if path.exists() else []
    new = section.rstrip("\n").splitlines()
    if heading in old:
        i = old.index(heading)
        j = next((k for k in range(i + 1, len(old)) if old[k].startswith("## ")), len(old))
        tail = [""] + old[j:] if j < len(old) else []
        lines = old[:i] + new + tail
    else:
        lines = old + ([""] if old and old[-1].strip() else []) + new
    path.write_text("\n".join(lines) + "\n")


def main(extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "samplebench.cli", "sweep", "run=bench", f"results_dir={tmp}", *extra]
        start = time.perf_counter()
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
        total = time.perf_counter() - start
        stages = next((line for line in proc.stderr.splitlines() if line.startswith("done in")), "")
        rows = [timing_row(cell) for cell in store.find_cells(Path(tmp) / "bench")]
    print(f"Machine: {machine()}\n")
    print(
        f"Default sweep `samplebench sweep {' '.join(extra)}` end to end (process start, generation, "
        f"metrics with cached ODE references cold, report): **{total:.1f} s**; "
        f"the tool's own split: {stages.removesuffix(' Files:')}\n"
    )
    print(
        "| sampler | NFE asked | NFE counted | samples | timed calls | sampling s/sample (median, min-max) "
        "| share inside model calls | warm-up s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["sampler"], r["nfe"])):
        print(
            f"| {r['sampler']} | {r['nfe']} | {r['nfe_actual']} | {r['n_images']} | {r['n_timed']} "
            f"| {r['sec_per_image_sampling']:.3g} "
            f"({r['sec_per_image_min']:.3g}-{r['sec_per_image_max']:.3g}) "
            f"| {r['model_call_share']:.0%} | {r['warmup_seconds']:.3g} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
