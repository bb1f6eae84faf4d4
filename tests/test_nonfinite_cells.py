"""Non-finite samples never stop a sweep: a NaN cell is counted, reported and excluded, and every other
cell's metrics are computed (issue 11, item 6).

One real sweep on the analytic model, in-process, with the sampler's output of two cells replaced mid-sweep:
ddim at NFE 10 returns NaN for every sample, dpmpp at NFE 5 for the even sample indices (half of them).
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

N = 64
SWEEP = ["sampler=ddim,dpmpp", "nfe=5,10", f"num_images={N}", "metrics.bootstrap=50"]
ALL_NAN = ("ddim", 10)  # (sampler, nfe): every sample NaN
HALF_NAN = ("dpmpp", 5)  # even sample indices NaN
CLEAN = [("ddim", 5), ("dpmpp", 10)]


def run_cli(*args: str) -> tuple[int, str, str]:
    """`samplebench ARGS` in this process (so the patched sampler is used): exit code, stdout, stderr."""
    from samplebench import cli

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["samplebench", *args])
        try:
            cli.main()
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def _poison(real):
    """sample_batch, but NaN for the samples of the two chosen cells."""

    def sample_batch(model, cell, indices, steps, conditions):
        batch = real(model, cell, indices, steps, conditions)
        which = (cell.sampler_label, int(cell.nfe))
        if which == ALL_NAN:
            batch.samples = torch.full_like(batch.samples, float("nan"))
        elif which == HALF_NAN:
            samples = batch.samples.clone()
            samples[torch.tensor([i % 2 == 0 for i in indices])] = float("nan")
            batch.samples = samples
        return batch

    return sample_batch


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, int, str, str]:
    import samplebench.generate as generate

    root = tmp_path_factory.mktemp("nonfinite")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generate, "sample_batch", _poison(generate.sample_batch))
        code, out, err = run_cli("sweep", *SWEEP, "run=nonfinite", f"results_dir={root}")
    return root, code, out, err


def _rows(df: pd.DataFrame, cell: tuple[str, int]) -> pd.DataFrame:
    return df[(df.sampler == cell[0]) & (df.nfe == cell[1])].set_index("metric")


def test_the_sweep_finishes_and_warns(sweep):
    _, code, out, err = sweep
    assert code == 0, err
    assert "Traceback" not in out + err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert any("ddim" in w and "nfe=10" in w and f"{N} of {N} samples non-finite" in w for w in warnings), err
    assert any("dpmpp" in w and "nfe=5" in w and f"{N // 2} of {N} samples non-finite" in w for w in warnings)


def test_metrics_of_every_other_cell_are_computed(sweep):
    root = sweep[0]
    df = pd.read_csv(root / "nonfinite" / "metrics.csv")
    for cell in CLEAN:
        rows = _rows(df, cell)
        assert set(rows.index) == {"fd_exact", "traj_err", "mmd_exact"}, cell  # no non-finite row: clean
        assert rows["value"].notna().all() and (rows["n_images"] == N).all()
        assert rows["ci_low"].notna().all() and rows["ci_high"].notna().all()


def test_an_all_nan_cell_is_recorded_without_values(sweep):
    df = pd.read_csv(sweep[0] / "nonfinite" / "metrics.csv")
    rows = _rows(df, ALL_NAN)
    for metric in ("fd_exact", "traj_err", "mmd_exact"):
        assert math.isnan(rows.at[metric, "value"]) and rows.at[metric, "n_images"] == 0
    assert rows.at["nonfinite_frac", "value"] == 1.0 and rows.at["nonfinite_frac", "n_images"] == N


def test_a_half_nan_cell_is_scored_on_its_finite_samples(sweep):
    root = sweep[0]
    df = pd.read_csv(root / "nonfinite" / "metrics.csv")
    rows = _rows(df, HALF_NAN)
    for metric in ("fd_exact", "traj_err", "mmd_exact"):
        assert math.isfinite(rows.at[metric, "value"]) and rows.at[metric, "n_images"] == N // 2
    assert rows.at["nonfinite_frac", "value"] == 0.5 and rows.at["nonfinite_frac", "n_images"] == N
    # Per-image values keep their sample indices (the odd ones), so paired tests pair the same images.
    per = pd.read_parquet(root / "nonfinite" / "per_image.parquet")
    cell = per[(per.sampler == f"{HALF_NAN[0]} · karras") & (per.nfe == HALF_NAN[1])]
    assert set(cell.metric) == {"traj_err", "mmd_exact"}
    for metric in ("traj_err", "mmd_exact"):
        assert sorted(cell[cell.metric == metric]["index"]) == list(range(1, N, 2))
    paired = pd.read_csv(root / "nonfinite" / "paired.csv")
    assert (paired[paired.nfe == 5]["n_images"] == N // 2).all()
    assert paired[paired.nfe == 10].empty  # ddim has no finite sample at NFE 10: nothing to pair


def test_the_report_shows_them_as_excluded(sweep):
    root, _, out, _ = sweep
    run = root / "nonfinite"
    board = (run / "leaderboard.md").read_text()
    fd = board.split("### gmm · fd_exact")[1].split("###")[0]
    ddim = next(line for line in fd.splitlines() if line.startswith("| ddim · karras |"))
    dpmpp = next(line for line in fd.splitlines() if line.startswith("| dpmpp · karras |"))
    assert ddim.endswith("| non-finite |")  # NFE 10: no value
    assert "†" in dpmpp.split("|")[2] and "**" not in dpmpp.split("|")[2]  # NFE 5: shown, not ranked
    assert "**" in ddim.split("|")[2]  # so ddim, the only ranked cell, is the best at NFE 5
    assert "Cells with non-finite samples" in board
    assert f"| gmm | ddim · karras | 10 | 1 | {N} of {N} | no metrics |" in board
    assert (
        f"| gmm | dpmpp · karras | 5 | 1 | {N // 2} of {N} | metrics over the {N // 2} finite samples |"
        in board
    )
    assert "Cells with non-finite samples" in out  # the terminal leaderboard too
    page = (run / "report" / "index.html").read_text()
    assert "Cells with non-finite samples" in page and "non-finite" in page
    plots = {p.name for p in (run / "plots").iterdir()}
    assert {"fd_exact_vs_nfe.png", "traj_err_vs_time.png"} <= plots
    assert not any(p.startswith("nonfinite") for p in plots)  # bookkeeping, not a quality metric


def test_check_fails_when_a_cell_became_non_finite(sweep, tmp_path):
    root = sweep[0]
    metrics = pd.read_csv(root / "nonfinite" / "metrics.csv")
    # The same run before its cells diverged: every value present, no non-finite samples.
    baseline = metrics[metrics.metric != "nonfinite_frac"].copy()
    baseline["value"] = baseline["value"].fillna(0.1)
    baseline["n_images"] = N
    path = tmp_path / "baseline.csv"
    baseline.to_csv(path, index=False)
    code, out, err = run_cli("check", "run=nonfinite", f"results_dir={root}", "--baseline", str(path))
    assert code == 1, out + err
    assert "Traceback" not in out + err
    lines = [line for line in out.splitlines() if line.startswith("non-finite:")]
    assert len(lines) == 2, out
    assert (
        "ddim · karras · NFE 10" in lines[0]
        and f"{N} of {N} samples" in lines[0]
        and "no metrics" in lines[0]
    )
    assert "dpmpp · karras · NFE 5" in lines[1] and f"{N // 2} of {N} samples" in lines[1]
    # Against itself the run passes: a cell that was already non-finite has not regressed.
    code, out, err = run_cli(
        "check", "run=nonfinite", f"results_dir={root}", "--baseline", str(root / "nonfinite" / "metrics.csv")
    )
    assert code == 0, out + err
