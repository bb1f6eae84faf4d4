"""Tests for samplebench.report: leaderboard winners, CI ties, markdown/rich output, Pareto, plots."""

from __future__ import annotations

import random
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest
from rich.console import Console

from samplebench.report import LOWER_IS_BETTER, METRICS_COLUMNS, lower_is_better
from samplebench.report.leaderboard import Leaderboard, leaderboard_tables, print_rich, render_markdown
from samplebench.report.pareto import pareto_front, plot_metric

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (sampler, nfe, value, ci_low, ci_high) for fd_exact (lower is better), guidance 1.0.
# NFE 4: euler wins [0.09, 0.11]; heun [0.105, 0.14] overlaps; dpm [0.12, 0.14] does not;
#        ipndm [0.11, 0.2] touches the best's upper bound exactly (closed intervals: a tie).
# NFE 8: heun wins alone. NFE 16: dpm wins, euler overlaps, heun misses, ipndm was not run.
FD_ROWS = [
    ("euler", 4, 0.1000, 0.0900, 0.1100),
    ("heun", 4, 0.1200, 0.1050, 0.1400),
    ("dpm", 4, 0.1300, 0.1200, 0.1400),
    ("ipndm", 4, 0.1500, 0.1100, 0.2000),
    ("euler", 8, 0.0800, 0.0700, 0.0900),
    ("heun", 8, 0.0500, 0.0450, 0.0550),
    ("dpm", 8, 0.0700, 0.0600, 0.0800),
    ("ipndm", 8, 0.0900, 0.0850, 0.0950),
    ("euler", 16, 0.0400, 0.0300, 0.0500),
    ("heun", 16, 0.0600, 0.0550, 0.0650),
    ("dpm", 16, 0.0350, 0.0320, 0.0380),
]
# clip_score (higher is better), guidance 3.0: at NFE 4 dpm is highest, euler overlaps it, heun does not.
CLIP_ROWS = [
    ("euler", 4, 30.0, 29.0, 31.0),
    ("heun", 4, 27.0, 26.5, 27.5),
    ("dpm", 4, 30.5, 30.2, 30.8),
    ("euler", 16, 31.0, 30.8, 31.2),
    ("heun", 16, 32.0, 31.9, 32.1),
    ("dpm", 16, 31.5, 31.4, 31.6),
]


def _rows(metric: str, guidance: float, rows: list[tuple[str, int, float, float, float]]) -> list[dict]:
    out = []
    for sampler, nfe, value, low, high in rows:
        steps_cost = {"euler": 1, "heun": 2, "dpm": 1, "ipndm": 1}[sampler]
        out.append(
            {
                "model": "gmm2d",
                "sampler": sampler,
                "nfe": nfe,
                "guidance": guidance,
                "metric": metric,
                "value": value,
                "ci_low": low,
                "ci_high": high,
                "n_images": 1000,
                "sec_per_image": 0.002 * nfe * steps_cost,
                "nfe_actual": nfe * steps_cost,
            }
        )
    return out


@pytest.fixture
def metrics_df() -> pd.DataFrame:
    """Both metrics at two guidance values (guidance 3.0 fd rows are the 1.0 rows shifted up), shuffled."""
    shifted = [(s, n, v + 0.01, lo + 0.01, hi + 0.01) for s, n, v, lo, hi in FD_ROWS]
    rows = (
        _rows("fd_exact", 1.0, FD_ROWS)
        + _rows("fd_exact", 3.0, shifted)
        + _rows("clip_score", 3.0, CLIP_ROWS)
    )
    df = pd.DataFrame(rows, columns=list(METRICS_COLUMNS))
    return df.sample(frac=1.0, random_state=0).reset_index(drop=True)


def _overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


# ---------------------------------------------------------------- directions


def test_lower_is_better_directions() -> None:
    assert lower_is_better("fd_exact") and lower_is_better("fid") and lower_is_better("kid")
    assert not lower_is_better("clip_score") and not lower_is_better("is")
    assert set(LOWER_IS_BETTER) >= {"fd_exact", "traj_err", "fid", "kid", "traj_mse", "is", "clip_score"}


def test_unknown_metric_raises_naming_it() -> None:
    with pytest.raises(ValueError, match="lpips_typo"):
        lower_is_better("lpips_typo")


# ---------------------------------------------------------------- leaderboard


