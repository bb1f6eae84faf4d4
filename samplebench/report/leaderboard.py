"""Leaderboards: samplers x NFE budgets per (model, metric, guidance), with the best cell and its CI ties.

A single "winner" per column overstates small differences; marking every sampler whose 95% interval
overlaps the winner's shows which rankings the data actually supports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from samplebench.report import (
    CELL_COLUMNS,
    KEY_COLUMNS,
    lower_is_better,
    nonfinite_cells,
    quality_rows,
    require_columns,
    require_unique_keys,
)

LEADERBOARD_COLUMNS: tuple[str, ...] = (*KEY_COLUMNS, "value", "ci_low", "ci_high")
TIE_MARK = "≈"
MISSING = "—"
LEGEND = (
    f"Cells: value [95% CI]. Best per NFE column in **bold**; {TIE_MARK} = tied with the best (95% CIs "
    "overlap, or a paired test on the same images is not significant at 5%); — = not run."
)
PARTIAL_MARK = "†"
NONFINITE_TEXT = "non-finite"
PARTIAL_LEGEND = (
    f"{PARTIAL_MARK} = some samples were non-finite (NaN or inf): the value is over the finite ones, "
    "not ranked."
)
NONFINITE_LEGEND = f"{NONFINITE_TEXT} = (almost) every sample was NaN or inf: no value."
UNCOMPUTED_TEXT = "not computed"
UNCOMPUTED_LEGEND = f"{UNCOMPUTED_TEXT} = the metric could not be computed for this cell (see Not computed)."

BoardKey = tuple[str, str, float]


@dataclass(frozen=True, eq=False)
class Leaderboard:
    """One (model, metric, guidance) table: rows = samplers (sorted), columns = NFE budgets (ascending).

    `best[nfe]` is the winning sampler of each column that has any value; `ties[nfe]` holds the *other*
    samplers whose [ci_low, ci_high] overlaps the winner's (closed intervals: touching counts).
    eq=False because DataFrame equality is elementwise, not a bool.
    """

    model: str
    metric: str
    guidance: float
    values: pd.DataFrame
    ci_low: pd.DataFrame
    ci_high: pd.DataFrame
    best: dict[Any, str]
    ties: dict[Any, frozenset[str]]
    # (sampler, nfe) -> share of that cell's samples that were non-finite; such cells are never ranked.
    nonfinite: dict[tuple[str, Any], float] = field(default_factory=dict)
    # (sampler, nfe) cells scored without a value (e.g. no exact reference could be solved): not "not run".
    uncomputed: frozenset[tuple[str, Any]] = frozenset()

    @property
    def lower_is_better(self) -> bool:
        """Direction of this board's metric."""
        return lower_is_better(self.metric)

    @property
    def heading(self) -> str:
        """Title shared by the markdown and rich renderings."""
        direction = "lower" if self.lower_is_better else "higher"
        return f"{self.model} · {self.metric} ({direction} is better) · guidance {self.guidance:g}"


def _scalar(x: Any) -> Any:
    """numpy scalars -> python scalars, so dict keys and headings print as 8, not np.int64(8)."""
    return x.item() if hasattr(x, "item") else x


def _interval(value: float, low: float, high: float) -> tuple[float, float]:
    """A missing CI bound falls back to the point value, so a cell without a CI ties only on overlap."""
    lo = value if math.isnan(low) else low
    hi = value if math.isnan(high) else high
    return min(lo, hi), max(lo, hi)


def _column_best(
    values: pd.Series, low: pd.Series, high: pd.Series, lower: bool
) -> tuple[str, frozenset[str]] | None:
    """Winner and tied samplers of one NFE column; None when the column has no values at all."""
    present = values.dropna()
    if present.empty:
        return None
    # Rows are sorted by sampler name, so exact value ties resolve to the first name, deterministically.
    best = present.idxmin() if lower else present.idxmax()
    b_lo, b_hi = _interval(values[best], low[best], high[best])
    tied = set()
    for sampler in present.index:
        if sampler == best:
            continue
        lo, hi = _interval(values[sampler], low[sampler], high[sampler])
        if lo <= b_hi and b_lo <= hi:
            tied.add(sampler)
    return best, frozenset(tied)


