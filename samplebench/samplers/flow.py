"""Euler and Heun on flow time: the steps flow-matching pipelines take (diffusers
FlowMatchEulerDiscreteScheduler and FlowMatchHeunDiscreteScheduler; Liu et al. 2023,
arXiv:2209.03003; Esser et al. 2024, arXiv:2403.03206), on our denoiser contract.

The state is carried as EDM's x = x_0 + sigma n; each step maps it to the rectified-flow state
x_t = x / (1 + sigma) at t = sigma / (1 + sigma), takes the step in t with the velocity
v = (x_t - D) / t (= E[n - x_0 | x_t]), and maps back. On any model, flow or VP, these integrate
the same probability-flow ODE, written in flow coordinates; on a flow model's `flow` schedule they
are the pipelines' own samplers. Euler in t and DDIM / Euler in sigma take identical steps (both
are exact for a constant D), which tests/test_flow_samplers.py checks; Heun in t does not equal
EDM's Heun in sigma (the averaged slopes differ).
"""

from __future__ import annotations

import torch

from samplebench.samplers.base import Denoiser


def _t(sigma: float) -> float:
    return sigma / (1.0 + sigma)


def _velocity(denoise: Denoiser, x_t: torch.Tensor, sigma: float) -> torch.Tensor:
    """v(x_t, t) = (x_t - D(x; sigma)) / t with x = x_t (1 + sigma)."""
    d = denoise(x_t * (1.0 + sigma), torch.tensor(sigma, dtype=torch.float64))
    return (x_t - d) / _t(sigma)


def sample_flow_euler(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generators=None
) -> torch.Tensor:
    """x_t' = x_t + (t' - t) v(x_t, t) (FlowMatchEulerDiscreteScheduler.step, deterministic)."""
    s = [float(v) for v in sigmas]
    x_t = x / (1.0 + s[0])
    for i in range(len(s) - 1):
        x_t = x_t + (_t(s[i + 1]) - _t(s[i])) * _velocity(denoise, x_t, s[i])
    return x_t * (1.0 + s[-1])


def sample_flow_heun(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generators=None
) -> torch.Tensor:
    """Heun's method in t (FlowMatchHeunDiscreteScheduler.step): an Euler predictor to t', the velocity
    there, and the step with the mean of both velocities; the last step, to t = 0, is Euler (the
    velocity at t = 0 is not evaluated), so N steps cost 2N - 1 evaluations."""
    s = [float(v) for v in sigmas]
    x_t = x / (1.0 + s[0])
    for i in range(len(s) - 1):
        dt = _t(s[i + 1]) - _t(s[i])
        v = _velocity(denoise, x_t, s[i])
        guess = x_t + dt * v
        if s[i + 1] == 0:
            x_t = guess
        else:
            x_t = x_t + dt * 0.5 * (v + _velocity(denoise, guess, s[i + 1]))
    return x_t * (1.0 + s[-1])
