"""Checks for the tiny on-disk diffusers pipelines built by ``tests/tiny_models.py``."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_models import (
    DDPM_IMAGE_SIZE,
    IMAGE_SIZE,
    LATENT_SIZE,
    VAE_SCALE_FACTOR,
    make_tiny_ddpm,
    make_tiny_dit,
    make_tiny_sd,
    make_tiny_sdxl,
)

MAX_BYTES = 5 * 1024 * 1024


@dataclass(frozen=True)
class Case:
    """One tiny pipeline: its builder, expected class, call arguments and output shape."""

    builder: Callable[[pathlib.Path, int], pathlib.Path]
    pipeline_class: str
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    image_shape: tuple[int, ...] = ()


CASES = {
    "sd": Case(
        make_tiny_sd, "StableDiffusionPipeline", {"prompt": "a red cube"}, (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    ),
    "sdxl": Case(
        make_tiny_sdxl, "StableDiffusionXLPipeline", {"prompt": "a red cube"}, (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    ),
    "dit": Case(make_tiny_dit, "DiTPipeline", {"class_labels": [1, 3]}, (2, IMAGE_SIZE, IMAGE_SIZE, 3)),
    "ddpm": Case(make_tiny_ddpm, "DDPMPipeline", {"batch_size": 2}, (2, DDPM_IMAGE_SIZE, DDPM_IMAGE_SIZE, 3)),
}


def _files(path: pathlib.Path) -> list[pathlib.Path]:
    return [f for f in path.rglob("*") if f.is_file()]


@pytest.mark.parametrize("name", list(CASES))
def test_tiny_pipeline_roundtrip(name: str, tmp_path: pathlib.Path) -> None:
    """Build, save, reload from the local folder and sample 2 steps through the pipeline's own __call__."""
    case = CASES[name]
    path = case.builder(tmp_path / name, 0)
    assert path == tmp_path / name
    assert (path / "model_index.json").is_file()

    files = _files(path)
    assert any(f.suffix == ".safetensors" for f in files)
    assert not [f for f in files if f.suffix == ".bin"]
    assert sum(f.stat().st_size for f in files) < MAX_BYTES

    pipe = DiffusionPipeline.from_pretrained(path)
    assert type(pipe).__name__ == case.pipeline_class
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **case.call_kwargs,
    )
    images = np.asarray(out.images)
    assert images.shape == case.image_shape
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_tiny_text_pipelines_geometry(name: str, tmp_path: pathlib.Path) -> None:
    """Latent size x VAE factor gives the image size, and the tiny tokenizer knows the test prompt's words."""
    pipe = DiffusionPipeline.from_pretrained(CASES[name].builder(tmp_path / name, 0))
    assert pipe.vae_scale_factor == VAE_SCALE_FACTOR == 8
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == IMAGE_SIZE == 64
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if name == "sdxl" else [])
    for tokenizer in tokenizers:
        assert tokenizer.model_max_length == 77
        tokens = tokenizer.convert_ids_to_tokens(tokenizer("a red cube").input_ids)
        assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "cube</w>", "<|endoftext|>"]
    # upstream layout: the BPE files sit next to the tokenizer config
    assert (tmp_path / name / "tokenizer" / "vocab.json").is_file()
    assert (tmp_path / name / "tokenizer" / "merges.txt").is_file()


def test_tiny_dit_labels_and_latents(tmp_path: pathlib.Path) -> None:
    """DiT keeps its id2label mapping and the learned-sigma output channels."""
    pipe = DiffusionPipeline.from_pretrained(make_tiny_dit(tmp_path / "dit"))
    assert pipe.get_label_ids(["class1", "class3"]) == [1, 3]
    assert len(pipe.labels) == 10
    config = pipe.transformer.config
    assert (config.in_channels, config.out_channels, config.sample_size) == (4, 8, LATENT_SIZE)


def test_builders_are_deterministic(tmp_path: pathlib.Path) -> None:
    """The same seed gives byte-identical weights, a different seed different ones."""
    first = make_tiny_ddpm(tmp_path / "a", seed=0)
    second = make_tiny_ddpm(tmp_path / "b", seed=0)
    third = make_tiny_ddpm(tmp_path / "c", seed=1)
    weights = pathlib.Path("unet") / "diffusion_pytorch_model.safetensors"
    assert (first / weights).read_bytes() == (second / weights).read_bytes()
    assert (first / weights).read_bytes() != (third / weights).read_bytes()
