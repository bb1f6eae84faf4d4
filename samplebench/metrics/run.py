"""The metrics stage: stream each finished cell's shards, append rows to metrics.csv."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import Progress

from samplebench import store
from samplebench.errors import UsageError
from samplebench.metrics import analytic
from samplebench.metrics.names import ALL, ANALYTIC
from samplebench.models import load_model
from samplebench.provenance import git_commit, versions
from samplebench.report import KEY_COLUMNS, METRICS_COLUMNS

COLUMNS = list(METRICS_COLUMNS)  # one definition of metrics.csv, shared with the report
KEY = list(KEY_COLUMNS)


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


def _known() -> tuple[str, ...]:
    return ALL


def _score_gmm(
    cell: store.CellRecord,
    names: list[str],
    model: Any,
    cfg: dict[str, Any],
    cache_dir: Path,
    floors_out: dict[str, float],
):
    """fd_exact and traj_err rows, per-sample traj_err, and the protocol of each."""
    from samplebench.metrics.image import CellScores

    out = CellScores()
    reps = int(cfg.get("bootstrap", 1000))
    rtol = float(cfg.get("ode_rtol", 1e-10))
    st = _cell_samples(cell)
    ok = st["finite"]
    info = cell.info["config"]
    if "fd_exact" in names:
        value, lo, hi = analytic.fd_exact(st["samples"][ok].astype(np.float64), model, reps)
        out.rows.append(dict(metric="fd_exact", value=value, ci_low=lo, ci_high=hi))
        out.protocols["fd_exact"] = {
            "definition": "Frechet distance of sample mean/covariance to the mixture's closed-form moments, "
            "bootstrap bias-corrected (2 T - mean of resampled T)",
            "interval": f"basic bootstrap over samples, {reps} resamples",
        }
    if "traj_err" in names:
        errs, floors = [], []
        for _, _, path in cell.shards():
            shard = store.read_shard(path, ("samples", "indices", "labels", "finite"))
            keep = shard["finite"]
            ref, floor = analytic.reference_solution(
                model,
                info["model"],
                int(info["seed"]),
                float(info["guidance"]),
                shard["indices"],
                shard["labels"],
                cache_dir,
                rtol,
            )
            errs.append(analytic.per_sample_traj_err(shard["samples"][keep], ref[keep]))
            floors.append(analytic.per_sample_traj_err(floor[keep], ref[keep]))
        n_ok = int(ok.sum())
        per = np.concatenate(errs)[:n_ok]
        value, lo, hi = analytic.traj_err(per, reps)
        out.rows.append(dict(metric="traj_err", value=value, ci_low=lo, ci_high=hi))
        out.per_image["traj_err"] = per
        floor = float(np.concatenate(floors)[:n_ok].mean())
        floors_out[f"{cell.info['model_label']} guidance={float(info['guidance']):g}"] = floor
        out.protocols["traj_err"] = {
            "definition": "mean over samples of the per-sample RMS distance to the exact probability-flow "
            "ODE "
            f"solution (scipy DOP853, rtol=atol={rtol}) from the same x_T and condition",
            "schedule_floor": f"{floor:.3e} (exact solve to sigma(t=0), then the exact denoiser's jump to 0: "
            "every sampler on this discrete schedule converges to that point)",
            "interval": f"percentile bootstrap over samples, {reps} resamples",
        }
    return out


def _merge_csv(path: Path, new: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    if path.exists():
        new = pd.concat([pd.read_csv(path), new]).drop_duplicates(subset=key, keep="last")
    new = new.sort_values(key).reset_index(drop=True)
    store.atomic_write_text(path, new.to_csv(index=False))
    return new


def paired_comparisons(per_image: pd.DataFrame, reps: int = 2000) -> pd.DataFrame:
    """For each (model, nfe, guidance, metric) and each pair of samplers on the same images: the mean
    per-image difference, its bootstrap interval and p-value."""
    from samplebench.metrics.stats import paired_difference

    rows = []
    for (model, nfe, guidance, metric), group in per_image.groupby(["model", "nfe", "guidance", "metric"]):
        wide = group.pivot_table(index="index", columns="sampler", values="value").dropna()
        samplers = sorted(wide.columns)
        for i, a in enumerate(samplers):
            for b in samplers[i + 1 :]:
                r = paired_difference(wide[a].to_numpy(), wide[b].to_numpy(), reps)
                rows.append(
                    {
                        "model": model,
                        "nfe": nfe,
                        "guidance": guidance,
                        "metric": metric,
                        "sampler_a": a,
                        "sampler_b": b,
                        **r,
                        "n_images": len(wide),
                        "significant": r["p_value"] < 0.05,
                    }
                )
    columns = [
        "model",
        "nfe",
        "guidance",
        "metric",
        "sampler_a",
        "sampler_b",
        "diff",
        "ci_low",
        "ci_high",
        "p_value",
        "n_images",
        "significant",
    ]
    return pd.DataFrame(rows, columns=columns)


def compute_metrics(
    run_dir: Path, metrics_cfg: dict[str, Any], console: Console | None = None
) -> pd.DataFrame:
    """Score every finished cell of a run; rows for the same key are replaced, others kept."""
    from samplebench.metrics.image import NEEDS_REF, ImageContext, score_image_cell
    from samplebench.models.base import pick_device

    console = console or Console(stderr=True)
    names = list(metrics_cfg["names"])
    unknown = [m for m in names if m not in _known()]
    if unknown:
        raise UsageError(f"metric {unknown[0]} is unknown; choose from {', '.join(_known())}")
    cells = store.find_cells(run_dir)
    finished = [c for c in cells if c.complete()]
    for c in cells:
        if not c.complete():
            rel = c.path.relative_to(run_dir)
            console.print(f"[yellow]skipping unfinished cell {rel}; re-run generate[/]")
    has_images = any(c.info["config"]["model"]["name"] != "gmm" for c in finished)
    if not metrics_cfg.get("ref") and any(n in NEEDS_REF for n in names):
        skipped = [n for n in names if n in NEEDS_REF]
        names = [n for n in names if n not in NEEDS_REF]
        if has_images:
            console.print(f"{', '.join(skipped)} skipped: they need reference images, set metrics.ref=")
    cache_root = run_dir.parent / ".cache"
    ctx = ImageContext(metrics_cfg, cache_root, str(pick_device(str(metrics_cfg.get("device", "auto")))))
    rows: list[dict[str, Any]] = []
    per_image_rows: list[pd.DataFrame] = []
    row_protocols: dict[str, dict[str, Any]] = {}
    models: dict[str, Any] = {}
    timings: list[dict[str, Any]] = []
    floors: dict[str, float] = {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("metrics", total=len(finished))
        for cell in finished:
            cfg = cell.info["config"]
            timing = timing_row(cell)
            timings.append(timing)
            if cfg["model"]["name"] == "gmm":
                mh = cell.info["model_hash"]
                if mh not in models:
                    models[mh] = load_model(cfg["model"], "cpu")
                scores = _score_gmm(
                    cell,
                    [n for n in names if n in ANALYTIC],
                    models[mh],
                    metrics_cfg,
                    cache_root / "traj",
                    floors,
                )
            else:
                scores = score_image_cell(ctx, cell, [n for n in names if n not in ANALYTIC])
            if timing["non_finite"]:
                console.print(
                    f"[red]{cell.path.relative_to(run_dir)}: {timing['non_finite']} non-finite samples "
                    "excluded from its metrics[/]"
                )
            base = {
                "model": cell.info["model_label"],
                "sampler": cell.info["sampler_label"],
                "nfe": int(cell.info["nfe"]),
                "guidance": float(cell.info["guidance"]),
                "n_images": timing["n_images"] - timing["non_finite"],
                "sec_per_image": timing["sec_per_image_total"],
                "nfe_actual": timing["nfe_actual"],
            }
            for r in scores.rows:
                rows.append({**base, **r})
                key = (
                    "|".join(str(base[k]) for k in ("model", "sampler", "nfe", "guidance"))
                    + f"|{r['metric']}"
                )
                row_protocols[key] = {
                    **scores.protocols.get(r["metric"], {}),
                    "n_images": str(base["n_images"]),
                }
            for metric, values in scores.per_image.items():
                per_image_rows.append(
                    pd.DataFrame(
                        {
                            **{k: base[k] for k in ("model", "sampler", "nfe", "guidance")},
                            "metric": metric,
                            "index": np.arange(len(values)),
                            "value": values,
                        }
                    )
                )
            progress.advance(task)
    if timings:
        _merge_csv(run_dir / "timings.csv", pd.DataFrame(timings), ["model", "sampler", "nfe", "guidance"])
    merged = _merge_csv(run_dir / "metrics.csv", pd.DataFrame(rows, columns=COLUMNS), KEY)
    if per_image_rows:
        per_image = pd.concat(per_image_rows)
        pi_path = run_dir / "per_image.parquet"
        if pi_path.exists():
            per_image = pd.concat([pd.read_parquet(pi_path), per_image]).drop_duplicates(
                subset=[*KEY, "index"], keep="last"
            )
        buf = __import__("io").BytesIO()
        per_image.to_parquet(buf, index=False)
        store.atomic_write_bytes(pi_path, buf.getvalue())
        _merge_csv(
            run_dir / "paired.csv",
            paired_comparisons(per_image),
            ["model", "nfe", "guidance", "metric", "sampler_a", "sampler_b"],
        )
    sidecar_path = run_dir / "metrics.protocol.json"
    old = json.loads(sidecar_path.read_text()) if sidecar_path.exists() else {}
    protocol = {
        "rows": {**old.get("rows", {}), **row_protocols},
        "traj_err_floor": {**old.get("traj_err_floor", {}), **floors},
        "nfe": "model evaluations per sample, counted outside guidance",
        "sec_per_image": "sampling plus decoding wall time per sample, device-synchronised; model load and "
        "warm-up batches (the first of each sampler in a worker) excluded",
        "versions": versions(),
        "git_commit": git_commit(),
    }
    store.write_json(sidecar_path, protocol)
    for key, value in floors.items():
        console.print(f"traj_err floor of the discrete schedule ({key}): {value:.2e}")
    if ctx.recomputed:
        console.print(f"{ctx.recomputed} feature or reference blocks computed (the rest came from the cache)")
    return merged
