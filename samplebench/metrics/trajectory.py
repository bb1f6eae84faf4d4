"""traj_mse for image models (the protocol DPM-Solver-v3 reports for Stable Diffusion): per image,
the mean squared error between a cell's final latent and the final latent of a reference solver
from the same x_T, prompt and guidance. The reference (by default DPM-Solver++(3M) at 200 NFE;
`metrics.traj_mse.sampler=` and `.nfe=`) is generated once per (model, guidance, seed, prompts,
reference sampler) and shard, cached under <results_dir>/.cache/traj_ref/, and shared by every
cell that needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from samplebench import cache, speed, store
from samplebench.config import Cell, conf_dir
from samplebench.errors import UsageError


def reference_cell(cell_info: dict[str, Any], sampler: str, nfe: int, schedule: str = "karras") -> Cell:
    """The cell a reference solve runs as: the cell's model, guidance, seed and prompts, another sampler
    on its own schedule (karras by default: not the cell's, which may stop above sigma_min)."""
    path = conf_dir() / "sampler" / f"{sampler}.yaml"
    if not path.exists():
        raise UsageError(
            f"metrics.traj_mse.sampler={sampler} is unknown; use a name from `samplebench list samplers`"
        )
    sampler_cfg = OmegaConf.to_container(OmegaConf.load(path))
    sched_path = conf_dir() / "schedule" / f"{schedule}.yaml"
    if not sched_path.exists():
        raise UsageError(
            f"metrics.traj_mse.schedule={schedule} is unknown; use a name from `samplebench list schedules`"
        )
    schedule_cfg = OmegaConf.to_container(OmegaConf.load(sched_path))
    # The reference runs eager, without the cell's speed switches (samplebench/speed.py): the same
    # solve, shared with the switches-off cells, and no compile in the metrics stage.
    model = cell_info["config"]["model"]
    model = {**model, **{k: v for k, v in speed.MODEL_DEFAULTS.items() if k in model}}
    cfg = {
        **cell_info["config"],
        "model": model,
        "allow_tf32": False,
        "sampler": sampler_cfg,
        "schedule": schedule_cfg,
        "nfe": int(nfe),
        "allow_lower_nfe": True,
    }
    return Cell(
        cell_info["model_label"],
        sampler,
        int(nfe),
        float(cell_info["guidance"]),
        cfg["model"],
        sampler_cfg,
        cfg,
        schedule_label=schedule,
    )


def reference_latents(ctx: Any, cell: store.CellRecord, shard: Path, indices: np.ndarray) -> np.ndarray:
    """Final latents of the reference solver for these sample indices (cached per shard, with a checksum:
    a damaged or altered cache file is named and recomputed; one for other indices is recomputed)."""
    from samplebench.generate import CellConditions, sample_batch, steps_for
    from samplebench.models import load_model

    t = ctx.sub("traj_mse")
    ref = reference_cell(
        cell.info, t.get("sampler", "dpmpp_3m"), int(t.get("nfe", 200)), t.get("schedule", "karras")
    )
    key = ref.config_hash
    path = ctx.cache_root / "traj_ref" / key / f"{shard.stem}.npz"
    found = cache.load(path, ("samples", "indices"))
    if found is not None and np.array_equal(found["indices"], indices):
        return found["samples"]
    if key not in ctx.models:
        ctx.models[key] = load_model(ref.model, ctx.device)
    model = ctx.models[key]
    conditions = CellConditions(model, ref.config)
    bs = int(ref.config.get("batch_size", 16))
    steps = steps_for(ref)
    parts = [
        sample_batch(model, ref, indices[i : i + bs].tolist(), steps, conditions).samples.cpu().numpy()
        for i in range(0, len(indices), bs)
    ]
    samples = np.concatenate(parts)
    cache.save(path, samples=samples, indices=indices)
    ctx.recomputed += 1
    return samples


def per_image_mse(samples: np.ndarray, reference: np.ndarray) -> np.ndarray:
    diff = samples.astype(np.float64) - reference.astype(np.float64)
    return (diff**2).reshape(len(diff), -1).mean(axis=1)


def describe(ctx: Any) -> dict[str, str]:
    t = ctx.sub("traj_mse")
    return {
        "reference_sampler": str(t.get("sampler", "dpmpp_3m")),
        "reference_nfe": str(t.get("nfe", 200)),
        "reference_schedule": str(t.get("schedule", "karras")),
        "definition": "per image mean over latent elements of (x - x_ref)^2, then mean over images",
        "interval": "percentile bootstrap over images",
    }
