"""diffusers-family entries against float64 transcriptions of their papers' updates (issue 11, item 4).

Each test runs a registry entry `diffusers:<name>` through the adapter exactly as a sweep does, then
runs a plain float64 transcription of the algorithm written here from the paper's equations, in VP
form: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with abar_t = gmm.alphas_cumprod[t] at the
integer training timesteps the entry visits (the grid's levels rounded to integer timesteps, which
is what the adapter hands these schedulers; `visited_timesteps`). The exact model enters only
through D: at x_t, y = x_t / sqrt(abar_t), sigma = sqrt((1 - abar_t) / abar_t), x_0 = D(y; sigma)
and eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t) (`VP.predict`). Both start from the same
unit-variance x_T (these schedulers are alpha-scaled: their first state is x_T itself), and the
stochastic ones get the same per-sample noise: diffusers' randn_tensor draws one row per sample from
the generator list, in the dtype of the model output, which is float64 here (the adapter hands
the scheduler a float64 eps), once per step; the transcriptions draw the same rows in the same
order (`Noise`).

Tolerance (RTOL, relative to the sample scale max |x|): diffusers builds alphas_cumprod as a
float32 cumprod of the float32-cast trained betas and computes its step coefficients from those
float32 values (DPMSolverSinglestep: its whole sigma / lambda table and exp(-h) in float32). Its
abar differs from gmm.alphas_cumprod by up to 6.7e-7 relative (1 - abar by up to 6.1e-6 at small
t), and each coefficient carries a float32 rounding of ~6e-8. Observed differences (karras,
time_uniform, logsnr, trailing at 5, 8, 10 steps; dpmpp_2s on its integer schedules at 5, 6, 9, 10):
<= 1.5e-7 for PNDM, <= 2.3e-7 for DPM-Solver++ singlestep, so RTOL = 5e-6 leaves a 20x
margin. DDPM gets DDPM_RTOL (see there). A change of the algorithm (a wrong weight, order, variance,
scaling or gamma) moves the samples by >= 3.7e-4 (test_transcriptions_have_teeth).

LCM, TCD and SA-Solver are not registered (yet): LCMScheduler and TCDScheduler ignore
timestep_spacing and, on a grid whose last level is t = 0, spend their last evaluation on the
consistency boundary (c_skip = 1, c_out = 0: the identity), so they need their own grids, which
come with the distilled models they are made for; SA-Solver has no transcription (note at the end).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from samplebench.config import conf_dir
from samplebench.samplers import SAMPLERS
from samplebench.samplers.base import CountingDenoiser, guided_denoiser
from samplebench.schedules import make_grid
from samplebench.seeds import initial_noise, sampler_generators

INDICES = list(range(8))
STEPS = (5, 8)
SCHEDULES = ("karras", "time_uniform")
RTOL = 5e-6
# DDPMScheduler.step forms beta_t = 1 - abar_t / abar_prev and (1 - abar_prev) / (1 - abar_t) in float32:
# between close small levels (logsnr at 10 steps visits t = 3 -> 0, beta = 2.6e-3) the cancellation
# costs ~6e-8 / 2.6e-3 = 2e-5 relative in that step's coefficients. Observed: <= 2.9e-7 on karras /
# time_uniform at 5 and 8 steps, 4.9e-6 on karras at 10, 6.8e-6 on logsnr at 8 and 10 steps; with
# the same float32 coefficient arithmetic written into the transcription they drop to 1e-8.
DDPM_RTOL = 2e-5


def conf_options(name: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / "sampler" / f"{name}.yaml"))
    assert cfg.pop("name") == name
    return cfg


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| relative to the sample scale max |ref|."""
    return float((a - ref).abs().max() / ref.abs().max())


def grid_of(gmm, schedule: str, steps: int):
    return make_grid({"name": schedule}, gmm.noise_schedule, steps)


def visited_timesteps(gmm, grid) -> list[int]:
    """The grid's N positive levels as integer training timesteps (nearest in log sigma), descending."""
    t = np.round(gmm.noise_schedule.sigma_to_t(grid.sigmas[:-1]).numpy()).astype(np.int64)
    assert len(set(t.tolist())) == len(t), "levels collide at integer timesteps: use fewer steps"
    return [int(v) for v in t]


