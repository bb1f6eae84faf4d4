"""Tiny, randomly initialised diffusers pipelines saved in the upstream on-disk format.

Every builder writes a folder loadable with ``DiffusionPipeline.from_pretrained(path)`` (``model_index.json``
plus one sub-folder per component, weights as ``*.safetensors``) and needs no network access. The models are
architecturally faithful miniatures of the real checkpoints (same classes, same scheduler configs, same
latent/pixel geometry conventions) but only a few hundred kB to a few MB on disk, so whole-pipeline tests run
in seconds on a CPU.

Geometry (height x width of the decoded image):

* ``make_tiny_sd`` / ``make_tiny_sdxl``: latents ``(B, 4, 8, 8)``, ``vae_scale_factor`` 8, images 64 x 64.
* ``make_tiny_dit``: latents ``(B, 4, 8, 8)``, VAE downsampling 8, images 64 x 64, 10 labelled classes.
* ``make_tiny_ddpm``: pixel-space UNet, samples ``(B, 3, 32, 32)``, images 32 x 32.
"""

from __future__ import annotations

import json
import pathlib

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = [
    "TEXT_HIDDEN_SIZE",
    "LATENT_SIZE",
    "VAE_SCALE_FACTOR",
    "IMAGE_SIZE",
    "DDPM_IMAGE_SIZE",
    "DIT_NUM_LABELS",
    "make_tiny_sd",
    "make_tiny_sdxl",
    "make_tiny_dit",
    "make_tiny_ddpm",
    "write_tiny_clip_vocab",
]

TEXT_HIDDEN_SIZE = 32
"""Hidden size (and projection size) of every tiny CLIP text encoder."""
LATENT_SIZE = 8
"""Spatial size of the latents of the latent-diffusion pipelines (SD, SDXL, DiT)."""
VAE_BLOCK_OUT_CHANNELS = (8, 8, 16, 16)
"""Four VAE levels, like the real SD VAE, so that the downsampling factor is 2 ** 3 = 8."""
VAE_SCALE_FACTOR = 2 ** (len(VAE_BLOCK_OUT_CHANNELS) - 1)
IMAGE_SIZE = LATENT_SIZE * VAE_SCALE_FACTOR
"""Decoded image size of the latent pipelines (64)."""
DDPM_IMAGE_SIZE = 32
"""Image size of the pixel-space DDPM pipeline (like google/ddpm-cifar10-32)."""
DIT_NUM_LABELS = 10
"""Number of labelled classes in the tiny DiT's ``id2label``."""
MODEL_MAX_LENGTH = 77

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_COMMON_WORDS = (
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "and",
    "with",
    "photo",
    "red",
    "green",
    "blue",
    "cube",
    "sphere",
    "cat",
    "dog",
    "car",
    "house",
    "tree",
    "painting",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_tiny_clip_vocab(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Write a tiny CLIP BPE ``vocab.json`` and ``merges.txt`` into ``folder``; return their paths.

    The vocabulary is laid out like the real CLIP one: the 256 byte-level characters, the same characters with
    the ``</w>`` end-of-word suffix, the merged word pieces (a handful of common words, built as left-to-right
    merge chains), and finally ``<|startoftext|>`` / ``<|endoftext|>``. Every input therefore tokenizes
    without unknown tokens; common words map to a single token.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    for word in _COMMON_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left += right
    for left, right in merges:
        if left + right not in tokens:
            tokens.append(left + right)
    tokens += [_BOS, _EOS]
    vocab_file = folder / "vocab.json"
    merges_file = folder / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False), "utf-8")
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")
    return vocab_file, merges_file


def _tiny_tokenizer(folder: pathlib.Path, pad_token: str = _EOS) -> CLIPTokenizer:
    """Write the tiny vocab into ``folder`` (a tokenizer sub-folder) and load a tokenizer from it."""
    write_tiny_clip_vocab(folder)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=MODEL_MAX_LENGTH, pad_token=pad_token)