def _pivot(group: pd.DataFrame, column: str, samplers: list[str], nfes: list[Any]) -> pd.DataFrame:
    table = group.pivot(index="sampler", columns="nfe", values=column).reindex(index=samplers, columns=nfes)
    table.index.name, table.columns.name = "sampler", "nfe"
    return table.astype(float)


def _paired_ties(
    paired: pd.DataFrame | None, model: str, metric: str, guidance: float, nfe: Any, best: str
) -> set[str]:
    """Samplers whose paired test against the best (same images) is not significant at 5%."""
    if paired is None or paired.empty:
        return set()
    rows = paired[
        (paired.model == model)
        & (paired.metric == metric)
        & (paired.guidance == guidance)
        & (paired.nfe == nfe)
        & ((paired.sampler_a == best) | (paired.sampler_b == best))
    ]
    rows = rows[rows.p_value >= 0.05]
    return {b if a == best else a for a, b in zip(rows.sampler_a, rows.sampler_b, strict=True)}


def leaderboard_tables(df: pd.DataFrame, paired: pd.DataFrame | None = None) -> dict[BoardKey, Leaderboard]:
    """One Leaderboard per (model, metric, guidance), keyed and ordered by that triple.

    A sampler ties with the best when their intervals overlap or, given `paired` (paired.csv: per-image
    paired tests on the same seeds), when the paired difference is not significant.
    Raises ValueError for missing columns, duplicate keys or a metric without a known direction.
    """
    require_columns(df, LEADERBOARD_COLUMNS)
    require_unique_keys(df)
    bad = _nonfinite_shares(df)
    boards: dict[BoardKey, Leaderboard] = {}
    for (model, metric, guidance), group in quality_rows(df).groupby(
        ["model", "metric", "guidance"], sort=True, dropna=False
    ):
        lower = lower_is_better(str(metric))
        samplers = sorted(group["sampler"].unique().tolist())
        nfes = sorted(_scalar(n) for n in group["nfe"].unique())
        values = _pivot(group, "value", samplers, nfes)
        low = _pivot(group, "ci_low", samplers, nfes)
        high = _pivot(group, "ci_high", samplers, nfes)
        nonfinite = {
            (s, n): frac
            for (m, s, n, g), frac in bad.items()
            if m == model and g == guidance and s in samplers and n in nfes
        }
        best: dict[Any, str] = {}
        ties: dict[Any, frozenset[str]] = {}
        for nfe in nfes:
            # A cell with non-finite samples is scored on the survivors only: ranking it would reward
            # a sampler for the samples it lost, so it is shown but takes no part.
            ranked = values[nfe].mask([(s, nfe) in nonfinite for s in samplers])
            result = _column_best(ranked, low[nfe], high[nfe], lower)
            if result is not None:
                best[nfe], ties[nfe] = result
                extra = _paired_ties(paired, str(model), str(metric), float(guidance), nfe, best[nfe])
                ties[nfe] = frozenset(ties[nfe] | (extra & set(ranked.dropna().index)))
        key = (str(model), str(metric), float(guidance))
        uncomputed = frozenset(
            (str(s), _scalar(n))
            for s, n, v in zip(group["sampler"], group["nfe"], group["value"], strict=True)
            if pd.isna(v) and (s, _scalar(n)) not in nonfinite
        )
        boards[key] = Leaderboard(
            *key,
            values=values,
            ci_low=low,
            ci_high=high,
            best=best,
            ties=ties,
            nonfinite=nonfinite,
            uncomputed=uncomputed,
        )
    return boards


def _nonfinite_shares(df: pd.DataFrame) -> dict[tuple[Any, ...], float]:
    """(model, sampler, nfe, guidance) -> share of non-finite samples, for the cells that had any."""
    cells = nonfinite_cells(df)
    return {
        (r.model, r.sampler, _scalar(r.nfe), float(r.guidance)): r.n_nonfinite / max(r.n_samples, 1)
        for r in cells.itertuples(index=False)
    }


def _fmt(x: float) -> str:
    """4 decimals, as metric values mostly sit in [0.01, 100]; tiny values (KID) switch to exponent form."""
    if math.isnan(x):
        return "nan"
    if x != 0 and abs(x) < 1e-3:
        return f"{x:.3e}"
    return f"{x:.4f}"


