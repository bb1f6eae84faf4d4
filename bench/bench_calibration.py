"""Benchmark (not a test): does the analytic model rank samplers as image models do?

For each analytic preset (samplebench/models/gmm.py, PRESETS), the samplers of the published CIFAR-10
table of diff-sampler (zju-pi/diff-sampler, diff-solvers-main/README.md, "FID on CIFAR-10"; the
figures are in ../shared/PROTOCOLS.md) run at NFE 5 and 10 with that table's settings: iPNDM (order 4),
Euler and Heun on EDM's polynomial schedule (karras, rho 7); DPM-Solver++(3M) and UniPC (order 3, bh2)
on logSNR-uniform steps; tAB-DEIS (ab order 3, our order 4) on time-quadratic steps. Each cell is
scored by mmd_exact and traj_err against the exact ODE endpoints of the same seeds, and its ranking
is compared with the table's FID ranking by Spearman's rho (scipy.stats.spearmanr). DDIM is shown but
not ranked: the table has no DDIM row (its Euler is DDIM in EDM's parametrisation).

Two NFE alignments are reported. "as run": our NFE N, N steps of which the last is the jump from the
schedule's smallest level to 0 (what a sweep runs). "table protocol": diff-sampler's NFE N takes N steps
between N + 1 positive levels ending at sigma_min = 0.002 and returns that point (denoise_to_zero=False),
so it matches our N + 1 steps, whose extra last evaluation is the jump from sigma_min to 0 (a change
of order sigma_min, below every other error here). Heun's table column at 10 NFE is 5 Heun steps, our
heun at 11.

    .venv/bin/python bench/bench_calibration.py [--samples 1000] [--write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import machine, write_section  # noqa: E402
from bench_schedules import run  # noqa: E402

from samplebench.metrics.analytic import coupled_mmd, mmd_bandwidth  # noqa: E402
from samplebench.metrics.reference import solve_with_floor  # noqa: E402
from samplebench.metrics.stats import mean_ci  # noqa: E402
from samplebench.models.gmm import DEFAULT_PRESET, PRESETS, GaussianMixtureModel, resolve_spec  # noqa: E402
from samplebench.seeds import initial_noise  # noqa: E402

# (label, sampler, schedule, options over conf/sampler/<sampler>.yaml): the table's solvers and settings
# (diff-solvers-main/README.md, "General Settings").
TABLE = [
    ("iPNDM-4", "ipndm", {"name": "karras", "rho": 7.0}, {"order": 4}),
    ("DEIS-tAB3", "deis_tab", {"name": "time_quadratic"}, {"order": 4}),
    ("UniPC-3", "unipc", {"name": "logsnr"}, {"order": 3, "variant": "bh2"}),
    ("DPM-Solver++(3M)", "dpmpp_3m", {"name": "logsnr"}, {}),
    ("Euler", "euler", {"name": "karras", "rho": 7.0}, {}),
    ("Heun", "heun", {"name": "karras", "rho": 7.0}, {}),
    ("DDIM", "ddim", {"name": "karras", "rho": 7.0}, {}),
]
# diff-sampler's CIFAR-10 FID (unconditional EDM VP model, 50k samples): NFE -> {label: FID}.
PUBLISHED = {
    5: {"iPNDM-4": 13.59, "DEIS-tAB3": 14.39, "UniPC-3": 23.98, "DPM-Solver++(3M)": 24.97, "Euler": 49.66},
    10: {
        "iPNDM-4": 2.77,
        "DEIS-tAB3": 4.09,
        "UniPC-3": 2.89,
        "DPM-Solver++(3M)": 3.00,
        "Euler": 15.69,
        "Heun": 15.93,
    },
}
HEADING = "## Calibration: analytic presets against the published CIFAR-10 ranking"


def score_preset(preset: str, samples: int, seed: int | None = None) -> dict:
    """{(label, nfe): (mmd, lo, hi, traj_err, nfe spent)} for one preset (and another mixture seed)."""
    fields = {"preset": preset} if seed is None else {"preset": preset, "seed": seed}
    model = GaussianMixtureModel(resolve_spec(fields), torch.device("cpu"))
    idx = list(range(samples))
    x_T = initial_noise(0, idx, model.sample_shape, torch.float64, model.device)
    ref, _ = solve_with_floor(model, x_T, model.conditions(idx, 0), 1.0)
    ref = ref.numpy()
    h = mmd_bandwidth(model)
    out = {}
    for label, name, schedule, extra in TABLE:
        for nfe in (5, 6, 10, 11):
            x, spent, _ = run(model, name, schedule, nfe, idx, x_T=x_T, options=extra)
            x = x.numpy()
            value, psi = coupled_mmd(x, ref, h)
            _, lo, hi = mean_ci(psi, 1000)
            traj = float(np.sqrt(((x - ref) ** 2).mean(1)).mean())
            out[(label, nfe)] = (value, lo, hi, traj, spent)
    return out


def _ranking(values: dict[str, float]) -> str:
    return " < ".join(k for k, _ in sorted(values.items(), key=lambda kv: kv[1]))


def rho(scores: dict, table_nfe: int, offset: int, column: int = 0) -> float:
    """Spearman's rho of the table's FID ranking at table_nfe against our cells at table_nfe + offset."""
    labels = list(PUBLISHED[table_nfe])
    return float(
        spearmanr(
            [PUBLISHED[table_nfe][k] for k in labels],
            [scores[(k, table_nfe + offset)][column] for k in labels],
        )[0]
    )


def displaced(scores: dict, table_nfe: int, offset: int) -> str:
    """The samplers ranked differently from the table (published rank -> ours), or 'none'."""
    published = PUBLISHED[table_nfe]
    theirs = sorted(published, key=published.get)
    ours = sorted(published, key=lambda k: scores[(k, table_nfe + offset)][0])
    moved = [
        f"{k} {theirs.index(k) + 1} -> {ours.index(k) + 1}"
        for k in theirs
        if theirs.index(k) != ours.index(k)
    ]
    return "; ".join(moved) if moved else "none"


def calibration_rows(preset: str, scores: dict) -> list[str]:
    rows = []
    for table_nfe in (5, 10):
        for offset, protocol in ((0, "as run"), (1, "table protocol")):
            nfe = table_nfe + offset
            published = PUBLISHED[table_nfe]
            labels = list(published)
            mmd = {k: scores[(k, nfe)][0] for k in labels}
            rho_mmd, rho_traj = rho(scores, table_nfe, offset, 0), rho(scores, table_nfe, offset, 3)
            lower = [f"{k} {scores[(k, nfe)][4]}" for k in labels if scores[(k, nfe)][4] != nfe]
            note = f" (ran {', '.join(lower)})" if lower else ""
            rows.append(
                f"| {preset} | {table_nfe} | {protocol}: our NFE {nfe}{note} | {rho_mmd:+.2f} "
                f"| {rho_traj:+.2f} | {_ranking(published)} | {_ranking(mmd)} |"
            )
    return rows


def cell_rows(preset: str, scores: dict) -> list[str]:
    rows = []
    for label, *_ in TABLE:
        cells = []
        for nfe in (5, 6, 10, 11):
            value, lo, hi, traj, spent = scores[(label, nfe)]
            mark = "" if spent == nfe else f" (ran {spent})"
            cells.append(f"{value:.2e} [{lo:.2e}, {hi:.2e}] / {traj:.2e}{mark}")
        rows.append(f"| {preset} | {label} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument(
        "--seeds", default="1,2,3,4", help="other mixture seeds of the default preset (robustness)"
    )
    ap.add_argument("--seed-samples", type=int, default=300)
    ap.add_argument("--write", action="store_true", help="replace BENCHMARKS.md's calibration section")
    args = ap.parse_args()
    torch.set_num_threads(1)
    scores = {p: score_preset(p, args.samples) for p in PRESETS}
    lines = [
        HEADING,
        "",
        f"Machine: {machine()}. `python bench/bench_calibration.py --samples {args.samples}`; "
        f"default preset: `{DEFAULT_PRESET}`.",
        "",
        "Spearman's rho between each preset's ranking of the published table's samplers (by mmd_exact, and "
        "by traj_err) and the table's CIFAR-10 FID ranking (diff-sampler, ../shared/PROTOCOLS.md), at NFE 5 "
        "(5 samplers) and 10 (6 samplers); rankings best first. Each sampler on the table's schedule and "
        'options (bench/bench_calibration.py). "as run": our NFE N, whose last step is the jump from '
        'sigma_min to 0; "table protocol": diff-sampler stops at sigma_min after N steps, which is our '
        "N + 1 (the extra evaluation is the final jump).",
        "",
        "| preset | table NFE | alignment | rho (mmd_exact) | rho (traj_err) | published FID ranking | "
        "our mmd_exact ranking |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset in PRESETS:
        lines += calibration_rows(preset, scores[preset])
    lines += ["", f"Where the default preset (`{DEFAULT_PRESET}`) departs from the published ranking:", ""]
    for table_nfe in (5, 10):
        for offset, protocol in ((0, "as run"), (1, "table protocol")):
            lines.append(
                f"- NFE {table_nfe}, {protocol}: " + displaced(scores[DEFAULT_PRESET], table_nfe, offset)
            )
    lines += [
        "",
        f"The cells behind it ({args.samples} samples each): mmd_exact [95% CI] / traj_err.",
        "",
        "| preset | sampler | NFE 5 | NFE 6 | NFE 10 | NFE 11 |",
        "|---|---|---|---|---|---|",
    ]
    for preset in PRESETS:
        lines += cell_rows(preset, scores[preset])
    seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    if seeds:
        lines += [
            "",
            f"How much of this is the particular mixture: the default preset (`{DEFAULT_PRESET}`) redrawn "
            f"with other `model.seed` values ({args.seed_samples} samples per cell), rho of mmd_exact.",
            "",
            "| model.seed | NFE 5, as run | NFE 5, table protocol | NFE 10, as run "
            "| NFE 10, table protocol |",
            "|---|---|---|---|---|",
        ]
        for seed in [resolve_spec({"preset": DEFAULT_PRESET}).seed, *seeds]:
            sc = (
                scores[DEFAULT_PRESET]
                if seed == resolve_spec({"preset": DEFAULT_PRESET}).seed
                else (score_preset(DEFAULT_PRESET, args.seed_samples, seed))
            )
            lines.append(
                f"| {seed} | " + " | ".join(f"{rho(sc, n, o):+.2f}" for n in (5, 10) for o in (0, 1)) + " |"
            )
    section = "\n".join(lines)
    print(section)
    if args.write:
        write_section(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", HEADING, section)


if __name__ == "__main__":
    main()
