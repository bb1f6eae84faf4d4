"""Reference image folders encoded to sampler states, shared by the samplers that need data statistics
of an image model (teleportation's `sampler.moments`, DPM-Solver-v3's `sampler.ems_data`).

The images are listed with samplebench.metrics.images (sorted, every supported format), resized to the
model's resolution (PIL bicubic) when their size differs, and encoded with `model.encode_images` (the
VAE posterior mean, shifted and scaled as the pipeline does; the pixels for pixel-space models).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samplebench.errors import UsageError


def vae_identity(model: Any) -> str:
    """sha256 of the encoder's parameters (computed once per loaded model): a cache key must change
    with the weights that map images to states."""
    known = getattr(model, "_teleport_vae_sha", None)
    if known is None:
        h = hashlib.sha256(f"{model.name}|{model.resolution}|{tuple(model.sample_shape)}".encode())
        vae = getattr(model, "vae", None)
        if vae is not None:
            for name, tensor in sorted(vae.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().float().cpu().numpy().tobytes())
        known = h.hexdigest()[:16]
        model._teleport_vae_sha = known
    return known


def reference_paths(folder: str | Path, option: str, at_least: int = 1) -> list[Path]:
    """The image files of a reference folder (one-line UsageError naming `option` if it is not a folder
    or holds fewer than `at_least` images)."""
    from samplebench.metrics.images import list_images

    folder = Path(str(folder)).expanduser()
    if not folder.is_dir():
        raise UsageError(f"{option}={folder} is not a folder; point it at a folder of reference images")
    paths = list_images(folder)
    if len(paths) < at_least:
        raise UsageError(f"{option}={folder} holds {len(paths)} images; this needs at least {at_least}")
    return paths


_DIGESTS: dict[tuple, str] = {}


def reference_digest(model: Any, paths: list[Path]) -> str:
    """sha256 over the encoder's identity and the images' names and bytes (24 hex digits). Samplers ask
    for it on every batch, so the images are read again only when a file's size or mtime moved."""
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    key = (vae_identity(model), stats)
    if key not in _DIGESTS:
        h = hashlib.sha256(key[0].encode())
        for p in paths:
            h.update(p.name.encode())
            h.update(p.read_bytes())
        _DIGESTS[key] = h.hexdigest()[:24]
    return _DIGESTS[key]


def encoded_reference(model: Any, paths: list[Path], batch_size: int = 16) -> torch.Tensor:
    """The images' sampler states (n, *model.sample_shape), float64 on the CPU."""
    from PIL import Image

    from samplebench.metrics.images import iter_image_batches

    side = int(model.resolution)
    states = []
    for batch in iter_image_batches(paths, batch_size):
        if batch.shape[1:3] != (side, side):  # resized to the model's resolution (PIL bicubic)
            batch = np.stack(
                [np.asarray(Image.fromarray(b).resize((side, side), Image.BICUBIC)) for b in batch]
            )
        states.append(model.encode_images(batch).double().cpu())
    return torch.cat(states)