def _cell_text(board: Leaderboard, sampler: str, nfe: Any) -> str | None:
    """'value [low, high]' (with a mark when some samples were non-finite), 'non-finite' when none
    could be scored, or None when the sampler was not run at this NFE."""
    value = board.values.at[sampler, nfe]
    excluded = (sampler, nfe) in board.nonfinite
    if math.isnan(value):
        if excluded:
            return NONFINITE_TEXT
        return UNCOMPUTED_TEXT if (sampler, nfe) in board.uncomputed else None
    mark = f" {PARTIAL_MARK}" if excluded else ""
    low, high = board.ci_low.at[sampler, nfe], board.ci_high.at[sampler, nfe]
    if math.isnan(low) and math.isnan(high):
        return _fmt(value) + mark
    return f"{_fmt(value)} [{_fmt(low)}, {_fmt(high)}]{mark}"


def _nonfinite_legend(board: Leaderboard) -> str:
    """Explains the marks this board uses ('' when it has no cells with non-finite samples)."""
    nan = [math.isnan(board.values.at[s, n]) for s, n in board.nonfinite]
    parts = ([PARTIAL_LEGEND] if not all(nan) else []) + ([NONFINITE_LEGEND] if any(nan) else [])
    return " ".join(parts)


def _legend(board: Leaderboard) -> str:
    extra = [_nonfinite_legend(board)] if board.nonfinite else []
    extra += [UNCOMPUTED_LEGEND] if board.uncomputed else []
    return " ".join([LEGEND, *extra])


def _boards(boards: Mapping[Any, Leaderboard] | Iterable[Leaderboard]) -> list[Leaderboard]:
    """Accept the dict from leaderboard_tables or any iterable of boards."""
    return list(boards.values()) if isinstance(boards, Mapping) else list(boards)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(boards: Mapping[Any, Leaderboard] | Iterable[Leaderboard]) -> str:
    """Markdown report: a heading, a table and a legend line per board, best in bold, CI ties with ≈."""
    parts: list[str] = []
    for board in _boards(boards):
        nfes = list(board.values.columns)
        lines = [
            f"### {_md_escape(board.heading)}",
            "",
            "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
            "|---|" + "---:|" * len(nfes),
        ]
        for sampler in board.values.index:
            cells = []
            for nfe in nfes:
                text = _cell_text(board, sampler, nfe)
                if text is None:
                    cells.append(MISSING)
                elif board.best.get(nfe) == sampler:
                    cells.append(f"**{text}**")
                elif sampler in board.ties.get(nfe, ()):
                    cells.append(f"{text} {TIE_MARK}")
                else:
                    cells.append(text)
            lines.append(f"| {_md_escape(sampler)} | " + " | ".join(cells) + " |")
        lines += ["", _legend(board), ""]
        parts.append("\n".join(lines))
    return "\n".join(parts)


def rich_table(board: Leaderboard) -> Table:
    """One board as a rich Table; Text cells, so brackets in values or names are never read as markup."""
    caption = (
        "value [95% CI]; best in bold green; ≈ = tied with the best (CI overlap or paired test); — = not run"
    )
    if board.nonfinite:
        caption += f"; {_nonfinite_legend(board)}"
    if board.uncomputed:
        caption += f"; {UNCOMPUTED_LEGEND}"
    table = Table(title=board.heading, caption=caption)
    table.add_column("sampler", style="cyan", no_wrap=True)
    nfes = list(board.values.columns)
    for nfe in nfes:
        table.add_column(f"NFE {nfe}", justify="right")
    for sampler in board.values.index:
        row: list[Text] = [Text(str(sampler))]
        for nfe in nfes:
            text = _cell_text(board, sampler, nfe)
            if text is None:
                row.append(Text(MISSING, style="dim"))
            elif (sampler, nfe) in board.nonfinite:
                row.append(Text(text, style="yellow"))
            elif board.best.get(nfe) == sampler:
                row.append(Text(text, style="bold green"))
            elif sampler in board.ties.get(nfe, ()):
                row.append(Text(f"{text} {TIE_MARK}", style="green"))
            else:
                row.append(Text(text))
        table.add_row(*row)
    return table


