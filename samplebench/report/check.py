"""`samplebench check`: compare a run's metrics.csv with a baseline, knowing each metric's direction.

A row regresses when it is worse than the baseline by more than the tolerance: relative
(|new - old| > rel * |old|), absolute (> abs), or beyond the baseline's confidence interval (the
new value lies outside it on the worse side). Rows of the baseline missing from the run count as
failures too: a check that silently skips what it cannot find passes for the wrong reason. So does a
cell of the baseline whose share of non-finite samples grew (status "non-finite"): its metrics then
cover fewer samples, or none, and a sampler that started to diverge has regressed whatever they say.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from samplebench.errors import UsageError
from samplebench.report import (
    CELL_COLUMNS,
    KEY_COLUMNS,
    NONFINITE,
    lower_is_better,
    nonfinite_cells,
    solver_frame,
)


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


def _shares(df: pd.DataFrame) -> dict[tuple, float]:
    """(model, sampler, nfe, guidance) -> share of non-finite samples (cells without any: absent)."""
    return {
        tuple(r[:4]): r.n_nonfinite / max(r.n_samples, 1) for r in nonfinite_cells(df).itertuples(index=False)
    }


def compare(run: pd.DataFrame, baseline: pd.DataFrame, tol: Tolerance) -> pd.DataFrame:
    """One row per baseline row: old and new values, the worsening, and a status; plus a non-finite row
    per baseline cell whose share of non-finite samples grew."""
    key = list(KEY_COLUMNS)
    merged = baseline.merge(run, on=key, how="left", suffixes=("_base", "_run"))
    run_keys = {tuple(k) for k in run[key].itertuples(index=False)}
    run_bad, base_bad = _shares(run), _shares(baseline)
    out = []
    for r in merged.itertuples(index=False):
        row = r._asdict()
        old, new = row["value_base"], row["value_run"]
        lower = lower_is_better(row["metric"])
        if row["metric"] == NONFINITE:
            # Compared below, per cell: a run without the row had no non-finite samples.
            continue
        if pd.isna(old):
            # The baseline had no value here (its cell was non-finite): nothing can be worse than that.
            status, worse = "ok", float("nan")
        elif pd.isna(new) and tuple(row[k] for k in key) in run_keys:
            # The row is there without a value: too few of the cell's samples were finite.
            status, worse = "non-finite", float("nan")
        elif pd.isna(new):
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
    cells = dict.fromkeys(tuple(k) for k in baseline[list(CELL_COLUMNS)].itertuples(index=False))
    for cell in cells:
        old, new = base_bad.get(cell, 0.0), run_bad.get(cell, 0.0)
        if new > old or cell in base_bad:
            out.append(
                {
                    **dict(zip(CELL_COLUMNS, cell, strict=True)),
                    "metric": NONFINITE,
                    "baseline": old,
                    "run": new,
                    "worse_by": new - old,
                    "direction": "lower",
                    "status": "non-finite" if new > old else "ok",
                }
            )
    columns = [*key, "baseline", "run", "worse_by", "direction", "status"]
    return pd.DataFrame(out, columns=columns)


def nonfinite_messages(run: pd.DataFrame, baseline: pd.DataFrame) -> list[str]:
    """One line per baseline cell with more non-finite samples in the run than in the baseline."""
    base_bad = _shares(baseline)
    cells = {tuple(k) for k in baseline[list(CELL_COLUMNS)].itertuples(index=False)}
    lines = []
    for r in nonfinite_cells(run).sort_values(list(CELL_COLUMNS)).itertuples(index=False):
        cell = tuple(r[:4])
        old = base_bad.get(cell, 0.0)
        if cell not in cells or r.n_nonfinite / max(r.n_samples, 1) <= old:
            continue
        what = f"its metrics cover the {r.n_finite} finite ones" if r.scored else "it has no metrics"
        was = f"{old:.1%} of samples" if old else "none"
        lines.append(
            f"non-finite: {r.model} · {r.sampler} · NFE {r.nfe} · guidance {r.guidance:g}: "
            f"{r.n_nonfinite} of {r.n_samples} samples are NaN or inf (baseline: {was}); {what}"
        )
    return lines


def load_metrics(path: Path, what: str) -> pd.DataFrame:
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    df = solver_frame(pd.read_csv(path))
    missing = [c for c in (*KEY_COLUMNS, "value") if c not in df.columns]
    if missing:
        raise UsageError(f"{what} {path} is not a metrics.csv (missing {', '.join(missing)})")
    return df
