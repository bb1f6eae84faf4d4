"""Tiny, randomly initialised flow-matching pipelines (SD3, FLUX, InstaFlow-shaped) in the upstream on-disk
format, built offline from configs like tests/tiny_models.py builds the SD / DiT ones.

Geometry: 64 x 64 images, VAE downsampling 8, latents (B, 16, 8, 8) for SD3 / FLUX (16 latent channels,
as SD3 and FLUX have; FLUX packs them 2 x 2 into 16 tokens of 64 channels), (B, 4, 8, 8) for InstaFlow
(an SD 1.5-shaped pipeline). The schedulers carry the real checkpoints' configs:
stabilityai/stable-diffusion-3.5-medium (shift 3), black-forest-labs/FLUX.1-dev (dynamic shift,
guidance embedding) and FLUX.1-schnell (shift 1, no guidance embedding).
"""

from __future__ import annotations

import pathlib
import string

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tiny_models import MODEL_MAX_LENGTH, TEXT_HIDDEN_SIZE, _save, _tiny_text_config, _tiny_tokenizer
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

LATENT_CHANNELS = 16
T5_HIDDEN_SIZE = 2 * TEXT_HIDDEN_SIZE  # SD3: the two CLIP hidden states side by side are padded to T5's width
MAX_SEQUENCE_LENGTH = 16  # T5 tokens per prompt in the tests (model.max_sequence_length=)
_T5_WORDS = ("a", "photo", "of", "the", "red", "blue", "cube", "cat", "dog", "painting", "on", "in", "with")


def _tiny_t5(folder: pathlib.Path) -> tuple[T5Tokenizer, T5EncoderModel]:
    """A unigram T5 tokenizer over a few dozen pieces (every byte-level letter, so nothing is unknown) and a
    2-layer T5 encoder of width T5_HIDDEN_SIZE."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in _T5_WORDS] + [("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.'-!?"]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(folder)
    tokenizer = T5Tokenizer.from_pretrained(folder)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_HIDDEN_SIZE,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer, T5EncoderModel(config)


def _flow_vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """Four-level (downsampling 8) AutoencoderKL with 16 latent channels and a shift factor, like SD3's and
    FLUX's VAE (no quant convs)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    )


def make_tiny_sd3(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A tiny StableDiffusion3Pipeline (SD3.5-medium's scheduler: FlowMatchEuler, shift 3)."""
    path = pathlib.Path(path)
    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer(path / "tokenizer")
    tokenizer_2 = _tiny_tokenizer(path / "tokenizer_2")
    text_encoder = CLIPTextModelWithProjection(_tiny_text_config(tokenizer, hidden_act="gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(tokenizer_2, hidden_act="gelu"))
    tokenizer_3, text_encoder_3 = _tiny_t5(path / "tokenizer_3")
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_HIDDEN_SIZE,
        caption_projection_dim=16,
        pooled_projection_dim=2 * TEXT_HIDDEN_SIZE,  # the two CLIP projections side by side
        pos_embed_max_size=8,
        qk_norm="rms_norm",
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_flow_vae(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return _save(pipeline, path)


def make_tiny_flux(path: pathlib.Path, guidance_embeds: bool, seed: int = 0) -> pathlib.Path:
    """A tiny FluxPipeline: dev-like (guidance embedding, dynamic shift) or schnell-like (neither)."""
    path = pathlib.Path(path)
    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer(path / "tokenizer")
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
    tokenizer_2, text_encoder_2 = _tiny_t5(path / "tokenizer_2")
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_HIDDEN_SIZE,
        pooled_projection_dim=TEXT_HIDDEN_SIZE,  # CLIP's pooled output
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    if guidance_embeds:  # black-forest-labs/FLUX.1-dev's scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:  # black-forest-labs/FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    pipeline = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_flow_vae(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    return _save(pipeline, path)


def make_tiny_flux_dev(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    return make_tiny_flux(path, guidance_embeds=True, seed=seed)


def make_tiny_flux_schnell(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    return make_tiny_flux(path, guidance_embeds=False, seed=seed)


def make_tiny_sana(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A tiny SanaPipeline: a character-level Gemma tokenizer, a 2-layer Gemma-2 encoder, a 2-level DC-AE
    (downsampling 2, 4 latent channels: latents (B, 4, 32, 32) for 64 x 64 images) and Sana's scheduler,
    DPMSolverMultistepScheduler with flow sigmas and flow_shift 3 (diffusers' Sana test configs)."""
    path = pathlib.Path(path)
    torch.manual_seed(seed)
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\u2581"] + [
        c for c in string.printable if not c.isspace()
    ]
    tokenizer = GemmaTokenizer(vocab={t: i for i, t in enumerate(pieces)}, merges=[])
    tokenizer.save_pretrained(path / "tokenizer")
    tokenizer = GemmaTokenizer.from_pretrained(path / "tokenizer")
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN_SIZE,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=TEXT_HIDDEN_SIZE,
        sample_size=32,
    )
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=[1, 1],
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipeline = SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    return _save(pipeline, path)


__all__ = [
    "LATENT_CHANNELS",
    "MAX_SEQUENCE_LENGTH",
    "MODEL_MAX_LENGTH",
    "make_tiny_sd3",
    "make_tiny_flux",
    "make_tiny_flux_dev",
    "make_tiny_flux_schnell",
    "make_tiny_sana",
]
