"""Diffusion sampling with momentum: Polyak's heavy ball (HB) on PLMS / iPNDM, the generalised heavy
ball (GHVB), and DPM-Solver++(2M) with HB.

Source: Wizadwongsa, Chinchuthakun, Khungurn, Raj, Suwajanakorn, "Diffusion Sampling with Momentum
for Mitigating Divergence Artifacts", ICLR 2024, arXiv:2307.11118; its code, sWizad/momentum-diffusion:
stable_diffusion/diffusion/momentum_scheduler.py (AdamBmixer, PLMSWithHBScheduler, GHVBScheduler,
MomentumDPMSolverMultistepScheduler) and DiT/diffusion/modified_gaussian_diffusion.py (hb_sample,
ghvb_sample, plms_b_mixer). Written anew here; tests/test_momentum.py checks it against a separate
transcription of those functions.

The paper steps x_bar = x / alpha in sigma_bar = sqrt(1 - alpha_bar) / sqrt(alpha_bar), which is this
codebase's x = x_0 + sigma n, so its updates carry over unchanged: x' = x + (sigma' - sigma) velocity,
with eps = (x - D(x; sigma)) / sigma and AB_k the Adams-Bashforth weights of iPNDM (newest first):

- hb (PLMSWithHBScheduler, hb_sample): v_n = (1 - beta) v_{n-1} + beta AB_k(eps_n, ..., eps_{n-k+1}),
  x' = x + (sigma' - sigma) v_n. beta mixes the whole Adams-Bashforth combination.
- ghvb (GHVBScheduler, ghvb_sample): v_n = (1 - beta) v_{n-1} + beta eps_n, then
  x' = x + (sigma' - sigma) AB_k^beta(v_n, ..., v_{n-k+1}). beta mixes each eps before the multistep
  sum, whose weights (AdamBmixer with b = beta) are the k-term weights c_j for which the step written
  in eps, sum_j c_j z^j * beta / (1 - (1 - beta) z) with z = e^{-s} the one-step shift back, matches
  the exact integral (e^s - 1) / s to O(s^k): AB_k at beta = 1, and their sum is 1 for every beta.
- dpmpp_hb (MomentumDPMSolverMultistepScheduler, its only variant: data prediction, 'midpoint'):
  v_n = (1 - beta) v_{n-1} + beta (D0 + D1 / 2), x' = (sigma'/sigma) x - (e^{-h} - 1) v_n, i.e.
  DPM-Solver++(2M) with the momentum on its midpoint combination.

Warm-up and the start of v, as in the official code: hb and ghvb take orders 1, 2, ... up to k from
the history they have (iPNDM's warm-up); both set v = eps_0 before their first mixing step, so
v_0 = eps_0 for any beta (the first step is Euler, not a beta-shortened one). dpmpp_hb leaves
DPM-Solver++'s first-order steps alone, as the official class (it overrides only the second-order
update): v starts as the first second-order step's D0 + D1/2 and is mixed from the step after.

The step to sigma = 0 is D(x; sigma_min) itself for all three, at every beta: hb and ghvb take it as
iPNDM does (first-order, x + (0 - sigma) eps = D), dpmpp_hb as DPM-Solver++ does (x = D), and none of
them mixes the velocity into it; every step between two positive levels carries the momentum. The
official code mostly never takes this step: on its PNDM, DDIM and DPM-Solver bases the last step ends
at the training schedule's smallest level (final_alpha_cumprod, alphas_cumprod[0]) and the latents
there are decoded as they are (DiT's g_prev[0] = g[0] even makes that last step zero-length); only on
an EulerDiscreteScheduler base does PLMSWithHBScheduler step to sigma = 0, at full order and with
momentum. Here every sampler ends with the same jump to 0 (the benchmark's floor comes from it), and
iPNDM's reason to take it first-order holds for the momentum samplers too (the equal-step weights do
not fit that long step). Keeping the velocity on it would return D + (1 - beta) sigma_min (eps_N -
v_{N-1}), a stale noise estimate added to the denoised output (4e-5 to 9e-3 of the sample scale on
the analytic model, tests/test_momentum.py); dpmpp_hb has no choice to make: the official class
leaves first-order steps, the step to 0 included, without momentum.

beta = 1 is the base solver exactly: hb and ghvb equal ipndm of the same order and dpmpp_hb equals
dpmpp bit for bit (the mixing multiplies the old velocity by 1 - beta = 0 exactly, GHVB's weights
at beta = 1 are the very floats of AB_WEIGHTS, and dpmpp_hb adds its momentum as a correction to
DPM-Solver++'s own expression). beta in (0, 1]: at beta = 0 HB would never update v and GHVB's
weights divide by beta. The official code encodes beta in a fractional `order` (3.8 = order 4,
beta = 3.8 % 1, which is 0.7999999999999998); here they are two options.

Not carried over: the official MomentumUniPCMultistepScheduler, whose predictor assigns the mixed
velocity and then overwrites it with the unmixed value (a no-op).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from samplebench.errors import UsageError
from samplebench.samplers.base import Denoiser
from samplebench.samplers.dpm_solver import _order
from samplebench.samplers.euler import _at, _levels
from samplebench.samplers.ipndm import AB_WEIGHTS

# GHVB's beta-modified Adams-Bashforth weights, newest first: c_j = (a_j + b_j beta) / (d beta) for
# order: (d, ((a_0, b_0), ...)) (AdamBmixer's table). At beta = 1, (a_j + b_j) / d is AB_WEIGHTS.
GHVB_TERMS = {
    1: (1, ((0, 1),)),
    2: (2, ((2, 1), (-2, 1))),
    3: (12, ((18, 5), (-24, 8), (6, -1))),
    4: (24, ((46, 9), (-78, 19), (42, -5), (-10, 1))),
}
DEFAULT_BETA = 0.8


def ghvb_weights(order: int, beta: float) -> tuple[float, ...]:
    """GHVB's multistep weights of this order for this beta, newest first (sum 1 for every beta)."""
    d, terms = GHVB_TERMS[order]
    return tuple((a + b * beta) / (d * beta) for a, b in terms)


