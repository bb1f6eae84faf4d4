"""Reporting: leaderboards and Pareto plots built from results/<run>/metrics.csv.

Every metric has a direction, and both the leaderboard (which cell is best) and the Pareto front (what is
dominated) depend on it, so the directions live here, in one place.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

# Columns of metrics.csv, long format: one row per (model, sampler, nfe, guidance, metric).
METRICS_COLUMNS: tuple[str, ...] = (
    "model",
    "sampler",
    "nfe",
    "guidance",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n_images",
    "sec_per_image",
    "nfe_actual",
)
KEY_COLUMNS: tuple[str, ...] = ("model", "sampler", "nfe", "guidance", "metric")

LOWER_IS_BETTER: dict[str, bool] = {
    "fd_exact": True,
    "traj_err": True,
    "fid": True,
    "kid": True,
    "traj_mse": True,
    "is": False,
    "clip_score": False,
    "image_reward": False,
    "clip_score_paper": False,
    "precision": False,
    "recall": False,
}


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


__all__ = [
    "KEY_COLUMNS",
    "LOWER_IS_BETTER",
    "METRICS_COLUMNS",
    "lower_is_better",
    "require_columns",
    "require_unique_keys",
]
