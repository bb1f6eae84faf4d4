"""The generation worker: loads each model once, runs all of its cells, writes shards.

Sample i of a cell starts from x_T and condition derived from (seed, i) alone, so shards can be
made in any order, by any batch size, and resumed after a crash with identical results.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from samplebench import speed, store
from samplebench.config import Cell
from samplebench.errors import UsageError
from samplebench.models import is_analytic, load_model
from samplebench.prompts import load_labels, load_prompts
from samplebench.samplers import get_sampler
from samplebench.samplers.base import CountingDenoiser, SamplerContext, guided_denoiser
from samplebench.schedules import Grid, make_grid
from samplebench.seeds import STREAM_NOISE, initial_noise, sample_seed, sampler_generators


@dataclass(frozen=True)
class GenerationSummary:
    run_dir: Path
    cells: int
    shards_written: int
    shards_skipped: int
    model_load_seconds: dict[str, float]


def steps_for(cell: Cell) -> int:
    """Solver steps for the cell's NFE budget (a one-line error if it cannot be spent)."""
    spec = get_sampler(cell.sampler["name"])
    spec.check(_sampler_options(cell))
    if spec.model_check is not None:
        spec.model_check(_sampler_options(cell), cell.model)
    rule = spec.rule(_sampler_options(cell), cell.schedule)
    steps = rule.steps(cell.nfe, cell.sampler["name"], bool(cell.config["allow_lower_nfe"]))
    if spec.steps_check is not None:
        spec.steps_check(_sampler_options(cell), steps)
    return steps


def grid_for(model: Any, cell: Cell, steps: int) -> Grid:
    """The noise levels the cell's sampler visits on this model."""
    return make_grid(cell.schedule, model.noise_schedule, steps)


def _sampler_options(cell: Cell) -> dict[str, Any]:
    return {k: v for k, v in cell.sampler.items() if k != "name"}


def prepare_cell_dir(run_dir: Path, cell: Cell) -> Path:
    """Create the cell folder, or check that an existing one was made with the same config and content
    (plan.record checked it when the sweep was planned; this second look covers a sweep into the same
    run since)."""
    import json

    from samplebench.plan import changes

    path = run_dir / cell.rel_dir
    info_path = path / "cell.json"
    if info_path.exists():
        old = json.loads(info_path.read_text())
        if old.get("config_hash") != cell.config_hash:
            what = ", ".join(changes(old.get("config") or {}, cell.config))
            raise UsageError(
                f"{path}: {what} changed since it was made, so its shards would mix inputs; use a new "
                "run= name, or on_change=restart to start such cells over"
            )
        if old.get("num_images") != cell.config["num_images"]:
            old["num_images"] = cell.config["num_images"]
            store.write_json(info_path, old)
        return path
    store.write_json(
        info_path,
        {
            "model_label": cell.model_label,
            "sampler_label": cell.sampler_label,
            "schedule_label": cell.schedule_label,
            "nfe": cell.nfe,
            "guidance": cell.guidance,
            "num_images": cell.config["num_images"],
            "seed": cell.config["seed"],
            "steps": steps_for(cell),
            "shard_size": cell.config["shard_size"],
            "config_hash": cell.config_hash,
            "model_hash": cell.model_hash,
            "config": cell.config,
        },
    )
    return path


def _append_provenance(run_dir: Path, cells: list[Cell]) -> None:
    """Each generate invocation appends what made it (versions, commit, devices, resolved configs, seeds)."""
    import json

    from samplebench import provenance
    from samplebench.plan import locked

    path = run_dir / "provenance.json"
    configs = {str(c.rel_dir): {"config_hash": c.config_hash, "config": c.config} for c in cells}
    seeds = sorted({int(c.config["seed"]) for c in cells})
    # the speed switches in effect per model, with torch's TF32 flags as they will be set
    switches = {
        c.model_label: speed.describe(c.model, bool(c.config.get("allow_tf32", False))) for c in cells
    }
    entry = provenance.record(
        extra={"stage": "generate", "seeds": seeds, "cells": configs, "speed": switches}
    )
    with locked(run_dir):  # several workers append to one run's history
        history = json.loads(path.read_text()) if path.exists() else []
        history.append(entry)
        store.write_json(path, history)


