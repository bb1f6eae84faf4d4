"""Failures a careless or hostile user meets (issue 12, Why items 3-5), one table: each case is a
one-line error (exit 2, or 130 for Ctrl-C) or a counted, reported exclusion, and the finished shards
of the runs already there are never touched.

Every case runs samplebench's entry point as a user does (tests/cli_run.py: in this process, or a child
process where a signal or a race between processes is the point) on tiny models built here: the
analytic model and a randomly initialised Stable Diffusion in diffusers' format.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tiny_models  # tests/tiny_models.py
from cli_run import cli_here as cli  # tests/cli_run.py: same entry point, in-process
from PIL import Image

from samplebench import store

GMM = ["sampler=ddim,dpmpp", "nfe=5", "num_images=64", "shard_size=32", "batch_size=32"]
GMM += ["metrics.bootstrap=50"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Tiny models, a reference folder, and two finished runs (analytic, image) the cases must not touch."""
    root = tmp_path_factory.mktemp("failures")
    sd = tiny_models.make_tiny_sd(root / "sd")
    inception = tiny_models.make_tiny_inception(root / "inception.pth")
    ref = root / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(ref / f"{i:03d}.png")
    results = root / "results"
    r = cli("sweep", *GMM, f"results_dir={results}", "run=gmm")
    assert r.returncode == 0, r.stderr[-3000:]
    image = image_args(sd, inception, ref, results)
    r = cli("sweep", *image, "num_images=8", "run=img")
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "sd": sd, "inception": inception, "ref": ref, "results": results}


def image_args(sd: Path, inception: Path, ref: Path, results: Path) -> list[str]:
    return [
        "model=sd15",
        f"model.path={sd}",
        "sampler=ddim,dpmpp",
        "nfe=3",
        "batch_size=4",
        "shard_size=4",
        "timing.repeats=1",
        "metrics.names=[fid,is]",
        f"metrics.ref={ref}",
        f"metrics.inception_weights={inception}",
        "metrics.is.splits=2",
        "metrics.fid.bootstrap=20",
        f"results_dir={results}",
    ]


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("shard-*.npz"))}


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return lines[0]


def copy_run(w: dict[str, Path], name: str, new: str) -> Path:
    """A copy of a finished run, to break without touching the original."""
    target = w["results"] / new
    shutil.copytree(w["results"] / name, target)
    return target


