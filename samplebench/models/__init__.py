"""Model adapters. Every model gives a noise schedule and a prediction at (x, t, sigma, condition)."""

from __future__ import annotations

from typing import Any

import torch

from samplebench.errors import UsageError
from samplebench.models.base import DiffusionModel, pick_device

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"model.dtype={name} is unknown; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(cfg: dict[str, Any], device: str) -> DiffusionModel:
    """Build the model a config names, once per worker."""
    name = cfg["name"]
    dev = pick_device(device)
    if name == "gmm":
        from samplebench.models.gmm import GaussianMixtureModel, MixtureSpec

        fields = {k: v for k, v in cfg.items() if k not in ("name", "dtype")}
        return GaussianMixtureModel(MixtureSpec(**fields), dev, parse_dtype(cfg.get("dtype", "float64")))
    from samplebench.models.diffusers_models import HUB_IDS, DiffusersModel

    if name in HUB_IDS or name == "diffusers":
        return DiffusersModel(cfg, dev)
    raise UsageError(f"model={name} has no adapter")
