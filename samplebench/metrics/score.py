"""`samplebench score PATH --ref REF`: the image metrics for images made elsewhere.

PATH is an image folder or a folder of samplebench shards; REF is what metrics.ref accepts
(an image folder, a folder of shards, or an .npz with mu, sigma and the protocol).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from samplebench.errors import UsageError
from samplebench.metrics.image import NEEDS_REF, ImageContext, _folder_hash, score_features

FOLDER_METRICS = ("fid", "kid", "is", "precision", "recall", "clip_score", "clip_score_paper")


def score_path(
    path: Path, metrics_cfg: dict[str, Any], cache_root: Path, prompts: Path | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Rows (metric, value, ci_low, ci_high, n_images) and the protocol of each metric."""
    from samplebench.models.base import pick_device

    if not path.exists():
        raise UsageError(f"{path} does not exist; give an image folder or a folder of shards")
    names = [n for n in metrics_cfg["names"] if n in FOLDER_METRICS]
    if not metrics_cfg.get("ref"):
        names = [n for n in names if n not in NEEDS_REF]
    if prompts is None:
        names = [n for n in names if not n.startswith("clip_score")]
    if not names:
        raise UsageError("nothing to score: give --ref for fid/kid, or --prompts for clip_score")
    ctx = ImageContext(metrics_cfg, cache_root, str(pick_device(str(metrics_cfg.get("device", "auto")))))
    shards = sorted(path.rglob("shard-*.npz")) if path.is_dir() else []
    per_image: dict[str, np.ndarray] = {}
    if shards:
        parts = [ctx.inception_features(s) for s in shards]
        pool = np.concatenate([p["pool"] for p in parts]).astype(np.float64)
        logits = np.concatenate([p["logits"] for p in parts]).astype(np.float64)
        images_for_clip = None
    else:
        from samplebench.metrics.images import iter_image_batches, list_images

        files = list_images(path)
        ext = ctx.inception()
        bs = int(metrics_cfg.get("batch_size", 64))

        def compute() -> dict[str, np.ndarray]:
            feats = [ext(b) for b in iter_image_batches(files, bs)]
            return {k: np.concatenate([f[k] for f in feats]).astype(np.float32) for k in ("pool", "logits")}

        f = ctx._cached("folders", ext.fingerprint(), _folder_hash(files), compute, ("pool", "logits"))
        pool, logits = f["pool"].astype(np.float64), f["logits"].astype(np.float64)
        images_for_clip = files
    if prompts is not None and any(n.startswith("clip_score") for n in names):
        from samplebench.metrics.clip_score import clip_score_paper, clip_score_torchmetrics
        from samplebench.metrics.images import iter_image_batches

        texts = [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
        if images_for_clip is None or len(texts) != len(images_for_clip):
            raise UsageError(
                f"--prompts {prompts} must have one line per image of an image folder, in file-name order"
            )
        bs = int(metrics_cfg.get("batch_size", 64))
        cos, start = [], 0
        for batch in iter_image_batches(images_for_clip, bs):
            cos.append(ctx.clip().cosine(batch, texts[start : start + len(batch)]))
            start += len(batch)
        c = np.concatenate(cos)
        per_image = {"clip_score": clip_score_torchmetrics(c), "clip_score_paper": clip_score_paper(c)}
    scores = score_features(ctx, names, pool, logits, per_image)
    df = pd.DataFrame(scores.rows)
    df["n_images"] = len(pool)
    return df, scores.protocols