def _record_grid(cell_dir: Path, grid: Grid, condition_kind: str) -> None:
    """The levels the cell visits and how they end, and what conditions the model takes (text, class,
    component, none: the metrics stage scores text metrics on text models only), in cell.json."""
    import json

    path = cell_dir / "cell.json"
    info = json.loads(path.read_text())
    if "sigmas" not in info or "condition_kind" not in info:
        info["sigmas"] = [float(v) for v in grid.sigmas]
        info["schedule_ends"] = grid.ends
        info["condition_kind"] = condition_kind
        store.write_json(path, info)


@dataclass
class _Threads:
    previous: int

    def restore(self) -> None:
        torch.set_num_threads(self.previous)


def _cpu_threads(model: Any) -> _Threads:
    """Run a model that asks for it (the analytic model: cpu_threads = 1) on that many CPU threads while
    its cells are generated; the previous count comes back with restore()."""
    previous = torch.get_num_threads()
    wanted = getattr(model, "cpu_threads", None)
    if wanted and model.device.type == "cpu":
        torch.set_num_threads(int(wanted))
    return _Threads(previous)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return "cpu"


def _recorded_shard_size(cell_dir: Path, cell: Cell) -> int:
    """Shard boundaries are fixed when a cell is first made, so resuming never overlaps shards."""
    import json

    return int(json.loads((cell_dir / "cell.json").read_text()).get("shard_size", cell.config["shard_size"]))