def run_registry(gmm, name: str, grid, overrides=None):
    """A registry run (conf/sampler/<name>.yaml plus overrides) from x_T of samples INDICES at seed 0:
    (x_0, the CountingDenoiser that recorded every call)."""
    x_T = initial_noise(0, INDICES, gmm.sample_shape, torch.float64, gmm.device)
    labels = gmm.conditions(INDICES, 0)
    counter = CountingDenoiser(guided_denoiser(gmm, labels, 1.0), record=True)
    x = gmm.noise_schedule.initial_state(x_T, float(grid.sigmas[0]))
    opts = {**conf_options(name), **(overrides or {})}
    out = SAMPLERS[name].run(counter, x, grid, opts, sampler_generators(0, INDICES))
    return out, counter


class VP:
    """The exact model in VP form at integer training timesteps (abar from gmm.alphas_cumprod)."""

    def __init__(self, gmm):
        self.gmm = gmm
        self.labels = gmm.conditions(INDICES, 0)
        self.abar_table = gmm.alphas_cumprod.double()
        self.calls: list[float] = []  # the VE sigma of every model call, in order

    def abar(self, t: int | None) -> float:
        """abar_t; t=None is the clean end (abar = 1, diffusers' set_alpha_to_one / `self.one`)."""
        return 1.0 if t is None else float(self.abar_table[t])

    def predict(self, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0, eps) at VP state x and timestep t, from the exact D."""
        a = self.abar(t)
        sigma = math.sqrt((1 - a) / a)
        self.calls.append(sigma)
        x0 = self.gmm.denoise(x / math.sqrt(a), torch.tensor(sigma, dtype=torch.float64), self.labels)
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        return x0, eps

    def x_T(self) -> torch.Tensor:
        return initial_noise(0, INDICES, self.gmm.sample_shape, torch.float64, self.gmm.device)


class Noise:
    """Per-sample standard normal rows from generators seeded like the registry's (seed 0, INDICES),
    drawn in float64 one row per sample per call: randn_tensor's draws for a generator list."""

    def __init__(self, gmm):
        self.generators = sampler_generators(0, INDICES)
        self.shape = gmm.sample_shape

    def __call__(self) -> torch.Tensor:
        return torch.stack(
            [torch.randn(self.shape, generator=g, dtype=torch.float64) for g in self.generators]
        )


