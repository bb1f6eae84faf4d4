"""The metrics stage: stream each finished cell's shards, append rows to metrics.csv."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from samplebench import store
from samplebench.errors import UsageError
from samplebench.memory import release_freed_memory
from samplebench.metrics import analytic, preflight
from samplebench.metrics.names import ALL, ANALYTIC, TEXT
from samplebench.metrics.reference import ReferenceSolveError
from samplebench.models import is_analytic, load_model
from samplebench.provenance import git_commit, versions
from samplebench.report import FILE_KEY_COLUMNS, METRICS_COLUMNS, NONFINITE

COLUMNS = list(METRICS_COLUMNS)  # one definition of metrics.csv, shared with the report
KEY = list(FILE_KEY_COLUMNS)
CELL_KEY = KEY[:-1]
# Fewer finite samples than this leave nothing to score (a covariance needs two): such a cell gets NaN rows.
MIN_FINITE = 2


def _finite_samples(cell: store.CellRecord) -> np.ndarray:
    """The finite ones of a cell's first num_images samples, in their stored dtype, read shard by shard
    (one copy of them is held, not a second concatenated one)."""
    n = int(cell.info["num_images"])
    parts, seen = [], 0
    for _, _, path in cell.shards():
        shard = store.read_shard(path, ("samples", "finite"))
        take = max(0, min(len(shard["finite"]), n - seen))
        parts.append(shard["samples"][:take][shard["finite"][:take]])
        seen += len(shard["finite"])
    return np.concatenate(parts)


def finite_flags(cell: store.CellRecord) -> np.ndarray:
    """Per sample of the cell's first num_images (the ones its metrics cover): no NaN or inf in it."""
    parts = [store.read_shard(p, ("finite",))["finite"] for _, _, p in cell.shards()]
    return np.concatenate(parts)[: int(cell.info["num_images"])].astype(bool)


def _unscorable(names: list[str], n_total: int):
    """NaN rows for every metric of a cell with (almost) no finite samples: the cell stays visible as
    excluded in metrics.csv (n_images=0 or 1) instead of vanishing or stopping the pass."""
    from samplebench.metrics.image import CellScores

    out = CellScores()
    nan = float("nan")
    for name in names:
        out.rows.append(dict(metric=name, value=nan, ci_low=nan, ci_high=nan))
        out.protocols[name] = {
            "excluded": f"not computed: fewer than {MIN_FINITE} of {n_total} samples finite"
        }
    return out


def _nonfinite_row(n_bad: int, n_total: int) -> dict[str, Any]:
    """The cell's share of non-finite samples; n_images is the cell's whole sample count, so the count
    is value * n_images."""
    nan = float("nan")
    return dict(metric=NONFINITE, value=n_bad / n_total, ci_low=nan, ci_high=nan, n_images=n_total)


TIMING_KEYS = (
    "nfe",
    "finite",
    "batch_sizes",
    "batch_seconds",
    "batch_model_seconds",
    "batch_decode_seconds",
    "batch_kind",
    "batch_warmup",
    "batch_compile_seconds",
)


def _batch_kinds(part: dict[str, np.ndarray]) -> np.ndarray:
    """ "sample", "repeat" or "warmup" per timed call (shards made before timing-only calls: from the
    old warm-up flag, which marked a real batch whose time was left out)."""
    if "batch_kind" in part:
        return part["batch_kind"].astype(str)
    warm = part.get("batch_warmup", np.zeros(len(part["batch_sizes"]), bool))
    return np.where(warm, "warmup-batch", "sample")


