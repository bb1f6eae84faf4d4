"""Preflight: before anything is generated, every selected metric's prerequisites are checked (weights
files, tokenizers, reference sets, prompts, enough images for the metric's settings), and everything
missing is named in one message, so an offline sweep fails in seconds instead of after hours of
generation. With metrics.on_missing=skip the metrics that cannot run are skipped instead, and the
reason goes to metrics.protocol.json, where the report finds it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samplebench.errors import UsageError
from samplebench.metrics.names import ANALYTIC, IMAGE, TEXT
from samplebench.models import is_analytic

NEEDS_REF = ("fid", "kid", "precision", "recall")
INCEPTION = ("fid", "kid", "is", "precision", "recall")
CLIP = ("clip_score", "clip_score_paper")
ON_MISSING = ("error", "skip")
_KINDS = {
    "text": "text",
    "sdxl": "text",
    "class": "class",
    "uncond": "none",
    "sd3": "text",
    "flux": "text",
    "sana": "text",
}
_BUILTIN_KINDS = {"sd15": "text", "sd21": "text", "sdxl": "text", "dit": "class", "ddpm_cifar10": "none"}
_BUILTIN_KINDS.update(sd3="text", flux_schnell="text", flux_dev="text", sana="text", instaflow="text")


@dataclass(frozen=True)
class Target:
    """What the metrics will be computed on: a model's kind and its smallest cell."""

    model: dict[str, Any]
    condition_kind: str  # text, class, none, component, or unknown (a hub model not cached yet)
    num_images: int


@dataclass(frozen=True)
class Preflight:
    names: list[str]  # the metrics that will run (those that can, or all when nothing is missing)
    skipped: dict[str, str]  # metric -> why it cannot run (metrics.on_missing=skip)


def condition_kind(model: dict[str, Any]) -> str:
    """What the model is conditioned on, read from its config or its model_index.json without loading it."""
    name = model.get("name")
    if is_analytic(str(name)):
        return "component"
    index = None
    if model.get("path"):
        index = Path(str(model["path"])).expanduser() / "model_index.json"
    elif model.get("id"):
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(str(model["id"]), "model_index.json")
            index = Path(found) if isinstance(found, str) else None
        except ImportError:
            index = None
    if index is not None and index.is_file():
        from samplebench.models.diffusers_models import PIPELINE_KINDS

        try:
            kind = PIPELINE_KINDS.get(json.loads(index.read_text()).get("_class_name", ""))
        except ValueError:
            kind = None
        if kind:
            return _KINDS[kind]
    return _BUILTIN_KINDS.get(str(name), "unknown")


def targets_of_cells(cells: list[Any]) -> list[Target]:
    """From planned cells (config.Cell): one target per model, with its smallest num_images."""
    by_model: dict[str, Target] = {}
    for c in cells:
        key = json.dumps(c.model, sort_keys=True, default=str)
        n = int(c.config["num_images"])
        if key not in by_model or n < by_model[key].num_images:
            by_model[key] = Target(c.model, condition_kind(c.model), n)
    return list(by_model.values())


def targets_of_records(records: list[Any]) -> list[Target]:
    """From finished cells on disk (store.CellRecord)."""
    by_model: dict[str, Target] = {}
    for r in records:
        model = r.info["config"]["model"]
        key = json.dumps(model, sort_keys=True, default=str)
        n = int(r.info["num_images"])
        if key not in by_model or n < by_model[key].num_images:
            by_model[key] = Target(model, r.condition_kind, n)
    return list(by_model.values())


def applicable(names: list[str], targets: list[Target]) -> list[str]:
    """The selected metrics that apply to at least one target (fid to image models, traj_err to the
    analytic one, clip_score to text models); the others are simply not computed, as before."""
    out = []
    for name in names:
        for t in targets:
            gmm = t.condition_kind == "component"
            if (name in ANALYTIC) != gmm:
                continue
            if name in TEXT and t.condition_kind not in ("text", "unknown"):
                continue
            out.append(name)
            break
    return out