def missing_end(first: int, n: int, size: int) -> int:
    """Last index of the shard starting at `first`: shards end at multiples of shard_size (or at n)."""
    return min((first // size + 1) * size, n) - 1


def missing_shards(cell_dir: Path, n: int, size: int) -> list[int]:
    """First indices of the shards a cell of n samples still needs. Shards end at multiples of the
    cell's shard size; a shard cut short by an earlier, smaller num_images is followed by one that
    fills its segment up (so a cell grown by less than a shard still completes)."""
    ends = {first: last for first, last, _ in store.shard_ranges(cell_dir)}
    todo = []
    for start in range(0, n, size):
        pos, end = start, missing_end(start, n, size)
        while pos in ends and pos <= end:
            pos = ends[pos] + 1
        if pos <= end:
            todo.append(pos)
    return todo


def timing_repeats(cell: Cell, first: int, shard_size: int) -> int:
    """Timing-only repeats of the first batch of shard `first` so the cell has `timing.repeats` timed calls.

    A cell's figure is a median over timed calls and its spread their range, so a cell that is one or
    two batches long (the analytic model's default: 1000 samples, one batch) repeats its first batch
    (run_repeats). Only the worker making the shard holding sample 0 does it, so the count does not
    depend on who makes which shard.
    """
    if first != 0:
        return 0
    n, bs = int(cell.config["num_images"]), int(cell.config["batch_size"])
    planned = sum(-(-min(shard_size, n - s) // bs) for s in range(0, n, shard_size))
    return max(0, wanted_timed_calls(cell) - planned)


def wanted_timed_calls(cell: Cell) -> int:
    """timing.repeats, or with `auto` 15 for the analytic model (its calls cost milliseconds, and 15 calls
    make a re-run's median fall inside this run's min-max range for about 99.8% of cells under noise
    alone) and 3 for networks (each call costs seconds and varies little; more would multiply the cost
    of cells that are only a batch or two long)."""
    wanted = (cell.config.get("timing") or {}).get("repeats", "auto")
    if wanted in (None, "auto"):
        return 15 if is_analytic(str(cell.model.get("name"))) else 3
    return int(wanted)


@dataclass
class Batch:
    """One generated batch: what goes into a shard."""

    indices: list[int]
    samples: torch.Tensor
    labels: np.ndarray
    prompt_ids: list[str]
    prompts: list[str]
    stats: dict[str, float]
    images: np.ndarray | None = None


class CellConditions:
    """The condition of sample i of a cell: a function of (config, i) alone."""

    def __init__(self, model: Any, cfg: dict[str, Any]):
        self.model, self.seed = model, int(cfg["seed"])
        self.kind = getattr(model, "condition_kind", "component")
        n, prompts_cfg = int(cfg["num_images"]), cfg.get("prompts") or {"kind": "builtin"}
        if self.kind == "none" and float(cfg["guidance"]) != 1.0:
            raise UsageError(
                f"model={model.name} is unconditional, so guidance={cfg['guidance']:g} has no "
                "meaning; use guidance=1"
            )
        if self.kind == "text":
            if prompts_cfg.get("kind") == "classes":
                raise UsageError(
                    f"model={model.name} takes text prompts; choose prompts=builtin, file or coco"
                )
            self.prompts = load_prompts(prompts_cfg, n)
        elif self.kind == "class":
            if prompts_cfg.get("kind") not in ("classes", "builtin"):
                raise UsageError(
                    f"model={model.name} takes class labels, not prompts={prompts_cfg.get('kind')}; "
                    "use prompts=classes"
                )
            labels_cfg = (
                prompts_cfg if prompts_cfg.get("kind") == "classes" else {"kind": "classes", "select": "all"}
            )
            self.labels = load_labels(labels_cfg, model.num_classes, n)

    def __call__(self, indices: list[int]) -> tuple[Any, np.ndarray, list[str], list[str]]:
        """(condition batch, integer labels, prompt ids, prompt texts)."""
        if self.kind == "component":
            cond = self.model.conditions(indices, self.seed)
            labels = cond.cpu().numpy()
            return cond, labels, [f"component:{c}" for c in labels], [f"component {c}" for c in labels]
        if self.kind == "text":
            texts, ids = self.prompts.for_indices(indices)
            return self.model.encode(texts), np.full(len(indices), -1), ids, texts
        if self.kind == "class":
            labels = self.labels.for_indices(indices)
            return (
                self.model.encode(labels),
                np.asarray(labels),
                [f"class:{c}" for c in labels],
                [f"class {c}" for c in labels],
            )
        return None, np.full(len(indices), -1), ["" for _ in indices], ["" for _ in indices]


@dataclass(frozen=True)
class BatchInputs:
    """What a batch starts from: x_T and the condition of each sample (functions of (seed, i) alone)."""

    indices: list[int]
    x_T: torch.Tensor
    cond: Any
    labels: np.ndarray
    prompt_ids: list[str]
    prompts: list[str]


def batch_inputs(model: Any, cell: Cell, indices: list[int], conditions: CellConditions) -> BatchInputs:
    x_T = initial_noise(int(cell.config["seed"]), indices, model.sample_shape, model.dtype, model.device)
    cond, labels, ids, texts = conditions(indices)
    return BatchInputs(indices, x_T, cond, labels, ids, texts)


def run_batch(model: Any, cell: Cell, inputs: BatchInputs, steps: int) -> Batch:
    """Run the cell's sampler from prepared inputs (device-synchronised timing), then decode to images.
    Timing repeats call this with the same inputs again; sampler noise is drawn afresh from (seed, i)."""
    spec = get_sampler(cell.sampler["name"])
    seed, indices = int(cell.config["seed"]), inputs.indices
    grid = grid_for(model, cell, steps)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    counter = CountingDenoiser(guided_denoiser(model, inputs.cond, cell.guidance), sync)
    gens = sampler_generators(seed, indices) if spec.kind == "sde" or cell.sampler.get("eta", 0) else None
    sync()
    graphs, compile_seconds = speed.compile_state()
    start = time.perf_counter()
    with torch.no_grad():
        x = model.noise_schedule.initial_state(inputs.x_T, float(grid.sigmas[0]))
        cache_root = Path(str(cell.config.get("results_dir", "results"))) / ".cache"
        context = SamplerContext(model, inputs.cond, cell.guidance, cache_root)
        x0 = spec.run(counter, x, grid, _sampler_options(cell), gens, context)
    sync()
    seconds = time.perf_counter() - start
    graphs_after, compile_after = speed.compile_state()
    images, decode_seconds = None, 0.0
    if hasattr(model, "decode"):
        start = time.perf_counter()
        images = model.decode(x0)
        sync()
        decode_seconds = time.perf_counter() - start
    stats = {
        "nfe": counter.calls,
        "seconds": seconds,
        "model_seconds": counter.seconds,
        "decode_seconds": decode_seconds,
        # torch.compile work inside this call (model.compile): graphs compiled and seconds spent
        "compiles": graphs_after - graphs,
        "compile_seconds": compile_after - compile_seconds,
    }
    if stats["compiles"]:  # a shape no warm-up compiled: its time is compile time, never a timed call's
        stats["kind"] = "compiled"
    return Batch(indices, x0, inputs.labels, inputs.prompt_ids, inputs.prompts, stats, images)


def sample_batch(model: Any, cell: Cell, indices: list[int], steps: int, conditions: CellConditions) -> Batch:
    """One batch of a cell: its inputs, then the sampler (run_batch)."""
    return run_batch(model, cell, batch_inputs(model, cell, indices, conditions), steps)


def make_shard(
    model: Any,
    cell: Cell,
    cell_dir: Path,
    shard: list[int],
    steps: int,
    conditions: CellConditions,
    warm_up: bool,
    compiled_shapes: set[tuple[Any, ...]] | None = None,
) -> tuple[list[Batch], list[dict[str, Any]]]:
    """The shard's batches, after an untimed warm-up call when `warm_up` (the first call of a sampler in
    a process pays lazy imports, allocator and kernel warm-up; its cost is kept apart, as a timing-only
    call on the shard's first batch whose outputs are discarded).

    A compiled network (model.compile) is compiled once per input shape (speed.apply: static shapes), so
    every batch size of the shard that this process has not yet run for this sampler and guidance
    (`compiled_shapes`; guidance doubles the network's batch) gets its own untimed warm-up first, and
    the shard's smaller last batch is never the call that compiles."""
    bs, first = int(cell.config["batch_size"]), shard[0]
    timing_calls: list[dict[str, Any]] = []
    chunks = [shard[b : b + bs] for b in range(0, len(shard), bs)]
    warm = [chunks[0]] if warm_up else []
    if compiled_shapes is not None and speed.compiled(cell.model):
        for chunk in chunks:
            key = (cell.sampler_label, cell.guidance, len(chunk))
            if key not in compiled_shapes:
                compiled_shapes.add(key)
                if not any(len(w) == len(chunk) for w in warm):
                    warm.append(chunk)
        warm = [w for w in warm for _ in range(speed.warmup_rounds(cell.model))]
    for chunk in warm:
        store.heartbeat(cell_dir, first)
        extra = sample_batch(model, cell, chunk, steps, conditions)
        timing_calls.append({**extra.stats, "size": len(extra.indices), "kind": "warmup"})
    batches = []
    for chunk in chunks:
        store.heartbeat(cell_dir, first)
        batches.append(sample_batch(model, cell, chunk, steps, conditions))
    return batches, timing_calls


@dataclass
class RepeatJob:
    """Timing-only repeats a cell still needs: its first batch, `count` more times (timing_repeats)."""

    cell: Cell
    cell_dir: Path
    indices: list[int]
    steps: int
    conditions: CellConditions
    count: int


def run_repeats(model: Any, jobs: list[RepeatJob]) -> None:
    """Timing-only repeats, interleaved round-robin over the cells of a model (A, B, C, A, B, C, ...):
    each cell's timed calls then span the whole pass, so a load that comes and goes moves every cell alike
    and shows in each cell's range, instead of landing on a few cells back to back. Written per cell as
    timing-<first>.npz beside its shards (read by metrics.run.timing_row); outputs are discarded."""
    calls: dict[int, list[dict[str, Any]]] = {k: [] for k in range(len(jobs))}
    inputs: dict[int, BatchInputs] = {}  # made once per cell: only the sampler's run is timed and repeated
    for r in range(max((j.count for j in jobs), default=0)):
        for k, job in enumerate(jobs):
            if r < job.count:
                if k not in inputs:
                    inputs[k] = batch_inputs(model, job.cell, job.indices, job.conditions)
                extra = run_batch(model, job.cell, inputs[k], job.steps)
                calls[k].append({"kind": "repeat", **extra.stats, "size": len(extra.indices)})
    for k, job in enumerate(jobs):
        if calls[k]:
            store.write_timing(job.cell_dir, job.indices[0], calls[k])


def _shard_arrays(
    batches: list[Batch], seed: int, timing_calls: list[dict[str, Any]]
) -> dict[str, np.ndarray]:
    samples = torch.cat([b.samples for b in batches]).cpu()
    indices = np.concatenate([np.asarray(b.indices, dtype=np.int64) for b in batches])
    arrays = {
        "samples": samples.numpy(),
        "indices": indices,
        "seeds": np.asarray([sample_seed(seed, int(i), STREAM_NOISE) for i in indices], dtype=np.int64),
        "labels": np.concatenate([b.labels for b in batches]).astype(np.int64),
        "prompt_ids": np.asarray([p for b in batches for p in b.prompt_ids], dtype=str),
        "prompts": np.asarray([p for b in batches for p in b.prompts], dtype=str),
        "finite": torch.isfinite(samples.reshape(len(samples), -1)).all(1).numpy(),
        "nfe": np.concatenate([np.full(len(b.indices), b.stats["nfe"], dtype=np.int64) for b in batches]),
    }
    # One entry per timed call: the shard's own batches, then its warm-up call (make_shard), if any.
    calls = [(len(b.indices), b.stats, str(b.stats.get("kind", "sample"))) for b in batches] + [
        (int(st["size"]), st, str(st["kind"])) for st in timing_calls
    ]
    arrays |= {
        "batch_sizes": np.asarray([c[0] for c in calls], dtype=np.int64),
        "batch_seconds": np.asarray([c[1]["seconds"] for c in calls], dtype=np.float64),
        "batch_model_seconds": np.asarray([c[1]["model_seconds"] for c in calls], dtype=np.float64),
        "batch_decode_seconds": np.asarray([c[1]["decode_seconds"] for c in calls], dtype=np.float64),
        "batch_kind": np.asarray([c[2] for c in calls], dtype=str),
        "batch_compiles": np.asarray([c[1].get("compiles", 0) for c in calls], dtype=np.int64),
        "batch_compile_seconds": np.asarray([c[1].get("compile_seconds", 0.0) for c in calls], dtype=float),
    }
    if batches[0].images is not None:
        arrays["images"] = np.concatenate([b.images for b in batches])
    return arrays


def _write_shard(
    cell_dir: Path, first: int, batches: list[Batch], seed: int, timing_calls: list[dict[str, Any]]
) -> Path:
    """Encode and write one shard (and its PNG contact sheet); runs on the writer thread."""
    arrays = _shard_arrays(batches, seed, timing_calls)
    if "images" in arrays:
        store.write_preview(cell_dir, first, arrays["images"])
    return store.write_shard(cell_dir, first, arrays)


def _write_and_log(
    run_dir: Path,
    worker: str,
    cell_dir: Path,
    first: int,
    batches: list[Batch],
    seed: int,
    timing_calls: list[dict[str, Any]],
) -> Path:
    """Write a shard, log it for this worker, then release its claim."""
    import json

    path = _write_shard(cell_dir, first, batches, seed, timing_calls)
    log = run_dir / "workers" / f"{worker}.jsonl"
    log.parent.mkdir(exist_ok=True)
    entry = {
        "shard": str(path.relative_to(run_dir)),
        "images": sum(len(b.indices) for b in batches),
        "model_calls": sum(int(b.stats["nfe"]) for b in batches),
        "time": time.time(),
    }
    with open(log, "a") as f:
        f.write(json.dumps(entry) + "\n")
    store.release_claim(cell_dir, first)
    return path


def _drain(
    pending: list[Future], progress: Progress, task: Any, on_shard: Callable[[Path], None] | None, block: bool
) -> int:
    """Collect finished shard writes (all of them when block); a failed write raises here."""
    done = 0
    while pending and (block or pending[0].done()):
        path = pending.pop(0).result()
        done += 1
        progress.advance(task)
        if on_shard:
            on_shard(path)
    return done


def generate(
    cells: list[Cell],
    console: Console | None = None,
    on_shard: Callable[[Path], None] | None = None,
    worker: str | None = None,
) -> GenerationSummary:
    """Generate every missing shard of every cell; finished shards are skipped.

    Several workers (processes, jobs, nodes) may run this on the same run at once: each claims a shard
    before making it (store.try_claim), so no shard is made twice, and a claim whose worker died is
    taken over. Every shard a worker writes is logged in <run>/workers/<worker>.jsonl.
    """
    console = console or Console(stderr=True)
    worker = worker or f"{os.uname().nodename}-{os.getpid()}"
    if not cells:
        raise UsageError("the sweep has no cells")
    from samplebench import plan

    if any("content" not in c.config for c in cells):  # not planned yet (called with config.plan's cells)
        cells, _ = plan.record(cells, str(cells[0].config.get("on_change", "refuse")))
    run_dir = plan.run_dir_of(cells[0])
    store.ensure_writable(run_dir)
    plan.verify_content(cells, run_dir)
    _append_provenance(run_dir, cells)
    steps = {c: steps_for(c) for c in cells}  # every NFE error before any work starts
    ordered = sorted(
        cells, key=lambda c: (c.model_hash, c.sampler_label, c.schedule_label, c.nfe, c.guidance)
    )
    todo = []
    for cell in ordered:
        cell_dir = prepare_cell_dir(run_dir, cell)
        store.drop_dead_claims(cell_dir, float(cell.config.get("claim_timeout", 600)))
        size, n = _recorded_shard_size(cell_dir, cell), int(cell.config["num_images"])
        todo.append((cell, cell_dir, size, missing_shards(cell_dir, n, size), len(range(0, n, size))))
    total = sum(len(t[3]) for t in todo)
    skipped = sum(t[4] - len(t[3]) for t in todo)
    written = 0
    loads: dict[str, float] = {}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    pending: list[Future] = []
    held: list[tuple[Path, int]] = []  # claims taken (released once written, or here on failure)
    try:
        with (
            ThreadPoolExecutor(max_workers=1) as writer,
            Progress(*columns, console=console, transient=True) as progress,
        ):
            task = progress.add_task("generate", total=total)
            for _, group in groupby(todo, key=lambda t: t[0].model_hash):
                group = [t for t in group if t[3]]
                if not group:
                    continue
                # TF32 is process-wide; cells with other allow_tf32 have another model_hash (another group)
                allow_tf32 = bool(group[0][0].config.get("allow_tf32", False))
                tf32 = speed.set_tf32(allow_tf32)
                start = time.perf_counter()
                model = load_model(group[0][0].model, group[0][0].config["device"])
                label = group[0][0].model_label
                loads[label] = time.perf_counter() - start
                store.write_json(
                    run_dir / label / "load.json",
                    {
                        "seconds": loads[label],
                        "device": describe_device(model.device),
                        "dtype": str(getattr(model, "model_dtype", model.dtype)),
                        "speed": speed.describe(group[0][0].model, allow_tf32),
                    },
                )
                warmed: set[str] = set()  # samplers this process has warmed up
                shapes: set[tuple[Any, ...]] = set()  # (sampler, guidance, batch size) compiled so far
                repeats: list[RepeatJob] = []  # made after the model's shards, interleaved over its cells
                threads = _cpu_threads(model)
                for cell, cell_dir, size, starts, _ in group:
                    plan.check_resolved(cell_dir, plan.resolved_identity(model, cell))
                    progress.update(task, description=f"{cell.rel_dir}")
                    kind = getattr(model, "condition_kind", "component")
                    _record_grid(cell_dir, grid_for(model, cell, steps[cell]), kind)
                    conditions = CellConditions(model, cell.config)
                    n = int(cell.config["num_images"])
                    warm_up = bool((cell.config.get("timing") or {}).get("warmup", True))
                    timeout = float(cell.config.get("claim_timeout", 600))
                    for s in starts:
                        if any(f == s for f, _, _ in store.shard_ranges(cell_dir)):
                            progress.advance(task)  # another worker finished it meanwhile
                            continue
                        if not store.try_claim(cell_dir, s, worker, timeout):
                            progress.advance(task)  # another live worker is on it
                            continue
                        if any(f == s for f, _, _ in store.shard_ranges(cell_dir)):
                            # Written (then released) by another worker between our check and our claim:
                            # a shard is written before its claim is released, so this second look is final.
                            store.release_claim(cell_dir, s)
                            progress.advance(task)
                            continue
                        held.append((cell_dir, s))
                        shard = list(range(s, missing_end(s, n, size) + 1))
                        cold = warm_up and cell.sampler["name"] not in warmed
                        warmed.add(cell.sampler["name"])
                        batches, timing_calls = make_shard(
                            model, cell, cell_dir, shard, steps[cell], conditions, cold, shapes
                        )
                        count = timing_repeats(cell, s, size)
                        if count:
                            bs = int(cell.config["batch_size"])
                            repeats.append(
                                RepeatJob(cell, cell_dir, shard[:bs], steps[cell], conditions, count)
                            )
                        # Encoding and writing run on a background thread, so the device never waits on disk.
                        pending.append(
                            writer.submit(
                                _write_and_log,
                                run_dir,
                                worker,
                                cell_dir,
                                s,
                                batches,
                                int(cell.config["seed"]),
                                timing_calls,
                            )
                        )
                        written += _drain(pending, progress, task, on_shard, block=False)
                progress.update(task, description=f"{label}: timing repeats")
                run_repeats(model, repeats)
                threads.restore()
                tf32.restore()
            written += _drain(pending, progress, task, on_shard, block=True)
    finally:
        for cell_dir, s in held:
            store.release_claim(cell_dir, s)
    return GenerationSummary(run_dir, len(cells), written, skipped, loads)