def timing_row(cell: store.CellRecord) -> dict[str, Any]:
    """Per-cell timing from the shards' per-call records.

    The figure is the median over timed calls (the cell's batches and its timing-only repeats, see
    generate.run_repeats, in timing-*.npz) of seconds per sample, with their min and max as its spread;
    a smaller last batch is left out when full ones exist (per-sample cost depends on batch size).
    Warm-up calls are never timed in: their cost is reported apart. A cell with nothing else (made
    before warm-up calls existed, one batch) falls back to its warm-up batch and says so in
    `timing_note`.
    """
    parts = [store.read_shard(p, TIMING_KEYS) for _, _, p in cell.shards()]
    repeats = [store.read_shard(p, TIMING_KEYS) for p in cell.timing_files()]
    nfe_actual = int(max(int(p["nfe"].max()) for p in parts))
    parts += repeats
    sizes = np.concatenate([p["batch_sizes"] for p in parts])
    kinds = np.concatenate([_batch_kinds(p) for p in parts])

    def column(key: str) -> np.ndarray:
        return np.concatenate([p.get(key, np.zeros(len(p["batch_sizes"]))) for p in parts]).astype(float)

    sampling, decode = column("batch_seconds"), column("batch_decode_seconds")
    timed = (kinds == "sample") | (kinds == "repeat")
    note = ""
    if not timed.any():
        timed, note = kinds != "warmup", "warm-up batch only (made before timed repeats)"
    full = timed & (sizes == sizes[timed].max())
    busy = sampling[full].sum()
    model_share = column("batch_model_seconds")[full].sum() / busy if busy else float("nan")
    rate_sampling, rate_decode = sampling[full] / sizes[full], decode[full] / sizes[full]
    rate_total = rate_sampling + rate_decode
    # warm-up calls, and any call that compiled the network (model.compile: a shape no warm-up compiled)
    warm = (kinds == "warmup") | (kinds == "warmup-batch") | (kinds == "compiled")
    info = cell.info
    flags = finite_flags(cell)
    return {
        "model": info["model_label"],
        "sampler": info["sampler_label"],
        "schedule": info.get("schedule_label", ""),
        "nfe": int(info["nfe"]),
        "guidance": float(info["guidance"]),
        "n_images": len(flags),
        "n_timed": int(full.sum()),
        "nfe_actual": nfe_actual,
        "non_finite": int((~flags).sum()),
        "sec_per_image_sampling": float(np.median(rate_sampling)),
        "sec_per_image_decode": float(np.median(rate_decode)),
        "sec_per_image_total": float(np.median(rate_total)),
        "sec_per_image_min": float(rate_total.min()),
        "sec_per_image_max": float(rate_total.max()),
        "warmup_seconds": float((sampling[warm] + decode[warm]).sum()),
        "compile_seconds": float(column("batch_compile_seconds").sum()),  # within warmup_seconds
        "model_call_share": float(model_share),
        "timing_note": note,
    }


def report_skipped(checked: preflight.Preflight, console: Console) -> None:
    """One line per metric skipped for a missing prerequisite (metrics.on_missing=skip)."""
    for metric, why in checked.skipped.items():
        console.print(
            f"[yellow]skipping {metric}[/] (metrics.on_missing=skip): {escape(why)}", soft_wrap=True
        )


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
    info = cell.info["config"]
    if "fd_exact" in names:
        value, lo, hi = analytic.fd_exact(_finite_samples(cell), model, reps)  # sums in float64
        release_freed_memory()
        out.rows.append(dict(metric="fd_exact", value=value, ci_low=lo, ci_high=hi))
        out.protocols["fd_exact"] = {
            "definition": "Frechet distance of sample mean/covariance to the mixture's closed-form moments, "
            "bootstrap bias-corrected (2 T - mean of resampled T)",
            "interval": f"basic bootstrap over samples, {reps} resamples",
        }
    against_exact = [m for m in ("traj_err", "mmd_exact") if m in names]
    if against_exact:
        try:
            _exact_reference_rows(out, cell, model, info, cache_dir, rtol, reps, floors_out, names, cfg)
        except ReferenceSolveError as e:
            nan = float("nan")
            for metric in against_exact:
                out.rows.append(dict(metric=metric, value=nan, ci_low=nan, ci_high=nan))
                out.protocols[metric] = {"excluded": f"not computed: {e}"}
                out.warnings.append(f"{metric} not computed: {e}; the cell's other metrics are")
    return out


