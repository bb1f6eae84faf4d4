"""Cost/quality Pareto fronts and the metric-vs-NFE and metric-vs-time plots that show them.

A sampler is only worth using at a budget if no other configuration is both cheaper and better; the
front makes that visible across samplers, independent of how each sampler spaces its NFE budgets.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullFormatter

from samplebench.report import CELL_COLUMNS, is_analytic, lower_is_better, nonfinite_cells, require_columns

PLOT_COLUMNS: tuple[str, ...] = (
    "model",
    "sampler",
    "guidance",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "sec_per_image",
    "nfe_actual",
)
X_AXES: dict[str, tuple[str, str]] = {
    # file suffix -> (column, axis label)
    "nfe": ("nfe_actual", "model evaluations per sample (counted NFE, log scale)"),
    "time": ("sec_per_image", "seconds per sample, median of timed calls (log scale)"),
}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p")
DPI = 150


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the points no other point dominates, minimising both x (cost) and y (error).

    q dominates p when q <= p in both coordinates and q < p in at least one, so exact duplicates do not
    dominate each other and are all kept. Points with a NaN coordinate are never on the front and dominate
    nothing. O(n log n): sort by (x, y) and sweep, keeping the lowest y seen at strictly smaller x.
    """
    pts = [(float(x), float(y)) for x, y in points]
    order = sorted(
        (i for i, (x, y) in enumerate(pts) if not (math.isnan(x) or math.isnan(y))), key=pts.__getitem__
    )
    front: list[int] = []
    best_y_before = math.inf  # lowest y among points with strictly smaller x
    start = 0
    while start < len(order):
        x = pts[order[start]][0]
        stop = start
        while stop < len(order) and pts[order[stop]][0] == x:
            stop += 1
        # Within one x the group is sorted by y: only the group's minimum-y points can survive.
        group_min = pts[order[start]][1]
        if group_min < best_y_before:
            front.extend(i for i in order[start:stop] if pts[i][1] == group_min)
            best_y_before = group_min
        start = stop
    return sorted(front)


def _safe_name(metric: str) -> str:
    """File-system-safe stem, so a metric name can never escape out_dir."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric).strip(".") or "metric"


def _error_bars(facet: pd.DataFrame) -> np.ndarray:
    """Asymmetric yerr from the CI; a missing or inverted bound draws no bar on that side."""
    value = facet["value"].to_numpy(float)
    below = np.nan_to_num(value - facet["ci_low"].to_numpy(float), nan=0.0).clip(min=0.0)
    above = np.nan_to_num(facet["ci_high"].to_numpy(float) - value, nan=0.0).clip(min=0.0)
    return np.vstack([below, above])


def _time_bars(rows: pd.DataFrame) -> np.ndarray | None:
    """Asymmetric xerr from the timed calls' range (min-max), where metrics.csv has it."""
    if "sec_per_image_min" not in rows or "sec_per_image_max" not in rows:
        return None
    x = rows["sec_per_image"].to_numpy(float)
    below = np.nan_to_num(x - rows["sec_per_image_min"].to_numpy(float), nan=0.0).clip(min=0.0)
    above = np.nan_to_num(rows["sec_per_image_max"].to_numpy(float) - x, nan=0.0).clip(min=0.0)
    return np.vstack([below, above])


def _draw_facet(
    ax: Axes, facet: pd.DataFrame, x_col: str, styles: dict[str, tuple[Any, str]], lower: bool
) -> None:
    """Per-sampler lines with CI bars, then the facet's Pareto front over all samplers on top."""
    for sampler, rows in facet.groupby("sampler", sort=True):
        rows = rows.sort_values(x_col)
        colour, marker = styles[str(sampler)]
        ax.errorbar(
            rows[x_col],
            rows["value"],
            yerr=_error_bars(rows),
            xerr=_time_bars(rows) if x_col == "sec_per_image" else None,
            color=colour,
            marker=marker,
            markersize=5,
            linewidth=1.5,
            capsize=3,
            elinewidth=1,
        )
    xs = facet[x_col].to_numpy(float)
    ys = facet["value"].to_numpy(float)
    # Cells with non-finite samples are scored on the survivors only: drawn, crossed, never on the front.
    partial = facet["nonfinite"].to_numpy(bool) if "nonfinite" in facet else np.zeros(len(facet), bool)
    if partial.any():
        ax.scatter(xs[partial], ys[partial], s=70, marker="x", color="firebrick", linewidths=1.5, zorder=6)
    ranked = np.where(partial, np.nan, ys if lower else -ys)
    front = pareto_front(list(zip(xs, ranked, strict=True)))
    if front:
        idx = sorted(front, key=lambda i: (xs[i], ys[i]))
        ax.step(xs[idx], ys[idx], where="post", color="black", linestyle="--", linewidth=1.2, zorder=4)
        ax.scatter(xs[idx], ys[idx], s=160, facecolors="none", edgecolors="black", linewidths=1.3, zorder=5)
    ax.set_xscale("log")
    # Label minor ticks at 2 and 5 only: enough to read a short range, never colliding.
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    ax.xaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False))
    positive = ys[np.isfinite(ys) & (ys > 0)]
    if len(positive) == len(ys) and positive.max() > 10 * positive.min():
        ax.set_yscale("log")  # errors spanning decades (traj_err) read better on a log axis
    ax.grid(True, which="both", alpha=0.3)
    ticks = np.unique(xs[np.isfinite(xs)])
    if x_col == "nfe_actual" and 0 < len(ticks) <= 12:
        # NFE budgets are few and meaningful: label them as plain numbers instead of 4x10^0.
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())