def print_rich(boards: Mapping[Any, Leaderboard] | Iterable[Leaderboard], console: Console) -> None:
    """Print every board on `console` (a caller-owned Console, so tests and CLIs control width/recording)."""
    for board in _boards(boards):
        console.print(rich_table(board))
        console.print()


def render_html(boards: Mapping[Any, Leaderboard] | Iterable[Leaderboard]) -> str:
    """HTML tables (for the report page): best cells <strong class="best">, ties marked."""
    import html

    parts: list[str] = []
    for board in _boards(boards):
        nfes = list(board.values.columns)
        head = "".join(f"<th>NFE {html.escape(str(n))}</th>" for n in nfes)
        body = []
        for sampler in board.values.index:
            cells = []
            for nfe in nfes:
                text = _cell_text(board, sampler, nfe)
                if text is None:
                    cells.append(f'<td class="missing">{MISSING}</td>')
                elif (sampler, nfe) in board.nonfinite:
                    cells.append(f'<td class="nonfinite">{html.escape(text)}</td>')
                elif board.best.get(nfe) == sampler:
                    cells.append(f'<td class="best"><strong>{html.escape(text)}</strong></td>')
                elif sampler in board.ties.get(nfe, ()):
                    cells.append(f'<td class="tie">{html.escape(text)} {TIE_MARK}</td>')
                else:
                    cells.append(f"<td>{html.escape(text)}</td>")
            body.append(f"<tr><th>{html.escape(str(sampler))}</th>{''.join(cells)}</tr>")
        parts.append(
            f"<h3>{html.escape(board.heading)}</h3>\n"
            f'<table class="leaderboard"><thead><tr><th>sampler</th>{head}'
            f'</tr></thead><tbody>{"".join(body)}</tbody></table>\n<p class="legend">'
            f"{html.escape(_legend(board).replace('**', ''))}</p>"
        )
    return "\n".join(parts)


def leaderboard_csv(boards: Mapping[Any, Leaderboard] | Iterable[Leaderboard]) -> pd.DataFrame:
    """Long table of every board cell with its best/tie flags."""
    rows = []
    for board in _boards(boards):
        for sampler in board.values.index:
            for nfe in board.values.columns:
                value = board.values.at[sampler, nfe]
                share = board.nonfinite.get((sampler, nfe), 0.0)
                if math.isnan(value) and not share:
                    continue
                rows.append(
                    {
                        "model": board.model,
                        "metric": board.metric,
                        "guidance": board.guidance,
                        "sampler": sampler,
                        "nfe": nfe,
                        "value": value,
                        "ci_low": board.ci_low.at[sampler, nfe],
                        "ci_high": board.ci_high.at[sampler, nfe],
                        "best": board.best.get(nfe) == sampler,
                        "tied": sampler in board.ties.get(nfe, ()),
                        "nonfinite_frac": share,
                    }
                )
    return pd.DataFrame(rows)


def best_per_budget(df: pd.DataFrame) -> pd.DataFrame:
    """The best sampler per budget, by NFE and by seconds per image.

    By NFE: the best cell at each NFE. By time: for each measured seconds-per-image t (ascending), the
    best cell among those that cost at most t: the sampler to pick for that time budget.
    """
    require_columns(df, LEADERBOARD_COLUMNS)
    rows = []
    bad = set(_nonfinite_shares(df))
    ranked = quality_rows(df).dropna(subset=["value"])
    if bad and not ranked.empty:  # as on the leaderboard: cells with non-finite samples are not ranked
        keys = zip(*(ranked[c] for c in CELL_COLUMNS), strict=True)
        ranked = ranked[[(m, s, _scalar(n), float(g)) not in bad for m, s, n, g in keys]]
    for (model, metric, guidance), group in ranked.groupby(["model", "metric", "guidance"], sort=True):
        lower = lower_is_better(str(metric))
        for nfe, col in group.groupby("nfe", sort=True):
            best = col.loc[col["value"].idxmin() if lower else col["value"].idxmax()]
            rows.append(
                {
                    "model": model,
                    "metric": metric,
                    "guidance": guidance,
                    "budget": "nfe",
                    "limit": float(nfe),
                    "sampler": best.sampler,
                    "nfe": int(best.nfe),
                    "sec_per_image": float(best.get("sec_per_image", float("nan"))),
                    "value": best.value,
                }
            )
        if "sec_per_image" in group and group["sec_per_image"].notna().any():
            ordered = group.dropna(subset=["sec_per_image"]).sort_values("sec_per_image")
            current = None
            for t in ordered["sec_per_image"]:
                within = ordered[ordered["sec_per_image"] <= t]
                best = within.loc[within["value"].idxmin() if lower else within["value"].idxmax()]
                if current is not None and best.name == current:
                    continue
                current = best.name
                rows.append(
                    {
                        "model": model,
                        "metric": metric,
                        "guidance": guidance,
                        "budget": "seconds",
                        "limit": float(t),
                        "sampler": best.sampler,
                        "nfe": int(best.nfe),
                        "sec_per_image": float(best.sec_per_image),
                        "value": best.value,
                    }
                )
    columns = ["model", "metric", "guidance", "budget", "limit", "sampler", "nfe", "sec_per_image", "value"]
    return pd.DataFrame(rows, columns=columns)


