"""Adapters over diffusers pipelines: text-to-image (SD 1.x/2.x, SDXL), class-conditional (DiT) and
unconditional pixel models (DDPM), all behind the protocol of models/base.py.

The pipeline's own components are used (UNet or transformer, VAE, text encoders and its
encode_prompt); the sampling loop is samplebench's, so every sampler drives every model unchanged.
The network is asked at the timestep matching the noise level the solver integrates (log-sigma
interpolation between training timesteps, k-diffusion's convention): on the integer timesteps of
most schedules that is the scheduler's own timestep.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samplebench import speed
from samplebench.errors import UsageError
from samplebench.models.base import NoiseSchedule, sigmas_from_alphas_cumprod, vp_denoise

HUB_IDS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1-base",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "dit": "facebook/DiT-XL-2-256",
    "ddpm_cifar10": "google/ddpm-cifar10-32",
    # few-step models (README, "Few-step models"); tcd has no full pipeline on the hub: model.path=
    "lcm": "SimianLuo/LCM_Dreamshaper_v7",
    "tcd": None,
    "sd_turbo": "stabilityai/sd-turbo",
    "sdxl_turbo": "stabilityai/sdxl-turbo",
    # rectified-flow models (models/flow_pipelines.py)
    "sd3": "stabilityai/stable-diffusion-3.5-medium",
    "flux_schnell": "black-forest-labs/FLUX.1-schnell",
    "flux_dev": "black-forest-labs/FLUX.1-dev",
    "sana": "Efficient-Large-Model/Sana_600M_512px_diffusers",
    "instaflow": "XCLiu/instaflow_0_9B_from_sd_1_5",
}
PIPELINE_KINDS = {
    "StableDiffusionPipeline": "text",
    "LatentConsistencyModelPipeline": "text",
    "StableDiffusionXLPipeline": "sdxl",
    "DiTPipeline": "class",
    "DDPMPipeline": "uncond",
    "DDIMPipeline": "uncond",
    "StableDiffusion3Pipeline": "sd3",  # flow models: loaded by models/flow_pipelines.py
    "FluxPipeline": "flux",
    "SanaPipeline": "sana",
}
FLOW_KINDS = ("sd3", "flux", "sana")
REQUIRED = {
    "text": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    "class": ("transformer", "vae", "scheduler"),
    "uncond": ("unet", "scheduler"),
    "sd3": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    "flux": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    "sana": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
}


@dataclass(frozen=True)
class TextCondition:
    """Prompt embeddings for a batch, with their unconditional counterpart computed alongside."""

    embeds: torch.Tensor
    null_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    null_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    timestep_cond: torch.Tensor | None = None  # LCM's guidance embedding (guidance_kind "embedded")

    def null(self) -> TextCondition:
        return TextCondition(
            self.null_embeds,
            self.null_embeds,
            self.null_pooled,
            self.null_pooled,
            self.time_ids,
            self.timestep_cond,
        )

    def cat(self, other: TextCondition) -> TextCondition:
        def c(a, b):
            return None if a is None else torch.cat([a, b])

        return TextCondition(
            c(self.embeds, other.embeds),
            c(self.null_embeds, other.null_embeds),
            c(self.pooled, other.pooled),
            c(self.null_pooled, other.null_pooled),
            c(self.time_ids, other.time_ids),
            c(self.timestep_cond, other.timestep_cond),
        )


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    from samplebench.models import parse_dtype

    if name in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    return parse_dtype(name)


def _source(cfg: dict[str, Any]) -> tuple[str, bool]:
    """(where to load from, is it a local folder)."""
    if cfg.get("path"):
        return str(cfg["path"]), True
    if cfg.get("id"):
        return str(cfg["id"]), False
    raise UsageError(f"model={cfg['name']} needs model.id=<hub id> or model.path=<local diffusers folder>")


def _check_folder(path: Path, name: str) -> dict[str, Any]:
    if not path.is_dir():
        raise UsageError(
            f"model.path={path} does not exist; point model.path= at a local diffusers pipeline folder"
        )
    index = path / "model_index.json"
    if not index.exists():
        raise UsageError(
            f"model.path={path} is not a diffusers pipeline: it has no model_index.json "
            "(save one with pipeline.save_pretrained)"
        )
    info = json.loads(index.read_text())
    kind = PIPELINE_KINDS.get(info.get("_class_name", ""))
    if kind is None:
        raise UsageError(
            f"model.path={path} holds a {info.get('_class_name')}; supported: {', '.join(PIPELINE_KINDS)}"
        )
    missing = [c for c in REQUIRED[kind] if c not in info or not (path / c).is_dir()]
    if missing:
        raise UsageError(
            f"model.path={path} is not a complete {info['_class_name']}: missing {', '.join(missing)}"
        )
    return info


def _not_available(cfg: dict[str, Any], source: str) -> UsageError:
    return UsageError(
        f"model={cfg['name']}: {source} is not in the local Hugging Face cache and could not be "
        f"downloaded; download it where there is network, or set model.path=<local copy of {source}>"
    )


def check_available(cfg: dict[str, Any]) -> None:
    """Without loading anything: a local folder is a complete pipeline, a hub model is cached or the hub
    answers (one-line UsageError otherwise), so a sweep fails before any work, not after a model load."""
    source, local = _source(cfg)
    if local:
        _check_folder(Path(source).expanduser(), cfg["name"])
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "model_index.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        raise _not_available(cfg, source)
    try:
        from huggingface_hub import model_info

        model_info(source, timeout=10)
    except Exception as e:  # no network, unknown repository, gated: all mean "not to be had from here"
        raise _not_available(cfg, source) from e


def load_pipeline(cfg: dict[str, Any], dtype: torch.dtype) -> Any:
    """The pipeline a model config names, from a local folder or the hub cache (or the hub when online)."""
    import diffusers.utils.logging as dlog
    import transformers
    from diffusers import DiffusionPipeline

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    source, local = _source(cfg)
    if local:
        _check_folder(Path(source), cfg["name"])
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if not cfg.get("allow_pickle", False):
        kwargs["use_safetensors"] = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch_dtype's rename; kept for older diffusers
            try:
                return DiffusionPipeline.from_pretrained(source, local_files_only=True, **kwargs)
            except Exception:
                if local or os.environ.get("HF_HUB_OFFLINE"):
                    raise
                return DiffusionPipeline.from_pretrained(source, **kwargs)
    except UsageError:
        raise
    except Exception as e:
        reason = " ".join(str(e).split()).split(". ")[0][:200]
        if local:
            raise UsageError(f"cannot load model.path={source}: {reason}") from e
        raise _not_available(cfg, source) from e


class DiffusersModel:
    """One loaded pipeline; its noise schedule is the pipeline scheduler's training schedule."""

    def __init__(self, cfg: dict[str, Any], device: torch.device):
        from diffusers import DDPMScheduler

        self.name = cfg["name"]
        self.device = device
        self.model_dtype = _resolve_dtype(cfg.get("dtype", "auto"), device)
        self.dtype = torch.float32  # the sampler's state; the network runs in model_dtype
        pipe = load_pipeline(cfg, self.model_dtype)
        self.kind = PIPELINE_KINDS.get(type(pipe).__name__)
        if self.kind is None:
            raise UsageError(
                f"model={self.name}: {type(pipe).__name__} is not supported; "
                f"supported: {', '.join(PIPELINE_KINDS)}"
            )
        if self.kind in FLOW_KINDS:
            raise UsageError(
                f"model={self.name}: {type(pipe).__name__} is a rectified-flow pipeline; "
                "use model=sd3, flux_schnell, flux_dev or sana with model.path="
            )
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        train = DDPMScheduler.from_config(pipe.scheduler.config)
        self._betas = train.betas.numpy().copy()
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        self.train_sigmas = sigmas_from_alphas_cumprod(train.alphas_cumprod)
        self.noise_schedule = NoiseSchedule("vp_discrete", self.train_sigmas)
        self._log_sigmas = self.train_sigmas.log().numpy()  # for sigma -> t on every call
        self.net = pipe.transformer if self.kind == "class" else pipe.unet
        speed.apply(self.net, cfg, device, self.model_dtype)  # compile / channels_last / attention, if asked
        self.vae = getattr(pipe, "vae", None)
        if self.vae is not None and self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast"):
            self.vae.to(torch.float32)  # as the SDXL pipelines do: its fp16 VAE overflows to NaN
        size = self.net.config.sample_size
        size = size[0] if isinstance(size, list | tuple) else int(size)
        channels = self.net.config.in_channels
        if self.vae is not None:
            scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
            resolution = int(cfg.get("resolution") or size * scale)
            if resolution % scale:
                raise UsageError(
                    f"model.resolution={resolution} must be a multiple of {scale} for model={self.name}"
                )
            if self.kind == "class" and resolution != size * scale:
                raise UsageError(
                    f"model={self.name} only makes {size * scale}px images; drop model.resolution="
                )
            self.sample_shape = (channels, resolution // scale, resolution // scale)
        else:
            resolution = int(cfg.get("resolution") or size)
            if resolution != size:
                raise UsageError(f"model={self.name} only makes {size}px images; drop model.resolution=")
            self.sample_shape = (channels, size, size)
        self.resolution = resolution
        self.negative_prompt = cfg.get("negative_prompt") or None
        self.num_classes = int(self.net.config.num_embeds_ada_norm) if self.kind == "class" else 0
        self.condition_kind = {"text": "text", "sdxl": "text", "class": "class", "uncond": "none"}[self.kind]
        self.guidance_kind = str(cfg.get("guidance_kind") or "cfg")
        self._consistency = self._boundary_condition(cfg.get("boundary_condition"))
        if self.guidance_kind == "embedded" and not getattr(self.net.config, "time_cond_proj_dim", None):
            raise UsageError(
                f"model={self.name}: guidance_kind embedded needs a UNet with time_cond_proj_dim (an LCM "
                "UNet); this one has none; set model.guidance_kind=cfg or point model.path at an LCM pipeline"
            )

    def _boundary_condition(self, kind: Any) -> tuple[float, float] | None:
        """(timestep_scaling, sigma_data) of LCM's consistency boundary condition, or None."""
        if kind in (None, "none"):
            return None
        if kind != "lcm":
            raise UsageError(f"model.boundary_condition={kind} is unknown; choose lcm or none")
        # LCMScheduler.get_scalings_for_boundary_condition_discrete: sigma_data is fixed at 0.5
        return float(self.pipe.scheduler.config.get("timestep_scaling", 10.0)), 0.5

    def with_guidance(self, cond: TextCondition, guidance: float) -> TextCondition:
        """The condition carrying LCM's guidance embedding: w = guidance - 1 (LatentConsistencyModelPipeline
        .__call__), embedded by its get_guidance_scale_embedding to the UNet's time_cond_proj_dim."""
        dim = int(self.net.config.time_cond_proj_dim)
        w = torch.tensor(float(guidance) - 1.0).repeat(cond.embeds.shape[0])
        emb = self.pipe.get_guidance_scale_embedding(w, embedding_dim=dim).to(self.device, self.model_dtype)
        return dataclasses.replace(cond, timestep_cond=emb)

    # -- protocol ---------------------------------------------------------------------------
    def scheduler_config(self) -> dict[str, Any]:
        return dict(
            num_train_timesteps=len(self._betas),
            trained_betas=self._betas,
            prediction_type=self.prediction_type,
        )

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Training timestep (fractional) of each noise level, on the model's device."""
        log_s = np.log(
            np.clip(sigma.detach().double().cpu().reshape(-1).numpy(), *np.exp(self._log_sigmas[[0, -1]]))
        )
        t = np.interp(log_s, self._log_sigmas, np.arange(len(self._log_sigmas)))  # as sigma_to_t
        return torch.as_tensor(t, dtype=torch.float32, device=self.device)

    def predict(self, x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        timesteps = self.timestep(sigma)
        x_in = x.to(self.model_dtype)
        if self.kind == "class":
            out = self.net(x_in, timestep=timesteps, class_labels=cond).sample
            if out.shape[1] == 2 * x.shape[1]:  # learned variance (DiT): keep the noise prediction
                out = out[:, : x.shape[1]]
        elif self.kind == "uncond":
            out = self.net(x_in, timesteps).sample
        else:
            extra = {}
            if self.kind == "sdxl":
                extra["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
            if cond.timestep_cond is not None:
                extra["timestep_cond"] = cond.timestep_cond
            out = self.net(x_in, timesteps, encoder_hidden_states=cond.embeds, **extra).sample
        return out.to(x.dtype)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """D(x; sigma) from the network's eps / v / sample prediction (models.base.vp_denoise). An LCM
        model's D is its consistency function f(x, t) = c_skip(t) x_t + c_out(t) x0(x_t, t), with x_t the
        VP input x / sqrt(1 + sigma^2) and LCMScheduler's c_skip = sd^2 / ((k t)^2 + sd^2),
        c_out = k t / sqrt((k t)^2 + sd^2), k = timestep_scaling (10), sd = sigma_data (0.5), at the
        (fractional) timestep the network is asked at."""
        x0 = vp_denoise(self, x, sigma, cond)
        if self._consistency is None:
            return x0
        scaling, sd = self._consistency
        shape = (-1,) + (1,) * (x.dim() - 1)
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        kt = self.timestep(s).double().to(x.device) * scaling
        c_skip = (sd**2 / (kt**2 + sd**2)).reshape(shape)
        c_out = (kt / (kt**2 + sd**2).sqrt()).reshape(shape)
        x_t = x.double() / (1 + s.reshape(shape) ** 2).sqrt()
        return (c_skip * x_t + c_out * x0.double()).to(x.dtype)

    def encode(self, raw: list[Any]) -> Any:
        """Conditions for a batch: prompts (text models), class labels, or None."""
        if self.kind == "class":
            return torch.as_tensor(raw, dtype=torch.long, device=self.device)
        if self.kind == "uncond":
            return None
        with torch.no_grad():
            if self.kind == "text":
                embeds, null = self.pipe.encode_prompt(
                    list(raw), self.device, 1, True, negative_prompt=[self.negative_prompt or ""] * len(raw)
                )
                return TextCondition(embeds, null)
            embeds, null, pooled, null_pooled = self.pipe.encode_prompt(
                list(raw),
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=None if self.negative_prompt is None else [self.negative_prompt] * len(raw),
            )
            size = (self.resolution, self.resolution)
            time_ids = self.pipe._get_add_time_ids(
                size,
                (0, 0),
                size,
                dtype=embeds.dtype,
                text_encoder_projection_dim=self.pipe.text_encoder_2.config.projection_dim,
            )
            return TextCondition(
                embeds, null, pooled, null_pooled, time_ids.to(self.device).repeat(len(raw), 1)
            )

    def null_condition(self, cond: Any) -> Any:
        if self.kind == "class":
            return torch.full_like(cond, self.num_classes)
        if self.kind == "uncond":
            raise UsageError(f"model={self.name} is unconditional; use guidance=1")
        return cond.null()

    def cat_conditions(self, a: Any, b: Any) -> Any:
        if self.kind == "class":
            return torch.cat([a, b])
        return a.cat(b)

    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images (N, H, W, 3) at the model's resolution to sampler states at sigma = 0 (the
        inverse of `decode`: the VAE posterior mean, shifted and scaled as the pipelines do), float32."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = x.to(self.device)
        with torch.no_grad():
            if self.vae is None:
                return x
            z = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean.float()
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift:
            z = z - shift
        return z * self.vae.config.scaling_factor

    def decode(self, samples: torch.Tensor) -> np.ndarray:
        """Final sampler states to uint8 images (N, H, W, 3)."""
        with torch.no_grad():
            if self.vae is not None:
                z = samples.to(self.vae.dtype) / self.vae.config.scaling_factor
                shift = getattr(self.vae.config, "shift_factor", None)
                if shift:
                    z = z + shift
                images = self.vae.decode(z).sample
            else:
                images = samples
            images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()
