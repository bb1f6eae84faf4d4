"""Spreading generation over workers: local processes (`workers=N`) or submitit jobs (`launcher=local`,
`launcher=slurm`). Workers share nothing but the run folder: each reads the cells the sweep planned from
<run>/plan.json (never re-planning from override strings) and claims shards atomically
(store.try_claim), so none is made twice and a dead worker's claim is taken over on a re-run.

Slurm jobs are watched here, not through submitit's watcher: submitit reads job states with `sacct`, which
tells nothing on a cluster without accounting, so a task that died without a result was waited for
forever. `squeue` and `scontrol` answer on every cluster; a task that has left the queue without writing
its result has failed, and the whole wait is bounded by `launcher.wait_min`.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samplebench.config import Cell
from samplebench.errors import UsageError


class WorkerStopped(Exception):
    """Raised in a worker by SIGTERM (scancel, preemption): generation stops at once, the shards already
    made are written and the claims are released, so a re-run takes the rest over without waiting."""


def _stop_on_sigterm() -> None:
    # submitit's job wrapper ignores SIGTERM ("Bypassing signal SIGTERM", submitit/core/job_environment.py)
    # so that a cancelled task worked on until Slurm's SIGKILL, KillWait (30 s) later. A worker stops.
    def stop(signum: int, frame: Any) -> None:
        raise WorkerStopped(f"stopped by {signal.Signals(signum).name} (scancel, preemption or time limit)")

    signal.signal(signal.SIGTERM, stop)


def _cpu_threads_from_slurm() -> None:
    """A Slurm task runs torch on the CPUs it was given (SLURM_CPUS_PER_TASK), not on every core of the
    node, so tasks sharing a node do not oversubscribe it."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit() and int(cpus) > 0:
        import torch

        torch.set_num_threads(int(cpus))


def worker_main(run_dir: str, invocation: int, worker: str) -> dict[str, Any]:
    """One worker: generate whatever shards of the planned cells are still unclaimed."""
    from samplebench.generate import generate
    from samplebench.plan import planned_cells

    _stop_on_sigterm()
    _cpu_threads_from_slurm()
    cells = planned_cells(Path(run_dir), invocation)
    summary = generate(cells, worker=worker)
    return {"worker": worker, "written": summary.shards_written, "skipped": summary.shards_skipped}


def _local_workers(run_dir: Path, invocation: int, n: int) -> list[dict[str, Any]]:
    import torch

    gpus = torch.cuda.device_count()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    procs = []
    for k in range(n):
        env = dict(os.environ)
        if gpus >= n:
            env["CUDA_VISIBLE_DEVICES"] = str(k)  # one worker per GPU
        elif gpus == 0 and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, cores // n))  # CPU workers share the cores, not each all
        cmd = [sys.executable, "-m", "samplebench.cli", "worker", str(run_dir)]
        cmd += ["--invocation", str(invocation), "--name", f"{run_dir.name}-w{k}"]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        )
    failed = []
    for k, p in enumerate(procs):
        _, stderr = p.communicate()
        if p.returncode != 0:
            failed.append(f"worker {k} exited with {p.returncode}: {stderr.strip().splitlines()[-1:] or ''}")
    if failed:
        raise UsageError("; ".join(failed) + "; finished shards are kept, re-run to resume")
    return [{"worker": f"w{k}"} for k in range(n)]


def slurm_parameters(launcher: dict[str, Any], name: str) -> dict[str, Any]:
    """submitit's Slurm parameters from conf/launcher/slurm.yaml. Resources are asked for only where set:
    no GPU unless gpus_per_node > 0, no memory flag unless mem_gb is given (the partition's default)."""
    params: dict[str, Any] = {
        "timeout_min": int(launcher["timeout_min"]),
        "cpus_per_task": int(launcher["cpus_per_task"]),
        "slurm_array_parallelism": int(launcher["array_parallelism"]),
        "name": name,
    }
    if int(launcher.get("gpus_per_node") or 0) > 0:
        params["gpus_per_node"] = int(launcher["gpus_per_node"])
    if launcher.get("mem_gb"):
        params["mem_gb"] = float(launcher["mem_gb"])
    for key in ("partition", "account", "qos", "constraint"):
        if launcher.get(key):
            params[f"slurm_{key}"] = launcher[key]
    if launcher.get("setup"):
        params["slurm_setup"] = list(launcher["setup"])
    return params


@dataclass(frozen=True)
class TaskEnd:
    """How one job (array task) ended: its worker's summary, or why it failed."""

    name: str
    job_id: str
    result: dict[str, Any] | None
    failure: str | None


