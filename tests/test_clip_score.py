"""CLIP score against a tiny, randomly initialised open_clip model saved as a checkpoint file.

No pretrained weights can be downloaded here, so the test writes an open_clip model config, saves a
random model's state_dict, and loads it back through ClipScorer exactly as a user's local checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samplebench.errors import UsageError
from samplebench.metrics.clip_score import ClipScorer, clip_score_paper, clip_score_torchmetrics

open_clip = pytest.importorskip("open_clip")  # an optional dependency of samplebench

TINY = "samplebench-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    # vocab_size 49408 and context_length 77 select open_clip's bundled BPE tokenizer (no download).
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PROMPTS = [
    "a red cube on a table",
    "a photograph of a cat",
    "an astronaut riding a horse",
    "a bowl of soup",
    "a watercolor painting of a lighthouse",
    "two dogs playing in the snow",
    "a city skyline at night",
]


@dataclass
class Tiny:
    config: Path
    checkpoint: Path
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    root = tmp_path_factory.mktemp("clip")
    config = root / f"{TINY}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY)  # random init, no weights
    model.eval()
    checkpoint = root / "tiny_clip.pt"
    torch.save(model.state_dict(), checkpoint)  # the plain state_dict format open_clip loads from a file
    return Tiny(config, checkpoint, model, preprocess, open_clip.get_tokenizer(TINY))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    # Not square and not the model's size, so the resize and center crop both do something.
    return np.random.default_rng(0).integers(0, 256, size=(len(PROMPTS), 40, 52, 3), dtype=np.uint8)


def scorer(tiny: Tiny, batch_size: int = 32) -> ClipScorer:
    return ClipScorer(
        model=TINY, pretrained=str(tiny.checkpoint), model_config=tiny.config, batch_size=batch_size
    )


@torch.no_grad()
def reference_cosine(tiny: Tiny, image: np.ndarray, prompt: str) -> float:
    """One (image, prompt) pair through the model's own transform and encoders, no batching."""
    pixels = tiny.preprocess(Image.fromarray(image)).unsqueeze(0)
    tokens = tiny.tokenizer([prompt])
    image_emb = tiny.model.encode_image(pixels)[0]
    text_emb = tiny.model.encode_text(tokens)[0]
    return float(image_emb @ text_emb / (image_emb.norm() * text_emb.norm()))


def test_cosine_matches_single_example_reference(tiny: Tiny, images: np.ndarray) -> None:
    cos = scorer(tiny).cosine(images, PROMPTS)
    expected = np.array([reference_cosine(tiny, im, p) for im, p in zip(images, PROMPTS, strict=True)])
    assert cos.dtype == np.float64 and cos.shape == (len(PROMPTS),)
    np.testing.assert_allclose(cos, expected, rtol=0, atol=1e-5)
    assert np.all(np.abs(cos) <= 1 + 1e-6)
    assert np.ptp(cos) > 1e-3  # the pairs really differ, so the comparison above means something


def test_batch_size_does_not_change_scores(tiny: Tiny, images: np.ndarray) -> None:
    small = scorer(tiny, batch_size=3).cosine(images, PROMPTS)  # 3 + 3 + 1: includes a ragged batch
    large = scorer(tiny, batch_size=32).cosine(images, PROMPTS)
    # Only float32 kernel choice and reduction order differ between batch sizes (u = 6e-8, reductions of
    # up to 768 terms): 1e-5 on cosines in [-1, 1]. A batch-mixing bug moves them by 1e-3 and more.
    np.testing.assert_allclose(small, large, rtol=0, atol=1e-5)


def test_each_image_is_scored_against_its_own_prompt(tiny: Tiny, images: np.ndarray) -> None:
    clip = scorer(tiny)
    perm = np.roll(np.arange(len(PROMPTS)), 2)
    permuted = clip.cosine(images, [PROMPTS[j] for j in perm])
    expected = np.array([reference_cosine(tiny, images[i], PROMPTS[j]) for i, j in enumerate(perm)])
    np.testing.assert_allclose(permuted, expected, rtol=0, atol=1e-5)
    assert np.all(np.abs(permuted - clip.cosine(images, PROMPTS)) > 1e-6)
    # Reordering images together with their prompts reorders the scores and changes nothing else.
    np.testing.assert_allclose(
        clip.cosine(images[perm], [PROMPTS[j] for j in perm]),
        clip.cosine(images, PROMPTS)[perm],
        rtol=0,
        atol=1e-5,  # other batch composition: float32 reduction order only, as in the batch-size test
    )


