"""ImageReward: our implementation equals the reference package (image-reward 1.5) on tiny random weights.

The reference is unzipped from its wheel (IMAGE_REWARD_WHEEL, else `pip download` from PyPI) and run under a
small compatibility shim (timm 1.x, transformers 5, no `clip`/`fairscale`/training deps); only its
constructor pieces are swapped for tiny sizes, never its forward code.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import types
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_med_config  # tests/tiny_models.py

from samplebench.errors import UsageError
from samplebench.metrics import image_reward as ir

WHEEL_ENV = "IMAGE_REWARD_WHEEL"
VOCAB = [
    "[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", "!", "a", "an", "the", "of", "on",
    "in", "with", "photo", "painting", "cat", "dog", "red", "blue", "green", "big", "small", "house", "tree",
    "sun", "##set", "##s", "##y", "at", "night", "oil", "style",
]  # fmt: skip
IMAGE_SIZE = 64
VIT_SIZES = {"vit_width": 32, "vit_depth": 2, "vit_heads": 2, "patch_size": 16}
MED_CONFIG = tiny_med_config(len(VOCAB))
PROMPTS = [
    "a photo of a red cat",
    "An oil painting of a big house at night, with the sunset!",
    "a dog",
    "zebra unicorn photo",  # unknown words -> [UNK]
    "a blue tree in the sun [DEC] style",  # the added special tokens are matched as in the reference
    " ".join(["a small green dog on the house ."] * 8),  # longer than 35 tokens: truncated
]
TOLERANCE = 1e-5


def _shapes(rng: np.random.Generator) -> list[np.ndarray]:
    """Image groups of one size each: portrait (resize + crop), exact size (no resize), crop offset 10.5
    (rounded half to even, no resize), landscape upscale."""
    return [
        rng.integers(0, 256, (5, 80, 61, 3), dtype=np.uint8),
        rng.integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
        rng.integers(0, 256, (2, IMAGE_SIZE + 21, IMAGE_SIZE, 3), dtype=np.uint8),
        rng.integers(0, 256, (3, 45, 103, 3), dtype=np.uint8),
    ]


# ----------------------------------------------------------------------------------------------------------
# the reference package


def _reference_wheel(tmp: Path) -> Path:
    if os.environ.get(WHEEL_ENV):
        wheel = Path(os.environ[WHEEL_ENV])
        assert wheel.is_file(), f"{WHEEL_ENV}={wheel} does not exist"
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "image-reward==1.5"]
    try:
        proc = subprocess.run([*cmd, "-d", str(tmp)], capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"could not download the reference wheel image-reward==1.5 ({e}); set {WHEEL_ENV}=")
    wheels = sorted(tmp.glob("image_reward-1.5-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        pytest.skip(
            f"could not download the reference wheel image-reward==1.5 from PyPI ({tail}); set {WHEEL_ENV}="
        )
    return wheels[0]


def _randomise(model: torch.nn.Module, seed: int) -> None:
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


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("image_reward_files")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (root / "med_config.json").write_text(json.dumps(MED_CONFIG))
    (root / "blip_med_config.json").write_text(json.dumps(ir.BLIP_MED_CONFIG))
    return {"root": root, "tokenizer": root / "tokenizer", "med_config": root / "med_config.json"}


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, tiny_files: dict[str, Path]
) -> Iterator[dict[str, Any]]:
    """The reference package imported under the shim, and a tiny random-weight reference model."""
    wheel = _reference_wheel(tmp_path_factory.mktemp("wheel"))
    src = tmp_path_factory.mktemp("image_reward_src")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(src)
    assert (src / "ImageReward" / "ImageReward.py").is_file(), f"{wheel} has no ImageReward package"

    import transformers
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    before = set(sys.modules)
    verbosity = transformers.logging.get_verbosity()
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
        # transformers 5 moved these out of modeling_utils (find_pruneable_heads_and_indices is gone; it is
        # only used to prune heads).
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

        irm = sys.modules["ImageReward.ImageReward"]
        blip_pretrain = sys.modules["ImageReward.models.BLIP.blip_pretrain"]
        med = sys.modules["ImageReward.models.BLIP.med"]
        vit = sys.modules["ImageReward.models.BLIP.vit"]
        # transformers 5: PreTrainedModel lost get_head_mask / invert_attention_mask, and its init_weights
        # needs post_init() state; give the reference's BertModel transformers 4's versions.
        mp.setattr(med.BertModel, "get_head_mask", _v4_get_head_mask, raising=False)
        mp.setattr(med.BertModel, "invert_attention_mask", _v4_invert_attention_mask, raising=False)
        mp.setattr(med.BertModel, "init_weights", lambda self: self.apply(self._init_weights))

        def init_tokenizer() -> Any:
            # The reference's init_tokenizer on a local vocab (transformers 5 has no
            # additional_special_tokens_ids for its unused enc_token_id).
            tok = transformers.BertTokenizer.from_pretrained(str(tiny_files["tokenizer"]))
            tok.add_special_tokens({"bos_token": "[DEC]"})
            tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
            return tok

        mp.setattr(blip_pretrain, "init_tokenizer", init_tokenizer)

        # The reference hard-codes ViT-L at 224 and MLP(768): build it with tiny sizes instead.
        with pytest.MonkeyPatch.context() as tiny:
            sizes = VIT_SIZES
            tiny.setattr(
                blip_pretrain,
                "create_vit",
                lambda *a, **k: (
                    vit.VisionTransformer(
                        img_size=IMAGE_SIZE,
                        patch_size=sizes["patch_size"],
                        embed_dim=sizes["vit_width"],
                        depth=sizes["vit_depth"],
                        num_heads=sizes["vit_heads"],
                        drop_path_rate=0.1,  # as for 'large'; identity in eval mode
                    ),
                    sizes["vit_width"],
                ),
            )
            mlp = irm.MLP
            tiny.setattr(irm, "MLP", lambda input_size: mlp(MED_CONFIG["hidden_size"]))
            model = irm.ImageReward(med_config=str(tiny_files["med_config"]), device="cpu")
        model.preprocess = irm._transform(IMAGE_SIZE)
        _randomise(model, seed=0)
        model.eval()
        checkpoint = tiny_files["root"] / "ImageReward.pt"
        torch.save(model.state_dict(), checkpoint)
        yield {"model": model, "module": irm, "checkpoint": checkpoint, "blip_med": tiny_files["root"]}
    transformers.logging.set_verbosity(verbosity)
    for name in set(sys.modules) - before:
        if name == "ImageReward" or name.startswith("ImageReward."):
            del sys.modules[name]


def _scorer(reference: dict[str, Any], tiny_files: dict[str, Path], **kw: Any) -> ir.ImageRewardScorer:
    kw = {
        "med_config": tiny_files["med_config"],
        "image_size": IMAGE_SIZE,
        "tokenizer": tiny_files["tokenizer"],
        "batch_size": 4,
        **VIT_SIZES,
        **kw,
    }
    return ir.ImageRewardScorer(reference["checkpoint"], **kw)


# ----------------------------------------------------------------------------------------------------------
# tests


def test_scores_equal_reference_score(reference: dict[str, Any], tiny_files: dict[str, Path]) -> None:
    """Each (image, prompt) pair scores as the reference's ImageReward.score(prompt, PIL image)."""
    scorer = _scorer(reference, tiny_files)
    rng = np.random.default_rng(1)
    worst = 0.0
    for images in _shapes(rng):
        prompts = [PROMPTS[i] for i in rng.integers(0, len(PROMPTS), len(images))]
        ours = scorer(images, prompts)
        assert ours.dtype == np.float64 and ours.shape == (len(images),)
        ref = np.array(
            [
                reference["model"].score(p, Image.fromarray(img))
                for img, p in zip(images, prompts, strict=True)
            ]
        )
        worst = max(worst, float(np.abs(ours - ref).max()))
        np.testing.assert_allclose(ours, ref, rtol=0, atol=TOLERANCE)
        assert np.ptp(ref) > 1e-3, "degenerate test: the random model gives every pair the same score"
    print(f"max |ours - reference| = {worst:.3g}")


