"""CLIP score: cosine similarity between each generated image and the prompt it was generated from.

The encoder is an open_clip model (default ViT-L-14 with OpenAI's weights, the model torchmetrics'
CLIPScore uses). Weights come from a pretrained tag resolved in the local cache first (no network), or
from a local checkpoint file, so that runs on machines without network fail fast with one actionable
line instead of hanging on retries.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from samplebench.errors import UsageError, brief

_OPTION = "metrics.clip"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz", ".npy")
# open_clip.constants.HF_WEIGHTS_NAME / HF_SAFE_WEIGHTS_NAME: the default file names in an HF hub repo.
_HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"
_HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"


def clip_score_torchmetrics(cos: np.ndarray) -> np.ndarray:
    """Per-image CLIP score on torchmetrics' scale; report the mean over images.

    torchmetrics.multimodal.CLIPScore (functional/multimodal/clip_score.py) defines
    score = max(100 * cos(E_image, E_text), 0) and returns its mean over the batch.
    """
    return 100.0 * np.maximum(np.asarray(cos, dtype=np.float64), 0.0)


def clip_score_paper(cos: np.ndarray, w: float = 2.5) -> np.ndarray:
    """Per-image CLIP score on the paper's scale; report the mean over images.

    Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning"
    (arXiv:2104.08718), eq. 1: CLIP-S(c, v) = w * max(cos(c, v), 0) with w = 2.5.
    """
    return w * np.maximum(np.asarray(cos, dtype=np.float64), 0.0)


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _one_line(error: BaseException, limit: int = 240) -> str:
    """An exception's message squeezed onto one short line (UsageError messages are one line)."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unreadable(error: BaseException) -> bool:
    """Whether loading a checkpoint failed on reading the file (damaged, truncated, empty, another format,
    pickled objects) rather than on fitting its weights into the model."""
    return (
        isinstance(error, (EOFError, pickle.UnpicklingError))
        or type(error).__name__ == "SafetensorError"
        or "zip archive" in str(error)
    )


