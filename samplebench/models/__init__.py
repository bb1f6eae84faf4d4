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


# The exact analytic models (no network, no weights): their metrics are fd_exact, traj_err and mmd_exact.
ANALYTIC_MODELS = ("gmm", "gmm_flow")


def is_analytic(name: str) -> bool:
    return name in ANALYTIC_MODELS


def mixture_spec(cfg: dict[str, Any]) -> Any:
    """The MixtureSpec of an analytic model's config: its preset (`model.preset`), then its non-null keys,
    less the plan-level ones every model config may carry (name, dtype, default_schedule, guidance_kind)."""
    from samplebench.models.gmm import DEFAULT_PRESET, MODEL_PRESETS, resolve_spec

    plan_keys = ("name", "dtype", "default_schedule", "guidance_kind")
    fields = {k: v for k, v in cfg.items() if k not in plan_keys}
    if fields.get("preset") is None:
        fields["preset"] = MODEL_PRESETS.get(str(cfg.get("name")), DEFAULT_PRESET)
    try:
        return resolve_spec(fields)
    except TypeError as e:
        name = cfg.get("name")
        raise UsageError(f"model={name}: {e}; see conf/model/{name}.yaml for its keys") from e


def load_model(cfg: dict[str, Any], device: str) -> DiffusionModel:
    """Build the model a config names, once per worker."""
    name = cfg["name"]
    dev = pick_device(device)
    if is_analytic(name):
        from samplebench.models.gmm import FlowMixtureModel, GaussianMixtureModel

        spec = mixture_spec(cfg)
        cls = FlowMixtureModel if name == "gmm_flow" else GaussianMixtureModel
        return cls(spec, dev, parse_dtype(cfg.get("dtype", "float64")))
    from samplebench.models.diffusers_models import HUB_IDS, DiffusersModel
    from samplebench.models.flow_pipelines import FLOW_MODELS, FlowPipelineModel

    if name in FLOW_MODELS:
        return FlowPipelineModel(cfg, dev)
    if name in HUB_IDS or name == "diffusers":
        return DiffusersModel(cfg, dev)
    raise UsageError(f"model={name} has no adapter")
