"""ImageReward: a learned human-preference score for text-to-image samples.

Xu et al. 2023, ImageReward, arXiv:2304.05977; reference: THUDM/ImageReward, image-reward 1.5 on PyPI.

This is our own re-implementation of the reference's scoring path (`ImageReward.score` and
`ImageReward.inference_rank`): a BLIP ViT image encoder, a BLIP "med" BERT text encoder that cross-attends to
the image tokens, the first ([CLS]) token's feature, a 5-layer linear MLP, then (reward - mean) / std with the
reference's constants. It loads the official `ImageReward.pt` state_dict and `med_config.json` unchanged and
reproduces the reference numerically: same preprocessing (PIL bicubic resize of the short side, center crop,
ToTensor, CLIP mean/std), same tokenisation (bert-base-uncased plus the added [DEC]/[ENC] tokens, padded and
truncated to 35 tokens), the same attention arithmetic (including BLIP's -10000 padding mask) and float32
throughout. What differs: we score a batch of (image, prompt) pairs at once instead of one image at a time
(float32 rounding only: < 1e-6 apart in the tests, bitwise equal with batch_size=1 on CPU), we refuse a
checkpoint with missing or misshapen weights (the reference loads with strict=False and would silently keep
random weights), we take the tokenizer's vocab.txt from a local path or the local Hugging Face cache only,
and we load with torch.load(weights_only=True). The package itself is not used because image-reward 1.5
pins timm 0.6.13 and fairscale, imports the OpenAI `clip` package and a training script (accelerate,
datasets) at import time, and its BLIP text encoder does not import or construct under transformers 5
(`apply_chunking_to_forward` moved; `PreTrainedModel.get_head_mask` / `invert_attention_mask` are gone and
`init_weights` changed; `BertTokenizer.additional_special_tokens_ids` is gone).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from samplebench.errors import UsageError, brief

OPTION = "metrics.image_reward"

# The reference's reward normalisation (ImageReward.ImageReward.__init__).
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072

# The reference's image normalisation (CLIP's constants, ImageReward._transform).
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)

# Prompts are padded and truncated to this many tokens (ImageReward.score).
MAX_PROMPT_TOKENS = 35

# BLIP's create_vit presets: (width, depth, heads); patch 16, MLP ratio 4, qkv bias, LayerNorm eps 1e-6.
VIT_PRESETS: dict[str, tuple[int, int, int]] = {"base": (768, 12, 12), "large": (1024, 24, 16)}

# Hidden sizes of the reward head after the text feature (ImageReward.MLP); no activations between them.
MLP_HIDDEN = (1024, 128, 64, 16)

# BLIP's configs/med_config.json, the med_config.json that ships with ImageReward-v1.0.
BLIP_MED_CONFIG: dict[str, Any] = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}

# transformers.BertConfig defaults for keys a med_config may leave out.
_BERT_DEFAULTS: dict[str, Any] = {
    "hidden_act": "gelu",
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "add_cross_attention": False,
}

DEFAULT_TOKENIZER = "bert-base-uncased"
# The name the reference used, and its current name on the hub.
DEFAULT_TOKENIZER_REPOS = ("bert-base-uncased", "google-bert/bert-base-uncased")


# ----------------------------------------------------------------------------------------------------------
# BLIP vision transformer (BLIP models/vit.py; the module names match the checkpoint's keys)


class _PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, as timm's PatchEmbed (flatten, no norm)."""

    def __init__(self, image_size: int, patch_size: int, width: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} pixels, got {tuple(x.shape[-2:])}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class _ViTAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Linear(width, width * 3, bias=True)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _ViTMlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = _ViTAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = _ViTMlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """BLIP's ViT: [CLS] + patch tokens + learned positions, pre-norm blocks, final LayerNorm."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"ViT width {width} is not a multiple of its {heads} heads")
        self.patch_embed = _PatchEmbed(image_size, patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, width))
        self.blocks = nn.ModuleList(_ViTBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embed[:, : x.size(1), :]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------------------
# BLIP "med" BERT text encoder in its multimodal mode (BLIP models/med.py, BertModel without pooler)


class _BertEmbeddings(nn.Module):
    """Word + absolute position embeddings (no token types), LayerNorm."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], hidden, padding_idx=cfg["pad_token_id"])
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=cfg["layer_norm_eps"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class _BertSelfAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any], kv_width: int) -> None:
        super().__init__()
        hidden, self.heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if hidden % self.heads:
            raise ValueError(f"BERT hidden size {hidden} is not a multiple of its {self.heads} heads")
        self.head_size = hidden // self.heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.heads, self.head_size).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(kv)), self._split(self.value(kv))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size)
        if mask is not None:
            scores = scores + mask
        context = torch.matmul(scores.softmax(dim=-1), v).permute(0, 2, 1, 3).contiguous()
        return context.view(*context.shape[:-2], self.heads * self.head_size)


