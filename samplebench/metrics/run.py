"""The metrics stage: stream each finished cell's shards, append rows to metrics.csv."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import Progress

from samplebench import store
from samplebench.errors import UsageError
from samplebench.metrics import analytic
from samplebench.models import load_model

COLUMNS = [
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
]
KEY = ["model", "sampler", "nfe", "guidance", "metric"]
KNOWN = {"fd_exact", "traj_err"}


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("samplebench", "torch", "diffusers", "numpy", "scipy", "hydra-core"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _cell_samples(cell: store.CellRecord) -> dict[str, np.ndarray]:
    """Samples, labels and counted NFE of a cell, read shard by shard."""
    keys = ("samples", "labels", "indices", "nfe", "finite")
    parts = [store.read_shard(p, keys) for _, _, p in cell.shards()]
    n = int(cell.info["num_images"])
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in keys}


TIMING_KEYS = (
    "nfe",
    "finite",
    "batch_sizes",
    "batch_seconds",
    "batch_model_seconds",
    "batch_decode_seconds",
    "batch_warmup",
)


def timing_row(cell: store.CellRecord) -> dict[str, Any]:
    """Per-cell timing from the shards' per-batch records. Warm-up batches (the first of each sampler
    in a worker process) are left out unless a cell has nothing else."""
    parts = [store.read_shard(p, TIMING_KEYS) for _, _, p in cell.shards()]
    sizes = np.concatenate([p["batch_sizes"] for p in parts])
    warm = np.concatenate([p.get("batch_warmup", np.zeros(len(p["batch_sizes"]), bool)) for p in parts])
    keep = ~warm if (~warm).any() else np.ones_like(warm)

    def total(key: str) -> float:
        values = np.concatenate([p.get(key, np.zeros(len(p["batch_sizes"]))) for p in parts])
        return float(values[keep].sum())

    n = int(sizes[keep].sum())
    sampling, decode = total("batch_seconds"), total("batch_decode_seconds")
    info = cell.info
    return {
        "model": info["model_label"],
        "sampler": info["sampler_label"],
        "nfe": int(info["nfe"]),
        "guidance": float(info["guidance"]),
        "n_images": int(sizes.sum()),
        "n_timed": n,
        "nfe_actual": int(max(int(p["nfe"].max()) for p in parts)),
        "non_finite": int(sum(int((~p["finite"]).sum()) for p in parts)),
        "sec_per_image_sampling": sampling / n,
        "sec_per_image_decode": decode / n,
        "sec_per_image_total": (sampling + decode) / n,
        "model_call_share": total("batch_model_seconds") / sampling if sampling else float("nan"),
    }


def compute_metrics(
    run_dir: Path, metrics_cfg: dict[str, Any], console: Console | None = None
) -> pd.DataFrame:
    """Score every finished cell of a run; rows for the same key are replaced, others kept."""
    console = console or Console(stderr=True)
    names = list(metrics_cfg["names"])
    unknown = [m for m in names if m not in KNOWN]
    if unknown:
        raise UsageError(f"metric {unknown[0]} is unknown; choose from {', '.join(sorted(KNOWN))}")
    cells = store.find_cells(run_dir)
    finished = [c for c in cells if c.complete()]
    for c in cells:
        if not c.complete():
            console.print(
                f"[yellow]skipping unfinished cell {c.path.relative_to(run_dir)}; re-run generate[/]"
            )
    cache_dir = run_dir.parent / ".cache" / "traj"
    reps = int(metrics_cfg.get("bootstrap", 1000))
    rtol = float(metrics_cfg.get("ode_rtol", 1e-10))
    rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    timings: list[dict[str, Any]] = []
    not_applicable: set[str] = set()
    schedule_floors: dict[str, float] = {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("metrics", total=len(finished))
        for cell in finished:
            cfg = cell.info["config"]
            timing = timing_row(cell)
            timings.append(timing)
            if cfg["model"]["name"] != "gmm":
                not_applicable.add(cell.info["model_label"])
                progress.advance(task)
                continue
            mh = cell.info["model_hash"]
            if mh not in models:
                models[mh] = load_model(cfg["model"], "cpu")
            model = models[mh]
            st = _cell_samples(cell)
            ok = st["finite"]
            if not ok.all():
                console.print(
                    f"[red]{cell.path.relative_to(run_dir)}: {int((~ok).sum())} non-finite samples "
                    "excluded from its metrics[/]"
                )
            x = st["samples"][ok].astype(np.float64)
            nfe_actual = int(st["nfe"].max())
            base = {
                "model": cell.info["model_label"],
                "sampler": cell.info["sampler_label"],
                "nfe": int(cell.info["nfe"]),
                "guidance": float(cell.info["guidance"]),
                "n_images": int(ok.sum()),
                "sec_per_image": timing["sec_per_image_total"],
                "nfe_actual": nfe_actual,
            }
            for name in names:
                if name == "fd_exact":
                    value, lo, hi = analytic.fd_exact(x, model, reps)
                else:
                    errs, floors = [], []
                    for _, _, path in cell.shards():
                        shard = store.read_shard(path)
                        keep = shard["finite"]
                        ref, floor = analytic.reference_solution(
                            model,
                            cfg["model"],
                            int(cfg["seed"]),
                            float(cfg["guidance"]),
                            shard["indices"],
                            shard["labels"],
                            cache_dir,
                            rtol,
                        )
                        errs.append(analytic.per_sample_traj_err(shard["samples"][keep], ref[keep]))
                        floors.append(analytic.per_sample_traj_err(floor[keep], ref[keep]))
                    n_ok = int(ok.sum())
                    value, lo, hi = analytic.traj_err(np.concatenate(errs)[:n_ok], reps)
                    floor_key = f"{cell.info['model_label']} guidance={float(cfg['guidance']):g}"
                    schedule_floors[floor_key] = float(np.concatenate(floors)[:n_ok].mean())
                rows.append({**base, "metric": name, "value": value, "ci_low": lo, "ci_high": hi})
            progress.advance(task)
    for label in sorted(not_applicable):
        console.print(
            f"{', '.join(names)} apply to model=gmm only; {label} cells get timings only "
            "(image metrics come with the metrics issue)"
        )
    if timings:
        tpath = run_dir / "timings.csv"
        tnew = pd.DataFrame(timings)
        if tpath.exists():
            tnew = pd.concat([pd.read_csv(tpath), tnew]).drop_duplicates(
                subset=["model", "sampler", "nfe", "guidance"], keep="last"
            )
        store.atomic_write_text(
            tpath, tnew.sort_values(["model", "sampler", "nfe", "guidance"]).to_csv(index=False)
        )
    new = pd.DataFrame(rows, columns=COLUMNS)
    path = run_dir / "metrics.csv"
    if path.exists():
        old = pd.read_csv(path)
        merged = pd.concat([old, new]).drop_duplicates(subset=KEY, keep="last")
    else:
        merged = new
    merged = merged.sort_values(KEY).reset_index(drop=True)
    store.atomic_write_text(path, merged.to_csv(index=False))
    protocol = {
        "metrics": {
            "fd_exact": "Frechet distance of sample mean/covariance to the mixture's closed-form moments, "
            "bootstrap bias-corrected (2 T - mean of resampled T)",
            "traj_err": "mean over samples of the per-sample RMS distance to the exact probability-flow ODE "
            f"solution (scipy DOP853, rtol=atol={rtol}) from the same x_T and condition",
        },
        "traj_err_floor": {
            "meaning": "traj_err of an exact solve to sigma(t=0) followed by the exact denoiser's jump to 0: "
            "every sampler on this discrete schedule converges to that point, not to the exact sample",
            "values": schedule_floors,
        },
        "interval": f"95% bootstrap over samples, {reps} resamples (basic interval for fd_exact, "
        "percentile for means)",
        "nfe": "model evaluations per sample, counted outside guidance",
        "sec_per_image": "sampling plus decoding wall time per sample, device-synchronised; model load and "
        "warm-up batches (the first of each sampler in a worker) excluded",
        "versions": versions(),
        "git_commit": git_commit(),
    }
    store.write_json(run_dir / "metrics.protocol.json", protocol)
    for key, value in schedule_floors.items():
        console.print(f"traj_err floor of the discrete schedule ({key}): {value:.2e}")
    return merged
