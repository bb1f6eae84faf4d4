"""iPNDM: improved pseudo-numerical methods (Zhang & Chen 2023, "Fast Sampling of Diffusion Models
with Exponential Integrator", Sec. 4 / Alg. 3; zju-pi/diff-sampler `get_ipndm`).

Adams-Bashforth steps of the probability-flow ODE dy/dsigma = eps(y, sigma) in EDM's scale
y = x_t / alpha_t, with the fixed multistep weights of PNDM and a lower-order warm-up instead of
Runge-Kutta steps, so N steps cost exactly N evaluations.
"""

from __future__ import annotations

from typing import Any

import torch

from samplebench.models.base import sigmas_from_alphas_cumprod
from samplebench.samplers.base import Denoiser, to_epsilon
from samplebench.samplers.schedules import sigma_grid, sigma_to_t

# Adams-Bashforth weights for orders 1..4, newest derivative first.
_AB_WEIGHTS = {
    1: (1.0,),
    2: (1.5, -0.5),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def sample_ipndm(
    denoise: Denoiser,
    x_T: torch.Tensor,
    steps: int,
    options: dict[str, Any],
    generators: list[torch.Generator] | None,
    schedule: dict[str, Any],
) -> torch.Tensor:
    """Run iPNDM from unit-variance noise x_T at the model's largest noise level to sigma = 0."""
    from diffusers import DDPMScheduler

    order = int(options.get("order", 4))
    if order not in _AB_WEIGHTS:
        raise ValueError("sampler.order for ipndm must be 1, 2, 3 or 4")
    train = DDPMScheduler(**schedule)
    train_sigmas = sigmas_from_alphas_cumprod(train.alphas_cumprod)
    sigmas = sigma_grid(
        train_sigmas, steps, options.get("schedule", "karras"), float(options.get("rho", 7.0))
    )
    prediction_type = schedule.get("prediction_type", "epsilon")
    y = x_T * (1 + sigmas[0] ** 2).sqrt()
    history: list[torch.Tensor] = []
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_vp = y / (1 + sigma**2).sqrt()
        t = sigma_to_t(train_sigmas, sigma.reshape(1))[0]
        d = to_epsilon(denoise(x_vp, t, sigma), x_vp, sigma, prediction_type)
        history.insert(0, d)
        del history[order:]
        # The last step, down to sigma = 0, is much longer than the ones before it on any discrete
        # schedule, so the equal-step multistep weights do not hold there: take it first-order.
        weights = _AB_WEIGHTS[1 if i == steps - 1 else len(history)]
        y = y + (sigma_next - sigma) * sum(w * h for w, h in zip(weights, history, strict=False))
    return y  # sigma = 0: VP and VE scales coincide
