"""The report stage: metrics.csv -> leaderboard (terminal and markdown) and Pareto plots."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from samplebench import store
from samplebench.errors import UsageError
from samplebench.report.leaderboard import leaderboard_tables, print_rich, render_markdown
from samplebench.report.pareto import plot_metric


def print_timings(df: pd.DataFrame, console: Console) -> None:
    """Seconds per image (sampling, decoding, total) and counted NFE of every cell."""
    table = Table(title="timings (seconds per image; warm-up excluded)")
    for col in ("model", "sampler", "NFE", "counted", "guidance", "images", "sampling", "decode", "total"):
        table.add_column(col, justify="left" if col in ("model", "sampler") else "right")
    for r in df.itertuples():
        table.add_row(
            str(r.model),
            str(r.sampler),
            str(r.nfe),
            str(r.nfe_actual),
            f"{r.guidance:g}",
            str(r.n_images),
            f"{r.sec_per_image_sampling:.4f}",
            f"{r.sec_per_image_decode:.4f}",
            f"{r.sec_per_image_total:.4f}",
        )
    console.print(table)


def build_report(run_dir: Path, console: Console) -> list[Path]:
    """Print the leaderboards and write leaderboard.md and plots/; returns the files written."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        raise UsageError(f"{path} does not exist; run `samplebench metrics run={run_dir.name}` first")
    df = pd.read_csv(path)
    files: list[Path] = []
    timings = run_dir / "timings.csv"
    if timings.exists():
        print_timings(pd.read_csv(timings), console)
        files.append(timings)
    if df.empty:
        console.print("no quality metrics in this run yet; timings only")
        return files
    boards = leaderboard_tables(df)
    print_rich(boards, console)
    md = run_dir / "leaderboard.md"
    store.atomic_write_text(md, f"# {run_dir.name}: leaderboard\n\n" + render_markdown(boards))
    files.append(md)
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    for metric in sorted(df["metric"].unique()):
        files += plot_metric(df, metric, plot_dir)
    return files