def _exact_reference_rows(
    out: Any,
    cell: store.CellRecord,
    model: Any,
    info: dict[str, Any],
    cache_dir: Path,
    rtol: float,
    reps: int,
    floors_out: dict[str, float],
    names: tuple[str, ...] | list[str] = ("traj_err",),
    cfg: dict[str, Any] | None = None,
) -> None:
    """The rows, per-sample values and protocols of the metrics measured against the exact ODE's
    endpoints (traj_err, mmd_exact) for a cell of the analytic model."""
    errs, floors, kept, generated, exact = [], [], [], [], []
    n = int(cell.info["num_images"])
    # The exact solve starts where the cell's grid starts (shared by every grid that starts at sigma_max).
    start = (cell.info.get("sigmas") or [None])[0]
    if start is not None and abs(start / model.noise_schedule.sigma_max - 1) < 1e-9:
        start = None
    flow = model.noise_schedule.is_flow
    # A flow grid ends at t = 0 after its last positive level: the floor is set there (reference.py).
    positive = [s for s in (cell.info.get("sigmas") or []) if s > 0]
    floor_level = float(positive[-1]) if flow and positive else None
    for _, _, path in cell.shards():
        shard = store.read_shard(path, ("samples", "indices", "labels", "finite"))
        keep = shard["finite"] & (shard["indices"] < n)  # the samples fd_exact and n_images cover
        kept.append(shard["indices"][keep])
        ref, floor = analytic.reference_solution(
            model,
            info["model"],
            int(info["seed"]),
            float(info["guidance"]),
            shard["indices"],
            shard["labels"],
            cache_dir,
            rtol,
            start,
            floor_level,
        )
        errs.append(analytic.per_sample_traj_err(shard["samples"][keep], ref[keep]))
        floors.append(analytic.per_sample_traj_err(floor[keep], ref[keep]))
        if "mmd_exact" in names:
            generated.append(shard["samples"][keep])
            exact.append(ref[keep])
        del shard, ref, floor
        release_freed_memory()  # the solve's freed buffers, before the next shard's solve
    per = np.concatenate(errs)
    out.indices = np.concatenate(kept)
    if "mmd_exact" in names:
        _mmd_rows(out, model, np.concatenate(generated), np.concatenate(exact), cfg or {}, reps)
        del generated, exact
    if "traj_err" not in names:
        return
    value, lo, hi = analytic.traj_err(per, reps)
    out.rows.append(dict(metric="traj_err", value=value, ci_low=lo, ci_high=hi))
    out.per_image["traj_err"] = per
    floor = float(np.concatenate(floors).mean())
    if flow:
        t_f = floor_level / (1 + floor_level) if floor_level is not None else float("nan")
        floors_out[f"{cell.info['model_label']} t_last={t_f:.4g} guidance={float(info['guidance']):g}"] = (
            floor
        )
        ode = "flow ODE dx_t/dt = v_u + w (v_c - v_u) in flow time"
        floor_text = (
            f"{floor:.3e} (exact solve to the grid's last positive flow time t={t_f:.4g}, then the exact "
            "denoiser's jump to t = 0, the last step every flow sampler takes: samplers on grids that "
            "keep that level converge to this point)"
        )
    else:
        floors_out[f"{cell.info['model_label']} guidance={float(info['guidance']):g}"] = floor
        ode = "probability-flow ODE"
        floor_text = (
            f"{floor:.3e} (exact solve to sigma(t=0), then the exact denoiser's jump to 0: "
            "every sampler on this discrete schedule converges to that point)"
        )
    out.protocols["traj_err"] = {
        "definition": f"mean over samples of the per-sample RMS distance to the exact {ode} "
        f"solution (scipy DOP853, rtol=atol={rtol}) from the same x_T and condition",
        "schedule_floor": floor_text,
        "interval": f"percentile bootstrap over samples, {reps} resamples",
    }