def _hf_hub_offline() -> bool:
    """HF_HUB_OFFLINE as the user set it (huggingface_hub itself only reads it at import time)."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if env.strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:
        raise UsageError(
            "the CLIP score needs open_clip; install it with `pip install open_clip_torch`"
        ) from e
    return open_clip


class ClipScorer:
    """Scores each image against its own prompt with an open_clip model.

    `pretrained` is an open_clip pretrained tag (looked up in the local cache first, downloaded only when
    HF_HUB_OFFLINE is not set) or a local checkpoint file (a state_dict as .pt/.bin/.safetensors, loaded
    by open_clip with torch.load(weights_only=True)). `model_config` registers an open_clip model-config
    JSON whose file name (without .json) must equal `model`.

    When a tag was trained with QuickGELU (e.g. ViT-L-14/openai) the model is built with QuickGELU, as the
    weights need: open_clip 3.x would otherwise build nn.GELU for "ViT-L-14" and only warn. A checkpoint
    file gets the activation its model config says, so use e.g. "ViT-L-14-quickgelu" for OpenAI weights.
    """

    def __init__(
        self,
        model: str = "ViT-L-14",
        pretrained: str = "openai",
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        model_config: str | Path | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        if batch_size < 1:
            raise UsageError(f"{_OPTION}.batch_size must be at least 1, got {batch_size}")
        open_clip = _import_open_clip()
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        located = locate_weights(model, pretrained, model_config, cache_dir)
        model_name, model_cfg, tag_cfg, checkpoint = located
        pretrained_desc = f"{pretrained} (open_clip tag)" if tag_cfg else f"file {Path(checkpoint).name}"
        weights_sha256 = _sha256(checkpoint)

        quick_gelu = bool(model_cfg.get("quick_gelu", False) or tag_cfg.get("quick_gelu", False))
        try:
            # Passing the resolved file (not the tag) keeps open_clip off the network; the tag's
            # preprocessing settings are passed explicitly, which is what open_clip merges for a tag.
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=checkpoint,
                device=self.device,
                precision="fp32",
                force_quick_gelu=quick_gelu,
                image_mean=tag_cfg.get("mean"),
                image_std=tag_cfg.get("std"),
                image_interpolation=tag_cfg.get("interpolation"),
                image_resize_mode=tag_cfg.get("resize_mode"),
                weights_only=True,
            )
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - torch.load / safetensors / load_state_dict failures
            if _unreadable(e):
                raise UsageError(
                    f"CLIP checkpoint {checkpoint} is damaged, not a PyTorch or safetensors file, or pickles "
                    f"objects torch.load(weights_only=True) refuses ({brief(e)}); "
                    f"set {_OPTION}.pretrained to an intact plain state_dict (.pt/.bin/.safetensors)"
                ) from e
            raise UsageError(
                f"CLIP checkpoint {checkpoint} does not load into open_clip model {model} "
                f"({brief(e)}); set {_OPTION}.pretrained to weights for this "
                f"model or {_OPTION}.model to their architecture"
            ) from e
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)

        pp = self.model.visual.preprocess_cfg
        context_length = getattr(self.tokenizer, "context_length", None)
        self.protocol: dict[str, str] = {
            "model": model,
            "pretrained": pretrained_desc,
            "weights_sha256": weights_sha256,
            "open_clip": str(open_clip.__version__),
            "activation": "QuickGELU" if quick_gelu else "GELU",
            "precision": "fp32",
            "image_preprocessing": _describe_preprocessing(pp),
            "image_transform": " -> ".join(
                _short_repr(t) for t in getattr(self.preprocess, "transforms", [])
            ),
            "text_preprocessing": (
                f"open_clip.get_tokenizer({model_name!r}) = {type(self.tokenizer).__name__}, "
                f"context_length {context_length} (longer prompts truncated)"
            ),
            "similarity": "cosine of L2-normalised image and text embeddings, each image with its own prompt",
            "scaling": (
                "clip_score_torchmetrics = 100 * max(cos, 0) (torchmetrics CLIPScore); "
                "clip_score_paper = 2.5 * max(cos, 0) (Hessel et al. 2021, arXiv:2104.08718); "
                "mean over images"
            ),
        }

    @torch.no_grad()
    def cosine(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """Cosine similarity of image i with prompt i, shape (N,), float64.

        Works through `batch_size` images at a time so memory does not grow with N.
        """
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(prompts) != len(images):
            raise ValueError(
                f"{len(images)} images but {len(prompts)} prompts; each image needs its own prompt"
            )
        out = np.empty(len(images), dtype=np.float64)
        for start in range(0, len(images), self.batch_size):
            stop = min(start + self.batch_size, len(images))
            pixels = torch.stack([self.preprocess(Image.fromarray(img)) for img in images[start:stop]])
            tokens = self.tokenizer(list(prompts[start:stop]))
            image_emb = self.model.encode_image(pixels.to(self.device)).float()
            text_emb = self.model.encode_text(tokens.to(self.device)).float()
            image_emb = torch.nn.functional.normalize(image_emb, dim=-1)
            text_emb = torch.nn.functional.normalize(text_emb, dim=-1)
            out[start:stop] = (image_emb * text_emb).sum(dim=-1).double().cpu().numpy()
        return out


def locate_weights(
    model: str,
    pretrained: str,
    model_config: str | Path | None = None,
    cache_dir: str | Path | None = None,
    download: bool = True,
) -> tuple[str, dict[str, Any], dict[str, Any], str]:
    """(open_clip model name, its config, the pretrained tag's config or {}, the checkpoint file): the
    architecture is known and its weights are on disk (downloaded if not cached and allowed), or a one-line
    UsageError says what is missing. With download=False (the preflight, before any generation) weights
    that are not cached are only checked to be downloadable: the file returned is then ''."""
    open_clip = _import_open_clip()
    cache = None if cache_dir is None else str(cache_dir)
    if model_config is not None:
        _register_model_config(open_clip, model, Path(model_config))
    model_name = model.replace("/", "-")  # open_clip's own clean-up of built-in names
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise UsageError(
            f"unknown open_clip model {model!r}; set {_OPTION}.model to one of open_clip.list_models() "
            f"or point {_OPTION}.model_config at its config JSON"
        )
    tag_cfg = dict(open_clip.get_pretrained_cfg(model_name, pretrained)) if pretrained else {}
    if tag_cfg:
        checkpoint = _resolve_tag(open_clip, model, pretrained, tag_cfg, cache, download)
    else:
        checkpoint = _check_checkpoint_file(open_clip, model_name, pretrained)
    return model_name, model_cfg, tag_cfg, checkpoint


def _register_model_config(open_clip: Any, model: str, path: Path) -> None:
    """Make `model` name the config in `path`; open_clip keys configs by file stem and skips bad files."""
    option = f"{_OPTION}.model_config"
    if not path.is_file():
        raise UsageError(f"CLIP model config {path} does not exist; set {option} to an open_clip config JSON")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"CLIP model config {path} is not valid JSON ({_one_line(e)}); fix {option}") from e
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UsageError(f"CLIP model config {path} needs embed_dim, vision_cfg and text_cfg; fix {option}")
    if path.suffix != ".json" or path.stem != model:
        raise UsageError(
            f"open_clip names a model config after its file, so with {option}={path} "
            f"set {_OPTION}.model={path.stem} (a .json file)"
        )
    if open_clip.get_model_config(model) != cfg:  # add_model_config appends to a global list: add once
        open_clip.add_model_config(path)


def _check_checkpoint_file(open_clip: Any, model_name: str, pretrained: str) -> str:
    option = f"{_OPTION}.pretrained"
    if pretrained and os.path.isfile(pretrained):
        return pretrained
    looks_like_path = bool(pretrained) and (
        os.sep in pretrained or "/" in pretrained or pretrained.lower().endswith(_CHECKPOINT_SUFFIXES)
    )
    if looks_like_path:
        raise UsageError(
            f"CLIP checkpoint file {pretrained} does not exist; set {option}=<local checkpoint file> "
            "or an open_clip pretrained tag"
        )
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
    raise UsageError(
        f"{pretrained!r} is neither an open_clip pretrained tag for {model_name} (tags: {tags}) nor a file; "
        f"set {option}=<tag or local checkpoint file>"
    )


def _cached_tag_file(open_clip: Any, tag_cfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """The checkpoint open_clip would download for this tag, if it is already on disk; never uses network.

    Mirrors open_clip.pretrained.download_pretrained: an explicit 'file', else the HF hub repo when
    huggingface_hub is installed (safetensors first), else the URL cached under ~/.cache/clip.
    """
    if tag_cfg.get("file"):
        return tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    hub = tag_cfg.get("hf_hub", "")
    if hub and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)
        filename = filename or _HF_WEIGHTS_NAME
        candidates = [filename]
        if filename == _HF_WEIGHTS_NAME:
            candidates.insert(0, _HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        for name in candidates:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        return None
    url = tag_cfg.get("url", "")
    if url:
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if not target.is_file():
            return None
        # open_clip's expected-checksum convention for these two hosts.
        expected = ""
        if "openaipublic" in url:
            expected = url.split("/")[-2]
        elif "mlfoundations" in url:
            expected = os.path.splitext(target.name)[0].split("-")[-1]
        return str(target) if not expected or _sha256(target).startswith(expected) else None
    return None


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the URL's host opens (a quick probe, no retries, nothing printed)."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(url).hostname
    if not host:
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _resolve_tag(
    open_clip: Any,
    model: str,
    tag: str,
    tag_cfg: dict[str, Any],
    cache_dir: str | None,
    download: bool = True,
) -> str:
    """Local cache first; download through open_clip only when HF_HUB_OFFLINE is not set."""
    cached = _cached_tag_file(open_clip, tag_cfg, cache_dir)
    if cached:
        return cached
    fix = f"download them where there is network, or set {_OPTION}.pretrained=<local checkpoint file>"
    if _hf_hub_offline():
        raise UsageError(
            f"CLIP weights {model}/{tag} are not cached and cannot be downloaded (HF_HUB_OFFLINE); {fix}"
        )
    if not download:
        source = "https://huggingface.co" if tag_cfg.get("hf_hub") else tag_cfg.get("url", "")
        if not _reachable(source):
            raise UsageError(
                f"CLIP weights {model}/{tag} are not cached and {source or 'their source'} cannot be "
                f"reached from here; {fix}"
            )
        return ""
    try:
        path = open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
    except Exception as e:  # network, hub and checksum failures all mean the same thing to the user
        raise UsageError(
            f"CLIP weights {model}/{tag} are not cached and could not be downloaded ({_one_line(e)}); {fix}"
        ) from e
    if not path or not os.path.isfile(path):
        raise UsageError(f"CLIP weights {model}/{tag} have no download source in open_clip; {fix}")
    return str(path)


def _describe_preprocessing(pp: dict[str, Any]) -> str:
    """open_clip's eval transform in words, from the preprocess config it was built from."""
    size, interp, mode = pp.get("size"), pp.get("interpolation", "bicubic"), pp.get("resize_mode", "shortest")
    if isinstance(size, (tuple, list)):
        size = size[0] if len(set(size)) == 1 else "x".join(str(s) for s in size)
    if mode == "shortest":
        steps = f"resize shortest side to {size} ({interp}), center crop {size}"
    elif mode == "longest":
        fill = pp.get("fill_color", 0)
        steps = f"resize longest side to {size} ({interp}), center crop/pad {size} (fill {fill})"
    else:
        steps = f"resize to {size} ignoring aspect ratio ({interp})"
    mean = tuple(round(float(v), 8) for v in pp.get("mean", ()))
    std = tuple(round(float(v), 8) for v in pp.get("std", ()))
    return (
        f"uint8 RGB -> PIL -> open_clip eval transform ({steps}, to [0,1], normalize mean={mean} std={std})"
    )


def _short_repr(transform: Any) -> str:
    text = repr(transform)
    return type(transform).__name__ if text.startswith("<") else " ".join(text.split())
