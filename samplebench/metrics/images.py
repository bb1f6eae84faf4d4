"""Image folders for the Inception metrics: which files count and how they are decoded.

Decoding mirrors torch-fidelity's `ImagesPathDataset` (PIL `open(...).convert("RGB")`, uint8), so the
features of a folder are the same whether torch-fidelity or samplebench reads it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from samplebench.errors import UsageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder` (not in subfolders), sorted by name.

    torch-fidelity's defaults are the same apart from the extensions (it looks for png, jpg, jpeg) and
    that it sorts resolved paths: for a folder of regular files both give the same order, which matters
    because KID subsets and IS splits are drawn by index.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"image folder {folder} does not exist; point it at a folder of png/jpg images")
    files = sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: p.name,
    )
    if not files:
        raise UsageError(
            f"no images (png, jpg, jpeg, webp, bmp) in {folder}; put the images directly in it "
            "(subfolders are not searched)"
        )
    return files


def _load_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"cannot read image {path} ({e}); remove or replace it") from e


def iter_image_batches(paths: Iterable[Path], batch_size: int) -> Iterator[np.ndarray]:
    """uint8 batches (N, H, W, 3) of at most `batch_size` images, decoded lazily so memory stays flat.

    Every image must have the size of the first one. torch-fidelity fails the same way in effect (its
    DataLoader cannot stack two sizes in one batch), but only when the sizes meet inside a batch; checking
    the whole folder makes the outcome independent of the batch size.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size={batch_size} must be a positive integer")
    batch: list[np.ndarray] = []
    first: tuple[Path, tuple[int, ...]] | None = None
    for path in paths:
        img = _load_rgb(Path(path))
        if first is None:
            first = (Path(path), img.shape)
        elif img.shape != first[1]:
            h, w = img.shape[:2]
            h0, w0 = first[1][:2]
            raise UsageError(
                f"image {path} is {w}x{h} but {first[0].name} is {w0}x{h0}; all images of a folder must "
                "have one size (resize them first)"
            )
        batch.append(img)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)