class _BertSelfOutput(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg["hidden_size"], cfg["hidden_size"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _BertAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any], kv_width: int) -> None:
        super().__init__()
        self.self = _BertSelfAttention(cfg, kv_width)
        self.output = _BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, kv, mask), x)


class _BertIntermediate(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.dense = nn.Linear(cfg["hidden_size"], cfg["intermediate_size"])
        self.act = ACT2FN[cfg["hidden_act"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class _BertOutput(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg["intermediate_size"], cfg["hidden_size"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _BertLayer(nn.Module):
    """Self-attention over the prompt, cross-attention to all image tokens, feed-forward."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.attention = _BertAttention(cfg, cfg["hidden_size"])
        self.crossattention = _BertAttention(cfg, cfg["encoder_width"])
        self.intermediate = _BertIntermediate(cfg)
        self.output = _BertOutput(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, mask)
        # The image attention mask is all ones, so BLIP's inverted cross mask is zero: nothing to add.
        x = self.crossattention(x, image_embeds, None)
        return self.output(self.intermediate(x), x)


class _BertEncoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_BertLayer(cfg) for _ in range(cfg["num_hidden_layers"]))


class TextEncoder(nn.Module):
    """BLIP's med BertModel (no pooler), run as an encoder with cross-attention to image embeddings."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.embeddings = _BertEmbeddings(cfg)
        self.encoder = _BertEncoder(cfg)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        x = self.embeddings(input_ids)
        # BertModel.get_extended_attention_mask of BLIP's med.py: padding gets -10000, not -inf.
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.encoder.layer:
            x = layer(x, mask, image_embeds)
        return x


class _Blip(nn.Module):
    def __init__(self, vit: VisionTransformer, text: TextEncoder) -> None:
        super().__init__()
        self.visual_encoder = vit
        self.text_encoder = text


class _RewardHead(nn.Module):
    """ImageReward's MLP: linear layers only (dropouts at indices 1, 3, 5 are identities at inference)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        h1, h2, h3, h4 = MLP_HIDDEN
        self.layers = nn.Sequential(
            nn.Linear(in_features, h1),
            nn.Identity(),
            nn.Linear(h1, h2),
            nn.Identity(),
            nn.Linear(h2, h3),
            nn.Identity(),
            nn.Linear(h3, h4),
            nn.Linear(h4, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """The network of ImageReward; its state_dict keys are those of the official ImageReward.pt."""

    def __init__(self, vit: VisionTransformer, text_cfg: dict[str, Any]) -> None:
        super().__init__()
        self.blip = _Blip(vit, TextEncoder(text_cfg))
        self.mlp = _RewardHead(text_cfg["hidden_size"])

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Normalised rewards (N,) for normalised pixels (N, 3, S, S) and padded prompt tokens (N, T)."""
        image_embeds = self.blip.visual_encoder(pixels)
        features = self.blip.text_encoder(input_ids, attention_mask, image_embeds)[:, 0, :].float()
        rewards = self.mlp(features)
        return ((rewards - REWARD_MEAN) / REWARD_STD).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------
# building, loading, preprocessing


def text_config(med_config: str | Path | dict[str, Any] | None, vision_width: int) -> dict[str, Any]:
    """The med BERT config with defaults filled in and encoder_width set to the ViT width, as BLIP does."""
    if med_config is None:
        cfg = dict(BLIP_MED_CONFIG)
    elif isinstance(med_config, dict):
        cfg = dict(med_config)
    else:
        path = Path(med_config).expanduser()
        if not path.is_file():
            raise UsageError(
                f"ImageReward med_config {path} does not exist; download med_config.json (THUDM/ImageReward) "
                f"or leave {OPTION}.med_config unset to use BLIP's built-in med config"
            )
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(
                f"ImageReward med_config {path} is not readable JSON ({e}); fix {OPTION}.med_config="
            ) from e
    cfg = {**_BERT_DEFAULTS, **cfg, "encoder_width": vision_width}
    missing = [
        k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in cfg
    ]
    if missing:
        raise UsageError(f"ImageReward med_config lacks {', '.join(missing)}; fix {OPTION}.med_config=")
    if not cfg["add_cross_attention"] or cfg["position_embedding_type"] != "absolute":
        raise UsageError(
            "ImageReward med_config must have add_cross_attention=true and absolute position embeddings; "
            f"fix {OPTION}.med_config="
        )
    return cfg


def build_model(
    vit: str = "large",
    image_size: int = 224,
    med_config: str | Path | dict[str, Any] | None = None,
    *,
    vit_width: int | None = None,
    vit_depth: int | None = None,
    vit_heads: int | None = None,
    patch_size: int = 16,
) -> ImageRewardModel:
    """An untrained ImageReward network; defaults: ImageReward-v1.0 (BLIP ViT-L/16 at 224, BERT-base)."""
    if vit not in VIT_PRESETS:
        raise UsageError(
            f"unknown ImageReward vit {vit!r}; set {OPTION}.vit= to one of {sorted(VIT_PRESETS)}"
        )
    width, depth, heads = VIT_PRESETS[vit]
    width, depth, heads = vit_width or width, vit_depth or depth, vit_heads or heads
    if image_size % patch_size:
        raise UsageError(f"ImageReward image_size {image_size} is not a multiple of patch {patch_size}")
    encoder = VisionTransformer(image_size, patch_size, width, depth, heads)
    return ImageRewardModel(encoder, text_config(med_config, width))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(model: ImageRewardModel, path: Path) -> None:
    """Load an ImageReward.pt state_dict (tensors only) into `model`; every weight must be present and fit.

    Extra keys (BLIP's vision_proj/text_proj, the position_ids buffer) are ignored, as by the reference.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise UsageError(
            f"ImageReward checkpoint {path} is damaged, not a PyTorch file, or not a plain state_dict of "
            f"tensors ({brief(e)}); set {OPTION}.checkpoint= to an intact copy of "
            "the official ImageReward.pt"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(
            f"ImageReward checkpoint {path} is not a state_dict of tensors; set {OPTION}.checkpoint= to "
            "the official ImageReward.pt"
        )
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    misfit = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or misfit:
        what = f"lacks {len(missing)} weights (e.g. {missing[0]})" if missing else ""
        if misfit:
            k = misfit[0]
            what += (", and " if what else "") + (
                f"has {len(misfit)} weights of another shape (e.g. {k}: {tuple(state[k].shape)} "
                f"vs {tuple(own[k].shape)})"
            )
        raise UsageError(
            f"ImageReward checkpoint {path} {what} for this architecture; check {OPTION}.checkpoint=, "
            f"{OPTION}.vit= and {OPTION}.med_config="
        )
    model.load_state_dict({k: state[k] for k in own}, strict=True)


def _cached_vocab(repo_ids: Sequence[str] = DEFAULT_TOKENIZER_REPOS) -> Path:
    """bert-base-uncased's vocab.txt from the local Hugging Face cache; never touches the network."""
    from huggingface_hub import hf_hub_download

    for repo_id in repo_ids:
        try:
            return Path(hf_hub_download(repo_id, "vocab.txt", local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached under this name
            continue
    raise UsageError(
        f"the ImageReward tokenizer {DEFAULT_TOKENIZER} is not in the local Hugging Face cache; download its "
        f"vocab.txt where there is network and set {OPTION}.tokenizer= to it (or to its folder)"
    )


def load_tokenizer(tokenizer: str | Path | None = None) -> Any:
    """BLIP's tokenizer: an uncased BertTokenizer on bert-base-uncased's vocab.txt, plus [DEC] and [ENC].

    `tokenizer` is a vocab.txt or a folder holding one; None: bert-base-uncased from the local HF cache.
    (transformers 5's BertTokenizer.from_pretrained returns an empty tokenizer when files are missing, so the
    vocab file is resolved here and checked.)
    """
    from transformers import BertTokenizer

    if tokenizer is None:
        vocab = _cached_vocab()
    else:
        path = Path(tokenizer).expanduser()
        vocab = path / "vocab.txt" if path.is_dir() else path
        if not vocab.is_file():
            raise UsageError(
                f"ImageReward tokenizer {vocab} does not exist; set {OPTION}.tokenizer= to "
                "bert-base-uncased's vocab.txt or a folder holding it"
            )
    # Positional: the first parameter is `vocab_file` in transformers 4 and `vocab` (dict or file) in 5.
    tok = BertTokenizer(str(vocab), do_lower_case=True)
    words = [t for t in tok.get_vocab() if not (t.startswith("[") and t.endswith("]"))]
    if not words:
        raise UsageError(
            f"ImageReward tokenizer {vocab} has no words; set {OPTION}.tokenizer= to a real vocab.txt"
        )
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def preprocess(image: np.ndarray, size: int) -> torch.Tensor:
    """The reference's transform on one uint8 (H, W, 3) image -> float32 (3, size, size), CLIP-normalised.

    torchvision Resize(size, BICUBIC) on a PIL image (short side to `size`, long side truncated), CenterCrop
    (offsets rounded half to even, as torchvision), ToTensor (/255), Normalize.
    """
    h, w = image.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_h, new_w) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    crop = np.array(image[top : top + size, left : left + size], dtype=np.uint8, copy=True)
    x = torch.from_numpy(crop).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32).view(-1, 1, 1)
    return x.sub(mean).div(std)


class ImageRewardScorer:
    """ImageReward scores for (image, prompt) pairs, equal to the reference's `ImageReward.score`.

    `vit` picks BLIP's preset ("large" for ImageReward-v1.0); `vit_width`, `vit_depth`, `vit_heads` and
    `patch_size` override it (tests build tiny models). `med_config` is the BERT config (path, dict, or None
    for BLIP's med_config.json); `tokenizer` is a folder or vocab.txt of bert-base-uncased (None: the hub
    name, from the local Hugging Face cache).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        med_config: str | Path | dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        vit: str = "large",
        image_size: int = 224,
        batch_size: int = 16,
        tokenizer: str | Path | None = None,
        *,
        vit_width: int | None = None,
        vit_depth: int | None = None,
        vit_heads: int | None = None,
        patch_size: int = 16,
    ) -> None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise UsageError(
                f"ImageReward checkpoint {path} does not exist; download ImageReward.pt where there is "
                f"network and set {OPTION}.checkpoint="
            )
        if batch_size < 1:
            raise UsageError(
                f"ImageReward batch_size must be >= 1, got {batch_size}; fix {OPTION}.batch_size="
            )
        self.device = torch.device(device)
        self.image_size = image_size
        self.batch_size = batch_size
        sizes = {
            "vit_width": vit_width,
            "vit_depth": vit_depth,
            "vit_heads": vit_heads,
            "patch_size": patch_size,
        }
        model = build_model(vit, image_size, med_config, **sizes)
        self.tokenizer = load_tokenizer(tokenizer)
        vocab = model.blip.text_encoder.embeddings.word_embeddings.num_embeddings
        if len(self.tokenizer) != vocab:  # BLIP: bert-base-uncased's 30522 + [DEC], [ENC] = 30524
            raise UsageError(
                f"ImageReward tokenizer has {len(self.tokenizer)} tokens with [DEC], [ENC] but the text "
                f"encoder has {vocab}; set {OPTION}.tokenizer= to bert-base-uncased's vocab.txt"
            )
        load_checkpoint(model, path)
        self.model = model.to(self.device).eval()
        vit_block = model.blip.visual_encoder
        text = model.blip.text_encoder
        self.protocol: dict[str, str] = {
            "model": "ImageReward (Xu et al. 2023; THUDM/ImageReward)",
            "architecture": (
                f"BLIP ViT-{vit} width {vit_block.cls_token.shape[-1]} depth {len(vit_block.blocks)} "
                f"patch {patch_size} + med BERT hidden {text.embeddings.word_embeddings.embedding_dim} "
                f"layers {len(text.encoder.layer)}"
            ),
            "checkpoint": path.name,
            "checkpoint_sha256": sha256_file(path),
            "image_size": str(image_size),
            "preprocess": f"PIL bicubic resize short side {image_size}, center crop, CLIP mean/std",
            "tokenizer": str(DEFAULT_TOKENIZER if tokenizer is None else tokenizer),
            "max_prompt_tokens": str(MAX_PROMPT_TOKENS),
            "normalisation": f"(reward - {REWARD_MEAN!r}) / {REWARD_STD!r}",
        }

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """Scores (N,) float64 of uint8 images (N, H, W, 3), image i scored against prompts[i]."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if isinstance(prompts, str) or len(prompts) != len(images):
            raise ValueError(f"need one prompt per image: {len(images)} images, prompts {prompts!r:.80}")
        out = np.empty(len(images), dtype=np.float64)
        for start in range(0, len(images), self.batch_size):
            stop = min(start + self.batch_size, len(images))
            pixels = torch.stack([preprocess(img, self.image_size) for img in images[start:stop]])
            tokens = self.tokenizer(
                list(prompts[start:stop]),
                padding="max_length",
                truncation=True,
                max_length=MAX_PROMPT_TOKENS,
                return_tensors="pt",
            )
            rewards = self.model(
                pixels.to(self.device),
                tokens["input_ids"].to(self.device),
                tokens["attention_mask"].to(self.device),
            )
            out[start:stop] = rewards.double().cpu().numpy()
        return out
