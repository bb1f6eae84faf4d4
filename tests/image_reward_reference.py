"""The reference ImageReward (image-reward 1.5 on PyPI, THUDM/ImageReward), imported from its wheel.

The package does not import under the current stack, so it runs under a small compatibility shim (timm 1.x,
transformers 5, no `clip`/`fairscale`/training deps); only its constructor pieces are swapped for tiny sizes,
never its forward code. Used by tests/test_image_reward.py (the live comparison, when the wheel can be had)
and by tests/fixtures/make_image_reward_reference.py (the scores recorded once for the offline test).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import types
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

REFERENCE = "image-reward==1.5"
WHEEL_ENV = "IMAGE_REWARD_WHEEL"


def find_wheel(tmp: Path) -> tuple[Path | None, str]:
    """(the reference wheel, "") from $IMAGE_REWARD_WHEEL, else `pip download` into tmp; else (None, why)."""
    if os.environ.get(WHEEL_ENV):
        wheel = Path(os.environ[WHEEL_ENV])
        if not wheel.is_file():
            return None, f"{WHEEL_ENV}={wheel} does not exist"
        return wheel, ""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", REFERENCE]
    try:
        proc = subprocess.run([*cmd, "-d", str(tmp)], capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"could not download the reference wheel {REFERENCE} ({e}); set {WHEEL_ENV}="
    wheels = sorted(tmp.glob("image_reward-1.5-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        return (
            None,
            f"could not download the reference wheel {REFERENCE} from PyPI ({tail}); set {WHEEL_ENV}=",
        )
    return wheels[0], ""


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorm gains around 1), scaled so activations and rewards stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("cls_token", "pos_embed")):
                p.copy_(0.5 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def _v4_get_head_mask(
    self: Any, head_mask: Any, num_hidden_layers: int, is_attention_chunked: bool = False
) -> Any:
    """transformers 4's PreTrainedModel.get_head_mask for head_mask=None (removed in transformers 5)."""
    assert head_mask is None, "the reference never passes a head mask when scoring"
    return [None] * num_hidden_layers


def _v4_invert_attention_mask(self: Any, mask: torch.Tensor) -> torch.Tensor:
    """transformers 4's PreTrainedModel.invert_attention_mask (removed in transformers 5)."""
    ext = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    ext = ext.to(dtype=self.dtype)
    return (1.0 - ext) * torch.finfo(self.dtype).min


@contextlib.contextmanager
def reference_package(wheel: Path, src: Path, tokenizer: Path) -> Iterator[types.SimpleNamespace]:
    """The reference package unzipped into `src` and imported under the shim, its tokenizer on the vocab.txt
    in the folder `tokenizer`: (irm = ImageReward.ImageReward, vit, blip_pretrain, med modules). The shim
    stays in place until the context exits; then the package leaves sys.modules again."""
    import pytest
    import transformers
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(src)
    assert (src / "ImageReward" / "ImageReward.py").is_file(), f"{wheel} has no ImageReward package"
    before = set(sys.modules)
    verbosity = transformers.logging.get_verbosity()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.syspath_prepend(str(src))
            # Imported by the package but never used for scoring: OpenAI CLIP (CLIPScore/AestheticScore),
            # fairscale (ViT gradient checkpointing only), the ReFL training script (accelerate, datasets).
            mp.setitem(sys.modules, "clip", types.ModuleType("clip"))
            fairscale = "fairscale.nn.checkpoint.checkpoint_activations"
            for name in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint", fairscale):
                mp.setitem(sys.modules, name, types.ModuleType(name))
            sys.modules[fairscale].checkpoint_wrapper = lambda module, *a, **k: module
            mp.setitem(sys.modules, "ImageReward.ReFL", types.ModuleType("ImageReward.ReFL"))
            # transformers 5 moved these out of modeling_utils (find_pruneable_heads_and_indices is gone; it
            # is only used to prune heads).
            mp.setattr(
                modeling_utils,
                "apply_chunking_to_forward",
                pytorch_utils.apply_chunking_to_forward,
                raising=False,
            )
            mp.setattr(modeling_utils, "prune_linear_layer", pytorch_utils.prune_linear_layer, raising=False)
            mp.setattr(modeling_utils, "find_pruneable_heads_and_indices", lambda *a: None, raising=False)
            with warnings.catch_warnings():  # blip.py calls warnings.filterwarnings("ignore") at import
                import ImageReward  # noqa: F401

            ref = types.SimpleNamespace(
                irm=sys.modules["ImageReward.ImageReward"],
                blip_pretrain=sys.modules["ImageReward.models.BLIP.blip_pretrain"],
                med=sys.modules["ImageReward.models.BLIP.med"],
                vit=sys.modules["ImageReward.models.BLIP.vit"],
            )
            # transformers 5: PreTrainedModel lost get_head_mask / invert_attention_mask, and its
            # init_weights needs post_init() state; give the reference's BertModel transformers 4's versions.
            mp.setattr(ref.med.BertModel, "get_head_mask", _v4_get_head_mask, raising=False)
            mp.setattr(ref.med.BertModel, "invert_attention_mask", _v4_invert_attention_mask, raising=False)
            mp.setattr(ref.med.BertModel, "init_weights", lambda self: self.apply(self._init_weights))

            def init_tokenizer() -> Any:
                # The reference's init_tokenizer on a local vocab (transformers 5 has no
                # additional_special_tokens_ids for its unused enc_token_id).
                tok = transformers.BertTokenizer.from_pretrained(str(tokenizer))
                tok.add_special_tokens({"bos_token": "[DEC]"})
                tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
                return tok

            mp.setattr(ref.blip_pretrain, "init_tokenizer", init_tokenizer)
            yield ref
    finally:
        transformers.logging.set_verbosity(verbosity)
        for name in set(sys.modules) - before:
            if name == "ImageReward" or name.startswith("ImageReward."):
                del sys.modules[name]


def tiny_reference_model(
    ref: types.SimpleNamespace, med_config: Path, image_size: int, vit_sizes: dict[str, int], hidden_size: int
) -> torch.nn.Module:
    """The reference's ImageReward built at tiny sizes: it hard-codes ViT-L at 224 and MLP(768), so
    create_vit and MLP are swapped while it is constructed (nothing else, and not its forward code)."""
    import pytest

    with pytest.MonkeyPatch.context() as tiny:
        tiny.setattr(
            ref.blip_pretrain,
            "create_vit",
            lambda *a, **k: (
                ref.vit.VisionTransformer(
                    img_size=image_size,
                    patch_size=vit_sizes["patch_size"],
                    embed_dim=vit_sizes["vit_width"],
                    depth=vit_sizes["vit_depth"],
                    num_heads=vit_sizes["vit_heads"],
                    drop_path_rate=0.1,  # as for 'large'; identity in eval mode
                ),
                vit_sizes["vit_width"],
            ),
        )
        mlp = ref.irm.MLP
        tiny.setattr(ref.irm, "MLP", lambda input_size: mlp(hidden_size))
        model = ref.irm.ImageReward(med_config=str(med_config), device="cpu")
    model.preprocess = ref.irm._transform(image_size)
    return model
