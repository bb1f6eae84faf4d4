"""Several workers on one run (submitit's local executor, local processes), and SIGKILL at random moments."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from cli_run import cli  # tests/cli_run.py

from samplebench import store

SWEEP = ["sampler=ddim,dpmpp", "nfe=5,10", "num_images=400", "shard_size=50", "metrics.bootstrap=50"]


def samples(run_dir):
    out = {}
    for cell in store.find_cells(run_dir):
        shards = list(cell.iter_shards())
        out[cell.key] = np.concatenate([s["samples"] for s in shards])
    return out


def logged_shards(run_dir):
    entries = []
    for log in (run_dir / "workers").glob("*.jsonl"):
        entries += [json.loads(line)["shard"] for line in log.read_text().splitlines()]
    return entries


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    r = cli("generate", *SWEEP, "run=one", f"results_dir={root}")
    assert r.returncode == 0, r.stderr
    return samples(root / "one")


@pytest.mark.parametrize("how", [["launcher=local", "launcher.jobs=2"], ["workers=2"]])
def test_two_workers_split_the_work_without_duplicates(tmp_path, single, how):
    r = cli("sweep", *SWEEP, *how, "run=two", f"results_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "two"
    cells = store.find_cells(run)
    assert len(cells) == 4 and all(c.complete() for c in cells)
    logged = logged_shards(run)
    counts = Counter(logged)
    dup = {k: v for k, v in counts.items() if v > 1}
    assert len(logged) == 4 * 8 and max(counts.values()) == 1, (dup, sorted(logged))  # every shard made once
    # Two workers ran (each records its generate call); how the shards split between them is timing,
    # so one fast worker may take them all: what must hold is that none was made twice.
    history = json.loads((run / "provenance.json").read_text())
    assert [h.get("stage") for h in history] == ["generate", "generate"]
    assert 1 <= len(list((run / "workers").glob("*.jsonl"))) <= 2
    assert not list(run.rglob(".claim-*"))  # claims released
    got = samples(run)
    for key, value in single.items():
        np.testing.assert_array_equal(got[key], value)  # identical to a single worker
    assert (run / "metrics.csv").exists()


def test_sigkill_at_random_moments_then_resume(tmp_path, single):
    """Kill the generator three times at random points of its execution, then resume.

    The child runs in short random slices (SIGCONT, a few ms, SIGSTOP) and is counted while stopped, so
    it can never finish the sweep between two looks however fast the machine is; once it has written a
    random number of further shards it is killed where the last slice stopped it (possibly mid-write).
    """
    rng = random.Random(7)
    run = tmp_path / "killed"
    heavy = [*SWEEP[:-1]]  # the same sweep, killed three times before it finishes

    def shards() -> int:
        return len(list(run.rglob("shard-*.npz"))) if run.exists() else 0

    for _ in range(3):
        target = shards() + rng.randint(1, 3)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "samplebench.cli",
                "generate",
                *heavy,
                "run=killed",
                f"results_dir={tmp_path}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            os.kill(proc.pid, signal.SIGSTOP)
            while proc.poll() is None and shards() < target:
                os.kill(proc.pid, signal.SIGCONT)
                time.sleep(rng.uniform(0.0005, 0.003))
                os.kill(proc.pid, signal.SIGSTOP)
        finally:
            proc.kill()  # SIGKILL, stopped or not; a no-op if it has exited
            proc.wait()
    done_before = len(list(run.rglob("shard-*.npz")))
    assert 0 < done_before < 32, "the kills should land mid-sweep"
    r = cli("generate", *heavy, "run=killed", f"results_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    logged = logged_shards(run)
    assert max(Counter(logged).values()) == 1  # no finished shard was made again
    assert len(list(run.rglob("shard-*.npz"))) == 32
    got = samples(run)
    for key, value in single.items():
        np.testing.assert_array_equal(got[key], value)


def test_dead_claims_of_written_shards_are_dropped(tmp_path):
    """A worker SIGKILLed between writing a shard and releasing its claim leaves a claim no one takes over
    (the shard is done); the next generate drops it. A live worker's claim, and a dead worker's claim of
    a shard not yet written (taken over by the claim logic instead), are left alone."""
    import socket

    cell = tmp_path / "cell"
    cell.mkdir()
    for first in (0, 50):
        store.write_shard(cell, first, {"indices": np.arange(first, first + 50)})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    claims = {0: dead.pid, 50: os.getpid(), 100: dead.pid}  # done+dead, done+alive, not written+dead
    for first, pid in claims.items():
        store.claim_path(cell, first).write_text(json.dumps({"worker": "w", "host": host, "pid": pid}))
    store.drop_dead_claims(cell, timeout=600)
    assert sorted(p.name for p in cell.glob(".claim-*")) == [".claim-00000050", ".claim-00000100"]
