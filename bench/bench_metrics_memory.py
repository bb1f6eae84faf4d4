"""Benchmark (not a test): peak memory of the metrics stage on the analytic model as the sample count
grows. For each sample count it generates one analytic cell (model=gmm, dpmpp, NFE 10), then runs
`samplebench metrics` on it in a fresh child process with the default metrics for gmm (fd_exact and
traj_err, metrics.bootstrap as configured, 1000 by default) and reads the child's peak resident set
size from os.wait4 (ru_maxrss of that child alone). Two passes per sample count: cold (the cache is
cleared first, so traj_err solves its exact-ODE references, as on a run's first metrics pass) and warm
(references cached, as when a run is scored again: what is left is reading shards and the bootstraps).
Prints markdown for BENCHMARKS.md.

    .venv/bin/python bench/bench_metrics_memory.py [--n 10000 100000] [--shard-size 10000]
        [--passes cold warm] [--workdir DIR] [extra metrics overrides...]

--workdir keeps the generated runs (generate skips finished shards) and their caches, so another
measurement reuses the samples (and, with --passes warm alone, the references). The children import
samplebench the way `python -m` does, from the current directory first: run the script from another
checkout (cd /tmp/old && python /path/to/bench_metrics_memory.py) to measure that checkout's code. The
package measured is printed with its git commit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import machine  # noqa: E402

# Outputs of the metrics stage: removed before each measurement so it never reads an earlier pass's.
OUTPUTS = ("metrics.csv", "per_image.parquet", "paired.csv", "timings.csv", "metrics.protocol.json")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "samplebench.cli", *args]


def generate(results: Path, n: int, shard_size: int) -> None:
    size = min(n, shard_size)
    subprocess.run(
        cli(
            "generate",
            "model=gmm",
            "sampler=dpmpp",
            "nfe=10",
            f"num_images={n}",
            f"run=mem-{n}",
            f"results_dir={results}",
            f"batch_size={size}",
            f"shard_size={size}",
        ),
        check=True,
        capture_output=True,
        text=True,
    )


def peak_rss_of(cmd: list[str]) -> tuple[int, float]:
    """Peak RSS in bytes of the child running cmd (and of children it waited for), and its wall time."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Read stderr before waiting so a chatty child cannot block on a full pipe.
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr}")
    return usage.ru_maxrss * 1024, wall  # ru_maxrss is in KiB on Linux


def measure(results: Path, n: int, cold: bool, extra: list[str]) -> tuple[int, float]:
    run_dir = results / f"mem-{n}"
    for name in OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)
    if cold:
        shutil.rmtree(results / ".cache", ignore_errors=True)  # traj_err solves its references again
    return peak_rss_of(cli("metrics", f"run=mem-{n}", f"results_dir={results}", *extra))


def measured_code() -> str:
    """Where the children import samplebench from (as `python -m` does: the current directory first),
    with its git commit and whether that package folder differs from it."""
    where = subprocess.run(
        [sys.executable, "-c", "import samplebench, os; print(os.path.dirname(samplebench.__file__))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", where, *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else "?"

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")  # the package folder only
    return f"{where} at {git('rev-parse', '--short', 'HEAD')}{' with uncommitted changes' if dirty else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000], help="sample counts")
    parser.add_argument("--shard-size", type=int, default=10_000, help="shard_size and batch_size")
    parser.add_argument("--passes", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    parser.add_argument("--workdir", type=Path, default=None, help="keep generated runs here")
    args, extra = parser.parse_known_args()
    code = measured_code()
    peaks: dict[tuple[str, int], int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        rows = []
        for n in args.n:
            # One results folder per sample count: their traj_err caches must not share shards.
            results = root / f"n{n}"
            start = time.perf_counter()
            generate(results, n, args.shard_size)  # skips shards a kept --workdir already has
            print(f"n={n}: generate {time.perf_counter() - start:.1f} s", file=sys.stderr)
            for kind in args.passes:
                peak, wall = measure(results, n, kind == "cold", extra)
                peaks[kind, n] = peak
                rows.append((n, kind, peak, wall))
                print(f"n={n} {kind}: peak RSS {peak / 2**30:.3f} GiB, metrics {wall:.1f} s", file=sys.stderr)
    overrides = " ".join(extra)
    print(f"Machine: {machine()}\n")
    print(f"Code measured: {code}\n")
    print(
        "Peak RSS of `samplebench metrics run=... "
        + (overrides + " " if overrides else "")
        + "` (fd_exact and traj_err) in a fresh child process, after `samplebench generate model=gmm "
        f"sampler=dpmpp nfe=10 num_images=N batch_size={args.shard_size} shard_size={args.shard_size}` "
        "(batch and shard size min(N, that)); cold: traj_err's exact-ODE references solved in the "
        "pass, warm: cached:\n"
    )
    print("| samples | pass | peak RSS GiB | metrics wall s |")
    print("|---:|---|---:|---:|")
    for n, kind, peak, wall in rows:
        print(f"| {n} | {kind} | {peak / 2**30:.3f} | {wall:.1f} |")
    if len(args.n) > 1:
        first, last = args.n[0], args.n[-1]
        for kind in args.passes:
            ratio = peaks[kind, last] / peaks[kind, first]
            print(f"\nratio of peak RSS, {kind}, {last} / {first} samples: {ratio:.3f}")


if __name__ == "__main__":
    main()