@pytest.mark.parametrize("size", [IMAGE_SIZE, 224])
def test_preprocess_is_bitwise_the_reference_transform(reference: dict[str, Any], size: int) -> None:
    transform = reference["module"]._transform(size)
    rng = np.random.default_rng(4)
    for shape in [(80, 61), (64, 64), (85, 64), (45, 103), (224, 224), (300, 200), (333, 500), (17, 400)]:
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        assert torch.equal(ir.preprocess(image, size), transform(Image.fromarray(image))), shape


def test_scores_equal_reference_ranking_path(reference: dict[str, Any], tiny_files: dict[str, Path]) -> None:
    """Every prompt against a list of images, as ImageReward.score(prompt, [images]) (inference_rank)."""
    scorer = _scorer(reference, tiny_files, batch_size=16)
    images = np.random.default_rng(2).integers(0, 256, (4, 70, 90, 3), dtype=np.uint8)
    for prompt in PROMPTS:
        ours = scorer(images, [prompt] * len(images))
        ref = reference["model"].score(prompt, [Image.fromarray(img) for img in images])
        np.testing.assert_allclose(ours, np.array(ref), rtol=0, atol=TOLERANCE)


def test_batch_size_independent(reference: dict[str, Any], tiny_files: dict[str, Path]) -> None:
    images = np.random.default_rng(3).integers(0, 256, (7, 50, 66, 3), dtype=np.uint8)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(images))]
    scores = [_scorer(reference, tiny_files, batch_size=b)(images, prompts) for b in (1, 3, 16)]
    for other in scores[1:]:
        np.testing.assert_allclose(other, scores[0], rtol=0, atol=1e-6)