def _mmd_rows(
    out: Any, model: Any, generated: np.ndarray, exact: np.ndarray, cfg: dict[str, Any], reps: int
) -> None:
    """mmd_exact's row, per-sample values (psi_i, analytic.coupled_mmd) and protocol."""
    from samplebench.metrics.stats import mean_ci

    width = (cfg.get("mmd") or {}).get("bandwidth", "auto")
    h = analytic.mmd_bandwidth(model) if width in (None, "auto") else float(width)
    if len(generated) < 2:
        nan = float("nan")
        out.rows.append(dict(metric="mmd_exact", value=nan, ci_low=nan, ci_high=nan))
        out.protocols["mmd_exact"] = {"excluded": "not computed: fewer than two finite samples"}
        return
    value, psi = analytic.coupled_mmd(generated, exact, h)
    _, lo, hi = mean_ci(psi, reps)
    out.rows.append(dict(metric="mmd_exact", value=value, ci_low=lo, ci_high=hi))
    out.per_image["mmd_exact"] = psi
    out.protocols["mmd_exact"] = {
        "definition": "unbiased squared MMD, Gaussian kernel exp(-|x - y|^2 / (2 h^2)), between the samples "
        "and the exact ODE endpoints from the same x_T and condition (the traj_err reference: exact draws of "
        "the exact model), cross terms over pairs of different seeds only",
        "bandwidth": f"h = {h:.6g}"
        + (
            " (auto: h^2 = 2 sum_k pi_k tr S_k, the mean squared distance between two draws of one component)"
            if width in (None, "auto")
            else " (metrics.mmd.bandwidth)"
        ),
        "interval": f"percentile bootstrap of the mean of per-sample values psi_i (estimate plus influence "
        f"function), {reps} resamples",
    }


def _merge_csv(path: Path, new: pd.DataFrame, key: list[str], keep_old) -> pd.DataFrame:
    """Old rows that `keep_old` (a function of the old frame -> bool Series) keeps, with new rows of the
    same key replacing them."""
    if path.exists():
        old = pd.read_csv(path)
        old = old[keep_old(old)] if len(old) else old
        new = pd.concat([old, new]).drop_duplicates(subset=key, keep="last")
    new = new.sort_values(key).reset_index(drop=True)
    store.atomic_write_text(path, new.to_csv(index=False))
    return new


def _stale_cells(path: Path, finished: set[tuple[Any, ...]]) -> list[str]:
    """Cells with rows in an old metrics.csv that are no longer finished on disk (a shard deleted, a cell
    folder removed or grown): their rows are dropped, never reported as if still measured."""
    if not path.exists():
        return []
    old = pd.read_csv(path)
    gone = sorted(set(store.frame_keys(old, CELL_KEY)) - finished) if len(old) else []
    return [" · ".join(str(x) for x in k if x != "") for k in gone]