def best_per_budget_markdown(best: pd.DataFrame) -> str:
    """Markdown of best_per_budget: one table per (model, metric, guidance)."""
    parts = []
    for (model, metric, guidance), group in best.groupby(["model", "metric", "guidance"], sort=True):
        lines = [
            f"### best sampler per budget · {model} · {metric} · guidance {guidance:g}",
            "",
            "| budget | sampler | NFE | s/image | value |",
            "|---|---|---:|---:|---:|",
        ]
        for r in group.itertuples():
            limit = f"NFE {r.limit:g}" if r.budget == "nfe" else f"≤ {r.limit:.3g} s/image"
            lines.append(f"| {limit} | {r.sampler} | {r.nfe} | {r.sec_per_image:.3g} | {_fmt(r.value)} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


NONFINITE_TITLE = "Cells with non-finite samples (excluded from their metrics and from every ranking)"


def _nonfinite_rows(cells: pd.DataFrame) -> list[tuple[str, str, str, str, str, str]]:
    """(model, sampler, NFE, guidance, 'k of n', what happened) per cell of nonfinite_cells()."""
    rows = []
    for r in cells.sort_values(list(CELL_COLUMNS)).itertuples(index=False):
        what = f"metrics over the {r.n_finite} finite samples" if r.scored else "no metrics"
        count = f"{r.n_nonfinite} of {r.n_samples}"
        rows.append((str(r.model), str(r.sampler), str(r.nfe), f"{r.guidance:g}", count, what))
    return rows


_NONFINITE_HEAD = ("model", "sampler", "NFE", "guidance", "non-finite samples", "result")


def nonfinite_markdown(cells: pd.DataFrame) -> str:
    """A markdown section listing the cells with non-finite samples ('' when there are none)."""
    if cells.empty:
        return ""
    lines = [
        f"### {NONFINITE_TITLE}",
        "",
        "| " + " | ".join(_NONFINITE_HEAD) + " |",
        "|---|---|---:|---:|---:|---|",
    ]
    lines += ["| " + " | ".join(_md_escape(v) for v in row) + " |" for row in _nonfinite_rows(cells)]
    return "\n".join(lines) + "\n"


def nonfinite_rich(cells: pd.DataFrame) -> Table:
    """The same list as a rich Table, in yellow, for the terminal."""
    table = Table(title=NONFINITE_TITLE, title_style="bold yellow")
    for col in _NONFINITE_HEAD:
        table.add_column(col, justify="right" if col in ("NFE", "guidance", "non-finite samples") else "left")
    for row in _nonfinite_rows(cells):
        table.add_row(*(Text(v) for v in row))
    return table


def nonfinite_html(cells: pd.DataFrame) -> str:
    """The same list as an HTML table for the report page ('' when there are none)."""
    import html

    if cells.empty:
        return ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in _NONFINITE_HEAD)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
        for row in _nonfinite_rows(cells)
    )
    return (
        f'<h3 id="nonfinite">{html.escape(NONFINITE_TITLE)}</h3>'
        f'<table class="leaderboard"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    )
