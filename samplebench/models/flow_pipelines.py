"""Adapters over rectified-flow diffusers pipelines (SD3 / SD3.5, FLUX.1 schnell and dev, InstaFlow)
behind the protocol of models/base.py, kind "flow".

The network predicts a velocity on x_t = (1 - t) x_0 + t n; models.base.flow_denoise turns it into
EDM's D(x; sigma) with sigma = t / (1 - t), so every sampler drives these models unchanged. The sampler
state is float64 (t = 1 is sigma = 1e8, x = x_T (1 + 1e8)); the network runs in the model dtype on
x_t, which is of order one.

What each pipeline hands its network, reproduced here (diffusers 0.3x-0.4x):

* StableDiffusion3Pipeline: hidden_states = x_t (B, 16, h, w), timestep = 1000 t, encoder_hidden_states
  (CLIP-L, CLIP-G and T5 embeddings), pooled_projections; velocity n - x_0. Guidance: classifier-free
  (negative prompt "").
* FluxPipeline: x_t packed 2 x 2 into (B, h w / 4, 64) tokens with img_ids (0, row, column) and
  txt_ids (zeros), timestep = t (the pipeline divides 1000 t by 1000), pooled_projections (CLIP),
  encoder_hidden_states (T5) and, when the transformer has guidance_embeds (FLUX.1-dev), the guidance
  value w as an input: one pass per step ("embedded" guidance; the pipeline's default w is 3.5).
  FLUX.1-schnell has no guidance embedding and takes no guidance.
* SanaPipeline (Sana, e.g. Efficient-Large-Model/Sana_600M_512px_diffusers): hidden_states = x_t (B, 32, h, w)
  of its DC-AE (downsampling 32), timestep = 1000 t times the transformer's timestep_scale,
  encoder_hidden_states (Gemma-2, the prompt prefixed with the pipeline's default complex human
  instruction) with its attention mask; velocity n - x_0 (DPMSolverMultistepScheduler's flow_prediction);
  a learned-sigma half of the output, if any, is dropped. Guidance: classifier-free (negative prompt "",
  encoded without the instruction, as SanaPipeline does). Its scheduler's grid is diffusers'
  use_flow_sigmas one: `schedule=flow schedule.start=train` (end 1/N is the model's default).
* InstaFlow (XCLiu/instaflow_0_9B_from_sd_1_5, a StableDiffusionPipeline folder): an SD 1.5 UNet
  distilled to a one-step rectified flow. Its published sampler (pipeline_rf.py of gnobitab/InstaFlow)
  is, as we transcribe it: timesteps (1 - i/N) 1000, i = 0 .. N-1, starting from noise,
  v = unet(latents, timestep, prompt_embeds), latents <- latents + v / N. Noise is at timestep 1000
  and the step adds v, so the UNet's output is x_0 - n, the negative of our velocity, at timestep
  1000 t in our time (t = 1 noise). Checked against pipeline_rf.py's source (its step 4 and 7:
  `timesteps = [(1. - i/num_inference_steps) * 1000. ...]`, `latents = latents + dt * v_pred`); not
  run on the released weights, and the hub folder's model_index.json is assumed to name a
  StableDiffusionPipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from samplebench import speed
from samplebench.errors import UsageError
from samplebench.models.base import flow_denoise, flow_schedule
from samplebench.models.diffusers_models import _resolve_dtype, load_pipeline

# Pipeline class -> the network's calling convention.
FLOW_PIPELINES = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "SanaPipeline": "sana",
    "StableDiffusionPipeline": "rf_unet",  # InstaFlow's folder is a plain SD 1.5 pipeline
}
# Model name -> (pipeline arch it needs, its default guidance kind).
FLOW_MODELS = {
    "sd3": ("sd3", "cfg"),
    "flux_dev": ("flux", "embedded"),
    "flux_schnell": ("flux", "none"),
    "sana": ("sana", "cfg"),
    "instaflow": ("rf_unet", "none"),
}


def calculate_shift(seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float):
    """FLUX's dynamic-shift exponent mu, linear in the number of image tokens (diffusers'
    pipeline_flux.calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + base_shift - m * base_seq_len


