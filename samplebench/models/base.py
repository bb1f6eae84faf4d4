"""The model protocol shared by the analytic model and the diffusers adapters, and the one thing
samplers see of a model: the denoiser D(x; sigma, cond) with its noise schedule.

Diffusion networks are evaluated on the variance-preserving input x_t = a x_0 + s n (a^2 + s^2 = 1)
and predict noise, v or x_0; flow-matching networks on the rectified-flow input
x_t = (1 - t) x_0 + t n and predict the velocity n - x_0 (Liu et al. 2023, arXiv:2209.03003;
Esser et al. 2024, arXiv:2403.03206). Samplers never see either: they work in EDM's
parametrisation x = x_0 + sigma n (Karras et al. 2022, Sec. 2; k-diffusion's external.py), with
sigma = s / a for VP models and sigma = t / (1 - t) for flow models (x_t = x / (1 + sigma)), and call
D(x; sigma) = E[x_0 | x], built from the native prediction once, here (`vp_denoise`,
`flow_denoise`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

# Flow time t = 1 (pure noise) is sigma = infinity in EDM's parametrisation. Samplers get this finite
# stand-in: t = sigma / (1 + sigma) = 1 - 1e-8 rounds to 1.0 in float32 (what the network is given,
# as t or as 1000 t), x / (1 + sigma) is x_T to float64 rounding, and the exact velocity differs from
# its t = 1 value by O(1e-8). The sampler state of a flow model is float64 (DiffusersModel.dtype) so
# that x = x_T (1 + 1e8) loses nothing in the first step.
FLOW_T1_SIGMA = 1e8


def flow_shift(t: np.ndarray | torch.Tensor | float, shift: float = 1.0, mu: float | None = None):
    """SD3's time shift s t / (1 + (s - 1) t) or, with mu, FLUX's resolution-dependent (dynamic) shift
    e^mu / (e^mu + 1/t - 1) (diffusers FlowMatchEulerDiscreteScheduler, time_shift with sigma = 1)."""
    if mu is not None:
        e = float(np.exp(mu))
        return e / (e + (1 / t - 1))
    return shift * t / (1 + (shift - 1) * t)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A model's noise levels, ascending float64.

    kind "vp_discrete": T training levels sigma_0 < ... < sigma_{T-1}; model time t is a fractional
    training index, linear in log sigma between training levels (k-diffusion's DiscreteSchedule).

    kind "flow": rectified flow, sigma = t / (1 - t). The training levels are the flow times
    shift(i / T), i = 1 .. T - 1, as diffusers' FlowMatchEulerDiscreteScheduler builds them
    (t = 1 itself, pure noise, is FLOW_T1_SIGMA and only the `flow` schedule visits it); model
    time is T * t (the timestep SD3's transformer takes). `shift` is the model's static shift (SD3:
    3), `mu` its dynamic shift at the configured resolution (FLUX; None when static), and
    `flow_end` how its pipeline spaces N steps: "train" (linspace from 1 to the smallest training
    time, then shifted: FlowMatchEulerDiscreteScheduler.set_timesteps) or "1/N" (linspace(1, 1/N),
    then shifted: FluxPipeline).
    """

    kind: str
    train_sigmas: torch.Tensor
    shift: float = 1.0
    mu: float | None = None
    flow_end: str = "train"

    @property
    def sigma_min(self) -> float:
        return float(self.train_sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.train_sigmas[-1])

    @property
    def is_flow(self) -> bool:
        return self.kind == "flow"

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional training timestep of each noise level (VP: clipped to the training range; flow:
        T * sigma / (1 + sigma), continuous)."""
        if self.is_flow:
            s = torch.as_tensor(sigma).double().cpu()
            return self.num_train_timesteps * s / (1 + s)
        log_sigmas = self.train_sigmas.log().numpy()
        s = np.log(np.clip(torch.as_tensor(sigma).double().cpu().numpy(), self.sigma_min, self.sigma_max))
        return torch.as_tensor(np.interp(s, log_sigmas, np.arange(len(log_sigmas))))

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level at a fractional training timestep (the inverse of sigma_to_t)."""
        if self.is_flow:
            u = torch.as_tensor(t).double().cpu() / self.num_train_timesteps
            return u / (1 - u)
        log_sigmas = self.train_sigmas.log().numpy()
        t = torch.as_tensor(t).double().cpu().numpy()
        return torch.as_tensor(np.exp(np.interp(t, np.arange(len(log_sigmas)), log_sigmas)))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.train_sigmas) + (1 if self.is_flow else 0)

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """The factor from EDM's x to the network's input: 1 / sqrt(1 + sigma^2) (VP), 1 / (1 + sigma)
        (flow)."""
        s = torch.as_tensor(sigma).double()
        return 1 / (1 + s) if self.is_flow else 1 / (1 + s**2).sqrt()

    def initial_state(self, x_T: torch.Tensor, sigma: float) -> torch.Tensor:
        """The sampler's start at level sigma from unit-variance noise x_T: the network's input is x_T,
        so x = x_T * sqrt(1 + sigma^2) for VP models (not x_T * sigma, diffusers' init_noise_sigma)
        and x = x_T * (1 + sigma) for flow models (x_t = x_T at t = sigma / (1 + sigma))."""
        if self.is_flow:
            return x_T * float(1.0 + sigma)
        return x_T * float(np.sqrt(1.0 + sigma**2))


def flow_schedule(
    num_train_timesteps: int, shift: float = 1.0, mu: float | None = None, flow_end: str = "train"
) -> NoiseSchedule:
    """The training levels of a rectified-flow model (diffusers FlowMatchEulerDiscreteScheduler.__init__:
    t_i = i / T, shifted unless the shift is dynamic), t = 1 left out (FLOW_T1_SIGMA)."""
    T = int(num_train_timesteps)
    t = np.arange(1, T, dtype=np.float64) / T
    if mu is None:
        t = flow_shift(t, shift)
    return NoiseSchedule("flow", torch.as_tensor(t / (1 - t)), float(shift), mu, flow_end)


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


def flow_denoise(model: Any, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
    """D(x; sigma) of a network trained on rectified-flow inputs: t = sigma / (1 + sigma),
    x_t = x / (1 + sigma), then D = x_t - t v with v the predicted velocity n - x_0 (computed in
    float64 where the state is)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
    t = (s / (1 + s)).reshape(shape)
    x_t = x / (1 + s.reshape(shape)).to(x.dtype)
    timestep = model.noise_schedule.sigma_to_t(s).to(x.device)
    v = model.predict(x_t, timestep, s, cond)
    return (x_t.double() - t * v.double()).to(x.dtype)


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
