"""iPNDM: improved pseudo-numerical methods (Zhang & Chen 2023, "Fast Sampling of Diffusion Models
with Exponential Integrator", Sec. 4 / Alg. 3; zju-pi/diff-sampler `get_ipndm`).

Adams-Bashforth steps of the probability-flow ODE dy/dsigma = eps(y, sigma) on y = x_0 + sigma n,
with the fixed multistep weights of PNDM and a lower-order warm-up instead of Runge-Kutta steps,
so N steps cost exactly N evaluations.
"""

from __future__ import annotations

import torch

from samplebench.samplers.base import Denoiser
from samplebench.samplers.euler import _at, _levels

# Adams-Bashforth weights for orders 1..4, newest derivative first.
AB_WEIGHTS = {
    1: (1.0,),
    2: (1.5, -0.5),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def sample_ipndm(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generators=None, order: int = 4
) -> torch.Tensor:
    """iPNDM of order 1-4. The last step, down to sigma = 0, is much longer than the ones before it
    on any schedule, so the equal-step weights do not hold there: it is taken first-order (= D)."""
    if order not in AB_WEIGHTS:
        raise ValueError("sampler.order for ipndm must be 1, 2, 3 or 4")
    s = _levels(sigmas)
    steps = len(s) - 1
    history: list[torch.Tensor] = []
    for i in range(steps):
        history.insert(0, (x - denoise(x, _at(s[i]))) / s[i])
        del history[order:]
        weights = AB_WEIGHTS[1 if i == steps - 1 else len(history)]
        x = x + (s[i + 1] - s[i]) * sum(w * h for w, h in zip(weights, history, strict=False))
    return x
