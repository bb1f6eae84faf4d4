"""`launcher=slurm` on a real single-node Slurm cluster (tests/slurm_cluster.py): a job array runs to
completion with results identical to a local run; a task cancelled mid-run (scancel) and one killed
outright are reported in bounded time, and a re-submission finishes with nothing made twice; a
submission the cluster refuses is a one-line error; the overall wait is bounded by launcher.wait_min.

The reference everywhere is the same sweep generated in one local process: samples equal bit for bit
(each sample's noise comes from (seed, index), not from which worker made it).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import slurm_cluster  # tests/slurm_cluster.py
from cli_run import cli  # tests/cli_run.py

from samplebench import store

SWEEP = ["sampler=ddim,dpmpp", "nfe=5,10", "num_images=400", "shard_size=50", "metrics.bootstrap=50"]
TOTAL_SHARDS = 4 * 8
FAST = ["launcher=slurm", "launcher.poll_s=1"]


@pytest.fixture(scope="module")
def cluster():
    why = slurm_cluster.why_unavailable()
    if why and os.environ.get("SAMPLEBENCH_REQUIRE_SLURM"):  # .ci/run: CI installs Slurm, so it must run
        pytest.fail(f"SAMPLEBENCH_REQUIRE_SLURM is set but {why}")
    if why:
        print(f"skipping the Slurm tests: {why}")
        pytest.skip(why)
    c = slurm_cluster.start(cpus=2)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    r = cli("sweep", *SWEEP, "run=one", f"results_dir={root}")
    assert r.returncode == 0, r.stderr
    return root / "one"


def samples(run_dir: Path) -> dict:
    return {c.key: np.concatenate([s["samples"] for s in c.iter_shards()]) for c in store.find_cells(run_dir)}


def logged(run_dir: Path) -> list[tuple[str, int]]:
    out = []
    for log in (run_dir / "workers").glob("*.jsonl"):
        out += [(log.stem, json.loads(line)["shard"]) for line in log.read_text().splitlines()]
    return out


def metric_values(run_dir: Path) -> pd.DataFrame:
    df = pd.read_csv(run_dir / "metrics.csv")
    keep = [c for c in df.columns if not any(w in c for w in ("sec", "time", "throughput", "per_s"))]
    return df[keep].sort_values(["sampler", "nfe"]).reset_index(drop=True)


def assert_same_as_local(run_dir: Path, local_dir: Path) -> None:
    got, want = samples(run_dir), samples(local_dir)
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value)
    pd.testing.assert_frame_equal(metric_values(run_dir), metric_values(local_dir))


def test_job_array_runs_to_completion_like_a_local_run(cluster, local, tmp_path):
    # The shipped defaults (no GPU asked for, no memory flag, 2 CPUs a task) fit a 2-core CPU node.
    r = cli("sweep", *SWEEP, *FAST, "launcher.jobs=2", "run=two", f"results_dir={tmp_path}", env=cluster.env)
    assert r.returncode == 0, r.stderr + cluster.logs()
    run = tmp_path / "two"
    counts = Counter(shard for _, shard in logged(run))
    assert sum(counts.values()) == TOTAL_SHARDS and max(counts.values()) == 1  # every shard made once
    assert {w for w, _ in logged(run)} <= {"two-job0", "two-job1"}
    assert not list(run.rglob(".claim-*"))
    assert_same_as_local(run, local)


def _task_pid(cluster, array_id: str, task: int) -> int | None:
    """The python process running submitit's job function for one array task (not its srun)."""
    for pid in cluster.processes():
        proc = Path(f"/proc/{pid}")
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"python" in Path(argv[0].decode(errors="replace")).name.encode()
            and b"submitit.core._submit" in argv
        ):
            if (
                f"SLURM_ARRAY_JOB_ID={array_id}".encode() in env
                and f"SLURM_ARRAY_TASK_ID={task}".encode() in env
            ):
                return int(proc.name)
    return None


