"""The report stage: metrics.csv of one or more runs -> leaderboards (terminal, markdown, CSV, HTML),
best sampler per budget, Pareto plots, image grids and one self-contained HTML page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from samplebench import store
from samplebench.errors import UsageError
from samplebench.report import nonfinite_cells, quality_rows, solver_frame, time_axis_notes
from samplebench.report.leaderboard import (
    best_per_budget,
    best_per_budget_markdown,
    leaderboard_csv,
    leaderboard_tables,
    nonfinite_html,
    nonfinite_markdown,
    nonfinite_rich,
    print_rich,
    render_html,
    render_markdown,
)
from samplebench.report.pareto import plot_metric

KEY = ["model", "sampler", "nfe", "guidance"]


def print_timings(df: pd.DataFrame, console: Console) -> None:
    """Seconds per sample (sampling, decoding, total with its range), counted NFE and warm-up cost of every
    cell, under a caption saying what the time axis measures."""
    table = Table(title="timings (seconds per sample; median of timed calls, range min-max)")
    for col in (
        "model",
        "sampler",
        "NFE",
        "counted",
        "guidance",
        "images",
        "non-finite",
        "timed",
        "sampling",
        "decode",
        "total",
        "range",
        "warm-up s",
    ):
        table.add_column(col, justify="left" if col in ("model", "sampler") else "right")
    for r in df.itertuples():
        lo, hi = getattr(r, "sec_per_image_min", float("nan")), getattr(r, "sec_per_image_max", float("nan"))
        table.add_row(
            str(r.model),
            str(r.sampler),
            str(r.nfe),
            str(r.nfe_actual),
            f"{r.guidance:g}",
            str(r.n_images),
            str(getattr(r, "non_finite", 0)),
            str(getattr(r, "n_timed", "")),
            f"{r.sec_per_image_sampling:.3g}",
            f"{r.sec_per_image_decode:.3g}",
            f"{r.sec_per_image_total:.3g}",
            "" if pd.isna(lo) else f"{lo:.3g}-{hi:.3g}",
            f"{getattr(r, 'warmup_seconds', float('nan')):.3g}",
        )
    console.print(table)
    for line in time_axis_notes(df["model"].astype(str)):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def _merged_csv(
    run_dirs: list[Path], name: str, key: list[str], stale: set[str] | None = None
) -> pd.DataFrame | None:
    """One table from several runs, as written (sampler and schedule apart); a later run's row
    replaces an earlier run's row for the same key. With `stale`, rows of cells no longer finished on
    disk (a shard deleted since scoring) are left out and their cells added to `stale`."""
    frames = []
    for d in run_dirs:
        if (d / name).exists():
            frame = pd.read_csv(d / name)
            if stale is not None:
                frame, gone = store.finished_rows(d, frame)
                stale.update(f"{d.name}: {g}" for g in gone)
            frames.append(frame)
    frames = [f for f in frames if not f.empty]
    if not frames:
        return None
    return pd.concat(frames).drop_duplicates(subset=key, keep="last").reset_index(drop=True)


def _file_key(run_dirs: list[Path], name: str) -> list[str]:
    """The cell key of a results table: with `schedule` unless every run predates the schedule axis."""
    header = [pd.read_csv(d / name, nrows=0).columns for d in run_dirs if (d / name).exists()]
    with_schedule = any("schedule" in h for h in header)
    return ["model", "sampler", *(["schedule"] if with_schedule else []), "nfe", "guidance"]


def _protocol(run_dirs: list[Path]) -> dict[str, Any]:
    merged: dict[str, Any] = {"runs": {}}
    for d in run_dirs:
        entry: dict[str, Any] = {}
        for name in ("metrics.protocol.json", "provenance.json"):
            if (d / name).exists():
                entry[name.split(".")[0]] = json.loads((d / name).read_text())
        merged["runs"][d.name] = entry
    return merged


def not_computed(run_dirs: list[Path], df: pd.DataFrame | None) -> list[str]:
    """One line per metric the metrics stage skipped (metrics.on_missing=skip) or could not compute for a
    cell (its row is NaN), with the reason it recorded in metrics.protocol.json."""
    lines: list[str] = []
    nan_keys = set()
    if df is not None and not df.empty:
        rows = df[df["value"].isna()]
        nan_keys = {
            "|".join(str(r[k]) for k in ("model", "sampler", "schedule", "nfe", "guidance", "metric"))
            for _, r in rows.assign(schedule=rows.get("schedule", "")).iterrows()
        }
    for d in run_dirs:
        path = d / "metrics.protocol.json"
        if not path.exists():
            continue
        protocol = json.loads(path.read_text())
        for metric, reason in sorted((protocol.get("skipped") or {}).items()):
            lines.append(f"{metric}: skipped in run {d.name} (metrics.on_missing=skip): {reason}")
        for key, proto in sorted((protocol.get("rows") or {}).items()):
            if key in nan_keys and proto.get("excluded"):
                model, sampler, schedule, nfe, guidance, metric = key.split("|")
                where = " · ".join(x for x in (model, sampler, schedule) if x and x != "nan")
                cell = f"{where} · NFE {nfe} · guidance {float(guidance):g}"
                reason = str(proto["excluded"]).removeprefix("not computed: ")
                lines.append(f"{metric} of {cell}: {reason}")
    return lines


def output_dir(run_dirs: list[Path]) -> Path:
    """A run's own folder, or results/<a+b> for a merged report."""
    if len(run_dirs) == 1:
        return run_dirs[0]
    return run_dirs[0].parent / "+".join(d.name for d in run_dirs)


