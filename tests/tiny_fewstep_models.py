"""Tiny, randomly initialised few-step pipelines in the upstream diffusers format (see tiny_models.py
for the tokenizer, text encoder and VAE they share with the tiny SD pipeline).

* ``make_tiny_lcm``: a ``LatentConsistencyModelPipeline`` whose UNet has ``time_cond_proj_dim`` (the
  guidance-scale embedding LCM distils into it) and an ``LCMScheduler`` configured as
  SimianLuo/LCM_Dreamshaper_v7's (scaled-linear betas, 50 original steps, timestep_scaling 10);
  latents ``(B, 4, 8, 8)``, images 64 x 64.
"""

from __future__ import annotations

import pathlib

import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
from tiny_models import LATENT_SIZE, TEXT_HIDDEN_SIZE, _save, _tiny_text_config, _tiny_tokenizer, _tiny_vae
from transformers import CLIPTextModel

TIME_COND_PROJ_DIM = 16
"""Width of the tiny LCM UNet's guidance embedding (LCM_Dreamshaper_v7: 256)."""


def make_tiny_lcm(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Build and save a tiny ``LatentConsistencyModelPipeline`` (64 x 64 images, 4 x 8 x 8 latents)."""
    path = pathlib.Path(path)
    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer(path / "tokenizer")
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=2,
        time_cond_proj_dim=TIME_COND_PROJ_DIM,
    )
    # A random UNet ignores w almost entirely (its cond projection starts small): scale that layer up
    # so that the guidance embedding visibly changes the output and a wrong w cannot pass the tests.
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.mul_(50.0)
    vae = _tiny_vae(scaling_factor=0.18215, force_upcast=True)
    scheduler = LCMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        original_inference_steps=50,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_scaling=10.0,
    )
    pipeline = LatentConsistencyModelPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save(pipeline, path)