def check_beta(beta: Any) -> float:
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 < beta <= 1:
        raise ValueError(
            f"sampler.beta={beta} must be a number in (0, 1] (1 = no momentum), e.g. sampler.beta=0.8"
        )
    return float(beta)


def validate_beta(options: dict[str, Any]) -> None:
    """SamplerSpec.validate of the momentum samplers: a bad sampler.beta is a one-line UsageError when
    the sweep is planned, before any cell runs."""
    if "beta" in options:
        try:
            check_beta(options["beta"])
        except ValueError as e:
            raise UsageError(str(e)) from None


def _check_order(name: str, order: int) -> None:
    if order not in AB_WEIGHTS:
        raise ValueError(f"sampler.order for {name} must be 1, 2, 3 or 4")


def _ab(weights: tuple[float, ...], history: list[torch.Tensor]) -> torch.Tensor:
    """sum_j w_j h_j, newest first: the same float operations as sample_ipndm's step."""
    return sum(w * h for w, h in zip(weights, history, strict=False))


def sample_hb(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generators=None,
    order: int = 4,
    beta: float = DEFAULT_BETA,
) -> torch.Tensor:
    """PLMS / iPNDM of order 1-4 with heavy-ball momentum on its Adams-Bashforth combination."""
    _check_order("hb", order)
    beta = check_beta(beta)
    s = _levels(sigmas)
    steps = len(s) - 1
    history: list[torch.Tensor] = []  # eps, newest first
    v: torch.Tensor | None = None
    for i in range(steps):
        eps = (x - denoise(x, _at(s[i]))) / s[i]
        history.insert(0, eps)
        del history[order:]
        if i == steps - 1:  # the jump to 0: iPNDM's first-order step, D, without momentum
            x = x + (s[i + 1] - s[i]) * _ab(AB_WEIGHTS[1], history)
            break
        prime = _ab(AB_WEIGHTS[len(history)], history)
        if v is None:
            v = eps  # the official start: v_0 = eps_0 whatever beta
        v = (1 - beta) * v + beta * prime
        x = x + (s[i + 1] - s[i]) * v
    return x


def sample_ghvb(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generators=None,
    order: int = 4,
    beta: float = DEFAULT_BETA,
) -> torch.Tensor:
    """GHVB of order 1-4: the velocity averages eps, the step is a beta-modified AB sum of velocities."""
    _check_order("ghvb", order)
    beta = check_beta(beta)
    s = _levels(sigmas)
    steps = len(s) - 1
    history: list[torch.Tensor] = []  # velocities, newest first
    v: torch.Tensor | None = None
    for i in range(steps):
        eps = (x - denoise(x, _at(s[i]))) / s[i]
        if i == steps - 1:  # the jump to 0: iPNDM's first-order step, D, without momentum
            x = x + (s[i + 1] - s[i]) * _ab(AB_WEIGHTS[1], [eps])
            break
        if v is None:
            v = eps  # the official start: v_0 = eps_0 whatever beta
        v = (1 - beta) * v + beta * eps
        history.insert(0, v)
        del history[order:]
        x = x + (s[i + 1] - s[i]) * _ab(ghvb_weights(len(history), beta), history)
    return x


def sample_dpmpp_hb(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generators=None,
    beta: float = DEFAULT_BETA,
) -> torch.Tensor:
    """DPM-Solver++(2M), 'midpoint', with heavy-ball momentum on D0 + D1/2. Its expressions are
    sample_dpmpp_multistep's at order 2 (same order schedule, lower_order_final included), and the
    momentum enters as -(e^{-h} - 1) (v - (D0 + D1/2)), with v - (D0 + D1/2) = (1 - beta) (v_prev -
    (D0 + D1/2)): exactly 0 at beta = 1."""
    beta = check_beta(beta)
    s = _levels(sigmas)
    steps = len(s) - 1
    d_hist: list[torch.Tensor] = []
    lam_hist: list[float] = []
    v: torch.Tensor | None = None
    for i in range(steps):
        sig, nxt = s[i], s[i + 1]
        d = denoise(x, _at(sig))
        d_hist.insert(0, d)
        lam_hist.insert(0, -math.log(sig))
        del d_hist[2:], lam_hist[2:]
        o = _order(2, i, steps, len(d_hist), nxt == 0, True)
        if nxt == 0:
            x = d
            continue
        h = -math.log(nxt) - lam_hist[0]
        phi1 = math.expm1(-h)
        x_next = (nxt / sig) * x - phi1 * d
        if o == 2:
            r0 = (lam_hist[0] - lam_hist[1]) / h
            d1_0 = (d_hist[0] - d_hist[1]) / r0
            x_next = x_next - 0.5 * phi1 * d1_0
            mid = d + 0.5 * d1_0
            if v is None:
                v = mid
            else:
                correction = (1 - beta) * (v - mid)
                v = mid + correction
                x_next = x_next - phi1 * correction
        x = x_next
    return x