def build_report(run_dirs: Path | list[Path], console: Console) -> list[Path]:
    """Print the leaderboards; write leaderboard.md/.csv, plots/, and report/index.html."""
    run_dirs = [run_dirs] if isinstance(run_dirs, Path) else list(run_dirs)
    for d in run_dirs:
        if not (d / "metrics.csv").exists():
            raise UsageError(
                f"{d / 'metrics.csv'} does not exist; run `samplebench metrics run={d.name}` first"
            )
    out = output_dir(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    stale: set[str] = set()
    timings = _merged_csv(run_dirs, "timings.csv", _file_key(run_dirs, "timings.csv"), stale)
    if timings is not None:
        if len(run_dirs) > 1:
            store.atomic_write_text(out / "timings.csv", timings.to_csv(index=False))
        timings = solver_frame(timings)
        print_timings(timings, console)
        files.append(out / "timings.csv")
    df = _merged_csv(run_dirs, "metrics.csv", [*_file_key(run_dirs, "metrics.csv"), "metric"], stale)
    if stale:
        console.print(
            f"left out the rows of {len(stale)} cells no longer finished on disk (a shard deleted since "
            f"they were scored): {'; '.join(sorted(stale))}; re-run generate and metrics to restore them",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    if df is not None and len(run_dirs) > 1:
        store.atomic_write_text(out / "metrics.csv", df.to_csv(index=False))
    raw, df = df, None if df is None else solver_frame(df)
    paired = _merged_csv(
        run_dirs, "paired.csv", ["model", "nfe", "guidance", "metric", "sampler_a", "sampler_b"]
    )
    figures: dict[str, list[Path]] = {}
    leaderboard_html = "<p>No quality metrics in this run yet; timings only.</p>"
    if df is None or df.empty:
        console.print("no quality metrics in this run yet; timings only")
    else:
        boards = leaderboard_tables(df, paired)
        print_rich(boards, console)
        excluded = nonfinite_cells(df)
        if not excluded.empty:
            console.print(nonfinite_rich(excluded))
        best = best_per_budget(df)
        missing = not_computed(run_dirs, raw)
        for line in missing:
            console.print(f"not computed: {line}", markup=False, highlight=False, soft_wrap=True)
        md = out / "leaderboard.md"
        store.atomic_write_text(
            md,
            f"# {out.name}: leaderboard\n\n"
            + render_markdown(boards)
            + "\n"
            + nonfinite_markdown(excluded)
            + ("\n" if not excluded.empty else "")
            + best_per_budget_markdown(best)
            + ("\n## Not computed\n\n" + "".join(f"- {line}\n" for line in missing) if missing else "")
            + "\n"
            + " ".join(time_axis_notes(df["model"].astype(str)))
            + "\n",
        )
        store.atomic_write_text(out / "leaderboard.csv", leaderboard_csv(boards).to_csv(index=False))
        store.atomic_write_text(out / "best_per_budget.csv", best.to_csv(index=False))
        files += [md, out / "leaderboard.csv", out / "best_per_budget.csv"]
        leaderboard_html = (
            render_html(boards) + nonfinite_html(excluded) + _best_html(best) + _not_computed_html(missing)
        )
        plot_dir = out / "plots"
        plot_dir.mkdir(exist_ok=True)
        for metric in sorted(quality_rows(df)["metric"].unique()):
            figures.setdefault("Pareto plots", []).extend(plot_metric(df, metric, plot_dir))
        files += figures.get("Pareto plots", [])
    files += _grids_and_page(run_dirs, out, figures, leaderboard_html, timings)
    return files


def _not_computed_html(lines: list[str]) -> str:
    import html

    if not lines:
        return ""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return f"<h3>Not computed</h3><ul>{items}</ul>"


def _best_html(best: pd.DataFrame) -> str:
    import html

    if best.empty:
        return ""

    def limit(r: Any) -> str:
        return f"NFE {r.limit:g}" if r.budget == "nfe" else f"≤ {r.limit:.3g} s"

    rows = "".join(
        f"<tr><td>{html.escape(str(r.model))}</td><td>{html.escape(str(r.metric))}</td><td>{r.guidance:g}</td>"
        f"<td>{limit(r)}</td>"
        f"<td>{html.escape(str(r.sampler))}</td><td>{r.nfe}</td><td>{r.value:.4g}</td></tr>"
        for r in best.itertuples()
    )
    return (
        '<h3>Best sampler per budget (by NFE and by seconds per image)</h3><table class="leaderboard">'
        "<thead><tr><th>model</th><th>metric</th><th>guidance</th><th>budget</th><th>sampler</th><th>NFE</th>"
        f"<th>value</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _grids_and_page(
    run_dirs: list[Path],
    out: Path,
    figures: dict[str, list[Path]],
    leaderboard_html: str,
    timings: pd.DataFrame | None,
) -> list[Path]:
    from samplebench.report.grids import gmm_projections, image_grids
    from samplebench.report.html import write_html

    page_dir = out / "report"
    page_dir.mkdir(exist_ok=True)
    grid_dir = page_dir / "grids"
    grid_dir.mkdir(exist_ok=True)
    grids: list[Path] = []
    for d in run_dirs:
        target = grid_dir / d.name if len(run_dirs) > 1 else grid_dir  # same names from different runs
        target.mkdir(exist_ok=True)
        grids += image_grids(d, target) + gmm_projections(d, target)
    if grids:
        figures["Sample grids"] = grids
    page = write_html(run_dirs, page_dir, figures, leaderboard_html, timings, _protocol(run_dirs))
    return [*grids, page]
