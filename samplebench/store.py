"""Run layout on disk: atomic writes, shards, and "is this finished".

    results/<run>/
      <model>/<sampler>/<schedule>/nfe=<n>/cfg=<g>/cell.json      resolved config and its hash
      <model>/<sampler>/<schedule>/nfe=<n>/cfg=<g>/shard-<first>-<last>.npz
      metrics.csv, metrics.protocol.json, leaderboard.md, plots/

A shard is written to a temporary file in the same folder and renamed into place, so a crash
never leaves a half shard under its final name; a shard that exists is finished.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samplebench.errors import UsageError

_SHARD = re.compile(r"shard-(\d+)-(\d+)\.npz$")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def shard_name(first: int, last: int) -> str:
    """Shard covering sample indices first..last inclusive."""
    return f"shard-{first:08d}-{last:08d}.npz"


def write_shard(cell_dir: Path, first: int, arrays: dict[str, np.ndarray]) -> Path:
    import io

    n = len(arrays["indices"])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = cell_dir / shard_name(first, first + n - 1)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_timing(cell_dir: Path, first: int, calls: list[dict[str, Any]]) -> Path:
    """Timing-only repeats of a cell's first batch (generate.run_repeats), beside its shards."""
    import io

    buf = io.BytesIO()
    np.savez(
        buf,
        batch_sizes=np.asarray([c["size"] for c in calls], dtype=np.int64),
        batch_seconds=np.asarray([c["seconds"] for c in calls], dtype=np.float64),
        batch_model_seconds=np.asarray([c["model_seconds"] for c in calls], dtype=np.float64),
        batch_decode_seconds=np.asarray([c["decode_seconds"] for c in calls], dtype=np.float64),
        batch_kind=np.asarray([c.get("kind", "repeat") for c in calls]),  # "compiled": a call that compiled
        batch_compiles=np.asarray([c.get("compiles", 0) for c in calls], dtype=np.int64),
        batch_compile_seconds=np.asarray([c.get("compile_seconds", 0.0) for c in calls], dtype=np.float64),
    )
    path = cell_dir / f"timing-{first:08d}.npz"
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_preview(cell_dir: Path, first: int, images: np.ndarray, columns: int = 8, thumb: int = 128) -> Path:
    """A PNG contact sheet of a shard's images (at most 64, scaled to `thumb` px), to look at."""
    from PIL import Image

    images = images[:64]
    rows = (len(images) + columns - 1) // columns
    size = min(thumb, images.shape[1])
    sheet = Image.new("RGB", (columns * size, rows * size), "white")
    for k, img in enumerate(images):
        tile = Image.fromarray(img).resize((size, size), Image.Resampling.LANCZOS)
        sheet.paste(tile, ((k % columns) * size, (k // columns) * size))
    import io

    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    path = cell_dir / f"preview-{first:08d}.png"
    atomic_write_bytes(path, buf.getvalue())
    return path


def read_shard(path: Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Load a shard (only `keys` if given); a damaged one is a one-line error naming it and the fix."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in (keys or z.files) if k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UsageError(
            f"shard {path} is corrupt or truncated ({e}); delete it and re-run to regenerate it"
        ) from e


def shard_ranges(cell_dir: Path) -> list[tuple[int, int, Path]]:
    out = []
    for p in sorted(cell_dir.glob("shard-*.npz")):
        m = _SHARD.search(p.name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), p))
    return out


def solver_label(sampler: str, schedule: str) -> str:
    """What the report ranks: a sampler on a schedule, `dpmpp · karras` (the sampler alone for runs
    made before schedules were an axis)."""
    return f"{sampler} · {schedule}" if schedule else sampler


@dataclass(frozen=True)
class CellRecord:
    """A cell as found on disk."""

    path: Path
    info: dict[str, Any]

    @property
    def key(self) -> tuple[str, str, int, float]:
        """(model, solver, nfe, guidance): the solver is the sampler on its schedule (solver_label)."""
        i = self.info
        solver = solver_label(i["sampler_label"], i.get("schedule_label", ""))
        return (i["model_label"], solver, int(i["nfe"]), float(i["guidance"]))

    def shards(self) -> list[tuple[int, int, Path]]:
        """The shards holding the cell's first num_images samples (after num_images was lowered, shards
        beyond it stay on disk for a later, larger run, but are no part of this cell)."""
        n = int(self.info["num_images"])
        return [s for s in shard_ranges(self.path) if s[0] < n]

    def timing_files(self) -> list[Path]:
        """Timing-only repeats (write_timing) of the cell's shards."""
        n = int(self.info["num_images"])
        return [p for p in sorted(self.path.glob("timing-*.npz")) if int(p.stem.split("-")[1]) < n]

    def iter_shards(self) -> Iterator[dict[str, np.ndarray]]:
        for _, _, p in self.shards():
            yield read_shard(p)

    def complete(self) -> bool:
        """Every index below num_images lies in a shard (shards never overlap)."""
        n = int(self.info["num_images"])
        return sum(min(last, n - 1) - first + 1 for first, last, _ in self.shards()) >= n

    @property
    def condition_kind(self) -> str:
        """text, class, component (the analytic model) or none; cells made before it was recorded tell
        by their prompt ids ('class:207', 'component:3', '' unconditional, anything else a prompt)."""
        if "condition_kind" in self.info:
            return str(self.info["condition_kind"])
        shards = self.shards()
        ids = read_shard(shards[0][2], ("prompt_ids",)).get("prompt_ids") if shards else None
        first = str(ids[0]) if ids is not None and len(ids) else ""
        if first.startswith("class:"):
            return "class"
        if first.startswith("component:"):
            return "component"
        return "text" if first else "none"

    @property
    def cell_key(self) -> tuple[str, str, str, int, float]:
        """(model, sampler, schedule, nfe, guidance) as metrics.csv and timings.csv key a cell."""
        i = self.info
        return (
            i["model_label"],
            i["sampler_label"],
            i.get("schedule_label", ""),
            int(i["nfe"]),
            float(i["guidance"]),
        )


def frame_keys(df: Any, columns: list[str]) -> Any:
    """Each row of a results table (pandas) keyed as a tuple of plain values in `columns` (schedule ''
    for tables from before schedules were an axis), comparable with CellRecord.cell_key."""
    import pandas as pd

    if "schedule" in columns and "schedule" not in df.columns:
        df = df.assign(schedule="")
    cast = {"nfe": int, "guidance": float, "schedule": lambda c: str(c) if pd.notna(c) else ""}
    cols = [[cast.get(c, str)(v) for v in df[c]] for c in columns]
    return pd.Series(list(zip(*cols, strict=True)), index=df.index, dtype=object)


CELL_KEY_COLUMNS = ["model", "sampler", "schedule", "nfe", "guidance"]


def finished_rows(run_dir: Path, df: Any) -> tuple[Any, list[str]]:
    """The rows of a run's results table whose cell is finished on disk, and the cells dropped (a shard
    deleted or a cell grown since it was scored). A folder without cells (a merged report's) keeps all."""
    cells = find_cells(run_dir) if run_dir.is_dir() else []
    if not cells or df.empty:
        return df, []
    finished = {c.cell_key for c in cells if c.complete()}
    keys = frame_keys(df, CELL_KEY_COLUMNS)
    keep = keys.isin(finished)
    gone = sorted({" · ".join(str(x) for x in k if x != "") for k in keys[~keep]})
    return df[keep], gone


def find_cells(run_dir: Path) -> list[CellRecord]:
    """All cells of a run, in a stable order."""
    if not run_dir.is_dir():
        raise UsageError(
            f"run folder {run_dir} does not exist; run `samplebench sweep run={run_dir.name}` first"
        )
    cells = []
    for p in sorted(run_dir.rglob("cell.json")):
        cells.append(CellRecord(p.parent, json.loads(p.read_text())))
    return cells


def ensure_writable(path: Path) -> None:
    """Fail early with a clear message when the results folder cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to {path} ({e.strerror}); choose another results_dir=") from e


# -- claims: several workers share one run without doing a shard twice ---------------------------
def claim_path(cell_dir: Path, first: int) -> Path:
    return cell_dir / f".claim-{first:08d}"


def _claim_is_stale(path: Path, timeout: float) -> bool:
    """A claim is stale when its heartbeat is older than `timeout` s, or its process on this host is gone."""
    import socket
    import time

    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return True  # vanished: released (the caller re-checks for the shard after claiming)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        # Empty or partial: its worker created it (O_EXCL) and is writing its name right now. Taking
        # it over here is how two workers once made one shard twice.
        return age > timeout
    if age > timeout:
        return True
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            return False
    return False


def try_claim(cell_dir: Path, first: int, worker: str, timeout: float) -> bool:
    """Claim shard `first` of a cell for `worker`: O_EXCL creation, or taking over a stale claim."""
    import socket

    path = claim_path(cell_dir, first)
    payload = json.dumps({"worker": worker, "host": socket.gethostname(), "pid": os.getpid()}).encode()
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            mine = json.loads(path.read_text()).get("worker") == worker
        except (OSError, ValueError):
            mine = False
        if not mine and not _claim_is_stale(path, timeout):
            return False
        atomic_write_bytes(path, payload)  # take over; re-read in case another worker did the same
        try:
            return json.loads(path.read_text()).get("worker") == worker
        except (OSError, ValueError):
            return False
    with os.fdopen(fd, "wb") as f:
        f.write(payload)
    return True


def heartbeat(cell_dir: Path, first: int) -> None:
    try:
        os.utime(claim_path(cell_dir, first))
    except OSError:
        pass


def release_claim(cell_dir: Path, first: int) -> None:
    claim_path(cell_dir, first).unlink(missing_ok=True)


def drop_dead_claims(cell_dir: Path, timeout: float) -> None:
    """Remove the stale claims of shards that are already written: a worker killed between writing a
    shard and releasing its claim (SIGKILL, a node lost) leaves one, and no worker would ever take it
    over, since the shard is finished."""
    written = {first for first, _, _ in shard_ranges(cell_dir)}
    for path in cell_dir.glob(".claim-*"):
        suffix = path.name.removeprefix(".claim-")
        if suffix.isdigit() and int(suffix) in written and _claim_is_stale(path, timeout):
            path.unlink(missing_ok=True)
