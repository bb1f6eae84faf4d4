"""Reporting: leaderboards and Pareto plots built from results/<run>/metrics.csv.

Every metric has a direction, and both the leaderboard (which cell is best) and the Pareto front (what is
dominated) depend on it, so the directions live here, in one place.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from samplebench.models import is_analytic as models_is_analytic

# Columns of metrics.csv, long format: one row per (model, sampler, schedule, nfe, guidance, metric).
METRICS_COLUMNS: tuple[str, ...] = (
    "model",
    "sampler",
    "schedule",
    "nfe",
    "guidance",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n_images",
    "sec_per_image",
    "nfe_actual",
    "sec_per_image_min",
    "sec_per_image_max",
)
# The key of a row in metrics.csv on disk.
FILE_KEY_COLUMNS: tuple[str, ...] = ("model", "sampler", "schedule", "nfe", "guidance", "metric")
# The key inside the report, where `sampler` is the solver: the sampler on its schedule (solver_frame).
KEY_COLUMNS: tuple[str, ...] = ("model", "sampler", "nfe", "guidance", "metric")
CELL_COLUMNS: tuple[str, ...] = KEY_COLUMNS[:-1]


def solver_frame(df: pd.DataFrame) -> pd.DataFrame:
    """metrics.csv as the report ranks it: `sampler` becomes `dpmpp · karras` (store.solver_label), so
    every table, plot and check keys on the sampler *and* its schedule; `schedule` stays a column."""
    from samplebench.store import solver_label

    if "schedule" not in df.columns or "sampler" not in df.columns or df.empty:
        return df
    out = df.copy()
    schedules = out["schedule"].fillna("").astype(str)
    out["sampler"] = [solver_label(str(a), b) for a, b in zip(out["sampler"], schedules, strict=True)]
    return out


# Not a quality metric: the share of a cell's samples with a NaN or inf element (n_images = all of the
# cell's samples), written only for cells that have some. Those samples are left out of every other metric
# of the cell, whose n_images counts the finite ones; a cell with (almost) none finite gets NaN values.
NONFINITE = "nonfinite_frac"

LOWER_IS_BETTER: dict[str, bool] = {
    "fd_exact": True,
    "traj_err": True,
    "mmd_exact": True,
    "fid": True,
    "kid": True,
    "traj_mse": True,
    "is": False,
    "clip_score": False,
    "image_reward": False,
    "clip_score_paper": False,
    "precision": False,
    "recall": False,
    NONFINITE: True,
}


TIMING_NOTE = (
    "seconds per sample, device-synchronised: median over each cell's timed calls (its full batches, or "
    "repeats of its first batch up to timing.repeats), range min-max; each sampler's untimed warm-up "
    "call per worker and model loading are excluded (warm-up cost in its own column)"
)
ANALYTIC_TIME_NOTE = (
    "On the analytic model (gmm) a model call costs microseconds, so its time axis measures the "
    "solver's own per-step overhead (Python and tensor operations), not a network's cost."
)


def is_analytic(model_label: str) -> bool:
    """The analytic Gaussian-mixture model, whose timings measure solver overhead only."""
    return models_is_analytic(str(model_label).split("[")[0])


def time_axis_notes(models: Iterable[str]) -> list[str]:
    """What the time axis of these models measures, as sentences for tables, plots and pages."""
    return [TIMING_NOTE[0].upper() + TIMING_NOTE[1:] + "."] + (
        [ANALYTIC_TIME_NOTE] if any(is_analytic(m) for m in models) else []
    )


def lower_is_better(metric: str) -> bool:
    """Direction of `metric`; unknown metrics raise, since guessing would silently invert a ranking."""
    try:
        return LOWER_IS_BETTER[metric]
    except KeyError:
        known = ", ".join(sorted(LOWER_IS_BETTER))
        raise ValueError(f"unknown metric {metric!r}: its direction is not known (known: {known})") from None


def require_columns(df: pd.DataFrame, columns: Iterable[str]) -> None:
    """Fail early, naming the missing columns, rather than with a KeyError deep inside a pivot."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"metrics table is missing column(s) {', '.join(missing)}")


def require_unique_keys(df: pd.DataFrame) -> None:
    """metrics.csv holds one row per key; a duplicate means two runs were concatenated or a bug upstream."""
    duplicated = df.duplicated(subset=list(KEY_COLUMNS), keep=False)
    if duplicated.any():
        first = df.loc[duplicated, list(KEY_COLUMNS)].iloc[0].to_dict()
        raise ValueError(f"metrics table has {int(duplicated.sum())} rows sharing a key, e.g. {first}")


def quality_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that rank samplers: everything but the non-finite bookkeeping rows."""
    return df[df["metric"] != NONFINITE] if "metric" in df.columns else df


def nonfinite_cells(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell with non-finite samples: model, sampler, nfe, guidance, n_samples, n_nonfinite,
    n_finite, and scored (whether any of its metrics has a value, i.e. enough samples were finite)."""
    columns = [*CELL_COLUMNS, "n_samples", "n_nonfinite", "n_finite", "scored"]
    if "metric" not in df.columns:
        return pd.DataFrame(columns=columns)
    rows = df[(df["metric"] == NONFINITE) & (df["value"].fillna(0) > 0)]
    quality = quality_rows(df)
    has_value = {
        tuple(k) for k in quality.loc[quality["value"].notna(), list(CELL_COLUMNS)].itertuples(index=False)
    }
    out = []
    for r in rows.itertuples(index=False):
        total = int(r.n_images) if "n_images" in df.columns and pd.notna(r.n_images) else 0
        bad = int(round(float(r.value) * total))
        key = (r.model, r.sampler, r.nfe, r.guidance)
        out.append((*key, total, bad, total - bad, key in has_value))
    return pd.DataFrame(out, columns=columns)


__all__ = [
    "ANALYTIC_TIME_NOTE",
    "CELL_COLUMNS",
    "FILE_KEY_COLUMNS",
    "KEY_COLUMNS",
    "LOWER_IS_BETTER",
    "METRICS_COLUMNS",
    "NONFINITE",
    "TIMING_NOTE",
    "is_analytic",
    "lower_is_better",
    "nonfinite_cells",
    "quality_rows",
    "require_columns",
    "require_unique_keys",
    "solver_frame",
    "time_axis_notes",
]