def test_tables_keys_and_layout(metrics_df: pd.DataFrame) -> None:
    boards = leaderboard_tables(metrics_df)
    assert list(boards) == [
        ("gmm2d", "clip_score", 3.0),
        ("gmm2d", "fd_exact", 1.0),
        ("gmm2d", "fd_exact", 3.0),
    ]
    board = boards[("gmm2d", "fd_exact", 1.0)]
    assert isinstance(board, Leaderboard)
    assert list(board.values.columns) == [4, 8, 16]
    assert list(board.values.index) == ["dpm", "euler", "heun", "ipndm"]
    assert board.values.at["heun", 8] == pytest.approx(0.05)
    assert board.ci_low.at["heun", 8] == pytest.approx(0.045)
    assert board.ci_high.at["heun", 8] == pytest.approx(0.055)
    assert pd.isna(board.values.at["ipndm", 16])  # not run -> missing, not dropped


def test_best_is_lowest_for_lower_is_better(metrics_df: pd.DataFrame) -> None:
    board = leaderboard_tables(metrics_df)[("gmm2d", "fd_exact", 1.0)]
    assert board.lower_is_better
    assert board.best == {4: "euler", 8: "heun", 16: "dpm"}
    for nfe, sampler in board.best.items():
        assert board.values.at[sampler, nfe] == board.values[nfe].min()


def test_best_is_highest_for_clip_score(metrics_df: pd.DataFrame) -> None:
    board = leaderboard_tables(metrics_df)[("gmm2d", "clip_score", 3.0)]
    assert not board.lower_is_better
    assert board.best == {4: "dpm", 16: "heun"}
    for nfe, sampler in board.best.items():
        assert board.values.at[sampler, nfe] == board.values[nfe].max()
    assert board.ties == {4: {"euler"}, 16: set()}


def test_ties_exactly_where_intervals_overlap_best(metrics_df: pd.DataFrame) -> None:
    board = leaderboard_tables(metrics_df)[("gmm2d", "fd_exact", 1.0)]
    assert board.ties == {4: {"heun", "ipndm"}, 8: set(), 16: {"euler"}}
    # And the same, derived independently for every board and column.
    for board in leaderboard_tables(metrics_df).values():
        for nfe, best in board.best.items():
            best_ci = (board.ci_low.at[best, nfe], board.ci_high.at[best, nfe])
            expected = {
                s
                for s in board.values.index
                if s != best
                and not pd.isna(board.values.at[s, nfe])
                and _overlaps((board.ci_low.at[s, nfe], board.ci_high.at[s, nfe]), best_ci)
            }
            assert board.ties[nfe] == expected, (board.metric, board.guidance, nfe)


def test_duplicate_keys_and_missing_columns_raise(metrics_df: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="sharing a key"):
        leaderboard_tables(pd.concat([metrics_df, metrics_df.iloc[:1]]))
    with pytest.raises(ValueError, match="ci_high"):
        leaderboard_tables(metrics_df.drop(columns=["ci_high"]))


def test_unknown_metric_in_table_raises(metrics_df: pd.DataFrame) -> None:
    df = metrics_df.copy()
    df.loc[0, "metric"] = "mystery"
    with pytest.raises(ValueError, match="mystery"):
        leaderboard_tables(df)


def test_markdown_marks_best_ties_and_legend(metrics_df: pd.DataFrame) -> None:
    md = render_markdown(leaderboard_tables(metrics_df))
    assert "### gmm2d · fd_exact (lower is better) · guidance 1" in md
    assert "### gmm2d · clip_score (higher is better) · guidance 3" in md
    assert "| sampler | NFE 4 | NFE 8 | NFE 16 |" in md
    # Best cells of the guidance-1.0 fd board, in bold with their intervals.
    assert "**0.1000 [0.0900, 0.1100]**" in md
    assert "**0.0500 [0.0450, 0.0550]**" in md
    assert "**30.5000 [30.2000, 30.8000]**" in md
    # Tied cells carry a trailing ≈ and are not bold; non-tied cells carry neither.
    assert "0.1200 [0.1050, 0.1400] ≈" in md
    assert "0.1500 [0.1100, 0.2000] ≈" in md
    assert "0.1300 [0.1200, 0.1400] ≈" not in md
    assert "**0.1200 [0.1050, 0.1400]" not in md
    assert md.count("Best per NFE column in **bold**") == 3
    fd_section = md.split("### gmm2d · fd_exact (lower is better) · guidance 1")[1].split("###")[0]
    heun_row = next(line for line in fd_section.splitlines() if line.startswith("| heun |"))
    assert heun_row == (
        "| heun | 0.1200 [0.1050, 0.1400] ≈ | **0.0500 [0.0450, 0.0550]** | 0.0600 [0.0550, 0.0650] |"
    )
    ipndm_row = next(line for line in fd_section.splitlines() if line.startswith("| ipndm |"))
    assert ipndm_row.endswith("| — |")