def _wait_for(what, timeout: float = 300.0, why: str = ""):
    """Poll `what()` until it is truthy (the timeout only stops a hung test; nothing is timed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {why}")


def test_cancelled_and_killed_tasks_are_reported_then_a_resubmission_finishes(cluster, local, tmp_path):
    """Each task makes at least one shard and is then frozen (SIGSTOP), so the faults land mid-run
    whatever the machine's speed: task 1 is cancelled with scancel (SIGCONT + SIGTERM: it must stop at
    once, not work on for KillWait), task 0 is killed outright (SIGKILL: no result file, its end is seen
    only through the job state, without accounting). The sweep must exit non-zero naming both, and a
    re-submission must finish the rest without making any finished shard again."""
    args = [
        *SWEEP,
        *FAST,
        "launcher.jobs=2",
        "launcher.cpus_per_task=1",
        "run=cut",
        f"results_dir={tmp_path}",
    ]

    driver = subprocess.Popen(
        [sys.executable, "-m", "samplebench.cli", "sweep", *args],
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = tmp_path / "cut"
    try:
        array_id = _wait_for(
            lambda: (
                next((p.name.split("_")[0] for p in (run / "submitit").glob("*_0_log.out")), None)
                if (run / "submitit").exists()
                else None
            )
        )
        # Each task is stopped as soon as its process exists, then let run in slices of a few ms until it
        # has made a shard: however fast the machine, neither can finish the sweep between two looks.
        pids: dict[int, int] = {}

        def find_and_stop() -> bool:
            for task in {0, 1} - pids.keys():
                pid = _task_pid(cluster, array_id, task)
                if pid:
                    os.kill(pid, signal.SIGSTOP)
                    pids[task] = pid
            return len(pids) == 2

        _wait_for(find_and_stop, why="both tasks' processes")
        rng = random.Random(3)
        waiting = {0, 1}

        def made_a_shard(task: int) -> bool:
            log = run / "workers" / f"cut-job{task}.jsonl"
            return log.exists() and bool(log.read_text().strip())

        def step() -> bool:
            for task in sorted(waiting):
                if made_a_shard(task):
                    waiting.discard(task)
                    continue
                try:
                    os.kill(pids[task], signal.SIGCONT)
                    time.sleep(rng.uniform(0.0005, 0.003))
                    os.kill(pids[task], signal.SIGSTOP)
                except ProcessLookupError:
                    errs = (run / "submitit").glob("*.err")
                    logs = "\n".join(p.name + ":\n" + p.read_text()[-3000:] for p in errs)
                    raise AssertionError(f"task {task} ended before making a shard: {logs}") from None
            return not waiting

        _wait_for(step, why="a shard from each task")
        made_before = len(logged(run))
        assert made_before < TOTAL_SHARDS, "both tasks were frozen with work left"
        cluster.run("scancel", f"{array_id}_1")
        os.kill(pids[0], signal.SIGKILL)
        _, stderr = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 2, stderr
    error = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in stderr, stderr
    assert "2 of 2 jobs failed" in error[0], error[0]
    assert f"cut-job1 ({array_id}_1)" in error[0] and "stopped by SIGTERM" in error[0], error[0]
    assert f"cut-job0 ({array_id}_0)" in error[0] and "without a result" in error[0], error[0]
    assert "re-run to resume" in error[0]
    made = Counter(shard for _, shard in logged(run))
    assert max(made.values()) == 1

    r = cli("sweep", *args, env=cluster.env)
    assert r.returncode == 0, r.stderr + cluster.logs()
    counts = Counter(shard for _, shard in logged(run))
    assert sum(counts.values()) == TOTAL_SHARDS and max(counts.values()) == 1  # none made again
    assert not list(run.rglob(".claim-*"))
    assert_same_as_local(run, local)


@pytest.mark.parametrize(
    "request_, says",
    [
        (["launcher.mem_gb=100000"], "Memory specification can not be satisfied"),
        (["launcher.gpus_per_node=1"], "Invalid generic resource"),
        (["launcher.partition=nosuch"], "invalid partition"),
    ],
)
def test_a_refused_submission_is_one_line(cluster, tmp_path, request_, says):
    r = cli("sweep", *SWEEP, *FAST, *request_, "run=refused", f"results_dir={tmp_path}", env=cluster.env)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the cluster refused the submission"), r.stderr
    assert says.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in r.stderr


def test_the_wait_is_bounded_and_leftover_jobs_are_cancelled(cluster, tmp_path):
    """A task that never finishes (its setup line sleeps) is cancelled after launcher.wait_min."""
    r = cli(
        "sweep", *SWEEP, *FAST, "launcher.jobs=1", "launcher.wait_min=0.2", "launcher.setup=[sleep 600]",
        "run=slow", f"results_dir={tmp_path}", env=cluster.env,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "still queued or running after launcher.wait_min=0.2 minutes, cancelled" in r.stderr, r.stderr
    array_id = next((tmp_path / "slow" / "submitit").glob("*_submitted.pkl")).name.split("_")[0]
    assert _wait_for(lambda: cluster.run("squeue", "-h", "-j", array_id, check=False).stdout.strip() == "")
