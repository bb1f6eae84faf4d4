"""The model protocol shared by the analytic model and the diffusers adapters, and the one thing
samplers see of a model: the denoiser D(x; sigma, cond) with its noise schedule.

Networks are evaluated on the variance-preserving input x_t = a x_0 + s n (a^2 + s^2 = 1) and
predict noise, v or x_0 (`predict`). Samplers never see that: they work in EDM's parametrisation
x = x_0 + sigma n (sigma = s / a, Karras et al. 2022, Sec. 2; k-diffusion's external.py) and call
D(x; sigma) = E[x_0 | x], built from the native prediction once, here (`vp_denoise`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A model's noise levels. kind "vp_discrete": T training levels sigma_0 < ... < sigma_{T-1}
    (ascending float64), model time t a fractional training index, linear in log sigma between
    training levels (k-diffusion's DiscreteSchedule convention). A flow-matching kind comes next.
    """

    kind: str
    train_sigmas: torch.Tensor

    @property
    def sigma_min(self) -> float:
        return float(self.train_sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.train_sigmas[-1])

    @property
    def num_train_timesteps(self) -> int:
        return len(self.train_sigmas)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional training timestep of each noise level (clipped to the training range)."""
        log_sigmas = self.train_sigmas.log().numpy()
        s = np.log(np.clip(torch.as_tensor(sigma).double().cpu().numpy(), self.sigma_min, self.sigma_max))
        return torch.as_tensor(np.interp(s, log_sigmas, np.arange(len(log_sigmas))))

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level at a fractional training timestep (the inverse of sigma_to_t)."""
        log_sigmas = self.train_sigmas.log().numpy()
        t = torch.as_tensor(t).double().cpu().numpy()
        return torch.as_tensor(np.exp(np.interp(t, np.arange(len(log_sigmas)), log_sigmas)))

    def initial_state(self, x_T: torch.Tensor, sigma: float) -> torch.Tensor:
        """The sampler's start at level sigma from unit-variance noise x_T: the VP input is x_T, so
        x = x_T * sqrt(1 + sigma^2) (not x_T * sigma, which is diffusers' init_noise_sigma)."""
        return x_T * float(np.sqrt(1.0 + sigma**2))


def vp_schedule(scheduler_config: dict[str, Any]) -> NoiseSchedule:
    """The training levels of a diffusers beta schedule (trained_betas or beta_schedule)."""
    from diffusers import DDPMScheduler

    train = DDPMScheduler(**{k: v for k, v in scheduler_config.items() if k != "prediction_type"})
    return NoiseSchedule("vp_discrete", sigmas_from_alphas_cumprod(train.alphas_cumprod))


class DiffusionModel(Protocol):
    """What a sampler needs from a model."""

    name: str
    prediction_type: str  # "epsilon", "v_prediction" or "sample"
    sample_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def scheduler_config(self) -> dict[str, Any]:
        """Keyword arguments for a diffusers scheduler: the training schedule and prediction type."""
        ...

    def predict(self, x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """The model's native prediction for a batch; `sigma` has one entry per sample."""
        ...

    def conditions(self, indices: list[int], seed: int) -> Any:
        """The condition of sample i, a function of (seed, i) alone."""
        ...

    def null_condition(self, cond: Any) -> Any:
        """The unconditional counterpart of `cond`, for classifier-free guidance."""
        ...

    def cat_conditions(self, a: Any, b: Any) -> Any:
        """Two conditions as one batch (a first), so a guided step is one model call."""
        ...

    @property
    def noise_schedule(self) -> NoiseSchedule:
        """The model's noise levels and its sigma <-> t map."""
        ...

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """D(x; sigma, cond) in EDM's parametrisation x = x_0 + sigma n; sigma has one entry per sample."""
        ...


def vp_denoise(model: Any, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
    """D(x; sigma) of a network trained on VP inputs: x_vp = x / sqrt(1 + sigma^2), t = t(sigma),
    then D = x - sigma * eps with eps converted from the native prediction (to_epsilon)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
    s_x = s.to(x.dtype).reshape(shape)
    x_vp = x / (1 + s_x**2).sqrt()
    t = model.noise_schedule.sigma_to_t(s).to(x.device)
    eps = to_epsilon(model.predict(x_vp, t, s, cond), x_vp, s_x, model.prediction_type)
    return x - s_x * eps


def to_epsilon(
    pred: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Convert a native prediction at VP input x and VE noise level sigma to a noise prediction."""
    if prediction_type == "epsilon":
        return pred
    alpha = (1 + sigma**2) ** -0.5
    s = sigma * alpha
    if prediction_type == "v_prediction":  # v = alpha * eps - s * x0, x = alpha * x0 + s * eps
        return alpha * pred + s * x
    if prediction_type == "sample":
        return (x - alpha * pred) / s
    raise ValueError(f"unknown prediction type {prediction_type}")


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """VE noise level sigma = sqrt((1 - abar) / abar) for each training timestep."""
    ac = alphas_cumprod.double()
    return ((1 - ac) / ac).sqrt()


def pick_device(device: str) -> torch.device:
    """'auto' means cuda when present, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
