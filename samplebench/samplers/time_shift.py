"""Time-Shift sampling (Li, Qu, Yao, Sun & Moens, "Alleviating Exposure Bias in Diffusion Models
through Sampling with Shifted Time Steps", ICLR 2024, arXiv:2305.15583; official code
Mingxiao-Li/TS-DPM): at a step whose time is above a cutoff, pick the training timestep tau in a
window around the scheduled time whose noise variance 1 - abar_tau is nearest the state's own
variance, and use tau in place of the scheduled time. Below the cutoff, nothing moves.

The selection rule (TS-DPM `PNMSolver.apply_time_shift`, `DPM_Solver.time_shift`,
`DEIS_Sampler.apply_time_shift`), written here in the VP scale of the model's NoiseSchedule:
x_vp = x / sqrt(1 + sigma^2) is the network's input (models/base.py) and
1 - abar_tau = sigma_tau^2 / (1 + sigma_tau^2); per sample, Var is the unbiased variance of x_vp
over all its elements (torch.var's default, as the official code), in float64, and

    tau = argmin over the window of (Var(x_vp) - (1 - abar_tau))^2     (ties: the smaller tau).

The window: the integer training timesteps within window // 2 of the scheduled time t (`window` is
the full width, as PNMSolver and DPM_Solver read `window_size`; DEIS_Sampler uses window_size itself
as the half-width), clipped to [0, T - 1], plus t itself (it is an integer on diffusers' spacings,
fractional on continuous grids, where it stays the scheduled level exactly). One addition of ours:
the window is also clipped to the open interval between the midpoints to the neighbouring scheduled
times, so a shifted time stays nearer its own step than either neighbour and the levels a sampler
visits stay in order and never repeat. It binds only where window // 2 exceeds half a step
(never at the defaults for NFE <= 20 above the cutoffs; the official code has no such clip). The
shift applies when t > cutoff; the first step is never shifted (it starts at sigmas[0] on x_T).

Which time the shift moves:

- ts_ddim (TS-DPM `PNMSolver.sample` with method='euler', i.e. DDIM): the shifted time is the
  *target* of the step. The variance is taken of the current state, the window is centred on the
  next scheduled time t_{i+1} (the cutoff is compared with t_{i+1}), the DDIM transfer goes from the
  scheduled t_i to tau, and the next step evaluates the model at the unshifted t_{i+1} on that VP
  state. In x = x_0 + sigma n: x' = (D + sigma_tau eps) sqrt((1 + sigma_{i+1}^2) / (1 + sigma_tau^2)),
  i.e. the VP state reached at tau, read as the state at sigma_{i+1}. The model is only ever
  evaluated at scheduled levels.
- ts_dpmpp (DPM-Solver++(2M), with the placement of TS-DPM `DEIS_Sampler`'s eps_fn): the shifted
  time is the *model input time*. The variance is taken of the current state, the window is
  centred on the current scheduled time t_i (cutoff compared with t_i), the network sees the same
  VP input x_vp at time tau, and its noise prediction eps_tau enters the solver as the data
  prediction x - sigma_i eps_tau: every solver coefficient (lambda, h, the multistep history) stays
  on the scheduled times. TS-DPM's own DPM-Solver integration (`DPM_Solver.sample` with
  `time_shift`) differs: it moves the whole time point (the step's target, the next model input and
  the next step's coefficients, a per-sample grid) and takes the variance of the last noise
  prediction rather than of the state; DEIS_Sampler's placement keeps the solver on its schedule.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from samplebench.errors import UsageError
from samplebench.models.base import NoiseSchedule
from samplebench.samplers.base import Denoiser
from samplebench.samplers.dpm_solver import sample_dpmpp_multistep
from samplebench.samplers.euler import _at, _levels


class OptionError(UsageError, ValueError):
    """A bad time-shift option: one line naming the fix (exit code 2 at the command line)."""


def check_options(options: dict[str, Any]) -> None:
    """One-line errors for window and cutoff values the time shift cannot take."""
    for key, example, off in (("window", 30, "0"), ("cutoff", 300, "999 or more")):
        value = options.get(key, example)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise OptionError(
                f"sampler.{key}={value!r} must be a non-negative integer number of training timesteps "
                f"(e.g. sampler.{key}={example}; {off} turns the shift off)"
            )


def _check(window: int, cutoff: int, noise: NoiseSchedule | None) -> None:
    check_options({"window": window, "cutoff": cutoff})
    if noise is None:
        raise ValueError("time-shift samplers need the model's noise schedule: run them through the registry")


def vp_variance(x: torch.Tensor, sigma: float) -> np.ndarray:
    """Per-sample unbiased variance over all elements of the VP input x / sqrt(1 + sigma^2), float64."""
    x_vp = x.detach().to(torch.float64).reshape(x.shape[0], -1) / math.sqrt(1.0 + sigma**2)
    return x_vp.var(dim=1).cpu().numpy()


def select_levels(
    var: np.ndarray,
    centre_t: float,
    centre_sigma: float,
    half: int,
    noise: NoiseSchedule,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> tuple[np.ndarray, np.ndarray]:
    """(sigma, shifted) per sample: the level whose 1 - abar is nearest `var` among the integer
    training timesteps within `half` of centre_t (inside [0, T - 1] and strictly inside `bounds`)
    and the scheduled level itself; `shifted` is False where the scheduled level won."""
    T = noise.num_train_timesteps
    lo, hi = bounds
    ks = np.arange(math.ceil(centre_t - half), math.floor(centre_t + half) + 1)
    keep = (ks >= 0) & (ks <= T - 1) & (ks > lo) & (ks < hi) & (np.abs(ks - centre_t) > 1e-6)
    ks = ks[keep]
    times = np.concatenate([ks.astype(np.float64), [centre_t]])
    sigmas = np.concatenate([noise.train_sigmas.numpy()[ks], [centre_sigma]])
    order = np.argsort(times, kind="stable")  # ascending time, as the official lists: ties -> smaller tau
    times, sigmas = times[order], sigmas[order]
    target = sigmas**2 / (1.0 + sigmas**2)  # 1 - abar = sigma^2 / (1 + sigma^2)
    pick = np.argmin((var[:, None] - target[None, :]) ** 2, axis=1)
    chosen = sigmas[pick]
    return chosen, times[pick] != centre_t


def _bounds(t: np.ndarray, i: int) -> tuple[float, float]:
    """The open interval between the midpoints from t_i to its scheduled neighbours."""
    lo = 0.5 * (t[i] + t[i + 1]) if i + 1 < len(t) else -math.inf
    hi = 0.5 * (t[i - 1] + t[i]) if i >= 1 else math.inf
    return lo, hi


def _column(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (like.dim() - 1)
    return (
        torch.as_tensor(values, dtype=torch.float64).to(device=like.device, dtype=like.dtype).reshape(shape)
    )


def sample_ts_ddim(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generators=None,
    noise: NoiseSchedule | None = None,
    window: int = 30,
    cutoff: int = 300,
) -> torch.Tensor:
    """TS-DDIM (deterministic DDIM, eta = 0): DDIM steps whose target time is shifted (module
    docstring; TS-DPM `PNMSolver.sample` / `apply_time_shift`). window = 0, or a cutoff at or above
    T - 1, is DDIM exactly."""
    _check(window, cutoff, noise)
    s = _levels(sigmas)
    t = noise.sigma_to_t(sigmas).numpy()  # sigma = 0 maps to t = 0 (clipped), which is never shifted
    half = int(window) // 2
    for i in range(len(s) - 1):
        x0 = denoise(x, _at(s[i]))
        eps = (x - x0) / s[i]
        nxt = s[i + 1]
        plain = x0 + nxt * eps
        if i == 0 or nxt == 0 or half == 0 or not t[i + 1] > cutoff:
            x = plain
            continue
        sig, shifted = select_levels(vp_variance(x, s[i]), t[i + 1], nxt, half, noise, _bounds(t, i + 1))
        if not shifted.any():
            x = plain
            continue
        sig_x = _column(sig, x)
        moved = (x0 + sig_x * eps) * torch.sqrt((1 + nxt**2) / (1 + sig_x**2))
        x = torch.where(_column(shifted, x).bool(), moved, plain)
    return x


def shifted_input_denoiser(
    denoise: Denoiser, sigmas: torch.Tensor, noise: NoiseSchedule, window: int, cutoff: int
) -> Denoiser:
    """The denoiser a scheduled-time solver calls, once per step in order, with the model input time
    shifted (module docstring, ts_dpmpp): at a shifted sample, D = x - sigma_i eps(x_vp; tau)."""
    s = _levels(sigmas)
    t = noise.sigma_to_t(sigmas).numpy()
    half = int(window) // 2
    step = [0]

    def shifted(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        i = step[0]
        step[0] += 1
        sig_i = float(sigma)
        if sig_i != s[i]:
            raise AssertionError(f"the shifted denoiser expects step {i} at sigma={s[i]}, got {sig_i}")
        if i == 0 or half == 0 or not t[i] > cutoff:
            return denoise(x, sigma)
        sig, moved = select_levels(vp_variance(x, sig_i), t[i], sig_i, half, noise, _bounds(t, i))
        if not moved.any():
            return denoise(x, sigma)
        sig_x = _column(sig, x)
        x_in = x * torch.sqrt((1 + sig_x**2) / (1 + sig_i**2))  # the same VP input, read at tau
        d_tau = denoise(x_in, torch.as_tensor(sig, dtype=torch.float64))
        eps = (x_in - d_tau) / sig_x
        return torch.where(_column(moved, x).bool(), x - sig_i * eps, d_tau)

    return shifted


def sample_ts_dpmpp(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generators=None,
    noise: NoiseSchedule | None = None,
    window: int = 30,
    cutoff: int = 300,
) -> torch.Tensor:
    """TS-DPM-Solver++(2M): samplebench's DPM-Solver++(2M) (midpoint, lower_order_final, as `dpmpp`)
    with the model input time shifted and its coefficients on the scheduled times (module docstring).
    window = 0, or a cutoff at or above T - 1, is dpmpp exactly."""
    _check(window, cutoff, noise)
    wrapped = shifted_input_denoiser(denoise, sigmas, noise, window, cutoff)
    return sample_dpmpp_multistep(wrapped, x, sigmas, generators, order=2)