def test_scalings_floor_negative_cosines_at_zero() -> None:
    cos = np.array([-0.7, -1e-9, 0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(clip_score_torchmetrics(cos), [0.0, 0.0, 0.0, 25.0, 50.0, 100.0])
    np.testing.assert_allclose(clip_score_paper(cos), [0.0, 0.0, 0.0, 0.625, 1.25, 2.5])
    np.testing.assert_allclose(clip_score_paper(cos, w=1.0), [0.0, 0.0, 0.0, 0.25, 0.5, 1.0])
    assert clip_score_torchmetrics(cos).dtype == np.float64


def test_protocol_records_model_weights_and_preprocessing(tiny: Tiny) -> None:
    protocol = scorer(tiny).protocol
    assert protocol["model"] == TINY
    assert protocol["weights_sha256"] == hashlib.sha256(tiny.checkpoint.read_bytes()).hexdigest()
    assert protocol["open_clip"] == open_clip.__version__
    assert "resize shortest side to 32 (bicubic), center crop 32" in protocol["image_preprocessing"]
    assert "CenterCrop" in protocol["image_transform"]
    assert "100 * max(cos, 0)" in protocol["scaling"] and "2.5 * max(cos, 0)" in protocol["scaling"]
    assert all(isinstance(v, str) for v in protocol.values())


def test_missing_checkpoint_is_a_usage_error(tiny: Tiny, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(UsageError, match=r"metrics\.clip\.pretrained") as info:
        ClipScorer(model=TINY, pretrained=str(missing), model_config=tiny.config)
    assert str(missing) in str(info.value) and "\n" not in str(info.value)


def test_uncached_tag_offline_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fails fast: with HF_HUB_OFFLINE set no download is even attempted (checked by making one fail the
    # test), instead of timing the call.
    import open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    attempts = []
    monkeypatch.setattr(open_clip, "download_pretrained", lambda *a, **k: attempts.append(a))
    with pytest.raises(UsageError, match=r"not cached.*metrics\.clip\.pretrained") as info:
        ClipScorer(model="ViT-B-32", pretrained="openai", cache_dir=tmp_path)  # empty cache
    assert not attempts, "a download was attempted although HF_HUB_OFFLINE is set"
    assert "ViT-B-32/openai" in str(info.value) and "\n" not in str(info.value)


def test_model_config_name_must_match_model(tiny: Tiny) -> None:
    with pytest.raises(UsageError, match=r"metrics\.clip\.model="):
        ClipScorer(model="other-name", pretrained=str(tiny.checkpoint), model_config=tiny.config)


def test_tag_resolves_from_local_cache_without_network(
    tiny: Tiny, images: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pretrained tag whose weights sit in the HF cache loads offline, with the tag's preprocessing and
    activation. open_clip only has tags for built-in models, so a tag for the tiny model is faked."""
    repo = tmp_path / "models--fake--tiny-clip"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "open_clip_pytorch_model.bin").write_bytes(tiny.checkpoint.read_bytes())
    tag_cfg = {
        "url": "",
        "hf_hub": "fake/tiny-clip/",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "quick_gelu": True,
    }
    real = open_clip.get_pretrained_cfg
    monkeypatch.setattr(
        open_clip, "get_pretrained_cfg", lambda m, t: tag_cfg if (m, t) == (TINY, "fake") else real(m, t)
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    clip = ClipScorer(model=TINY, pretrained="fake", model_config=tiny.config, cache_dir=tmp_path)
    assert clip.protocol["pretrained"].startswith("fake")
    assert clip.protocol["activation"] == "QuickGELU"
    assert any(isinstance(m, open_clip.transformer.QuickGELU) for m in clip.model.modules())
    assert "mean=(0.5, 0.5, 0.5) std=(0.5, 0.5, 0.5)" in clip.protocol["image_preprocessing"]
    ref_model, _, ref_preprocess = open_clip.create_model_and_transforms(
        TINY,
        pretrained=str(tiny.checkpoint),
        force_quick_gelu=True,
        image_mean=(0.5,) * 3,
        image_std=(0.5,) * 3,
    )
    ref = Tiny(tiny.config, tiny.checkpoint, ref_model.eval(), ref_preprocess, tiny.tokenizer)
    expected = [reference_cosine(ref, im, p) for im, p in zip(images, PROMPTS, strict=True)]
    np.testing.assert_allclose(clip.cosine(images, PROMPTS), expected, rtol=0, atol=1e-5)