def _tiny_text_config(tokenizer: CLIPTokenizer, hidden_act: str = "quick_gelu") -> CLIPTextConfig:
    """CLIP text config with hidden size 32, 2 layers, 2 heads, vocab matching ``tokenizer``."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        projection_dim=TEXT_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae(scaling_factor: float, force_upcast: bool = True) -> AutoencoderKL:
    """Four-level (downsampling 8) AutoencoderKL with 4 latent channels and very few features."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
        block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def _save(pipeline: DiffusionPipeline, path: pathlib.Path) -> pathlib.Path:
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_sd(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Build and save a tiny ``StableDiffusionPipeline`` (64 x 64 images, 4 x 8 x 8 latents)."""
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
        attention_head_dim=2,  # historically the number of heads in UNet2DConditionModel
    )
    vae = _tiny_vae(scaling_factor=0.18215, force_upcast=True)
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipeline = StableDiffusionPipeline(
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


def make_tiny_sdxl(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Build and save a tiny ``StableDiffusionXLPipeline`` (64 x 64 images, 4 x 8 x 8 latents)."""
    path = pathlib.Path(path)
    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer(path / "tokenizer")
    tokenizer_2 = _tiny_tokenizer(
        path / "tokenizer_2", pad_token="!"
    )  # SDXL's second tokenizer pads with "!"
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(tokenizer_2, hidden_act="gelu"))
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        # prompt embeddings are the two encoders' penultimate hidden states concatenated
        cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # 6 micro-conditioning ids (original size, crop top-left, target size) + pooled text embedding
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_HIDDEN_SIZE,
    )
    vae = _tiny_vae(scaling_factor=0.13025, force_upcast=True)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _save(pipeline, path)


def make_tiny_dit(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Build and save a tiny class-conditional ``DiTPipeline`` (64 x 64 images, 10 labelled classes).

    ``num_embeds_ada_norm`` stays 1000 as in DiT-XL-2: ``DiTPipeline.__call__`` hard-codes the null
    (unconditional) class id as 1000, so a smaller label table would break classifier-free guidance. Only
    the first ``DIT_NUM_LABELS`` classes are named in ``id2label``.
    """
    path = pathlib.Path(path)
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned sigma: epsilon and variance channels
        num_layers=2,
        sample_size=LATENT_SIZE,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        activation_fn="gelu-approximate",
        attention_bias=True,
    )
    vae = _tiny_vae(scaling_factor=0.18215, force_upcast=True)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
    )
    id2label = {i: f"class{i}" for i in range(DIT_NUM_LABELS)}
    pipeline = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
    # DiTPipeline does not register id2label itself; the hub checkpoints keep it in model_index.json.
    pipeline.register_to_config(id2label=id2label)
    return _save(pipeline, path)


def make_tiny_ddpm(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Build and save a tiny pixel-space ``DDPMPipeline`` (32 x 32 RGB, like google/ddpm-cifar10-32)."""
    path = pathlib.Path(path)
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=DDPM_IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        variance_type="fixed_large",
        clip_sample=True,
        prediction_type="epsilon",
    )
    pipeline = DDPMPipeline(unet=unet, scheduler=scheduler)
    return _save(pipeline, path)