def _check_reference(cfg: dict[str, Any], wanted: list[str]) -> str | None:
    """Why metrics.ref cannot serve `wanted` (None when it can); cheap: no features are computed here."""
    ref = cfg.get("ref")
    if not ref:
        return (
            "metrics.ref= is not set (reference images: an image folder, a run folder of shards, or an .npz)"
        )
    path = Path(str(ref)).expanduser()
    if not path.exists():
        return f"metrics.ref={ref} does not exist"
    if path.suffix == ".npz":
        from samplebench.metrics.image import _read_reference_npz

        z = _read_reference_npz(path, str(ref), 2048)  # shapes, finite values: one-line errors
        if z["protocol"] is None and not cfg.get("ref_trust", False):
            return f"metrics.ref={ref} does not record its protocol (metrics.ref_trust=true to use it anyway)"
        if z["pool"] is None and any(n in ("kid", "precision", "recall") for n in wanted):
            return f"metrics.ref={ref} holds only mu and sigma; kid, precision and recall need the images"
        return None
    if not path.is_dir():
        return f"metrics.ref={ref} is neither a folder nor an .npz"
    shards = sorted(path.rglob("shard-*.npz"))
    if shards:
        from samplebench.metrics.image import shard_has_images

        if not any(shard_has_images(s) for s in shards):
            return f"metrics.ref={ref} is a folder of samplebench shards without images"
        return None
    from samplebench.metrics.images import list_images

    try:
        files = list_images(path)
    except UsageError:
        return f"metrics.ref={ref} holds no images (png, jpg, jpeg, webp, bmp, directly in it) and no shards"
    k = int((cfg.get("prc") or {}).get("neighborhood", 3))
    if len(files) < 2:
        return f"metrics.ref={ref} holds {len(files)} image; reference statistics need at least 2"
    if any(n in ("precision", "recall") for n in wanted) and len(files) <= k:
        return f"metrics.ref={ref} has {len(files)} images; precision and recall need more than {k}"
    return None


def _inception(cfg: dict[str, Any], device: str) -> None:
    import contextlib
    import io

    from samplebench.metrics.inception import InceptionFeatures

    # torch.hub prints "Downloading: ..." when the weights are not cached: the verdict is what counts here.
    with contextlib.redirect_stderr(io.StringIO()):
        _ = InceptionFeatures(
            mode=(cfg.get("fid") or {}).get("mode", "legacy"),
            weights_path=cfg.get("inception_weights"),
            device=device,
            batch_size=int(cfg.get("batch_size", 64)),
        )


def _clip(cfg: dict[str, Any]) -> None:
    from samplebench.metrics.clip_score import locate_weights

    c = cfg.get("clip") or {}
    locate_weights(
        c.get("model", "ViT-L-14"), c.get("pretrained", "openai"), c.get("model_config"), download=False
    )


def _image_reward(cfg: dict[str, Any]) -> None:
    from samplebench.metrics import image_reward as ir

    c = cfg.get("image_reward") or {}
    if not c.get("checkpoint"):
        raise UsageError("the official ImageReward.pt is needed: set metrics.image_reward.checkpoint=<path>")
    path = Path(str(c["checkpoint"])).expanduser()
    if not path.is_file():
        raise UsageError(f"metrics.image_reward.checkpoint={path} does not exist")
    ir.load_tokenizer(c.get("tokenizer"))
    ir.text_config(c.get("med_config"), 1)


def _traj_mse(cfg: dict[str, Any], targets: list[Target]) -> None:
    from samplebench.metrics.trajectory import reference_cell

    t = cfg.get("traj_mse") or {}
    for target in targets:
        if target.condition_kind != "component":
            info = {"config": {"model": target.model}, "model_label": "", "guidance": 1.0}
            sampler, schedule = t.get("sampler", "dpmpp_3m"), t.get("schedule", "karras")
            reference_cell(info, sampler, int(t.get("nfe", 200)), schedule)
            return


