"""Benchmark (not a test): Inception feature extraction of a folder of PNGs, torch-fidelity's own command
line against samplebench (images.iter_image_batches + InceptionFeatures), side by side in one run.

Both run as child processes on the same folder with the same weights file, so both wall times include
process start, imports and loading the network; samplebench also reports its extraction-only time.
Peak resident memory is each child's ru_maxrss (os.wait4); run with several --n to see it stay flat.
The weights are random (torch-fidelity's upstream file format, made offline): throughput and memory do
not depend on the weight values. Prints markdown for BENCHMARKS.md.

    .venv/bin/python bench/bench_features.py --n 1000 [10000 ...] [--size 64] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import machine  # noqa: E402

FIDELITY = Path(sys.executable).with_name("fidelity")


@dataclass(frozen=True)
class Run:
    """One child process: what it reported, its wall time and its peak resident memory."""

    name: str
    n: int
    wall_s: float
    maxrss_mib: float
    isc: float
    extract_s: float | None
    load: float  # 1-minute load average when the child ended (others' jobs on a shared machine show here)


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """Smooth gradients with a blob and noise, like generated samples (content does not affect speed)."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    for i in range(n):
        a, b = rng.uniform(0, 255, (2, 3))
        img = a * xx[..., None] + b * yy[..., None]
        cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.3)]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 8, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.png")


def run_child(name: str, cmd: list[str], n: int) -> Run:
    """Run `cmd`, timing it and reading its own peak RSS (not the running maximum over all children)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{stderr[-3000:]}")
    report = json.loads(stdout[stdout.index("{") :])
    isc = float(report.get("inception_score_mean", report.get("isc", float("nan"))))
    return Run(name, n, wall, usage.ru_maxrss / 1024, isc, report.get("extract_s"), os.getloadavg()[0])


def child(folder: Path, weights: Path, batch_size: int) -> None:
    """samplebench's side: list, decode batch by batch, extract, Inception Score, as the CLI does."""
    from samplebench.metrics.images import iter_image_batches, list_images
    from samplebench.metrics.inception import InceptionFeatures, isc_from_logits

    ext = InceptionFeatures("legacy", weights_path=weights, batch_size=batch_size)
    start = time.perf_counter()
    pools, logits = [], []
    for batch in iter_image_batches(list_images(folder), batch_size):
        f = ext(batch)
        pools.append(f["pool"].astype(np.float32))  # what samplebench keeps (its feature cache is float32)
        logits.append(f["logits"].astype(np.float32))
    extract = time.perf_counter() - start
    isc, _ = isc_from_logits(np.concatenate(logits).astype(np.float64))
    print(json.dumps({"isc": isc, "extract_s": extract, "n": sum(len(p) for p in pools)}))


def best(runs: list[Run], n: int, name: str) -> Run:
    """The fastest repeat: on a shared machine other jobs only ever add time."""
    return min((r for r in runs if r.n == n and r.name == name), key=lambda r: r.wall_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000], help="numbers of images (one group each)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument(
        "--batch-size", type=int, default=64, help="batch size for both (torch-fidelity's default)"
    )
    ap.add_argument(
        "--fidelity",
        choices=("default", "save-cpu-ram", "both"),
        default="both",
        help="torch-fidelity runs: its defaults (DataLoader workers), --save-cpu-ram (no workers), or both",
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="runs of each pipeline, in rotating order; the fastest counts"
    )
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "WEIGHTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.batch_size)
        return

    from samplebench.metrics.inception import save_random_weights

    print(f"Machine: {machine()}\n")
    runs: list[Run] = []
    names: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_random_weights(Path(tmp) / "weights-inception-2015-12-05-6726825d.pth", seed=0)
        for n in args.n:
            folder = Path(tmp) / f"images-{n}"
            write_images(folder, n, args.size)
            fidelity = [
                str(FIDELITY),
                "--input1",
                str(folder),
                "--isc",
                "--feature-extractor-weights-path",
                str(weights),
                "--cpu",
                "--no-cache",
                "--silent",
                "--json",
                "--batch-size",
                str(args.batch_size),
            ]
            ours = [sys.executable, str(Path(__file__).resolve()), "--child", str(folder), str(weights)]
            pipelines: list[tuple[str, list[str]]] = []
            if args.fidelity in ("default", "both"):
                pipelines.append(("torch-fidelity CLI", fidelity))
            if args.fidelity in ("save-cpu-ram", "both"):
                pipelines.append(("torch-fidelity CLI --save-cpu-ram", [*fidelity, "--save-cpu-ram"]))
            pipelines.append(("samplebench", [*ours, "--batch-size", str(args.batch_size)]))
            names = [name for name, _ in pipelines]
            for rep in range(args.repeats):
                k = rep % len(pipelines)
                for name, cmd in pipelines[k:] + pipelines[:k]:
                    runs.append(run_child(name, cmd, n))

    print(
        f"Inception-v3 features (torch-fidelity's port, legacy resize to 299) of {args.size}x{args.size} "
        f"PNGs, batch {args.batch_size}, CPU; every pipeline is a child process timed from spawn to exit "
        "(process start, imports, loading the network, decoding, extraction, Inception Score), "
        f"{args.repeats} run(s) each in rotating order, the fastest shown. Random weights in "
        "torch-fidelity's upstream file format: throughput and memory do not depend on the weight values. "
        "torch-fidelity's default uses 4 DataLoader worker processes (none with --save-cpu-ram); peak RSS "
        "is ru_maxrss of the child, which counts its reaped workers as a maximum, not a sum. samplebench "
        "holds the same network in channels-last memory layout (oneDNN's fast path; features agree with "
        "torch-fidelity's to float32 rounding, hence the IS column).\n"
    )
    print(
        "| pipeline | images | wall s | images/s (wall) | extraction-only s | images/s (extraction) "
        "| peak RSS MiB | IS (same weights) | wall s of each run (load avg at end) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for n in args.n:
        for name in names:
            r = best(runs, n, name)
            each = ", ".join(f"{x.wall_s:.0f} ({x.load:.1f})" for x in runs if x.n == n and x.name == name)
            rss = max(x.maxrss_mib for x in runs if x.n == n and x.name == name)
            ex = f"{r.extract_s:.1f}" if r.extract_s is not None else "n/a"
            ex_rate = f"{r.n / r.extract_s:.2f}" if r.extract_s else "n/a"
            print(
                f"| {name} | {n} | {r.wall_s:.1f} | {n / r.wall_s:.2f} | {ex} | {ex_rate} "
                f"| {rss:.0f} | {r.isc:.6f} | {each} |"
            )
    print()
    for n in args.n:
        ours = best(runs, n, "samplebench")
        for name in names[:-1]:
            r = best(runs, n, name)
            speed = r.wall_s / ours.wall_s
            is_diff = abs(ours.isc - r.isc) / abs(r.isc)
            print(
                f"- {n} images: samplebench vs {name}: throughput (wall) ratio **{speed:.2f}x**, "
                f"IS relative difference {is_diff:.1e}"
            )
    if len(args.n) > 1:
        lo, hi = min(args.n), max(args.n)
        for name in names:
            a = max(x.maxrss_mib for x in runs if x.n == lo and x.name == name)
            b = max(x.maxrss_mib for x in runs if x.n == hi and x.name == name)
            print(f"- peak RSS of {name}, {lo} -> {hi} images: {a:.0f} -> {b:.0f} MiB")
    print(
        "- features kept per image: samplebench 12 KiB (float32 pool + logits, as its feature cache stores "
        "them), torch-fidelity --isc 4 KiB (float32 logits)"
    )


if __name__ == "__main__":
    main()