def _combined(data: pd.DataFrame, guidances: list[float]) -> pd.DataFrame:
    """Every model's cells as series of one facet, named model · sampler (· guidance when several), so a
    few-step model and a base model's samplers share one front."""
    label = data["model"].astype(str) + " · " + data["sampler"].astype(str)
    if len(guidances) > 1:
        label = label + " · g=" + data["guidance"].astype(float).map("{:g}".format)
    return data.assign(sampler=label)


def _plot_one(df: pd.DataFrame, metric: str, suffix: str, out_dir: Path) -> Path:
    """One figure: rows = models, columns = guidance values; with several models, a first row puts all
    of them on one pair of axes with one Pareto front (the comparison a mixed sweep is run for)."""
    x_col, x_label = X_AXES[suffix]
    lower = lower_is_better(metric)
    # Log axes cannot show x <= 0 (e.g. an unmeasured time); drop those points rather than crash. A cell
    # without a value (every sample non-finite) has no point either.
    x = df[x_col].astype(float)
    data = df[np.isfinite(x) & (x > 0) & np.isfinite(df["value"].astype(float))]
    models = sorted(df["model"].astype(str).unique())
    guidances = sorted(df["guidance"].astype(float).unique())
    samplers = sorted(df["sampler"].astype(str).unique())
    styles = _styles(samplers)

    together = len(models) > 1
    fig = Figure(figsize=(4.8 * len(guidances) + 2.2, 4.0 * (len(models) + together)), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(models) + together, len(guidances), squeeze=False)
    direction = "lower" if lower else "higher"
    if together:
        ax = axes[0][0]
        for extra in axes[0][1:]:
            extra.set_visible(False)
        ax.set_title(
            "all models" + (", every guidance" if len(guidances) > 1 else f" · guidance = {guidances[0]:g}")
        )
        if data.empty:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        else:
            both = _combined(data, guidances)
            series = sorted(both["sampler"].unique())
            series_styles = _styles(series)
            _draw_facet(ax, both, x_col, series_styles, lower)
            ax.set_xlabel(x_label)
            ax.set_ylabel(f"{metric} ({direction} is better)")
            ax.legend(
                handles=[
                    Line2D([], [], color=series_styles[n][0], marker=series_styles[n][1], label=n)
                    for n in series
                ],
                fontsize="x-small",
                loc="upper left",
                bbox_to_anchor=(1.02, 1.0),
                frameon=False,
            )
    for r, model in enumerate(models):
        for c, guidance in enumerate(guidances):
            ax = axes[r + together][c]
            facet = data[(data["model"].astype(str) == model) & (data["guidance"].astype(float) == guidance)]
            title = f"guidance = {guidance:g}"
            ax.set_title(title if len(models) == 1 else f"{model} · {title}")
            if facet.empty:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
                continue
            _draw_facet(ax, facet, x_col, styles, lower)
            ax.set_xlabel(x_label)
            if c == 0:
                ax.set_ylabel(f"{metric} ({direction} is better)")
    handles = [
        Line2D([], [], color=styles[s][0], marker=styles[s][1], linewidth=1.5, label=s) for s in samplers
    ]
    handles.append(
        Line2D(
            [],
            [],
            color="black",
            linestyle="--",
            marker="o",
            markerfacecolor="none",
            markersize=9,
            label="Pareto front",
        )
    )
    if "nonfinite" in data and data["nonfinite"].any():
        handles.append(
            Line2D(
                [],
                [],
                color="firebrick",
                linestyle="none",
                marker="x",
                markersize=8,
                label="some samples non-finite\n(not ranked)",
            )
        )
    if suffix == "nfe":
        fig.suptitle(f"{metric} vs NFE (error bars: 95% CI)")
    else:
        analytic = any(is_analytic(m) for m in models)
        fig.suptitle(
            f"{metric} vs time (error bars: 95% CI; time bars: range of timed calls)"
            + ("\nanalytic model: time is the solver's per-step overhead (model calls cost µs)" * analytic)
        )
    fig.tight_layout()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    path = out_dir / f"{_safe_name(metric)}_vs_{suffix}.png"
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _styles(samplers: list[str]) -> dict[str, tuple[Any, str]]:
    """(colour, marker) per sampler, fixed across facets and both figures so a sampler is recognisable."""
    cmap = colormaps["tab10" if len(samplers) <= 10 else "tab20"]
    return {s: (cmap(i % cmap.N), MARKERS[i % len(MARKERS)]) for i, s in enumerate(samplers)}


def plot_metric(df: pd.DataFrame, metric: str, out_dir: Path) -> list[Path]:
    """Write <metric>_vs_nfe.png and <metric>_vs_time.png into out_dir and return their paths.

    Uses the Agg canvas directly (no pyplot), so it neither needs a display nor touches global state.
    One facet per guidance value (and one row per model if the table holds several); the Pareto front is
    computed on -value when higher is better.
    """
    require_columns(df, PLOT_COLUMNS)
    lower_is_better(metric)  # unknown metric: fail before writing anything
    rows = df[df["metric"] == metric]
    if rows.empty:
        available = ", ".join(sorted(df["metric"].astype(str).unique()))
        raise ValueError(f"no rows for metric {metric!r} (available: {available})")
    bad = {tuple(k) for k in nonfinite_cells(df)[list(CELL_COLUMNS)].itertuples(index=False)}
    if "nfe" in rows and bad:
        keys = zip(*(rows[c] for c in CELL_COLUMNS), strict=True)
        rows = rows.assign(nonfinite=[(m, s, n, g) in bad for m, s, n, g in keys])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_plot_one(rows, metric, suffix, out_dir) for suffix in X_AXES]