def test_normalisation_constants_are_the_reference(reference: dict[str, Any]) -> None:
    model, irm = reference["model"], reference["module"]
    assert (ir.REWARD_MEAN, ir.REWARD_STD) == (model.mean, model.std)
    normalize = [t for t in irm._transform(224).transforms if type(t).__name__ == "Normalize"]
    assert [tuple(normalize[0].mean), tuple(normalize[0].std)] == [ir.PIXEL_MEAN, ir.PIXEL_STD]
    assert f"max_length={ir.MAX_PROMPT_TOKENS}," in inspect.getsource(irm.ImageReward.score).replace(" ", "")


def test_protocol(reference: dict[str, Any], tiny_files: dict[str, Path]) -> None:
    import hashlib

    scorer = _scorer(reference, tiny_files)
    digest = hashlib.sha256(reference["checkpoint"].read_bytes()).hexdigest()
    assert scorer.protocol["checkpoint_sha256"] == digest
    assert scorer.protocol["image_size"] == str(IMAGE_SIZE)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in scorer.protocol.items())


def test_default_architecture_has_the_reference_weights(reference: dict[str, Any]) -> None:
    """Our defaults (ViT-L/16 at 224, BLIP's med BERT, MLP(768)) hold exactly the reference's weights."""
    irm = reference["module"]
    blip_vit = sys.modules["ImageReward.models.BLIP.vit"]
    med_path = reference["blip_med"] / "blip_med_config.json"

    class _CpuLinspace(types.ModuleType):  # the reference's VisionTransformer calls .item() on a linspace
        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

        @staticmethod
        def linspace(*args: Any, **kwargs: Any) -> torch.Tensor:
            return torch.linspace(*args, **kwargs, device="cpu")

    with pytest.MonkeyPatch.context() as mp, torch.device("meta"):
        mp.setattr(blip_vit, "torch", _CpuLinspace("torch"))
        ref = irm.ImageReward(med_config=str(med_path), device="cpu")
        ours = ir.build_model()
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    unused = {
        k for k in ref_shapes if k.startswith(("blip.vision_proj.", "blip.text_proj.")) or "position_ids" in k
    }
    assert set(ref_shapes) - set(our_shapes) == unused
    assert our_shapes == {k: s for k, s in ref_shapes.items() if k not in unused}
    assert our_shapes["blip.visual_encoder.pos_embed"] == (1, 197, 1024)
    assert our_shapes["mlp.layers.0.weight"] == (1024, 768)


def test_missing_checkpoint_is_a_one_line_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "ImageReward.pt"
    with pytest.raises(UsageError) as err:
        ir.ImageRewardScorer(missing)
    message = str(err.value)
    assert "\n" not in message
    assert str(missing) in message and "metrics.image_reward.checkpoint=" in message


def test_missing_tokenizer_is_a_one_line_usage_error(
    reference: dict[str, Any], tiny_files: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(UsageError) as err:
        _scorer(reference, tiny_files, tokenizer=tmp_path / "no-such-tokenizer")
    message = str(err.value)
    assert "\n" not in message and "metrics.image_reward.tokenizer=" in message


def test_uncached_default_tokenizer_is_a_one_line_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The default bert-base-uncased comes from the local HF cache only (no network, no empty vocab)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UsageError) as err:
        ir.load_tokenizer(None)
    assert "\n" not in str(err.value) and "metrics.image_reward.tokenizer=" in str(err.value)


def test_tokenizer_of_another_vocab_is_a_one_line_usage_error(
    reference: dict[str, Any], tiny_files: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "vocab.txt").write_text("\n".join([*VOCAB, "extra"]) + "\n")
    with pytest.raises(UsageError) as err:
        _scorer(reference, tiny_files, tokenizer=tmp_path / "vocab.txt")
    assert "\n" not in str(err.value) and "metrics.image_reward.tokenizer=" in str(err.value)


def test_wrong_architecture_is_a_one_line_usage_error(
    reference: dict[str, Any], tiny_files: dict[str, Path]
) -> None:
    with pytest.raises(UsageError) as err:
        _scorer(reference, tiny_files, image_size=32)  # pos_embed of another length
    assert "\n" not in str(err.value) and "pos_embed" in str(err.value)