def offline_env(w: dict[str, Path]) -> dict[str, str]:
    """No hub, and torch's cache (where torch-fidelity keeps Inception) empty."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(w["root"] / "empty-torch-home")}


# -- item 3: failures came late, or not at all -------------------------------------------------------
def offline_sweep_missing_metric_weights(w):
    args = ["model=sd15", f"model.path={w['sd']}", "sampler=ddim", "nfe=3", "num_images=4"]
    r = cli("sweep", *args, f"results_dir={w['results']}", "run=offline", env=offline_env(w))
    line = one_error_line(r)
    # Every missing piece in the one line: the reference set, Inception's and CLIP's weights.
    for piece in ("fid, kid: metrics.ref=", "Inception weights", "CLIP weights", "metrics.on_missing=skip"):
        assert piece in line, (piece, line)
    assert not list((w["results"] / "offline").rglob("cell.json"))  # nothing generated


def offline_sweep_skips_with_on_missing_skip(w):
    args = ["model=sd15", f"model.path={w['sd']}", "sampler=ddim", "nfe=3", "num_images=4", "batch_size=4"]
    args += ["metrics.on_missing=skip", "metrics.traj_mse.nfe=8", f"results_dir={w['results']}", "run=skip"]
    r = cli("sweep", *args, env=offline_env(w))
    assert r.returncode == 0, r.stderr[-3000:]
    for metric in ("fid", "kid", "is", "clip_score", "clip_score_paper"):
        assert f"skipping {metric} (metrics.on_missing=skip)" in r.stderr, metric
    board = (w["results"] / "skip" / "leaderboard.md").read_text()
    missing = board.split("## Not computed")[1]
    for metric in ("fid", "kid", "is", "clip_score"):
        assert f"- {metric}: skipped in run skip" in missing, metric
    df = pd.read_csv(w["results"] / "skip" / "metrics.csv")
    assert list(df.metric) == ["traj_mse"] and np.isfinite(df.value).all()  # what could run, ran


def ctrl_c_during_a_sweep(w):
    cmd = [sys.executable, "-m", "samplebench.cli", "sweep", "sampler=ddim", "nfe=5", "num_images=400000"]
    cmd += ["shard_size=500", "batch_size=500", f"results_dir={w['results']}", "run=ctrlc"]
    # Ctrl-C reaches a foreground job whose SIGINT is at its default. A process started in the
    # background by a non-interactive shell (`make test &`, nohup, some CI runners) inherits SIGINT
    # *ignored*, and Python then installs no KeyboardInterrupt handler: the child would never see the
    # signal. So the child gets the disposition a terminal's foreground job has.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    cell = w["results"] / "ctrlc" / "gmm" / "ddim" / "karras" / "nfe=5" / "cfg=1"
    deadline = time.monotonic() + 300  # only stops a hung child: the test waits for a shard, not a time
    while not list(cell.glob("shard-*.npz")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]  # 800 shards: still generating
    kept = snapshot(cell)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted:") and "re-run" in lines[-1] and "Traceback" not in err
    assert kept and all(p.read_bytes() == b for p, b in kept.items())  # finished shards kept as they were


def all_nan_analytic_cells(w):
    # guidance=1e300 overflows every sample to NaN/inf: counted, excluded, reported; the others scored.
    args = ["sampler=ddim,dpmpp", "nfe=5", "guidance=1,1e300", "num_images=32", "metrics.bootstrap=50"]
    r = cli("sweep", *args, f"results_dir={w['results']}", "run=nonfinite")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    df = pd.read_csv(w["results"] / "nonfinite" / "metrics.csv")
    bad = df[df.guidance == 1e300].set_index(["sampler", "metric"])
    assert (bad.loc[(slice(None), "nonfinite_frac"), "value"] == 1.0).all()
    assert bad.loc[(slice(None), ["fd_exact", "traj_err", "mmd_exact"]), "value"].isna().all()
    good = df[(df.guidance == 1) & (df.metric != "nonfinite_frac")]
    assert len(good) == 6 and np.isfinite(good.value).all()
    assert "non-finite" in (w["results"] / "nonfinite" / "leaderboard.md").read_text()


def all_nan_image_cell(w):
    # One cell's samples all NaN (the shard flags say so): the metrics stage scores the other cell.
    run = copy_run(w, "img", "img-nan")
    (cell,) = [c for c in store.find_cells(run) if c.info["sampler_label"] == "ddim"]
    for _, _, path in cell.shards():
        arrays = store.read_shard(path)
        arrays["samples"] = np.full_like(arrays["samples"], np.nan)
        arrays["finite"] = np.zeros_like(arrays["finite"])
        store.write_shard(cell.path, int(arrays["indices"][0]), arrays)
    r = cli("metrics", f"results_dir={w['results']}", "run=img-nan")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "8 of 8 samples non-finite" in " ".join(r.stderr.split())
    df = pd.read_csv(run / "metrics.csv").set_index(["sampler", "metric"])
    assert df.loc[("ddim", "nonfinite_frac"), "value"] == 1.0 and np.isnan(df.loc[("ddim", "fid"), "value"])
    assert np.isfinite(df.loc[("dpmpp", "fid"), "value"]) and df.loc[("dpmpp", "fid"), "n_images"] == 8
    r = cli("report", f"results_dir={w['results']}", "run=img-nan")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]


def exact_ode_cannot_be_solved(w):
    # At guidance=1e20 the samples stay finite but the exact guided ODE is too stiff for DOP853: traj_err is
    # "not computed" with the reason (it was a traceback), fd_exact is computed.
    args = ["sampler=dpmpp", "nfe=5", "guidance=1e20", "num_images=16", "metrics.bootstrap=50"]
    r = cli("sweep", *args, f"results_dir={w['results']}", "run=stiff")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "traj_err not computed: the exact ODE solve failed" in " ".join(r.stderr.split())
    df = pd.read_csv(w["results"] / "stiff" / "metrics.csv").set_index("metric")
    assert np.isnan(df.loc["traj_err", "value"]) and np.isfinite(df.loc["fd_exact", "value"])
    board = (w["results"] / "stiff" / "leaderboard.md").read_text()
    assert "not computed" in board and "the exact ODE solve failed" in board.split("## Not computed")[1]


# -- item 4: caches and references trusted blindly; stale rows ----------------------------------------
def deleted_shard_leaves_no_rows(w):
    run = copy_run(w, "gmm", "gmm-deleted")
    (ddim,) = [c for c in store.find_cells(run) if c.info["sampler_label"] == "ddim"]
    ddim.shards()[1][2].unlink()
    r = cli("report", f"results_dir={w['results']}", "run=gmm-deleted")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "left out the rows of 1 cells no longer finished" in " ".join((r.stdout + r.stderr).split())
    assert "ddim · karras" not in (run / "leaderboard.md").read_text()  # not ranked as if still measured
    r = cli("metrics", f"results_dir={w['results']}", "run=gmm-deleted")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dropped the metric rows of 1 cells no longer finished on disk" in " ".join(r.stderr.split())
    for name in ("metrics.csv", "timings.csv"):
        assert set(pd.read_csv(run / name).sampler) == {"dpmpp"}, name
    assert set(pd.read_parquet(run / "per_image.parquet").sampler) == {"dpmpp · karras"}


def lowered_num_images_counts_what_is_scored(w):
    # The image run had 8 images per cell; the same sweep with num_images=4 scores the first 4 (n_images 4),
    # equal to a run that only ever had 4. Reference: that fresh run's fid and is.
    run = copy_run(w, "img", "img-shrunk")
    args = image_args(w["sd"], w["inception"], w["ref"], w["results"])
    r = cli("sweep", *args, "num_images=4", "run=img-shrunk")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list(run.rglob("shard-*.npz"))) == 4  # the shards beyond 4 stay on disk, unscored
    r = cli("sweep", *args, "num_images=4", "run=img-four")
    assert r.returncode == 0, r.stderr[-3000:]
    shrunk = pd.read_csv(run / "metrics.csv")
    fresh = pd.read_csv(w["results"] / "img-four" / "metrics.csv")
    assert (shrunk.n_images == 4).all()
    pd.testing.assert_series_equal(shrunk.value, fresh.value)


# -- item 5: paths and races ---------------------------------------------------------------------------
def worker_name_that_is_a_path(w):
    r = cli("sweep", *GMM, f"results_dir={w['results']}", "run=gmm", "worker=../../x")
    assert "worker=../../x must be a plain name" in one_error_line(r)
    assert not list(w["root"].rglob("x.jsonl"))


def two_sweeps_into_one_run_at_once(w):
    args = ["sampler=ddim,dpmpp,unipc", "nfe=5,10", "num_images=256", "shard_size=16", "batch_size=16"]
    cmd = [sys.executable, "-m", "samplebench.cli", "generate", *args, f"results_dir={w['results']}"]
    cmd.append("run=race")
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    logged = []
    for log in (w["results"] / "race" / "workers").glob("*.jsonl"):
        logged += [line.split('"shard": ')[1].split(",")[0] for line in log.read_text().splitlines()]
    assert len(logged) == 6 * 16 == len(set(logged))  # every shard made exactly once
    assert all(c.complete() for c in store.find_cells(w["results"] / "race"))


CASES: dict[str, Callable[[dict[str, Path]], None]] = {
    "3 offline image sweep, metric weights and reference missing": offline_sweep_missing_metric_weights,
    "3 the same with metrics.on_missing=skip": offline_sweep_skips_with_on_missing_skip,
    "3 Ctrl-C during a sweep": ctrl_c_during_a_sweep,
    "3 all-NaN cells of the analytic model": all_nan_analytic_cells,
    "3 an all-NaN image cell": all_nan_image_cell,
    "3 guidance=1e20: no exact ODE reference": exact_ode_cannot_be_solved,
    "4 a deleted shard": deleted_shard_leaves_no_rows,
    "4 a lowered num_images": lowered_num_images_counts_what_is_scored,
    "5 a worker name that is a path": worker_name_that_is_a_path,
    "5 two sweeps into one run at once": two_sweeps_into_one_run_at_once,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_failure_table(world, case):
    before = {run: snapshot(world["results"] / run) for run in ("gmm", "img")}
    CASES[case](world)
    for run, shards in before.items():
        assert shards and snapshot(world["results"] / run) == shards, f"{case} touched run {run}"
