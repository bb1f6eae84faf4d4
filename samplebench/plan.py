"""The run's plan, <run>/plan.json: the cells a run was asked for, with fingerprints of the content
they read from disk, written once by `sweep` / `generate` and read by workers, launchers and the
metrics stage, so none of them re-plans from override strings or re-reads changed inputs unnoticed.

    {"cells": {rel_dir: {labels, nfe, guidance, config (with "content"), config_hash}},
     "weights": {folder: {"cheap": ..., "sha256": ...}},   full hashes, computed once per run
     "invocations": [{"time", "cells": [rel_dir, ...], "metrics": {...}, "reference": ...}]}

A cell's identity (Cell.config_hash) covers its resolved config and `content`: the prompt texts of a
prompt file, the sha256 of every file under model.path (or the hub id), never paths or mtimes, so a
copied or touched file is the same content and an edited one is not. What a worker resolves on its
own machine (device type, dtype, the hub snapshot it loaded) is recorded in the cell's cell.json by
the first worker and checked by every later one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from samplebench import store
from samplebench.config import Cell
from samplebench.errors import UsageError
from samplebench.models import is_analytic

PLAN_FILE = "plan.json"
CONTENT_WHAT = {
    "prompts": "the prompt file's contents (prompts.path=)",
    "weights": "the weights under model.path=",
    "device": "the device (device=)",
    "dtype": "the model dtype (model.dtype=)",
    "revision": "the hub snapshot of model.id=",
}
ON_CHANGE = ("refuse", "restart")


def run_dir_of(cell: Cell) -> Path:
    return Path(cell.config["results_dir"]) / cell.config["run"]


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on the run's plan and provenance (several sweeps and workers share a run)."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".plan.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / PLAN_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UsageError(f"{path} is not valid JSON ({e}); delete it and re-run the sweep") from e


# -- content fingerprints ---------------------------------------------------------------------------
def _cheap_fingerprint(root: Path) -> str:
    """Every file's relative path, size and mtime: changes whenever a file might have."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _full_hash(root: Path) -> str:
    """sha256 over every file's relative path and bytes (read in blocks)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(root)}\n".encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def weights_identity(folder: Path, known: dict[str, dict[str, str]]) -> str:
    """sha256 of the weights folder, recomputed only when its cheap fingerprint (sizes, mtimes) moved
    since the run last hashed it; `known` (plan.json's "weights") is updated in place."""
    if not folder.is_dir():
        return "missing"  # the worker names what is wrong with model.path
    key = str(folder.resolve())
    cheap = _cheap_fingerprint(folder)
    entry = known.get(key)
    if entry is None or entry.get("cheap") != cheap:
        entry = {"cheap": cheap, "sha256": _full_hash(folder)}
        known[key] = entry
    return entry["sha256"]


def content_identity(config: dict[str, Any], known_weights: dict[str, dict[str, str]]) -> dict[str, str]:
    """What a cell reads from disk besides its config: the prompt file's texts (prompts=file|coco on an
    image model) and the weights (model.path: their sha256; model.id: the hub id, whose snapshot the
    worker records)."""
    model = config["model"]
    if is_analytic(str(model.get("name"))):
        return {}
    out: dict[str, str] = {}
    prompts = config.get("prompts") or {}
    if prompts.get("kind") in ("file", "coco"):
        from samplebench.prompts import load_prompts

        try:
            out["prompts"] = load_prompts(prompts, 1).fingerprint()
        except UsageError:
            out["prompts"] = "unreadable"  # the worker names what is wrong with it (kind, file)
    moments = (config.get("sampler") or {}).get("moments")
    if moments:  # teleportation's reference images (sampler.moments)
        out["sampler.moments"] = weights_identity(Path(str(moments)).expanduser(), known_weights)
    ems_data = (config.get("sampler") or {}).get("ems_data")
    if ems_data:  # DPM-Solver-v3's reference images (sampler.ems_data)
        out["sampler.ems_data"] = weights_identity(Path(str(ems_data)).expanduser(), known_weights)
    if model.get("path"):
        out["weights"] = weights_identity(Path(str(model["path"])).expanduser(), known_weights)
    elif model.get("id"):
        out["weights"] = f"hub:{model['id']}"
    return out


def reference_fingerprint(ref: str | None) -> str | None:
    """A cheap fingerprint of metrics.ref (file or folder: names, sizes, mtimes), recorded in the plan."""
    if not ref:
        return None
    path = Path(str(ref)).expanduser()
    if path.is_file():
        st = path.stat()
        return hashlib.sha256(f"{path.name}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return _cheap_fingerprint(path) if path.is_dir() else "missing"


# -- cells to and from JSON -------------------------------------------------------------------------
def cell_to_json(cell: Cell) -> dict[str, Any]:
    return {
        "model_label": cell.model_label,
        "sampler_label": cell.sampler_label,
        "schedule_label": cell.schedule_label,
        "nfe": cell.nfe,
        "guidance": cell.guidance,
        "config": cell.config,
        "config_hash": cell.config_hash,
    }


def cell_from_json(d: dict[str, Any]) -> Cell:
    c = d["config"]
    return Cell(
        d["model_label"],
        d["sampler_label"],
        int(d["nfe"]),
        float(d["guidance"]),
        c["model"],
        c["sampler"],
        c,
        schedule_label=d["schedule_label"],
    )


def with_content(cells: list[Cell], known_weights: dict[str, dict[str, str]]) -> list[Cell]:
    """The cells with config["content"] filled in (once per distinct model and prompts config)."""
    memo: dict[str, dict[str, str]] = {}
    out = []
    for cell in cells:
        if "content" in cell.config:
            out.append(cell)
            continue
        key = json.dumps([cell.config["model"], cell.config.get("prompts")], sort_keys=True, default=str)
        if key not in memo:
            memo[key] = content_identity(cell.config, known_weights)
        config = {**cell.config, "content": memo[key]}
        out.append(dataclasses.replace(cell, config=config))
    return out


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two cells' resolved configs, in words (content first)."""
    was, now = old.get("content") or {}, new.get("content") or {}
    changed = [CONTENT_WHAT.get(k, k) for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    if not changed:
        keys = sorted(k for k in set(old) | set(new) if k != "content" and old.get(k) != new.get(k))
        identity = (
            *("model", "sampler", "schedule", "nfe", "guidance", "seed", "allow_lower_nfe", "prompts"),
            "allow_tf32",
        )
        changed = [f"{k}=" for k in keys if k in identity] or ["its config (made by an earlier samplebench?)"]
    return changed


def _restart(cell_dir: Path) -> None:
    """Start a cell over: its shards, previews, claims and cell.json go (on_change=restart)."""
    if cell_dir.is_dir():
        shutil.rmtree(cell_dir)


def record(cells: list[Cell], on_change: str = "refuse") -> tuple[list[Cell], int]:
    """Fill in the cells' content, check them against what the run already holds, and write the plan.

    A cell whose identity changed since the run planned or made it (other prompts, other weights, another
    config at the same folder) is refused with one line naming what changed, or started over with
    on_change=restart; never resumed into a mix. Returns the cells and this invocation's number.
    """
    if on_change not in ON_CHANGE:
        raise UsageError(f"on_change={on_change} is unknown; choose {' or '.join(ON_CHANGE)}")
    run_dir = run_dir_of(cells[0])
    store.ensure_writable(run_dir)
    with locked(run_dir):
        plan = load(run_dir) or {"cells": {}, "weights": {}, "invocations": []}
        cells = with_content(cells, plan.setdefault("weights", {}))
        for cell in cells:
            rel = str(cell.rel_dir)
            info_path = run_dir / cell.rel_dir / "cell.json"
            made = json.loads(info_path.read_text()) if info_path.exists() else None
            planned = plan["cells"].get(rel)
            before = next(
                (x for x in (made, planned) if x and x.get("config_hash") != cell.config_hash), None
            )
            if before is None:
                continue
            if on_change == "restart":
                _restart(run_dir / cell.rel_dir)
                continue
            what = ", ".join(changes(before.get("config") or {}, cell.config))
            raise UsageError(
                f"{run_dir / cell.rel_dir}: {what} changed since it was made, so its shards would mix "
                "inputs; use a new run= name, or on_change=restart to start such cells over"
            )
        for cell in cells:
            plan["cells"][str(cell.rel_dir)] = cell_to_json(cell)
        metrics = cells[0].config.get("metrics") or {}
        plan["invocations"].append(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "cells": [str(c.rel_dir) for c in cells],
                "metrics": metrics,
                "reference": reference_fingerprint(metrics.get("ref")),
            }
        )
        store.write_json(run_dir / PLAN_FILE, plan)
    return cells, len(plan["invocations"]) - 1


def verify_content(cells: list[Cell], run_dir: Path) -> None:
    """Before a worker generates: what the cells read from disk is still what was planned (a job that
    starts hours after the sweep must not read an edited prompt file or new weights)."""
    plan = load(run_dir) or {}
    known = dict(plan.get("weights") or {})
    memo: dict[str, dict[str, str]] = {}
    for cell in cells:
        planned = cell.config.get("content")
        if planned is None:
            continue
        key = json.dumps([cell.config["model"], cell.config.get("prompts")], sort_keys=True, default=str)
        if key not in memo:
            memo[key] = content_identity(cell.config, known)
        if memo[key] != planned:
            what = ", ".join(changes({"content": planned}, {"content": memo[key]}))
            raise UsageError(
                f"{what} changed since the sweep planned {run_dir}, so new shards would mix inputs; "
                "restore them, or plan again (a new run= name, or on_change=restart)"
            )


def planned_cells(run_dir: Path, invocation: int | None = None) -> list[Cell]:
    """The cells of one invocation (a worker's share of work), or every planned cell of the run."""
    plan = load(run_dir)
    if plan is None:
        raise UsageError(f"{run_dir} has no {PLAN_FILE}; run `samplebench sweep run={run_dir.name}` first")
    if invocation is None:
        return [cell_from_json(d) for d in plan["cells"].values()]
    try:
        names = plan["invocations"][invocation]["cells"]
    except IndexError:
        raise UsageError(f"{run_dir / PLAN_FILE} has no invocation {invocation}") from None
    return [cell_from_json(plan["cells"][n]) for n in names]


def planned_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The metrics config of the run's latest sweep, or None for a run without a plan."""
    plan = load(run_dir)
    if not plan or not plan.get("invocations"):
        return None
    return plan["invocations"][-1].get("metrics")


# -- what a worker resolves on its own machine -------------------------------------------------------
def hub_revision(model_id: str) -> str | None:
    """The cached snapshot (commit) of a hub model, as from_pretrained resolves it offline."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(model_id, "model_index.json")
    return Path(found).parent.name if isinstance(found, str) else None


def resolved_identity(model: Any, cell: Cell) -> dict[str, str]:
    """Device type and dtype the worker runs the model with, and the hub snapshot it loaded."""
    out = {
        "device": model.device.type,
        "dtype": str(getattr(model, "model_dtype", model.dtype)).replace("torch.", ""),
    }
    if cell.model.get("id") and not cell.model.get("path"):
        out["revision"] = hub_revision(str(cell.model["id"])) or "unknown"
    return out


def check_resolved(cell_dir: Path, resolved: dict[str, str]) -> None:
    """The first worker records what it resolved in cell.json; a later one that resolves otherwise (other
    device, dtype or hub snapshot) is refused, since its shards would mix precisions or weights."""
    path = cell_dir / "cell.json"
    info = json.loads(path.read_text())
    before = info.get("resolved")
    if before is None:
        info["resolved"] = resolved
        store.write_json(path, info)
        return
    changed = [k for k in sorted(set(before) | set(resolved)) if before.get(k) != resolved.get(k)]
    if changed:
        was = ", ".join(f"{k}={before.get(k)}" for k in changed)
        now = ", ".join(f"{k}={resolved.get(k)}" for k in changed)
        raise UsageError(
            f"{cell_dir} was made with {was} but this worker resolves {now}, so its shards would mix "
            "them; set device= and model.dtype= to match, or use a new run= name"
        )