def assert_same_run(counter, vp: VP, out: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> float:
    """Same model calls, at the same levels (to float32 table precision), and the same final samples."""
    seen = [float(s.reshape(-1)[0]) for _, s in counter.visits]
    assert len(seen) == len(vp.calls), f"{len(seen)} model calls, the transcription makes {len(vp.calls)}"
    np.testing.assert_allclose(seen, vp.calls, rtol=1e-5)
    err = rel_err(out, ref)
    assert err <= rtol, f"final samples differ by {err:.2e} > {rtol:.0e} of the sample scale"
    return err


# ---------------------------------------------------------------------------------------------
# DDPM (Ho et al. 2020, arXiv:2006.11239) on the visited sub-sequence, variance_type fixed_small
# ---------------------------------------------------------------------------------------------


def ddpm_transcription(vp: VP, noise: Noise, ts: list[int], variance: str = "fixed_small") -> torch.Tensor:
    """Ancestral sampling, Ho et al. Alg. 2, on the sub-sequence ts (descending) then abar = 1.
    With alpha_t = abar_t / abar_prev and beta_t = 1 - alpha_t between consecutive visited levels
    (the respacing of Nichol & Dhariwal 2021, Sec. 4, which diffusers' custom timesteps use):
    x_0 from eps, eq. 15 (here D itself); the posterior mean, eq. 7:
        mu = sqrt(abar_prev) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t;
    the posterior variance, eq. 7 (fixed_small, sigma_t^2 = beta~_t of Sec. 3.2):
        beta~_t = (1 - abar_prev) / (1 - abar_t) beta_t;
    x_prev = mu + sqrt(beta~_t) z (Alg. 2, line 4). The last step, to abar = 1, has beta~ = 0 (diffusers
    clamps the variance to 1e-20 there and adds 1e-10 z: far below RTOL); there t = 0 draws no noise in
    diffusers, and any draw on the last step comes after every used one, so the streams stay aligned."""
    x = vp.x_T()
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else None
        a, a_prev = vp.abar(t), vp.abar(prev)
        alpha, beta = a / a_prev, 1 - a / a_prev
        x0, _ = vp.predict(x, t)
        mean = math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(alpha) * (1 - a_prev) / (1 - a) * x
        var = (1 - a_prev) / (1 - a) * beta if variance == "fixed_small" else beta  # fixed_large: beta_t
        x = mean + math.sqrt(var) * noise() if prev is not None else mean
    return x


DDPM_CASES = [(schedule, steps) for schedule in SCHEDULES for steps in STEPS] + [("logsnr", 10)]


@pytest.mark.parametrize("schedule,steps", DDPM_CASES)
def test_ddpm_matches_transcription(gmm, schedule, steps):
    """diffusers:ddpm (DDPMScheduler, custom integer timesteps) = Ho et al.'s ancestral sampler on the
    visited levels, to DDPM_RTOL (logsnr at 10 steps: close small levels, the float32 worst case)."""
    grid = grid_of(gmm, schedule, steps)
    out, counter = run_registry(gmm, "diffusers:ddpm", grid)
    vp = VP(gmm)
    ref = ddpm_transcription(vp, Noise(gmm), visited_timesteps(gmm, grid))
    assert_same_run(counter, vp, out, ref, DDPM_RTOL)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddpm_equals_native_ddim_eta_1_on_the_visited_levels(gmm, schedule, steps):
    """DDPM ancestral with beta~ (fixed_small) on a sub-sequence is DDIM with eta = 1 (Song et al.
    2021, eq. 16: sigma_t(1)^2 = beta~_t, and eq. 12's mean is eq. 7's mean): diffusers:ddpm and the
    native ddim (eta = 1, schedule=custom on the same integer levels) draw the same per-sample noise."""
    grid = grid_of(gmm, schedule, steps)
    out, counter = run_registry(gmm, "diffusers:ddpm", grid)
    levels = gmm.noise_schedule.train_sigmas[torch.tensor(visited_timesteps(gmm, grid))].tolist()
    custom = make_grid({"name": "custom", "sigmas": levels}, gmm.noise_schedule, steps)
    ref, native = run_registry(gmm, "ddim", custom, {"eta": 1.0})
    assert counter.calls == native.calls == steps
    assert rel_err(out, ref) <= DDPM_RTOL


# ---------------------------------------------------------------------------------------------
# PNDM with skip_prk_steps = PLMS (Liu et al. 2022, arXiv:2202.09778)
# ---------------------------------------------------------------------------------------------

# Adams-Bashforth weights on (newest, ..., oldest) noise predictions, orders 1-4.
AB_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def pndm_transfer(x: torch.Tensor, eps: torch.Tensor, a: float, a_next: float) -> torch.Tensor:
    """PNDM's transfer part phi(x_t, eps, t, t - delta), eq. 9, written as x + delta_x (as the
    authors' runner/method.py `transfer`):
        x' = x + (a' - a) [x / (sqrt(a) (sqrt(a) + sqrt(a')))
                           - eps / (sqrt(a) (sqrt((1 - a') a) + sqrt((1 - a) a')))]
    (a = abar_t, a' = abar_{t - delta}); it is DDIM's deterministic step."""
    ra, rn = math.sqrt(a), math.sqrt(a_next)
    return x + (a_next - a) * (
        x / (ra * (ra + rn)) - eps / (ra * (math.sqrt((1 - a_next) * a) + math.sqrt((1 - a) * a_next)))
    )


def pndm_transcription(
    vp: VP, ts: list[int], weights=AB_WEIGHTS, warmup_average: bool = True
) -> torch.Tensor:
    """PLMS on the visited levels ts (descending), then abar = 1 (set_alpha_to_one):
    step 1 is the pseudo improved Euler step of S-PNDM (the authors' `improved_eular`): e_0 at x, a
    trial x_1 = phi(x, e_0), e_1 at (x_1, t_1) (the level's first visit), then x_1 = phi(x, (e_0 + e_1)/2);
    e_1 is not kept. Every later step evaluates e at (x_i, t_i) (t_1's second visit) and applies the
    pseudo linear multistep update (eqs. 12-13: e' = sum_j w_j e_{i-j} with Adams-Bashforth weights,
    (3, -1)/2, (23, -16, 5)/12, then (55, -59, 37, -9)/24 once four are kept), x_{i+1} = phi(x_i, e')."""
    a = [vp.abar(t) for t in ts] + [vp.abar(None)]
    x = vp.x_T()
    _, e0 = vp.predict(x, ts[0])
    trial = pndm_transfer(x, e0, a[0], a[1])
    _, e1 = vp.predict(trial, ts[1])
    x = pndm_transfer(x, (e0 + e1) / 2 if warmup_average else e0, a[0], a[1])
    kept = [e0]
    for i in range(1, len(ts)):
        _, e = vp.predict(x, ts[i])
        kept = (kept + [e])[-4:]
        w = weights[len(kept)]
        e_prime = sum(wj * ej for wj, ej in zip(w, reversed(kept), strict=True))
        x = pndm_transfer(x, e_prime, a[i], a[i + 1])
    return x


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pndm_matches_transcription(gmm, schedule, steps):
    """diffusers:pndm (PNDMScheduler, skip_prk_steps, on the visited sub-schedule) = PLMS on the visited
    levels with the second level visited twice (N + 1 calls)."""
    grid = grid_of(gmm, schedule, steps)
    out, counter = run_registry(gmm, "diffusers:pndm", grid)
    vp = VP(gmm)
    ref = pndm_transcription(vp, visited_timesteps(gmm, grid))
    assert counter.calls == steps + 1
    assert_same_run(counter, vp, out, ref)


# ---------------------------------------------------------------------------------------------
# DPM-Solver++ singlestep, order 2 (Lu et al. 2022, arXiv:2211.01095), DPMSolverSinglestepScheduler
# ---------------------------------------------------------------------------------------------


def singlestep_orders(steps: int, order: int = 2, lower_order_final: bool = True) -> list[int]:
    """The order of each of the N steps for solver_order 2 with lower_order_final (the rule diffusers
    documents for DPMSolverSinglestepScheduler): pairs (1, 2), an odd N ending with a first-order step
    to 0 and an even N with two first-order steps; final_sigmas_type='zero' makes the last order 1."""
    assert order == 2 and lower_order_final
    orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
    orders[-1] = 1
    return orders


def dpmpp_singlestep_transcription(
    vp: VP, ts: list[int], orders: list[int], r_mid: bool = False
) -> torch.Tensor:
    """DPM-Solver++ in data prediction on levels ts (descending) then sigma = 0, VP form: alpha_i =
    sqrt(abar_i), sigma_i = sqrt(1 - abar_i), lambda_i = log(alpha_i / sigma_i), h = lambda_t - lambda_s.
    Order 1 (DPM-Solver++1, the first-order solver of the data-prediction exact solution; DDIM):
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x_0(x_s, s); the step to sigma = 0 gives x_0.
    A pair (1, 2) in the order list is one DPM-Solver++(2S) step (Alg. 1) from level i to i + 2 whose
    intermediate point is the grid's level i + 1 (r = (lambda_{i+1} - lambda_i) / h, not a fixed 1/2):
        u = (sigma_{i+1} / sigma_i) x - alpha_{i+1} (e^{-r h} - 1) x_0(x, i),
        D = (1 - 1 / (2 r)) x_0(x, i) + 1 / (2 r) x_0(u, i + 1),
        x_{i+2} = (sigma_{i+2} / sigma_i) x - alpha_{i+2} (e^{-h} - 1) D.
    r_mid=True takes the pair's intermediate weight as r = 1/2 instead (a different algorithm)."""
    a = [vp.abar(t) for t in ts]
    alpha = [math.sqrt(v) for v in a]
    sig = [math.sqrt(1 - v) for v in a]
    lam = [math.log(al / s) for al, s in zip(alpha, sig, strict=True)]
    x = vp.x_T()
    i, n = 0, len(ts)
    while i < n:
        x0, _ = vp.predict(x, ts[i])
        if i + 1 == n:  # first order to sigma = 0: alpha = 1, sigma = 0, e^{-h} = 0
            return x0
        if orders[i] == 1 and i + 1 < n and orders[i + 1] == 2:
            h = lam[i + 2] - lam[i]
            r = 0.5 if r_mid else (lam[i + 1] - lam[i]) / h
            u = sig[i + 1] / sig[i] * x - alpha[i + 1] * math.expm1(-(lam[i + 1] - lam[i])) * x0
            x0_u, _ = vp.predict(u, ts[i + 1])
            d = (1 - 1 / (2 * r)) * x0 + 1 / (2 * r) * x0_u
            x = sig[i + 2] / sig[i] * x - alpha[i + 2] * math.expm1(-h) * d
            i += 2
        else:
            h = lam[i + 1] - lam[i]
            x = sig[i + 1] / sig[i] * x - alpha[i + 1] * math.expm1(-h) * x0
            i += 1
    raise AssertionError("the last step must go to sigma = 0")


@pytest.mark.parametrize("steps", (5, 6, 9))
@pytest.mark.parametrize("schedule", ("time_uniform", "trailing"))
def test_dpmpp_singlestep_matches_transcription(gmm, schedule, steps):
    """diffusers:dpmpp_2s (DPMSolverSinglestepScheduler, dpmsolver++, solver_order 2, lower_order_final,
    midpoint; custom integer timesteps) = DPM-Solver++(2S) pairs on the grid's own intermediate levels.
    karras and logsnr are left out: there the adapter sets use_karras_sigmas / use_exponential_sigmas,
    whose levels are not integer timesteps."""
    grid = grid_of(gmm, schedule, steps)
    out, counter = run_registry(gmm, "diffusers:dpmpp_2s", grid)
    vp = VP(gmm)
    ref = dpmpp_singlestep_transcription(vp, visited_timesteps(gmm, grid), singlestep_orders(steps))
    assert counter.calls == steps
    assert_same_run(counter, vp, out, ref)


# ---------------------------------------------------------------------------------------------
# The comparisons separate algorithms
# ---------------------------------------------------------------------------------------------


def test_transcriptions_have_teeth(gmm):
    """A slightly different algorithm is far outside the tolerances on the same run (karras, 8 steps;
    the smallest gap, 3.7e-4 for PLMS without the warm-up average, is 74x RTOL and 18x DDPM_RTOL):
    DDPM with beta_t instead of beta~_t; PLMS with a wrong third AB weight or without the warm-up
    average; DPM-Solver++ with r = 1/2
    in place of the grid's intermediate level, or all first-order steps (time_uniform, 8 steps)."""
    grid = grid_of(gmm, "karras", 8)
    ts = visited_timesteps(gmm, grid)

    def off(name, ref_fn):
        out, _ = run_registry(gmm, name, grid)
        return rel_err(out, ref_fn(VP(gmm)))

    wrong_ab = {**AB_WEIGHTS, 3: (23 / 12, -16 / 12, 4 / 12)}
    gaps = {
        "ddpm fixed_large": off(
            "diffusers:ddpm", lambda vp: ddpm_transcription(vp, Noise(gmm), ts, "fixed_large")
        ),
        "pndm AB3 weight": off("diffusers:pndm", lambda vp: pndm_transcription(vp, ts, weights=wrong_ab)),
        "pndm no warm-up": off("diffusers:pndm", lambda vp: pndm_transcription(vp, ts, warmup_average=False)),
    }
    tu = grid_of(gmm, "time_uniform", 8)
    ts_tu = visited_timesteps(gmm, tu)
    out, _ = run_registry(gmm, "diffusers:dpmpp_2s", tu)
    orders = singlestep_orders(8)
    gaps["dpmpp r=1/2"] = rel_err(out, dpmpp_singlestep_transcription(VP(gmm), ts_tu, orders, r_mid=True))
    gaps["dpmpp order 1"] = rel_err(out, dpmpp_singlestep_transcription(VP(gmm), ts_tu, [1] * 8))
    small = {k: f"{v:.1e}" for k, v in gaps.items() if v <= 50 * RTOL}
    assert not small, f"indistinguishable from the registry run: {small}"


# ---------------------------------------------------------------------------------------------
# Not transcribed: diffusers:sa_solver (SASolverScheduler, Xue et al. 2023, arXiv:2309.05019)
# ---------------------------------------------------------------------------------------------
# A faithful transcription needs the SA-Predictor and SA-Corrector (stochastic Adams-Bashforth /
# Adams-Moulton in lambda with the tau(t) = 1 on 200 <= t <= 800 noise profile, the corrector reusing
# the predictor's noise), their Lagrange-weighted integrals of exp((1 + tau^2) lambda), the warm-up
# and lower_order_final order rules, and diffusers' extra order-2 terms in both updates ("a
# modification ... similar to UniPC", not the paper's update); its grids are diffusers' own spacings
# and karras / exponential sigmas, not integer timesteps. That was out of scope for this file.
