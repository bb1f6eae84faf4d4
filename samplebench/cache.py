"""Cache files: named arrays in an .npz that carries a sha256 of its own content, verified on read.

Every cache samplebench writes (Inception features, CLIP cosines, ImageReward scores, reference
features, exact ODE endpoints, reference latents) goes through `save` and `load`. The checksum covers
each array's name, dtype, shape and bytes, so a file that is truncated, unreadable, altered, or written
without a checksum (by an older samplebench) is never used: `load` says so on stderr in one line
naming the file and returns None, and the caller recomputes the entry and saves it again.
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import numpy as np

from samplebench import store
from samplebench.errors import brief

CHECKSUM_KEY = "__samplebench_sha256__"


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays in name order: name, dtype, shape and C-order bytes of each."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(path: Path, **arrays: np.ndarray) -> None:
    """Write the arrays and their checksum atomically (readers see the old file or the new one)."""
    if CHECKSUM_KEY in arrays:
        raise ValueError(f"{CHECKSUM_KEY} is reserved for the checksum")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays, **{CHECKSUM_KEY: np.asarray(checksum(arrays))})
    store.atomic_write_bytes(path, buf.getvalue())


def _say(line: str) -> None:
    # Plain stderr, one line, never wrapped (rich redirects stderr around a live progress bar).
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def load(path: Path, keys: tuple[str, ...] = ()) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file, or None when it is missing or must not be trusted (then one line on
    stderr names the file and why). `keys` are arrays the caller needs: a file without them is stale."""
    if not path.exists():
        return None
    problem = None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - zip, zlib, npy-header and OS errors all mean "unreadable"
        problem = f"is unreadable ({brief(e)})"
    else:
        stored = arrays.pop(CHECKSUM_KEY, None)
        if stored is None:
            problem = "has no checksum (written by an older samplebench)"
        elif str(stored) != checksum(arrays):
            problem = "does not match its checksum (altered or damaged)"
        elif any(k not in arrays for k in keys):
            problem = f"lacks {', '.join(k for k in keys if k not in arrays)}"
    if problem is None:
        return arrays
    _say(f"warning: cache file {path} {problem}; recomputing it")
    return None
