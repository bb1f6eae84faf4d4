"""`samplebench check`: compare a run's metrics.csv with a baseline, knowing each metric's direction.

A row regresses when it is worse than the baseline by more than the tolerance: relative
(|new - old| > rel * |old|), absolute (> abs), or beyond the baseline's confidence interval (the
new value lies outside it on the worse side). Rows of the baseline missing from the run count as
failures too: a check that silently skips what it cannot find passes for the wrong reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from samplebench.errors import UsageError
from samplebench.report import KEY_COLUMNS, lower_is_better


@dataclass(frozen=True)
class Tolerance:
    mode: str  # "rel", "abs" or "ci"
    amount: float = 0.0

    @staticmethod
    def parse(text: str) -> Tolerance:
        """'rel=0.05', 'abs=0.01' or 'ci'."""
        if text == "ci":
            return Tolerance("ci")
        mode, _, amount = text.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if mode not in ("rel", "abs") or value < 0:
            raise UsageError(f"--tolerance {text} is not understood; use rel=0.05, abs=0.01 or ci")
        return Tolerance(mode, value)


def compare(run: pd.DataFrame, baseline: pd.DataFrame, tol: Tolerance) -> pd.DataFrame:
    """One row per baseline row: old and new values, the worsening, and a status."""
    key = list(KEY_COLUMNS)
    merged = baseline.merge(run, on=key, how="left", suffixes=("_base", "_run"))
    out = []
    for r in merged.itertuples(index=False):
        row = r._asdict()
        old, new = row["value_base"], row["value_run"]
        lower = lower_is_better(row["metric"])
        if pd.isna(new):
            status, worse = "missing", float("nan")
        else:
            worse = (new - old) if lower else (old - new)
            if tol.mode == "rel":
                bad = worse > tol.amount * abs(old)
            elif tol.mode == "abs":
                bad = worse > tol.amount
            else:
                bound = row["ci_high_base"] if lower else row["ci_low_base"]
                bad = (new > bound) if lower else (new < bound)
            status = "regression" if bad else "ok"
        out.append(
            {
                **{k: row[k] for k in key},
                "baseline": old,
                "run": new,
                "worse_by": worse,
                "direction": "lower" if lower else "higher",
                "status": status,
            }
        )
    return pd.DataFrame(out)


def load_metrics(path: Path, what: str) -> pd.DataFrame:
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    df = pd.read_csv(path)
    missing = [c for c in (*KEY_COLUMNS, "value") if c not in df.columns]
    if missing:
        raise UsageError(f"{what} {path} is not a metrics.csv (missing {', '.join(missing)})")
    return df
