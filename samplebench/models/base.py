"""The model protocol shared by the analytic model and the diffusers adapters.

A model is evaluated on the variance-preserving input x_t = a x_0 + s n (a^2 + s^2 = 1). Samplers
pass both the scheduler's timestep `t` and the noise level `sigma = s / a` their update assumes, so
an exact model (or one converted to EDM's D(x; sigma), as k-diffusion's external.py does) is asked
about the very noise level the solver integrates.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


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


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """VE noise level sigma = sqrt((1 - abar) / abar) for each training timestep."""
    ac = alphas_cumprod.double()
    return ((1 - ac) / ac).sqrt()


def pick_device(device: str) -> torch.device:
    """'auto' means cuda when present, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
