"""Leaderboards: samplers x NFE budgets per (model, metric, guidance), with the best cell and its CI ties.

A single "winner" per column overstates small differences; marking every sampler whose 95% interval
overlaps the winner's shows which rankings the data actually supports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from samplebench.report import lower_is_better, require_columns, require_unique_keys

LEADERBOARD_COLUMNS: tuple[str, ...] = (
    "model",
    "sampler",
    "nfe",
    "guidance",
    "metric",
    "value",
    "ci_low",
    "ci_high",
)
TIE_MARK = "≈"
MISSING = "—"
LEGEND = (
    f"Cells: value [95% CI]. Best per NFE column in **bold**; {TIE_MARK} = 95% CI overlaps the best's "
    "(difference not significant); — = not run."
)

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


def leaderboard_tables(df: pd.DataFrame) -> dict[BoardKey, Leaderboard]:
    """One Leaderboard per (model, metric, guidance), keyed and ordered by that triple.

    Raises ValueError for missing columns, duplicate keys or a metric without a known direction.
    """
    require_columns(df, LEADERBOARD_COLUMNS)
    require_unique_keys(df)
    boards: dict[BoardKey, Leaderboard] = {}
    for (model, metric, guidance), group in df.groupby(
        ["model", "metric", "guidance"], sort=True, dropna=False
    ):
        lower = lower_is_better(str(metric))
        samplers = sorted(group["sampler"].unique().tolist())
        nfes = sorted(_scalar(n) for n in group["nfe"].unique())
        values = _pivot(group, "value", samplers, nfes)
        low = _pivot(group, "ci_low", samplers, nfes)
        high = _pivot(group, "ci_high", samplers, nfes)
        best: dict[Any, str] = {}
        ties: dict[Any, frozenset[str]] = {}
        for nfe in nfes:
            result = _column_best(values[nfe], low[nfe], high[nfe], lower)
            if result is not None:
                best[nfe], ties[nfe] = result
        key = (str(model), str(metric), float(guidance))
        boards[key] = Leaderboard(*key, values=values, ci_low=low, ci_high=high, best=best, ties=ties)
    return boards


def _fmt(x: float) -> str:
    """4 decimals, as metric values mostly sit in [0.01, 100]; tiny values (KID) switch to exponent form."""
    if math.isnan(x):
        return "nan"
    if x != 0 and abs(x) < 1e-3:
        return f"{x:.3e}"
    return f"{x:.4f}"


def _cell_text(board: Leaderboard, sampler: str, nfe: Any) -> str | None:
    """'value [low, high]' or None when the sampler was not run at this NFE."""
    value = board.values.at[sampler, nfe]
    if math.isnan(value):
        return None
    low, high = board.ci_low.at[sampler, nfe], board.ci_high.at[sampler, nfe]
    if math.isnan(low) and math.isnan(high):
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(low)}, {_fmt(high)}]"


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
        lines += ["", LEGEND, ""]
        parts.append("\n".join(lines))
    return "\n".join(parts)


def rich_table(board: Leaderboard) -> Table:
    """One board as a rich Table; Text cells, so brackets in values or names are never read as markup."""
    table = Table(
        title=board.heading,
        caption="value [95% CI]; best in bold green; ≈ = CI overlaps the best's; — = not run",
    )
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