def _too_few(name: str, cfg: dict[str, Any], n: int) -> str | None:
    """Why n images per cell are too few for this metric's settings (None when enough)."""
    if name in ("fid", "kid") and n < 2:
        return f"{name} needs at least 2 images per cell (num_images={n})"
    if name == "is":
        splits = int((cfg.get("is") or {}).get("splits", 10))
        if n < splits:
            return f"is needs at least metrics.is.splits={splits} images per cell (num_images={n})"
    if name in ("precision", "recall"):
        k = int((cfg.get("prc") or {}).get("neighborhood", 3))
        if n <= k:
            return f"{name} needs more than metrics.prc.neighborhood={k} images per cell (num_images={n})"
    return None


def model_problems(targets: list[Target]) -> list[str]:
    """Models that cannot be loaded from here (no such folder, not a pipeline, not cached and no hub)."""
    out = []
    for t in targets:
        if t.condition_kind == "component":
            continue
        from samplebench.models.diffusers_models import check_available

        try:
            check_available(t.model)
        except UsageError as e:
            out.append(" ".join(str(e).split()))
    return out


def check_models(targets: list[Target]) -> None:
    """One UsageError naming every model that cannot be loaded (before anything is generated)."""
    problems = model_problems(targets)
    if problems:
        raise UsageError("; ".join(p.rstrip(".") for p in problems))


def check(
    cfg: dict[str, Any], targets: list[Target], stage: str = "nothing was generated", models: bool = False
) -> Preflight:
    """Every prerequisite of the selected metrics that apply to these targets; one UsageError naming all
    that is missing (metrics.on_missing=error, the default), or those metrics skipped (=skip). Networks
    are loaded on the CPU here, only to see that their weights are there and load. With `models`, the
    models themselves are checked too (before generation), and listed first."""
    on_missing = str(cfg.get("on_missing", "error"))
    if on_missing not in ON_MISSING:
        raise UsageError(f"metrics.on_missing={on_missing} is unknown; choose error (default) or skip")
    names = list(cfg.get("names") or [])
    wanted = applicable(names, targets)
    problems: dict[str, list[str]] = defaultdict(list)  # what is missing -> the metrics that need it
    image_targets = [t for t in targets if t.condition_kind != "component"]

    def need(metrics: list[str], probe) -> None:
        if not metrics:
            return
        try:
            why = probe()
        except UsageError as e:
            why = " ".join(str(e).split())
        if why:
            problems[why].extend(metrics)

    need([n for n in wanted if n in NEEDS_REF], lambda: _check_reference(cfg, wanted))
    need([n for n in wanted if n in INCEPTION], lambda: _inception(cfg, "cpu"))
    need([n for n in wanted if n in CLIP], lambda: _clip(cfg))
    need([n for n in wanted if n == "image_reward"], lambda: _image_reward(cfg))
    need([n for n in wanted if n == "traj_mse"], lambda: _traj_mse(cfg, image_targets))
    if image_targets:
        n = min(t.num_images for t in image_targets)
        for name in wanted:
            if name in IMAGE:
                need([name], lambda name=name: _too_few(name, cfg, n))
    unloadable = model_problems(targets) if models else []
    if not problems and not unloadable:
        return Preflight(names, {})
    parts = [f"{', '.join(dict.fromkeys(ms))}: {why}" for why, ms in problems.items()]
    reasons: dict[str, list[str]] = defaultdict(list)
    for why, ms in problems.items():
        for m in dict.fromkeys(ms):
            reasons[m].append(why.rstrip("."))
    skipped = {m: "; ".join(whys) for m, whys in reasons.items()}
    if unloadable:  # nothing to skip: without the model there is nothing to score
        raise UsageError("; ".join(p.rstrip(".") for p in [*unloadable, *parts]))
    if on_missing == "error":
        raise UsageError(
            f"the selected metrics cannot all be computed ({stage}): "
            + "; ".join(p.rstrip(".") for p in parts)
            + ". Provide what is missing, leave those metrics out of metrics.names=[...], or set "
            "metrics.on_missing=skip to skip them"
        )
    return Preflight([n for n in names if n not in skipped], skipped)
