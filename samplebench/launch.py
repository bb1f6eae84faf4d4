"""Spreading generation over workers: local processes (`workers=N`) or submitit jobs (`launcher=local`,
`launcher=slurm`). Workers share nothing but the run folder: each claims shards atomically
(store.try_claim), so none is made twice and a dead worker's claim is taken over on a re-run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from samplebench.config import Cell, plan
from samplebench.errors import UsageError

_SINGLE = ["launcher=none", "workers=1"]


def _worker_overrides(overrides: list[str]) -> list[str]:
    """The sweep's overrides minus how to launch it: a worker runs its share in-process."""
    drop = ("launcher", "workers", "worker")
    return [o for o in overrides if o.split("=")[0].lstrip("+~").split(".")[0] not in drop] + _SINGLE


def worker_main(overrides: list[str], worker: str) -> dict[str, Any]:
    """One worker: plan the same sweep and generate whatever shards are still unclaimed."""
    from samplebench.generate import generate

    summary = generate(plan([*_worker_overrides(overrides), f"worker={worker}"]), worker=worker)
    return {"worker": worker, "written": summary.shards_written, "skipped": summary.shards_skipped}


def _local_workers(overrides: list[str], n: int, run_dir: Path) -> list[dict[str, Any]]:
    import torch

    gpus = torch.cuda.device_count()
    procs = []
    for k in range(n):
        env = dict(os.environ)
        if gpus >= n:
            env["CUDA_VISIBLE_DEVICES"] = str(k)  # one worker per GPU
        cmd = [
            sys.executable,
            "-m",
            "samplebench.cli",
            "generate",
            *overrides,
            *_SINGLE,
            f"worker={run_dir.name}-w{k}",
        ]
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


def _submitit(overrides: list[str], launcher: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
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
    jobs = executor.map_array(worker_main, [overrides] * n, names)
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


def launch(overrides: list[str], cells: list[Cell]) -> list[dict[str, Any]] | None:
    """Run generation through the configured launcher; None means 'in this process'."""
    cfg = cells[0].config
    launcher, workers = cfg.get("launcher") or {"name": "none"}, int(cfg.get("workers", 1))
    run_dir = Path(cfg["results_dir"]) / cfg["run"]
    if launcher["name"] == "none":
        return None if workers <= 1 else _local_workers(overrides, workers, run_dir)
    if launcher["name"] in ("local", "slurm"):
        return _submitit(overrides, launcher, run_dir)
    raise UsageError(f"launcher={launcher['name']} is unknown; choose none, local or slurm")