def _queue_states(job_ids: list[str]) -> dict[str, str] | None:
    """States of the jobs still known to the controller, by job id ("12_3": "RUNNING"); tasks that have
    left the queue are absent. None when the controller cannot be asked."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(arrays)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        # squeue refuses ids the controller has already forgotten (MinJobAge): they are all gone
        return {} if "Invalid job id" in out.stderr else None
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def _ended_state(job_id: str) -> str:
    """The final state the controller still remembers for a job that left the queue (CANCELLED, FAILED,
    TIMEOUT, NODE_FAIL, ...), or 'ended' once it has forgotten it."""
    try:
        out = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return "ended"
    found = re.search(r"JobState=(\S+)", out.stdout)
    return found.group(1) if found else "ended"


def _outcome(job: Any) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return job.result(), None
    except Exception as e:  # the worker raised: the last line of its traceback says why
        text = str(e)
        # submitit's FailedJobError: "... with trace:\n-----\n<traceback>\n-----\nYou can check full logs ..."
        blocks = re.split(r"\n-{10,}\n", text)
        if len(blocks) >= 3:
            text = blocks[1]
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        return None, (lines[-1] if lines else type(e).__name__)[:300]


def _cancel(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=60)


def wait_for_slurm(
    jobs: list[Any], names: list[str], wait_min: float, poll_s: float, grace_s: float = 20.0
) -> list[TaskEnd]:
    """Wait until every task has ended, reading states from squeue/scontrol (no accounting needed).

    A task is finished when submitit's result file exists. One that is no longer in the queue and has
    written no result within `grace_s` (a shared file system may show the file late) has failed, with the
    state scontrol still reports (CANCELLED, TIMEOUT, ...). After `wait_min` minutes the tasks still
    queued or running are cancelled and reported as such.
    """
    deadline = time.monotonic() + 60.0 * wait_min
    ends: dict[str, TaskEnd] = {}
    gone_since: dict[str, float] = {}
    unreachable_since: float | None = None
    while True:
        open_jobs = [(n, j) for n, j in zip(names, jobs, strict=True) if j.job_id not in ends]
        for name, job in open_jobs:
            if job.paths.result_pickle.exists():
                result, failure = _outcome(job)
                ends[job.job_id] = TaskEnd(name, job.job_id, result, failure)
        open_jobs = [(n, j) for n, j in open_jobs if j.job_id not in ends]
        if not open_jobs:
            return [ends[j.job_id] for j in jobs]
        states = _queue_states([j.job_id for _, j in open_jobs])
        now = time.monotonic()
        if states is None:
            unreachable_since = unreachable_since or now
            if now - unreachable_since > max(300.0, 5 * poll_s):
                raise UsageError(
                    "the Slurm controller has not answered squeue for 5 minutes; the jobs may still run: "
                    "check them with squeue, then re-run the sweep to finish and score it"
                )
        else:
            unreachable_since = None
            for name, job in open_jobs:
                if job.job_id in states:
                    gone_since.pop(job.job_id, None)
                    continue
                first = gone_since.setdefault(job.job_id, now)
                if now - first >= grace_s:
                    state = _ended_state(job.job_id)
                    ends[job.job_id] = TaskEnd(name, job.job_id, None, f"{state} without a result")
        if now > deadline:
            left = [j.job_id for _, j in open_jobs if j.job_id not in ends]
            _cancel(left)
            for name, job in open_jobs:
                if job.job_id not in ends:
                    ends[job.job_id] = TaskEnd(
                        name,
                        job.job_id,
                        None,
                        f"still queued or running after launcher.wait_min={wait_min} minutes, cancelled",
                    )
            return [ends[j.job_id] for j in jobs]
        time.sleep(poll_s)


def _submit(executor: Any, n: int, run_dir: Path, invocation: int) -> tuple[list[Any], list[str]]:
    names = [f"{run_dir.name}-job{k}" for k in range(n)]
    captured = io.StringIO()
    try:
        # submitit prints sbatch's stderr itself before raising: kept for the one-line error instead
        with contextlib.redirect_stderr(captured):
            jobs = executor.map_array(worker_main, [str(run_dir.resolve())] * n, [invocation] * n, names)
    except Exception as e:
        text = str(e) or captured.getvalue()
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()] or lines[-1:] or [type(e).__name__]
        errors = [re.sub(r"^(sbatch: )?error: ", "", line) for line in errors]
        why = " ".join("; ".join(dict.fromkeys(errors)).split())[:400]
        raise UsageError(
            f"the cluster refused the submission ({why}); check launcher.partition, gpus_per_node, "
            "cpus_per_task, mem_gb and timeout_min against what the partition offers (sinfo)"
        ) from e
    return jobs, names


def _submitit(run_dir: Path, invocation: int, launcher: dict[str, Any]) -> list[dict[str, Any]]:
    import submitit

    folder = run_dir / "submitit"
    n = int(launcher.get("jobs", 1))
    if n < 1:
        raise UsageError(f"launcher.jobs={n} must be at least 1")
    if launcher["name"] == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=int(launcher.get("timeout_min", 600)))
        jobs, names = _submit(executor, n, run_dir, invocation)
        ends = []
        for name, job in zip(names, jobs, strict=True):
            result, failure = _outcome(job)
            ends.append(TaskEnd(name, job.job_id, result, failure))
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        executor.update_parameters(**slurm_parameters(launcher, f"samplebench-{run_dir.name}"))
        jobs, names = _submit(executor, n, run_dir, invocation)
        print(
            f"submitted {n} Slurm job{'s' if n > 1 else ''} ({jobs[0].job_id.split('_')[0]}); "
            f"logs in {folder}",
            file=sys.stderr,
        )
        ends = wait_for_slurm(
            jobs, names, float(launcher.get("wait_min") or 1440), float(launcher.get("poll_s") or 5)
        )
    failed = [e for e in ends if e.failure]
    if failed:
        what = "; ".join(f"{e.name} ({e.job_id}): {e.failure}" for e in failed)
        raise UsageError(
            f"{len(failed)} of {len(ends)} jobs failed: {what}; finished shards are kept, re-run to resume"
        )
    return [e.result or {} for e in ends]


def launch(cells: list[Cell], invocation: int) -> list[dict[str, Any]] | None:
    """Run generation of a planned invocation through the configured launcher; None means 'in this
    process'."""
    cfg = cells[0].config
    launcher, workers = cfg.get("launcher") or {"name": "none"}, int(cfg.get("workers", 1))
    run_dir = Path(cfg["results_dir"]) / cfg["run"]
    if launcher["name"] == "none":
        return None if workers <= 1 else _local_workers(run_dir.resolve(), invocation, workers)
    if launcher["name"] in ("local", "slurm"):
        return _submitit(run_dir, invocation, launcher)
    raise UsageError(f"launcher={launcher['name']} is unknown; choose none, local or slurm")
