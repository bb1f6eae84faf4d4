"""Benchmark (not a test): are per-cell timings of the default sweep signal or noise?

Runs the default sweep (5 samplers x NFE 5, 10, 20 on the analytic model, 1000 samples per cell)
several times for each source tree given, interleaved (tree A run 1, tree B run 1, tree A run 2, ...),
so trees are compared side by side on the same machine state, and prints markdown for BENCHMARKS.md:

- per cell, each run's seconds per sample (and, where the tree reports it, the range of timed calls);
- monotone: how many samplers' seconds per sample fail to rise with NFE, per run;
- reproduced: how many cells' figure in one run lies within the other run's reported range.

    .venv/bin/python bench/bench_timings.py --tree before=/path/to/old/checkout --tree after=. --runs 2
    (add --busy to keep one core busy with a spinning process during every sweep)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import machine  # noqa: E402

CELL = ["sampler", "nfe"]


def sweep(tree: Path, results: Path, run: str, extra: list[str]) -> pd.DataFrame:
    """The default sweep with `tree`'s code; its timings.csv (fd_exact only: the metrics do not matter)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "samplebench.cli", "sweep", f"results_dir={results}", f"run={run}"]
    cmd += ["metrics.names=[fd_exact]", *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=tree)
    return pd.read_csv(results / run / "timings.csv")


def figures(t: pd.DataFrame) -> pd.DataFrame:
    """sampler, nfe, median (or the tree's only figure), low, high (NaN where the tree reports none)."""
    out = t[CELL].copy()
    out["sec"] = t["sec_per_image_total"]
    out["low"] = t["sec_per_image_min"] if "sec_per_image_min" in t else float("nan")
    out["high"] = t["sec_per_image_max"] if "sec_per_image_max" in t else float("nan")
    return out.set_index(CELL).sort_index()


def non_monotone(f: pd.DataFrame) -> list[str]:
    """Samplers whose seconds per sample do not rise with NFE."""
    bad = []
    for sampler, rows in f.groupby(level="sampler"):
        secs = rows["sec"].to_numpy()
        if not all(a < b for a, b in zip(secs, secs[1:], strict=False)):
            bad.append(str(sampler))
    return bad


def reproduced(a: pd.DataFrame, b: pd.DataFrame) -> int:
    """Cells whose figure in run b lies within run a's reported range."""
    if a["low"].isna().all():
        return 0
    return int(((b["sec"] >= a["low"]) & (b["sec"] <= a["high"])).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", action="append", required=True, help="label=path of a samplebench checkout")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--busy", action="store_true", help="keep one core busy during the sweeps")
    ap.add_argument("extra", nargs="*", help="overrides passed to every sweep")
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    results: dict[str, list[pd.DataFrame]] = {label: [] for label in trees}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for k in range(args.runs):
                for label, tree in trees.items():
                    start = time.perf_counter()
                    t = sweep(Path(tree).resolve(), Path(tmp) / label, f"r{k}", args.extra)
                    results[label].append(figures(t))
                    print(f"{label} run {k + 1}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    finally:
        if busy:
            busy.kill()
    print(f"Machine: {machine()}{' (one core kept busy by a spinning process)' if args.busy else ''}\n")
    runs = range(args.runs)
    head = " | ".join(f"{label} run {k + 1}" for label in trees for k in runs)
    print(f"| sampler | NFE | {head} |")
    print("|---|---:|" + "---:|" * (len(trees) * args.runs))
    first = next(iter(results.values()))[0]
    for sampler, nfe in first.index:
        cells = []
        for label in trees:
            for k in runs:
                r = results[label][k].loc[(sampler, nfe)]
                rng = "" if pd.isna(r["low"]) else f" ({r['low'] * 1e3:.3f}-{r['high'] * 1e3:.3f})"
                cells.append(f"{r['sec'] * 1e3:.3f}{rng}")
        print(f"| {sampler} | {nfe} | " + " | ".join(cells) + " |")
    print("\nms per sample: median of timed calls (range min-max) where the tree reports it.\n")
    for label in trees:
        bad = [", ".join(non_monotone(f)) or "none" for f in results[label]]
        print(f"- {label}: samplers not rising with NFE, per run: " + "; ".join(bad))
        if args.runs >= 2:
            a, b = results[label][0], results[label][1]
            ratio = (b["sec"] / a["sec"]).agg(["min", "max"])
            print(
                f"- {label}: run 2 / run 1 per cell {ratio['min']:.2f}-{ratio['max']:.2f}; cells whose run-2 "
                f"figure lies in run 1's range: {reproduced(a, b)} of {len(a)}, run 1's in run 2's: "
                f"{reproduced(b, a)} of {len(a)}"
            )


if __name__ == "__main__":
    main()
