"""Spreading generation over workers: local processes (`workers=N`) or submitit jobs (`launcher=local`,
`launcher=slurm`). Workers share nothing but the run folder: each reads the cells the sweep planned from
<run>/plan.json (never re-planning from override strings) and claims shards atomically
(store.try_claim), so none is made twice and a dead worker's claim is taken over on a re-run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from samplebench.config import Cell
from samplebench.errors import UsageError


def worker_main(run_dir: str, invocation: int, worker: str) -> dict[str, Any]:
    """One worker: generate whatever shards of the planned cells are still unclaimed."""
    from samplebench.generate import generate
    from samplebench.plan import planned_cells

    cells = planned_cells(Path(run_dir), invocation)
    summary = generate(cells, worker=worker)
    return {"worker": worker, "written": summary.shards_written, "skipped": summary.shards_skipped}


def _local_workers(run_dir: Path, invocation: int, n: int) -> list[dict[str, Any]]:
    import torch

    gpus = torch.cuda.device_count()
    procs = []
    for k in range(n):
        env = dict(os.environ)
        if gpus >= n:
            env["CUDA_VISIBLE_DEVICES"] = str(k)  # one worker per GPU
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


def _submitit(run_dir: Path, invocation: int, launcher: dict[str, Any]) -> list[dict[str, Any]]:
    import submitit

    folder = run_dir / "submitit"
    if launcher["name"] == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=int(launcher.get("timeout_min", 600)))
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params = {
            "timeout_min": int(launcher["timeout_min"]),
            "gpus_per_node": int(launcher["gpus_per_node"]),
            "cpus_per_task": int(launcher["cpus_per_task"]),
            "mem_gb": int(launcher["mem_gb"]),
            "slurm_array_parallelism": int(launcher["array_parallelism"]),
            "name": f"samplebench-{run_dir.name}",
        }
        for key in ("partition", "account", "qos", "constraint"):
            if launcher.get(key):
                params[f"slurm_{key}"] = launcher[key]
        if launcher.get("setup"):
            params["slurm_setup"] = list(launcher["setup"])
        executor.update_parameters(**params)
    n = int(launcher.get("jobs", 1))
    names = [f"{run_dir.name}-job{k}" for k in range(n)]
    jobs = executor.map_array(worker_main, [str(run_dir.resolve())] * n, [invocation] * n, names)
    results = []
    for name, job in zip(names, jobs, strict=True):
        try:
            results.append(job.result())
        except Exception as e:  # a failed job: its finished shards stay; a re-run finishes the rest
            raise UsageError(
                f"job {name} ({job.job_id}) failed: {' '.join(str(e).split())[:300]}; finished "
                "shards are kept, re-run to resume"
            ) from e
    return results


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