def paired_comparisons(per_image: pd.DataFrame, reps: int = 2000) -> pd.DataFrame:
    """For each (model, nfe, guidance, metric) and each pair of samplers on the same images: the mean
    per-image difference, its bootstrap interval and p-value."""
    from samplebench.metrics.stats import paired_difference

    rows = []
    for (model, nfe, guidance, metric), group in per_image.groupby(["model", "nfe", "guidance", "metric"]):
        wide = group.pivot_table(index="index", columns="sampler", values="value").dropna()
        if len(wide) < 2:  # no images scored by every sampler (e.g. non-finite ones excluded): no test
            continue
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
    run_dir: Path,
    metrics_cfg: dict[str, Any],
    console: Console | None = None,
    checked: preflight.Preflight | None = None,
) -> pd.DataFrame:
    """Score every finished cell of a run; rows for the same key are replaced, others kept. The metrics'
    prerequisites are checked first (preflight), unless `checked` says what the sweep's check found."""
    from samplebench.metrics.image import ImageContext, score_image_cell
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
    if checked is None:
        checked = preflight.check(metrics_cfg, preflight.targets_of_records(finished), "nothing was scored")
        report_skipped(checked, console)
    names = checked.names
    cache_root = run_dir.parent / ".cache"
    ctx = ImageContext(metrics_cfg, cache_root, str(pick_device(str(metrics_cfg.get("device", "auto")))))
    rows: list[dict[str, Any]] = []
    per_image_rows: list[pd.DataFrame] = []
    row_protocols: dict[str, dict[str, Any]] = {}
    models: dict[str, Any] = {}
    timings: list[dict[str, Any]] = []
    floors: dict[str, float] = {}
    scored_cells: set[tuple[Any, ...]] = set()  # (model, sampler, nfe, guidance) scored in this pass
    scored: set[tuple[Any, ...]] = set()  # the same with each metric requested for the cell
    nonfinite: list[str] = []  # their folders, for cells with non-finite samples
    excluded: list[str] = []  # metrics of a cell that could not be computed, with why
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("metrics", total=len(finished))
        for cell in finished:
            cfg = cell.info["config"]
            timing = timing_row(cell)
            timings.append(timing)
            gmm = is_analytic(cfg["model"]["name"])
            wanted = [n for n in names if (n in ANALYTIC) == gmm]
            if cell.condition_kind != "text":  # no prompt to score an image against
                wanted = [n for n in wanted if n not in TEXT]
            finite = finite_flags(cell)
            n_total, n_ok = len(finite), int(finite.sum())
            if n_ok < MIN_FINITE:
                scores = _unscorable(wanted, n_total)
            elif gmm:
                mh = cell.info["model_hash"]
                if mh not in models:
                    models[mh] = load_model(cfg["model"], "cpu")
                scores = _score_gmm(cell, wanted, models[mh], metrics_cfg, cache_root / "traj", floors)
            else:
                scores = score_image_cell(ctx, cell, wanted)
            base = {
                "model": cell.info["model_label"],
                "sampler": cell.info["sampler_label"],
                "schedule": cell.info.get("schedule_label", ""),
                "nfe": int(cell.info["nfe"]),
                "guidance": float(cell.info["guidance"]),
                "n_images": n_ok,
                "sec_per_image": timing["sec_per_image_total"],
                "sec_per_image_min": timing["sec_per_image_min"],
                "sec_per_image_max": timing["sec_per_image_max"],
                "nfe_actual": timing["nfe_actual"],
            }
            cell_key = tuple(base[k] for k in CELL_KEY)
            scored_cells.add(cell_key)
            scored.update((*cell_key, name) for name in wanted)
            cell_rows = [{**base, **r} for r in scores.rows]
            for line in scores.warnings:
                rel = str(cell.path.relative_to(run_dir))
                excluded.append(f"{rel}: {line}")
                console.print(
                    f"[yellow]warning:[/] {escape(rel)}: {escape(line)}", highlight=False, soft_wrap=True
                )
            if n_ok < n_total:
                rel = str(cell.path.relative_to(run_dir))
                nonfinite.append(rel)
                what = (
                    "no metrics for this cell"
                    if n_ok < MIN_FINITE
                    else f"excluded, its metrics use the {n_ok} finite ones"
                )
                console.print(
                    f"[yellow]warning:[/] {escape(rel)}: {n_total - n_ok} of {n_total} samples non-finite "
                    f"(NaN or inf); {what}",
                    highlight=False,
                    soft_wrap=True,
                )
                cell_rows.append({**base, **_nonfinite_row(n_total - n_ok, n_total)})
                scores.protocols[NONFINITE] = {
                    "definition": "share of the cell's samples with a NaN or inf element; they are "
                    "excluded from every other metric of the cell (n_images counts the finite ones)",
                }
            for row in cell_rows:
                rows.append(row)
                key = "|".join(str(row[k]) for k in KEY)
                row_protocols[key] = {
                    **scores.protocols.get(row["metric"], {}),
                    "n_images": str(row["n_images"]),
                }
            for metric, values in scores.per_image.items():
                index = scores.indices if scores.indices is not None else np.arange(len(values))
                per_image_rows.append(
                    pd.DataFrame(
                        {
                            **{k: base[k] for k in CELL_KEY},
                            # paired tests compare solvers (sampler on schedule), as leaderboards rank them
                            "sampler": store.solver_label(base["sampler"], base["schedule"]),
                            "metric": metric,
                            "index": index,
                            "value": values,
                        }
                    )
                )
            progress.advance(task)
    finished_keys = {c.cell_key for c in finished}
    stale = _stale_cells(run_dir / "metrics.csv", finished_keys)
    cell_cols = ["model", "sampler", "schedule", "nfe", "guidance"]
    if timings or (run_dir / "timings.csv").exists():
        _merge_csv(
            run_dir / "timings.csv",
            pd.DataFrame(timings, columns=list(timings[0]) if timings else cell_cols),
            cell_cols,
            lambda old: store.frame_keys(old, cell_cols).isin(finished_keys),
        )
    # A cell scored again keeps no non-finite row from an earlier pass unless it still has some.
    merged = _merge_csv(
        run_dir / "metrics.csv",
        pd.DataFrame(rows, columns=COLUMNS),
        KEY,
        lambda old: (
            store.frame_keys(old, CELL_KEY).isin(finished_keys)
            & ~((old["metric"] == NONFINITE) & store.frame_keys(old, CELL_KEY).isin(scored_cells))
        ),
    )
    pi_path = run_dir / "per_image.parquet"
    parts = list(per_image_rows)
    if pi_path.exists():
        # A cell's per-image values of a metric scored again replace the old ones as a whole (images now
        # excluded as non-finite must not keep values from an earlier pass); cells no longer finished go.
        # per_image's `sampler` is the solver label (sampler · schedule), as paired tests compare solvers.
        old_pi = pd.read_parquet(pi_path)
        solver = ["model", "sampler", "nfe", "guidance"]
        as_solver = {(m, store.solver_label(s, c), n, g) for m, s, c, n, g in finished_keys}
        rescored = {(m, store.solver_label(s, c), n, g, x) for m, s, c, n, g, x in scored}
        keep = store.frame_keys(old_pi, solver).isin(as_solver)
        keep &= ~store.frame_keys(old_pi, [*solver, "metric"]).isin(rescored)
        parts.insert(0, old_pi[keep])
    if parts:
        per_image = pd.concat(parts)
        buf = __import__("io").BytesIO()
        per_image.to_parquet(buf, index=False)
        store.atomic_write_bytes(pi_path, buf.getvalue())
        # Made from every per-image value of the run, so it replaces the old file (no stale pairs).
        paired_key = ["model", "nfe", "guidance", "metric", "sampler_a", "sampler_b"]
        paired = paired_comparisons(per_image).sort_values(paired_key).reset_index(drop=True)
        store.atomic_write_text(run_dir / "paired.csv", paired.to_csv(index=False))
    if stale:
        console.print(
            f"[yellow]warning:[/] dropped the metric rows of {len(stale)} cells no longer finished on disk "
            f"(shards deleted or cells grown): {escape('; '.join(stale))}; re-run generate to finish them",
            highlight=False,
            soft_wrap=True,
        )
    kept_rows = {"|".join(str(r[c]) for c in KEY) for r in merged.to_dict("records")}
    sidecar_path = run_dir / "metrics.protocol.json"
    old = json.loads(sidecar_path.read_text()) if sidecar_path.exists() else {}
    protocol = {
        "rows": {k: v for k, v in {**old.get("rows", {}), **row_protocols}.items() if k in kept_rows},
        "skipped": checked.skipped,
        "traj_err_floor": {**old.get("traj_err_floor", {}), **floors},
        "nfe": "model evaluations per sample, counted outside guidance",
        "sec_per_image": "sampling plus decoding wall time per sample, device-synchronised: the median over "
        "a cell's timed calls (its full-size batches, plus timing-only repeats of its first batch up to "
        "timing.repeats), sec_per_image_min/max their range; model load and each sampler's untimed "
        "warm-up call per worker excluded (timings.csv warmup_seconds)",
        "versions": versions(),
        "git_commit": git_commit(),
    }
    store.write_json(sidecar_path, protocol)
    for key, value in floors.items():
        console.print(f"traj_err floor of the schedule's last level ({key}): {value:.2e}")
    if ctx.recomputed:
        console.print(f"{ctx.recomputed} feature or reference blocks computed (the rest came from the cache)")
    if nonfinite:
        console.print(
            f"[yellow]warning:[/] {len(nonfinite)} of {len(finished)} cells had non-finite samples, "
            f"excluded from their metrics: {escape(', '.join(nonfinite))}",
            highlight=False,
            soft_wrap=True,
        )
    return merged
