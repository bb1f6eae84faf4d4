"""The generation worker: loads each model once, runs all of its cells, writes shards.

Sample i of a cell starts from x_T and condition derived from (seed, i) alone, so shards can be
made in any order, by any batch size, and resumed after a crash with identical results.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from samplebench import store
from samplebench.config import Cell
from samplebench.errors import UsageError
from samplebench.models import load_model
from samplebench.samplers import get_sampler
from samplebench.samplers.base import CountingDenoiser, guided_denoiser
from samplebench.seeds import initial_noise, sampler_generators


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
    return spec.nfe_rule.steps(cell.nfe, cell.sampler["name"], bool(cell.config["allow_lower_nfe"]))


def _sampler_options(cell: Cell) -> dict[str, Any]:
    return {k: v for k, v in cell.sampler.items() if k != "name"}


def prepare_cell_dir(run_dir: Path, cell: Cell) -> Path:
    """Create the cell folder, or check that an existing one was made with the same config."""
    path = run_dir / cell.rel_dir
    info_path = path / "cell.json"
    if info_path.exists():
        import json

        old = json.loads(info_path.read_text())
        if old.get("config_hash") != cell.config_hash:
            raise UsageError(
                f"{path} was made with a different config; use a new run= name or delete that folder"
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


def _recorded_shard_size(cell_dir: Path, cell: Cell) -> int:
    """Shard boundaries are fixed when a cell is first made, so resuming never overlaps shards."""
    import json

    return int(json.loads((cell_dir / "cell.json").read_text()).get("shard_size", cell.config["shard_size"]))


def sample_batch(model: Any, cell: Cell, indices: list[int], steps: int) -> tuple[torch.Tensor, Any, dict]:
    """Run the cell's sampler on one batch; returns samples, conditions and counted timings."""
    spec = get_sampler(cell.sampler["name"])
    seed = int(cell.config["seed"])
    x_T = initial_noise(seed, indices, model.sample_shape, model.dtype, model.device)
    cond = model.conditions(indices, seed)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    counter = CountingDenoiser(guided_denoiser(model, cond, cell.guidance), sync)
    gens = sampler_generators(seed, indices) if spec.kind == "sde" or cell.sampler.get("eta", 0) else None
    start = time.perf_counter()
    with torch.no_grad():
        x0 = spec.run(counter, x_T, steps, _sampler_options(cell), gens, model.scheduler_config())
    sync()
    seconds = time.perf_counter() - start
    return x0, cond, {"nfe": counter.calls, "seconds": seconds, "model_seconds": counter.seconds}


def _shard_arrays(chunks: list[tuple[torch.Tensor, Any, dict, list[int]]]) -> dict[str, np.ndarray]:
    samples = torch.cat([c[0] for c in chunks]).cpu()
    labels = torch.cat([torch.as_tensor(c[1]).reshape(len(c[3]), -1)[:, 0].cpu() for c in chunks])
    return {
        "samples": samples.numpy(),
        "indices": np.concatenate([np.asarray(c[3], dtype=np.int64) for c in chunks]),
        "labels": labels.numpy(),
        "finite": torch.isfinite(samples.reshape(len(samples), -1)).all(1).numpy(),
        "nfe": np.concatenate([np.full(len(c[3]), c[2]["nfe"], dtype=np.int64) for c in chunks]),
        "batch_sizes": np.asarray([len(c[3]) for c in chunks], dtype=np.int64),
        "batch_seconds": np.asarray([c[2]["seconds"] for c in chunks]),
        "batch_model_seconds": np.asarray([c[2]["model_seconds"] for c in chunks]),
    }


def generate(
    cells: list[Cell], console: Console | None = None, on_shard: Callable[[Path], None] | None = None
) -> GenerationSummary:
    """Generate every missing shard of every cell; finished shards are skipped."""
    console = console or Console(stderr=True)
    if not cells:
        raise UsageError("the sweep has no cells")
    first = cells[0].config
    run_dir = Path(first["results_dir"]) / first["run"]
    store.ensure_writable(run_dir)
    steps = {c: steps_for(c) for c in cells}  # every NFE error before any work starts
    ordered = sorted(cells, key=lambda c: (c.model_hash, c.sampler_label, c.nfe, c.guidance))
    todo = []
    for cell in ordered:
        cell_dir = prepare_cell_dir(run_dir, cell)
        done = {first for first, _, _ in store.shard_ranges(cell_dir)}
        size, n = _recorded_shard_size(cell_dir, cell), int(cell.config["num_images"])
        todo.append(
            (cell, cell_dir, size, [s for s in range(0, n, size) if s not in done], len(range(0, n, size)))
        )
    total = sum(len(t[3]) for t in todo)
    skipped = sum(t[4] - len(t[3]) for t in todo)
    written = 0
    loads: dict[str, float] = {}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("generate", total=total)
        for _, group in groupby(todo, key=lambda t: t[0].model_hash):
            group = [t for t in group if t[3]]
            if not group:
                continue
            start = time.perf_counter()
            model = load_model(group[0][0].model, group[0][0].config["device"])
            loads[group[0][0].model_label] = time.perf_counter() - start
            warmed: set[str] = set()
            for cell, cell_dir, size, starts, _ in group:
                progress.update(task, description=f"{cell.rel_dir}")
                if cell.sampler["name"] not in warmed:
                    # An untimed one-sample run first: lazy imports, allocator and kernel warm-up
                    # must not be billed to whichever cell happens to run first.
                    sample_batch(model, cell, [0], steps[cell])
                    warmed.add(cell.sampler["name"])
                n, bs = int(cell.config["num_images"]), int(cell.config["batch_size"])
                for s in starts:
                    shard = list(range(s, min(s + size, n)))
                    chunks = []
                    for b in range(0, len(shard), bs):
                        idx = shard[b : b + bs]
                        x0, cond, stats = sample_batch(model, cell, idx, steps[cell])
                        chunks.append((x0, cond, stats, idx))
                    path = store.write_shard(cell_dir, s, _shard_arrays(chunks))
                    written += 1
                    progress.advance(task)
                    if on_shard:
                        on_shard(path)
    return GenerationSummary(run_dir, len(cells), written, skipped, loads)