@dataclass(frozen=True)
class FlowCondition:
    """Prompt embeddings of a batch (and, for classifier-free guidance, the negative prompt's), the
    text position ids FLUX takes, and the embedded guidance value (FLUX.1-dev)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    null_embeds: torch.Tensor | None = None
    null_pooled: torch.Tensor | None = None
    txt_ids: torch.Tensor | None = None  # (tokens, 3), shared by the batch
    guidance: float | None = None
    mask: torch.Tensor | None = None  # Sana: the prompt tokens' attention mask
    null_mask: torch.Tensor | None = None

    def null(self) -> FlowCondition:
        return replace(self, embeds=self.null_embeds, pooled=self.null_pooled, mask=self.null_mask)

    def cat(self, other: FlowCondition) -> FlowCondition:
        def c(a, b):
            return None if a is None else torch.cat([a, b])

        return replace(
            self,
            embeds=c(self.embeds, other.embeds),
            pooled=c(self.pooled, other.pooled),
            null_embeds=c(self.null_embeds, other.null_embeds),
            null_pooled=c(self.null_pooled, other.null_pooled),
            mask=c(self.mask, other.mask),
            null_mask=c(self.null_mask, other.null_mask),
        )


class FlowPipelineModel:
    """One loaded rectified-flow pipeline; its noise schedule is the pipeline scheduler's flow schedule
    at the configured resolution."""

    prediction_type = "flow"
    condition_kind = "text"
    num_classes = 0

    def __init__(self, cfg: dict[str, Any], device: torch.device):
        self.name = cfg["name"]
        arch, default_kind = FLOW_MODELS[self.name]
        self.device = device
        if cfg.get("dtype", "auto") in (None, "auto"):  # SD3 / FLUX ship bf16 weights; fp16 overflows
            # InstaFlow (SD 1.5) runs in fp16 like its pipeline
            half = torch.bfloat16 if arch != "rf_unet" else torch.float16
            self.model_dtype = half if device.type == "cuda" else torch.float32
        else:
            self.model_dtype = _resolve_dtype(cfg["dtype"], device)
        # the sampler's state is float64 (t = 1 is sigma = 1e8); the network runs in model_dtype
        self.dtype = torch.float64
        pipe = load_pipeline(cfg, self.model_dtype)
        found = FLOW_PIPELINES.get(type(pipe).__name__)
        if found != arch:
            raise UsageError(
                f"model={self.name} needs a {_class_of(arch)} folder, not a {type(pipe).__name__}; "
                "point model.path= at the right pipeline or pick the model it is"
            )
        self.arch = arch
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        self.net = pipe.unet if arch == "rf_unet" else pipe.transformer
        if self.net.dtype != self.model_dtype:
            # diffusers 0.42 leaves an SD3Transformer2DModel saved in fp32 in fp32 whatever torch_dtype says
            self.net.to(self.model_dtype)
        speed.apply(self.net, cfg, device, self.model_dtype)  # compile / channels_last / attention, if asked
        self.vae = pipe.vae
        if self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast"):
            self.vae.to(torch.float32)
        self.guidance_kind = str(cfg.get("guidance_kind") or default_kind)
        embeds_guidance = bool(getattr(self.net.config, "guidance_embeds", False))
        if embeds_guidance and self.guidance_kind != "embedded":
            raise UsageError(
                f"model={self.name}: {cfg.get('path') or cfg.get('id')} has a guidance embedding "
                "(FLUX.1-dev-like); use model=flux_dev or model.guidance_kind=embedded"
            )
        if self.guidance_kind == "embedded" and not embeds_guidance:
            raise UsageError(
                f"model={self.name}: {cfg.get('path') or cfg.get('id')} has no guidance embedding, so "
                "guidance_kind embedded is impossible; use model.guidance_kind=none or cfg"
            )
        default_length = {"flux": 512, "sana": 300}.get(arch, 256)  # the pipelines' defaults
        self.max_sequence_length = int(cfg.get("max_sequence_length") or default_length)
        self.negative_prompt = cfg.get("negative_prompt") or None

        levels = self.vae.config.get("block_out_channels") or self.vae.config.encoder_block_out_channels
        scale = 2 ** (len(levels) - 1)
        channels = int(self.vae.config.latent_channels)
        patch = {"sd3": int(self.net.config.get("patch_size", 1)), "flux": 2}.get(arch, 1)
        if arch == "flux":
            native = int(getattr(pipe, "default_sample_size", 128)) * scale
        else:
            size = self.net.config.sample_size
            native = (size[0] if isinstance(size, list | tuple) else int(size)) * scale
        self.resolution = int(cfg.get("resolution") or native)
        if self.resolution <= 0 or self.resolution % (scale * patch):
            raise UsageError(
                f"model.resolution={self.resolution} must be a positive multiple of {scale * patch} "
                f"for model={self.name}"
            )
        h = self.resolution // scale
        self.sample_shape = (channels, h, h)

        sc = dict(pipe.scheduler.config)
        if arch == "rf_unet":
            # InstaFlow's sampler: t = 1 - i/N (linspace(1, 1/N, N), then 0), no shift, 1000 timesteps;
            # the folder's own scheduler (SD 1.5's) is not used.
            self._T, shift, mu, end = 1000, 1.0, None, "1/N"
        else:
            self._T = int(sc.get("num_train_timesteps", 1000))
            shift = float(sc["shift"] if "shift" in sc else sc.get("flow_shift", 1.0))  # Sana's DPM-Solver
            mu = None
            if sc.get("use_dynamic_shifting"):
                seq_len = (h // patch) ** 2  # image tokens (FLUX: packed 2 x 2; SD3: patches)
                mu = calculate_shift(
                    seq_len,
                    sc.get("base_image_seq_len", 256),
                    sc.get("max_image_seq_len", 4096),
                    sc.get("base_shift", 0.5),
                    sc.get("max_shift", 1.15 if arch == "flux" else 1.16),  # the pipelines' defaults
                )
            # FluxPipeline's sigmas and DPM-Solver's use_flow_sigmas (Sana): linspace to 1/N; SD3: to 1/T
            end = "1/N" if arch == "flux" or sc.get("use_flow_sigmas") else "train"
        self.shift, self.mu = shift, mu
        self.noise_schedule = flow_schedule(self._T, shift, mu, end)
        self._img_ids: torch.Tensor | None = None

    # -- protocol ---------------------------------------------------------------------------
    def scheduler_config(self) -> dict[str, Any]:
        """FlowMatchEulerDiscreteScheduler keyword arguments (a dynamic shift's mu at this resolution is
        noise_schedule.mu, an argument of set_timesteps)."""
        out: dict[str, Any] = dict(num_train_timesteps=self._T, shift=self.shift)
        if self.mu is not None:
            out.update(use_dynamic_shifting=True)
        return out

    def predict(
        self, x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor, cond: FlowCondition
    ) -> torch.Tensor:
        """The velocity n - x_0 at flow input x_t = x (one sample per row) and timestep t = T * flow time."""
        md = self.model_dtype
        x_in = x.to(md)
        ts = torch.as_tensor(t, device=self.device).reshape(-1).expand(x.shape[0]).float()
        if self.arch == "sd3":
            out = self.net(
                hidden_states=x_in,
                timestep=ts,
                encoder_hidden_states=cond.embeds,
                pooled_projections=cond.pooled,
                return_dict=False,
            )[0]
        elif self.arch == "flux":
            b, c, h, w = x.shape
            packed = x_in.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c)
            guidance = None
            if self.guidance_kind == "embedded":
                guidance = torch.full((b,), float(cond.guidance), device=self.device, dtype=torch.float32)
            out = self.net(
                hidden_states=packed,
                timestep=ts.to(md) / self._T,  # as FluxPipeline: timestep in the latents' dtype, / 1000
                guidance=guidance,
                pooled_projections=cond.pooled,
                encoder_hidden_states=cond.embeds,
                txt_ids=cond.txt_ids,
                img_ids=self._image_ids(h, w),
                return_dict=False,
            )[0]
            out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        elif self.arch == "sana":
            out = self.net(
                x_in,
                encoder_hidden_states=cond.embeds,
                encoder_attention_mask=cond.mask,
                timestep=ts * self.net.config.timestep_scale,
                return_dict=False,
            )[0]
            if out.shape[1] == 2 * x.shape[1]:  # learned sigma: keep the velocity
                out = out[:, : x.shape[1]]
        else:  # InstaFlow: the UNet predicts x_0 - n (see the module docstring)
            out = -self.net(x_in, ts, encoder_hidden_states=cond.embeds).sample
        return out.to(x.dtype)

    def _image_ids(self, h: int, w: int) -> torch.Tensor:
        if self._img_ids is None or self._img_ids.shape[0] != (h // 2) * (w // 2):
            ids = torch.zeros(h // 2, w // 2, 3)
            ids[..., 1] += torch.arange(h // 2)[:, None]
            ids[..., 2] += torch.arange(w // 2)[None, :]
            self._img_ids = ids.reshape(-1, 3).to(device=self.device, dtype=self.model_dtype)
        return self._img_ids

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """D(x; sigma) from the predicted velocity (models.base.flow_denoise)."""
        return flow_denoise(self, x, sigma, cond)

    def encode(self, raw: list[Any]) -> FlowCondition:
        """Prompt embeddings of a batch of prompts, with the negative prompt's when guidance is cfg."""
        prompts = [str(p) for p in raw]
        cfg = self.guidance_kind == "cfg"
        negative = [self.negative_prompt or ""] * len(prompts)
        with torch.no_grad():
            if self.arch == "sd3":
                embeds, null, pooled, null_pooled = self.pipe.encode_prompt(
                    prompt=prompts,
                    prompt_2=None,
                    prompt_3=None,
                    device=self.device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=cfg,
                    negative_prompt=negative if cfg else None,
                    max_sequence_length=self.max_sequence_length,
                )
                return FlowCondition(embeds, pooled, null, null_pooled)
            if self.arch == "flux":
                embeds, pooled, txt_ids = self.pipe.encode_prompt(
                    prompt=prompts,
                    prompt_2=None,
                    device=self.device,
                    max_sequence_length=self.max_sequence_length,
                )
                null = null_pooled = None
                if cfg:  # FluxPipeline's true_cfg_scale
                    null, null_pooled, _ = self.pipe.encode_prompt(
                        prompt=negative,
                        prompt_2=None,
                        device=self.device,
                        max_sequence_length=self.max_sequence_length,
                    )
                return FlowCondition(embeds, pooled, null, null_pooled, txt_ids)
            if self.arch == "sana":
                import inspect

                instruction = inspect.signature(type(self.pipe).__call__).parameters[
                    "complex_human_instruction"
                ]
                embeds, mask, null, null_mask = self.pipe.encode_prompt(
                    prompts,
                    do_classifier_free_guidance=cfg,
                    negative_prompt=negative,
                    device=self.device,
                    max_sequence_length=self.max_sequence_length,
                    complex_human_instruction=instruction.default,
                )
                return FlowCondition(embeds, None, null, mask=mask, null_mask=null_mask)
            embeds, null = self.pipe.encode_prompt(
                prompts, self.device, 1, cfg, negative_prompt=negative if cfg else None
            )
            return FlowCondition(embeds, None, null)

    def with_guidance(self, cond: FlowCondition, guidance: float) -> FlowCondition:
        """The condition carrying the guidance value FLUX.1-dev's transformer embeds."""
        return replace(cond, guidance=float(guidance))

    def null_condition(self, cond: FlowCondition) -> FlowCondition:
        if cond.null_embeds is None:
            raise UsageError(f"model={self.name} takes no classifier-free guidance; use guidance=1")
        return cond.null()

    def cat_conditions(self, a: FlowCondition, b: FlowCondition) -> FlowCondition:
        return a.cat(b)

    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images (N, H, W, 3) at the model's resolution to sampler states at sigma = 0 (the VAE
        posterior mean, shifted and scaled as the pipelines do; the inverse of `decode`), float64."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            out = self.vae.encode(x.to(self.device, self.vae.dtype))
            z = (out.latent_dist.mean if hasattr(out, "latent_dist") else out.latent).double()  # KL / DC-AE
        shift = self.vae.config.get("shift_factor") or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    def decode(self, samples: torch.Tensor) -> np.ndarray:
        """Final sampler states to uint8 images (N, H, W, 3): the VAE on z / scaling_factor + shift_factor."""
        shift = self.vae.config.get("shift_factor") or 0.0
        with torch.no_grad():
            z = samples.double() / self.vae.config.scaling_factor + shift
            images = self.vae.decode(z.to(self.vae.dtype)).sample
            images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()


def _class_of(arch: str) -> str:
    return next(k for k, v in FLOW_PIPELINES.items() if v == arch)
