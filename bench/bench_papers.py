"""Benchmark (not a test): do the papers' claims hold on the analytic model?

Each sampler of issue 13 against its base, at NFE 5, 10, 20 and guidance 1 and a large guidance, run
through the product path (`samplebench sweep model=gmm ...`, then the metrics stage): traj_err (RMS
distance to the exact probability-flow ODE solution from the same x_T, with its 95% bootstrap interval)
and fd_exact (Frechet distance to the exact data distribution of the cell's conditions), plus the paired
difference new - base of traj_err over the same samples (mean, 95% bootstrap interval). Negative is
better for both metrics. A sampler that cannot spend an NFE exactly runs the nearest lower budget
(allow_lower_nfe=true; the NFE column says what was spent).

    .venv/bin/python bench/bench_papers.py [--samples 1000] [--guidance 1 5] [--workdir /tmp/papers]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import machine  # noqa: E402

from samplebench.metrics.stats import paired_difference  # noqa: E402

# new sampler -> (its base, what the paper claims against it)
PAIRS = {
    "hb": ("ipndm", "momentum removes divergence artifacts at low NFE"),
    "ghvb": ("ipndm", "momentum keeps the base order, fewer artifacts"),
    "dpmpp_hb": ("dpmpp", "momentum on DPM-Solver++(2M)"),
    "ts_ddim": ("ddim", "time-shift lowers exposure bias"),
    "ts_dpmpp": ("dpmpp", "time-shift lowers exposure bias"),
    "teleport": ("dpmpp", "skipping early steps costs no quality, frees NFE"),
    "deis_tab": ("deis", "tAB-DEIS beats other DEIS forms at low NFE"),
    "deis_rhoab": ("deis", "rhoAB-DEIS"),
    "deis_rhork": ("deis", "rhoRK-DEIS"),
    "dc_solver": ("unipc", "dynamic compensation improves UniPC at low NFE"),
    "dpm_solver_v3": ("dpmpp", "empirical model statistics beat DPM-Solver++"),
}


def _per_image(pi: pd.DataFrame, name: str, nfe: int, guidance: float) -> np.ndarray:
    """Per-sample traj_err of one cell, in sample order (the pairing of the paired difference)."""
    p = pi[
        (pi.sampler.str.split(" · ").str[0] == name)
        & (pi.nfe == nfe)
        & (pi.guidance == guidance)
        & (pi.metric == "traj_err")
    ]
    return p.sort_values("index")["value"].to_numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 5.0])
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--workdir", default="/tmp/bench-papers")
    args = ap.parse_args()
    samplers = sorted(set(PAIRS) | {b for b, _ in PAIRS.values()})
    work = Path(args.workdir)
    cmd = [
        sys.executable,
        "-m",
        "samplebench.cli",
        "sweep",
        "model=gmm",
        f"sampler={','.join(samplers)}",
        f"nfe={','.join(map(str, args.nfe))}",
        f"guidance={','.join(f'{g:g}' for g in args.guidance)}",
        f"num_images={args.samples}",
        f"batch_size={args.samples}",
        f"shard_size={args.samples}",
        "allow_lower_nfe=true",
        "timing.repeats=1",
        f"results_dir={work}",
        "run=papers",
    ]
    subprocess.run(cmd, check=True)
    run = work / "papers"
    df = pd.read_csv(run / "metrics.csv")
    pi = pd.read_parquet(run / "per_image.parquet")
    print(f"Machine: {machine()}")
    print(f"Command: {' '.join(cmd[2:])}\n")
    print(
        "| sampler | base | guidance | NFE | traj_err [95% CI] | base traj_err [95% CI] "
        "| new - base [95% CI] | fd_exact | base fd_exact |"
    )
    print("|---|---|---:|---:|---|---|---|---:|---:|")
    for new, (base, _) in PAIRS.items():
        for g in args.guidance:
            for nfe in args.nfe:
                row = []
                for name in (new, base):
                    sel = df[(df.sampler == name) & (df.nfe == nfe) & (df.guidance == g)]
                    te = sel[sel.metric == "traj_err"].iloc[0]
                    fd = sel[sel.metric == "fd_exact"].iloc[0]
                    row.append((te, fd))
                (te_n, fd_n), (te_b, fd_b) = row

                d = paired_difference(_per_image(pi, new, nfe, g), _per_image(pi, base, nfe, g))
                spent = int(te_n.nfe_actual) if "nfe_actual" in te_n and not pd.isna(te_n.nfe_actual) else nfe
                print(
                    f"| {new} | {base} | {g:g} | {spent} "
                    f"| {te_n.value:.4g} [{te_n.ci_low:.4g}, {te_n.ci_high:.4g}] "
                    f"| {te_b.value:.4g} [{te_b.ci_low:.4g}, {te_b.ci_high:.4g}] "
                    f"| {d['diff']:+.3g} [{d['ci_low']:+.3g}, {d['ci_high']:+.3g}] "
                    f"| {fd_n.value:.4g} | {fd_b.value:.4g} |"
                )


if __name__ == "__main__":
    main()
