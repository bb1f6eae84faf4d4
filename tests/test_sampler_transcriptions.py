"""Native samplers without a k-diffusion counterpart against float64 transcriptions written here.

iPNDM: Zhang & Chen 2023 (arXiv:2204.13902), Alg. 3 / zju-pi/diff-sampler `get_ipndm`, in EDM form:
x' = x + (t' - t) * AB_k(d_0, ..., d_{k-1}), d = (x - D(x; t)) / t, warm-up orders 1, 2, 3, then 4.
DPM-Solver multistep (noise prediction): Lu et al. 2022 (arXiv:2206.00927) and its repository's
`multistep_dpm_solver_second_update` / `_third_update`, written in the VP variables
x_t = alpha_t x_0 + s_t eps with alpha_t = 1 / sqrt(1 + sigma^2), s_t = sigma alpha_t, lambda = log(alpha/s).
The samplers under test work in x = x_0 + sigma n instead; agreement is float64 round-off (1e-12
relative to the sample scale).
"""

import math

import pytest
import torch

from samplebench.samplers import SAMPLERS
from samplebench.schedules import make_grid
from samplebench.seeds import initial_noise, sampler_generators

IDX = list(range(12))
TOL = 1e-12


def _setup(gmm, schedule, steps):
    grid = make_grid({"name": schedule}, gmm.noise_schedule, steps)
    x_T = initial_noise(0, IDX, gmm.sample_shape, torch.float64, gmm.device)
    labels = gmm.conditions(IDX, 0)
    return grid, x_T, labels


def _native(gmm, name, grid, x_T, labels, **options):
    x = gmm.noise_schedule.initial_state(x_T, float(grid.sigmas[0]))
    return SAMPLERS[name].run(
        lambda y, s: gmm.denoise(y, s, labels), x, grid, options, sampler_generators(0, IDX)
    )


def _close(a, b, tol=TOL):
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= tol * scale, float((a - b).abs().max()) / scale


def ipndm_reference(gmm, x_T, labels, sigmas, order=4):
    t = [float(v) for v in sigmas]
    x = x_T * math.sqrt(1 + t[0] ** 2)
    ds = []
    for i in range(len(t) - 1):
        ds.append((x - gmm.denoise(x, torch.tensor(t[i], dtype=torch.float64), labels)) / t[i])
        k = 1 if i == len(t) - 2 else min(len(ds), order)
        if k == 1:
            step = ds[-1]
        elif k == 2:
            step = (3 * ds[-1] - ds[-2]) / 2
        elif k == 3:
            step = (23 * ds[-1] - 16 * ds[-2] + 5 * ds[-3]) / 12
        else:
            step = (55 * ds[-1] - 59 * ds[-2] + 37 * ds[-3] - 9 * ds[-4]) / 24
        x = x + (t[i + 1] - t[i]) * step
    return x


@pytest.mark.parametrize("schedule", ["karras", "time_uniform", "logsnr"])
@pytest.mark.parametrize("steps", [3, 6, 12])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_matches_its_transcription(gmm, schedule, steps, order):
    grid, x_T, labels = _setup(gmm, schedule, steps)
    _close(
        _native(gmm, "ipndm", grid, x_T, labels, order=order),
        ipndm_reference(gmm, x_T, labels, grid.sigmas, order),
    )


def dpm_reference(gmm, x_T, labels, sigmas, order, solver_type, lower_order_final):
    """The DPM-Solver repository's multistep update in VP variables (alpha, s, lambda)."""
    sig = [float(v) for v in sigmas]
    steps = len(sig) - 1

    def alpha(s):
        return 1 / math.sqrt(1 + s * s)

    def lam(s):
        return -math.log(s)  # log(alpha / s_vp) with s_vp = sigma * alpha

    x = x_T  # the VP state at sigma_0 is x_T itself
    eps_hist, lam_hist = [], []
    for i in range(steps):
        a, s_vp = alpha(sig[i]), sig[i] * alpha(sig[i])
        y = x / a
        eps = (x - a * gmm.denoise(y, torch.tensor(sig[i], dtype=torch.float64), labels)) / s_vp
        eps_hist.append(eps)
        lam_hist.append(lam(sig[i]))
        if sig[i + 1] == 0:  # the final step, h = infinity: x_0 = (x - s eps) / alpha
            x = (x - s_vp * eps) / a
            break
        k = min(order, len(eps_hist))
        if lower_order_final and steps < 15:
            k = min(k, steps - i)
        a_t, s_t = alpha(sig[i + 1]), sig[i + 1] * alpha(sig[i + 1])
        h = lam(sig[i + 1]) - lam_hist[-1]
        x_next = (a_t / a) * x - s_t * math.expm1(h) * eps_hist[-1]
        if k >= 2:
            r0 = (lam_hist[-1] - lam_hist[-2]) / h
            d1_0 = (eps_hist[-1] - eps_hist[-2]) / r0
        if k == 2:
            if solver_type == "midpoint":  # the repository's 'dpmsolver' form
                x_next = x_next - 0.5 * s_t * math.expm1(h) * d1_0
            else:  # 'taylor'
                x_next = x_next - s_t * (math.expm1(h) / h - 1) * d1_0
        elif k == 3:
            r1 = (lam_hist[-2] - lam_hist[-3]) / h
            d1_1 = (eps_hist[-2] - eps_hist[-3]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi2 = math.expm1(h) / h - 1
            x_next = x_next - s_t * phi2 * d1 - s_t * (phi2 / h - 0.5) * d2
        x = x_next
    return x


@pytest.mark.parametrize("schedule", ["karras", "time_uniform"])
@pytest.mark.parametrize("steps", [4, 10, 20])
@pytest.mark.parametrize(
    ("order", "solver_type"), [(1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "midpoint")]
)
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_dpm_multistep_matches_the_repository_update_in_vp_form(
    gmm, schedule, steps, order, solver_type, lower_order_final
):
    grid, x_T, labels = _setup(gmm, schedule, steps)
    opts = dict(order=order, solver_type=solver_type, lower_order_final=lower_order_final)
    ref = dpm_reference(gmm, x_T, labels, grid.sigmas, order, solver_type, lower_order_final)
    _close(_native(gmm, "dpm", grid, x_T, labels, **opts), ref)


def test_a_wrong_weight_is_caught(gmm):
    # The comparison has teeth: iPNDM's order-3 warm-up weights changed in the last digit differ.
    grid, x_T, labels = _setup(gmm, "karras", 8)
    right = ipndm_reference(gmm, x_T, labels, grid.sigmas, order=4)
    wrong = ipndm_reference(gmm, x_T, labels, grid.sigmas, order=3)
    assert float((right - wrong).abs().max()) > 1e3 * TOL * float(right.abs().max())