# -- tiny metric networks in their upstream file formats ----------------------------------------------
def make_tiny_inception(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A random-weight Inception-v3 in torch-fidelity's weights-file layout."""
    from samplebench.metrics.inception import save_random_weights

    return save_random_weights(path, seed=seed)


TINY_CLIP = "samplebench-tiny-clip"


def make_tiny_clip(root: pathlib.Path, seed: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
    """An open_clip model config (JSON, open_clip's format) and a random-weight checkpoint for it."""
    import json

    import open_clip

    root.mkdir(parents=True, exist_ok=True)
    config = root / f"{TINY_CLIP}.json"
    config.write_text(
        json.dumps(
            {
                "embed_dim": 32,
                "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
            }
        )
    )
    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP)
    checkpoint = root / "tiny_clip.pt"
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint


REWARD_VOCAB = [
    "[PAD]",
    "[unused0]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    ",",
    ".",
    "a",
    "of",
    "in",
    "on",
    "the",
    "red",
    "blue",
    "cube",
    "dog",
    "cat",
    "photo",
    "painting",
]
REWARD_ARCH = {"image_size": 64, "vit_width": 32, "vit_depth": 2, "vit_heads": 2, "patch_size": 16}


def tiny_med_config(vocab_words: int) -> dict:
    """A tiny BLIP text-encoder config (med_config.json's keys) for a vocab.txt of `vocab_words` lines."""
    return {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 40,
        "pad_token_id": 0,
        "vocab_size": vocab_words + 2,  # + the [DEC] and [ENC] tokens ImageReward adds
        "encoder_width": 32,
        "add_cross_attention": True,
    }


def make_tiny_image_reward(root: pathlib.Path, seed: int = 0) -> dict[str, pathlib.Path]:
    """A random-weight ImageReward checkpoint (ImageReward.pt's state_dict layout), its med_config.json and
    a vocab.txt: the files a user points metrics.image_reward.* at."""
    import json

    from samplebench.metrics import image_reward as ir

    root.mkdir(parents=True, exist_ok=True)
    med = tiny_med_config(len(REWARD_VOCAB))
    (root / "med_config.json").write_text(json.dumps(med))
    (root / "vocab.txt").write_text("\n".join(REWARD_VOCAB) + "\n")
    torch.manual_seed(seed)
    model = ir.build_model("base", med_config=med, **REWARD_ARCH)
    torch.save(model.state_dict(), root / "ImageReward.pt")
    return {
        "checkpoint": root / "ImageReward.pt",
        "med_config": root / "med_config.json",
        "tokenizer": root / "vocab.txt",
    }


def make_metric_inputs(root: pathlib.Path) -> dict:
    """Every metric network in its upstream file format (random weights), 12 random 64x64 reference images,
    and the `metrics.*` overrides that point samplebench at them: all nine image metrics, with subsets,
    splits and resamples small enough for 8 images per cell.

    Returns the paths (inception, clip_config, clip_checkpoint, reward: the dict of make_tiny_image_reward,
    ref) and `overrides`, the list to pass after `samplebench sweep|metrics`.
    """
    import numpy as np
    from PIL import Image

    inception = make_tiny_inception(root / "inception.pth")
    clip_config, clip_ckpt = make_tiny_clip(root / "clip")
    reward = make_tiny_image_reward(root / "reward")
    ref = root / "ref"
    ref.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(ref / f"{i:03d}.png")
    overrides = [
        "metrics.names=[fid,kid,precision,recall,is,clip_score,clip_score_paper,image_reward,traj_mse]",
        f"metrics.ref={ref}",
        f"metrics.inception_weights={inception}",
        "metrics.kid.subset_size=6",
        "metrics.is.splits=2",
        "metrics.fid.bootstrap=20",
        "metrics.bootstrap=100",
        f"metrics.clip.model={TINY_CLIP}",
        f"metrics.clip.pretrained={clip_ckpt}",
        f"metrics.clip.model_config={clip_config}",
        f"metrics.image_reward.checkpoint={reward['checkpoint']}",
        f"metrics.image_reward.med_config={reward['med_config']}",
        f"metrics.image_reward.tokenizer={reward['tokenizer']}",
        "metrics.image_reward.vit=base",
        *[f"metrics.image_reward.{k}={v}" for k, v in REWARD_ARCH.items()],
        "metrics.traj_mse.sampler=dpmpp_3m",
        "metrics.traj_mse.nfe=8",
    ]
    return {
        "inception": inception,
        "clip_config": clip_config,
        "clip_checkpoint": clip_ckpt,
        "reward": reward,
        "ref": ref,
        "overrides": overrides,
    }