def test_print_rich_renders_all_tables(metrics_df: pd.DataFrame) -> None:
    console = Console(record=True, width=200, color_system=None)
    print_rich(leaderboard_tables(metrics_df), console)
    text = console.export_text()
    assert text.count("gmm2d · fd_exact (lower is better)") == 2
    assert "gmm2d · clip_score (higher is better) · guidance 3" in text
    assert "0.1000 [0.0900, 0.1100]" in text
    assert "0.1200 [0.1050, 0.1400] ≈" in text
    assert "0.1300 [0.1200, 0.1400] ≈" not in text


# ---------------------------------------------------------------- pareto


def _brute_force_front(points: list[tuple[float, float]]) -> list[int]:
    """Reference: O(n^2) definition of non-domination (minimising both coordinates)."""
    front = []
    for i, (px, py) in enumerate(points):
        dominated = any(
            qx <= px and qy <= py and (qx < px or qy < py) for j, (qx, qy) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def test_pareto_small_cases() -> None:
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]
    # Duplicates of a front point are all kept; same x with higher y, and a dominated point, are not.
    points = [(1.0, 1.0), (1.0, 1.0), (2.0, 0.5), (2.0, 2.0), (0.5, 3.0), (1.0, 1.5), (3.0, 0.5)]
    assert pareto_front(points) == [0, 1, 2, 4]
    assert pareto_front(points) == _brute_force_front(points)
    # Same y at larger x is dominated.
    assert pareto_front([(1.0, 2.0), (2.0, 2.0)]) == [0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pareto_matches_brute_force_on_random_points(seed: int) -> None:
    rng = random.Random(seed)
    continuous = [(rng.random(), rng.random()) for _ in range(200)]
    assert pareto_front(continuous) == _brute_force_front(continuous)
    # A coarse grid forces many exact ties in x, in y and in both.
    grid = [(float(rng.randint(0, 15)), float(rng.randint(0, 15))) for _ in range(200)]
    assert pareto_front(grid) == _brute_force_front(grid)
    assert len(_brute_force_front(grid)) >= 1


def test_pareto_ignores_nan_points() -> None:
    nan = float("nan")
    assert pareto_front([(nan, 0.0), (1.0, 1.0), (0.0, nan)]) == [1]


# ---------------------------------------------------------------- plots


@pytest.mark.parametrize("metric", ["fd_exact", "clip_score"])
def test_plot_metric_writes_pngs(metrics_df: pd.DataFrame, tmp_path: Path, metric: str) -> None:
    out_dir = tmp_path / "plots"
    paths = plot_metric(metrics_df, metric, out_dir)
    assert paths == [out_dir / f"{metric}_vs_nfe.png", out_dir / f"{metric}_vs_time.png"]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 10_000
        height, width = mpimg.imread(path).shape[:2]
        assert width > 600 and height > 400


def test_plot_metric_rejects_absent_metric(metrics_df: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kid"):
        plot_metric(metrics_df, "kid", tmp_path)
    assert not list(tmp_path.iterdir())


def test_several_models_share_one_facet_and_one_front(
    metrics_df: pd.DataFrame, tmp_path: Path, monkeypatch
) -> None:
    """A mixed sweep (a base model's samplers and a few-step model) is compared on one pair of axes: the
    first facet holds every model's cells as model · sampler series, with one Pareto front over all."""
    from samplebench.report import pareto

    other = metrics_df.assign(model="lcm", value=metrics_df["value"] - 0.05)
    both = pd.concat([metrics_df.assign(model="sd15"), other], ignore_index=True)
    drawn = []
    real = pareto._draw_facet
    monkeypatch.setattr(
        pareto, "_draw_facet", lambda ax, facet, *a: (drawn.append(facet), real(ax, facet, *a))
    )
    plot_metric(both, "fd_exact", tmp_path)
    first = drawn[0]  # the combined facet of the NFE figure, before the per-model rows
    assert set(first["model"]) == {"sd15", "lcm"}
    assert all(label.startswith(("sd15 · ", "lcm · ")) and " · g=" in label for label in first["sampler"])
    assert len(first) == int((both["metric"] == "fd_exact").sum())
    assert len(drawn) == 2 * (1 + 2 * 2)  # per figure: the combined facet, then 2 models x 2 guidances
