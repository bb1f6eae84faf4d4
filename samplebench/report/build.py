"""The report stage: metrics.csv -> leaderboard (terminal and markdown) and Pareto plots."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.console import Console

from samplebench import store
from samplebench.errors import UsageError
from samplebench.report.leaderboard import leaderboard_tables, print_rich, render_markdown
from samplebench.report.pareto import plot_metric


def build_report(run_dir: Path, console: Console) -> list[Path]:
    """Print the leaderboards and write leaderboard.md and plots/; returns the files written."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        raise UsageError(f"{path} does not exist; run `samplebench metrics run={run_dir.name}` first")
    df = pd.read_csv(path)
    if df.empty:
        raise UsageError(f"{path} has no rows; run `samplebench metrics run={run_dir.name}` first")
    boards = leaderboard_tables(df)
    print_rich(boards, console)
    md = run_dir / "leaderboard.md"
    store.atomic_write_text(md, f"# {run_dir.name}: leaderboard\n\n" + render_markdown(boards))
    files = [md]
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    for metric in sorted(df["metric"].unique()):
        files += plot_metric(df, metric, plot_dir)
    return files
