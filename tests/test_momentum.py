"""The momentum samplers (hb, ghvb, dpmpp_hb; samplebench/samplers/momentum.py) against independent
references: the base solvers they reduce to at beta = 1, GHVB's weights derived here from their
definition, float64 transcriptions of the official code written here, and the exact ODE solution.

Official code: sWizad/momentum-diffusion (Wizadwongsa et al. 2024, ICLR, arXiv:2307.11118),
stable_diffusion/diffusion/momentum_scheduler.py: AdamBmixer, PLMSWithHBScheduler.step with
output_mode='scale', GHVBScheduler._step_with_momentum, MomentumDPMSolverMultistepScheduler
.multistep_dpm_solver_second_order_update (with diffusers' first-order DPM-Solver++ update for the
steps it does not override). The transcriptions work in the VP latents z = alpha x_bar that code steps
(alpha = sqrt(alpha_bar) = 1 / sqrt(1 + sigma^2), g = sqrt(1 - alpha_bar) / sqrt(alpha_bar) = sigma),
not in the sampler's x = x_0 + sigma n.
"""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from samplebench.errors import UsageError
from samplebench.metrics.reference import solve_with_floor
from samplebench.samplers import SAMPLERS, get_sampler
from samplebench.samplers.ipndm import AB_WEIGHTS
from samplebench.samplers.momentum import (
    GHVB_TERMS,
    check_beta,
    ghvb_weights,
    sample_dpmpp_hb,
    sample_ghvb,
    sample_hb,
)
from samplebench.schedules import make_grid
from samplebench.seeds import initial_noise

IDX = list(range(12))
# Float64 round-off over at most 16 steps: the transcriptions do the same arithmetic regrouped (VP
# latents, AdamBmixer's tensor sums divided by beta instead of scalar weights), a few ulps per step;
# 1e-12 of the sample scale, as in test_sampler_transcriptions. The alternatives they rule out are
# more than 1e6 times as far (asserted below).
TOL = 1e-12
SCHEDULES = ["karras", "logsnr", "time_uniform"]


def _setup(gmm, schedule, steps, idx=IDX):
    grid = make_grid({"name": schedule}, gmm.noise_schedule, steps)
    x_T = initial_noise(0, idx, gmm.sample_shape, torch.float64, gmm.device)
    return grid, x_T, gmm.conditions(idx, 0)


def _native(gmm, name, grid, x_T, labels, **options):
    x = gmm.noise_schedule.initial_state(x_T, float(grid.sigmas[0]))
    return SAMPLERS[name].run(lambda y, s: gmm.denoise(y, s, labels), x, grid, options, None)


def _gap(a, b):
    return float((a - b).abs().max()) / float(b.abs().max())


# -- beta = 1 is the base solver -------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 3, 6, 12, 16])
def test_beta_one_is_the_base_solver_bit_for_bit(gmm, schedule, steps):
    """Reference: the registered ipndm (of the same order) and dpmpp, themselves checked against
    transcriptions in test_sampler_transcriptions / test_sampler_references. Bitwise: at beta = 1 the
    old velocity is multiplied by exactly 0, GHVB's weights are AB_WEIGHTS' floats, and dpmpp_hb's
    momentum term is an exact 0 added to DPM-Solver++'s own expression."""
    grid, x_T, labels = _setup(gmm, schedule, steps)
    for order in (1, 2, 3, 4):
        base = _native(gmm, "ipndm", grid, x_T, labels, order=order)
        for name in ("hb", "ghvb"):
            out = _native(gmm, name, grid, x_T, labels, order=order, beta=1.0)
            assert torch.equal(out, base), (name, order, _gap(out, base))
    base = _native(gmm, "dpmpp", grid, x_T, labels, solver_type="midpoint", lower_order_final=True)
    out = _native(gmm, "dpmpp_hb", grid, x_T, labels, beta=1.0)
    assert torch.equal(out, base), _gap(out, base)


@pytest.mark.parametrize("name", ["hb", "ghvb", "dpmpp_hb"])
def test_beta_below_one_changes_the_samples(gmm, name):
    """Reference: the same sampler at beta = 1. At 6 steps on karras momentum moves the samples by far
    more than round-off (measured: 1.2e-3 of the sample scale at beta = 0.9 for ghvb, which keeps the
    base method's order, 1.7e-2 for hb and 2.6e-2 for dpmpp_hb), and more as beta falls."""
    grid, x_T, labels = _setup(gmm, "karras", 6)
    opts = {} if name == "dpmpp_hb" else {"order": 4}
    plain = _native(gmm, name, grid, x_T, labels, beta=1.0, **opts)
    gaps = [_gap(_native(gmm, name, grid, x_T, labels, beta=b, **opts), plain) for b in (0.9, 0.8, 0.5)]
    assert gaps[0] > 1e-4 and gaps[0] < gaps[1] < gaps[2], gaps


def test_hb_and_ghvb_differ_above_order_one_and_agree_at_it(gmm):
    """At order 1 both are v_n = (1 - beta) v_{n-1} + beta eps_n, x' = x + (sigma' - sigma) v_n (GHVB's
    only weight is beta / beta = 1): equal to round-off. Above it they put beta in different places."""
    grid, x_T, labels = _setup(gmm, "karras", 10)
    a, b = (_native(gmm, n, grid, x_T, labels, order=1, beta=0.8) for n in ("hb", "ghvb"))
    assert _gap(a, b) <= TOL
    for order in (2, 3, 4):
        a, b = (_native(gmm, n, grid, x_T, labels, order=order, beta=0.8) for n in ("hb", "ghvb"))
        assert _gap(a, b) > 1e-3, order


# -- GHVB's weights, derived from their definition --------------------------------------------------


def _derived_ghvb_weights(order, beta):
    """GHVB's step, written in eps: with v = beta / (1 - (1 - beta) z) eps (z = e^{-s}, the shift one
    step back, s = h d/dt), x' - x = h sum_j c_j z^j v. Order k means this operator equals the exact
    one, (e^s - 1) / s, up to O(s^k): sum_j c_j (-j)^m / m! = g_m for m < k, where g_m are the Taylor
    coefficients of (e^s - 1) / s * (1 - (1 - beta) e^{-s}) / beta. Solved exactly in fractions.
    (At beta = 1 this is the definition of the Adams-Bashforth weights.)"""
    k = order
    phi = [Fraction(1, math.factorial(m + 1)) for m in range(k)]
    damp = [(1 if m == 0 else 0) - (1 - beta) * Fraction((-1) ** m, math.factorial(m)) for m in range(k)]
    g = [sum(phi[i] * damp[m - i] for i in range(m + 1)) / beta for m in range(k)]
    rows = [[Fraction((-j) ** m, math.factorial(m)) for j in range(k)] + [g[m]] for m in range(k)]
    for c in range(k):  # Gauss-Jordan on the (nonsingular, Vandermonde) system
        pivot = next(r for r in range(c, k) if rows[r][c] != 0)
        rows[c], rows[pivot] = rows[pivot], rows[c]
        rows[c] = [v / rows[c][c] for v in rows[c]]
        for r in range(k):
            if r != c:
                rows[r] = [a - rows[r][c] * b for a, b in zip(rows[r], rows[c], strict=True)]
    return [row[k] for row in rows]


# The classical Adams-Bashforth weights, newest first (e.g. Hairer, Norsett & Wanner, Solving ODEs I,
# Table III.1.1).
ADAMS_BASHFORTH = {
    1: [Fraction(1)],
    2: [Fraction(3, 2), Fraction(-1, 2)],
    3: [Fraction(23, 12), Fraction(-16, 12), Fraction(5, 12)],
    4: [Fraction(55, 24), Fraction(-59, 24), Fraction(37, 24), Fraction(-9, 24)],
}
BETAS = [Fraction(1), Fraction(4, 5), Fraction(1, 2), Fraction(3, 10), Fraction(1, 20), Fraction(7, 9)]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ghvb_weights_are_the_order_conditions_solution(order):
    """Reference: _derived_ghvb_weights (exact). The module's table (AdamBmixer's) evaluated in floats
    is within 4 ulps of it for every beta; at beta = 1 it is AB_k, and the floats are AB_WEIGHTS'
    bit for bit (which is what makes ghvb at beta = 1 equal ipndm exactly)."""
    for beta in BETAS:
        exact = _derived_ghvb_weights(order, beta)
        ours = ghvb_weights(order, float(beta))
        # float(beta) is not beta: compare with the exact solution at the float actually used.
        exact_at_float = _derived_ghvb_weights(order, Fraction(float(beta)))
        for c, e in zip(ours, exact_at_float, strict=True):
            assert abs(c - float(e)) <= 4 * np.spacing(abs(float(e))), (order, beta, ours, exact)
        assert sum(exact) == 1  # consistency (the m = 0 condition), exactly
    assert _derived_ghvb_weights(order, Fraction(1)) == ADAMS_BASHFORTH[order]
    assert ghvb_weights(order, 1.0) == AB_WEIGHTS[order]
    assert ghvb_weights(order, 1) == AB_WEIGHTS[order]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ghvb_weights_sum_to_one_for_every_beta(order):
    """Consistency: a constant eps moves x by exactly (sigma' - sigma) eps at every beta. Exactly for
    the table: with c_j = (a_j + b_j beta) / (d beta), sum a_j = 0 and sum b_j = d make the sum
    d beta / (d beta) = 1 identically in beta; in floats to round-off on a grid of beta (weights up to
    ~200 at beta = 0.01, so 1e-14 relative to the largest)."""
    d, terms = GHVB_TERMS[order]
    assert sum(a for a, _ in terms) == 0 and sum(b for _, b in terms) == d
    for beta in np.linspace(0.01, 1.0, 100):
        w = ghvb_weights(order, float(beta))
        assert abs(math.fsum(w) - 1) <= 1e-14 * max(1.0, max(abs(c) for c in w)), (order, beta, w)


# -- the official code, transcribed -----------------------------------------------------------------


def _adam_b_mixer(order, ets, b):
    """AdamBmixer (momentum_scheduler.py): ets oldest first, the newest last."""
    k = min(order, len(ets))
    e = ets[::-1]
    if k == 1:
        prime = b * e[0]
    elif k == 2:
        prime = ((2 + b) * e[0] - (2 - b) * e[1]) / 2
    elif k == 3:
        prime = ((18 + 5 * b) * e[0] - (24 - 8 * b) * e[1] + (6 - 1 * b) * e[2]) / 12
    else:
        prime = ((46 + 9 * b) * e[0] - (78 - 19 * b) * e[1] + (42 - 5 * b) * e[2] - (10 - b) * e[3]) / 24
    return prime / b


def _vp(sigma):
    """(alpha, sigma_vp, lambda) of the VP process at this sigma: diffusers' alpha_t, sigma_t, lambda_t."""
    if sigma == 0:
        return 1.0, 0.0, math.inf
    alpha = 1 / math.sqrt(1 + sigma * sigma)
    return alpha, sigma * alpha, math.log(alpha) - math.log(sigma * alpha)


def official_plms_momentum(gmm, x_T, labels, sigmas, order, beta, method, momentum_on_last=False):
    """PLMSWithHBScheduler (method 'hb') / GHVBScheduler ('ghvb') .step(grads, t, latents, 'scale'):
    latents' = (latents / s0 + (g' - g) * update) * s_1 with s0 = alpha, g = sigma. The official code
    never steps to sigma = 0 (its last level is alphas_cumprod[0]); ours takes that step as iPNDM does,
    update = eps (= D, no momentum). momentum_on_last=True uses the momentum update there instead."""
    s = [float(v) for v in sigmas]
    z = x_T.numpy().copy()  # the VP latents: alpha_0 x_T sqrt(1 + sigma_0^2) = x_T
    ets, vel = [], None
    for i in range(len(s) - 1):
        alpha, _, _ = _vp(s[i])
        alpha_next, _, _ = _vp(s[i + 1])
        x_bar = torch.from_numpy(z / alpha)
        d = gmm.denoise(x_bar, torch.tensor(s[i], dtype=torch.float64), labels).numpy()
        grads = (z / alpha - d) / s[i]  # the epsilon prediction
        if vel is None:
            vel = grads
        if method == "hb":
            ets = (ets + [grads])[-order:]
            update = (1 - beta) * vel + beta * _adam_b_mixer(order, ets, 1.0)
            vel = update
        else:
            vel = (1 - beta) * vel + beta * grads
            ets = (ets + [vel])[-order:]
            update = _adam_b_mixer(order, ets, beta)
        if s[i + 1] == 0 and not momentum_on_last:
            update = grads
        z = (z / alpha + (s[i + 1] - s[i]) * update) * alpha_next
    return torch.from_numpy(z)


def official_dpmpp_hb(gmm, x_T, labels, sigmas, beta):
    """MomentumDPMSolverMultistepScheduler (algorithm_type='dpmsolver++', solver_type='midpoint') in
    diffusers' variables: the first step and the step to sigma = 0 are diffusers' first-order update
    x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) m0 (no momentum; at sigma_t = 0 it is m0: h =
    inf, and diffusers takes that step first-order), every other step the overridden second-order one:
    vel = D0 + D1/2 the first time, (1 - beta) vel + beta (D0 + D1/2) after,
    x_t = (sigma_t / sigma_s0) x - alpha_t (e^{-h} - 1) vel."""
    s = [float(v) for v in sigmas]
    z = x_T.numpy().copy()
    outputs, lambdas, vel = [], [], None
    for i in range(len(s) - 1):
        alpha_s, sigma_s, lambda_s = _vp(s[i])
        alpha_t, sigma_t, lambda_t = _vp(s[i + 1])
        m0 = gmm.denoise(torch.from_numpy(z / alpha_s), torch.tensor(s[i], dtype=torch.float64), labels)
        m0 = m0.numpy()
        outputs.append(m0)
        lambdas.append(lambda_s)
        h = lambda_t - lambda_s
        if i == 0 or s[i + 1] == 0:
            z = (sigma_t / sigma_s) * z - alpha_t * (math.exp(-h) - 1.0) * m0
            continue
        r0 = (lambdas[-1] - lambdas[-2]) / h
        d1 = (1.0 / r0) * (outputs[-1] - outputs[-2])
        diff = m0 + 0.5 * d1
        vel = diff if vel is None else (1 - beta) * vel + beta * diff
        z = (sigma_t / sigma_s) * z - alpha_t * (math.exp(-h) - 1.0) * vel
    return torch.from_numpy(z)


@pytest.mark.parametrize("schedule", ["karras", "logsnr"])
@pytest.mark.parametrize("steps", [3, 6, 12])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("name", ["hb", "ghvb"])
def test_hb_and_ghvb_match_the_official_update(gmm, name, schedule, steps, order):
    """Reference: official_plms_momentum (float64, VP latents) at beta = 0.8 and 0.5: equal to TOL. It
    is far from the alternatives: the same code at beta = 1 (iPNDM) and the velocity also on the step
    to 0 (the decision documented in momentum.py; it moves the samples by 4e-5 to 9e-3 of their
    scale)."""
    grid, x_T, labels = _setup(gmm, schedule, steps)
    for beta in (0.8, 0.5):
        ours = _native(gmm, name, grid, x_T, labels, order=order, beta=beta)
        ref = official_plms_momentum(gmm, x_T, labels, grid.sigmas, order, beta, name)
        assert _gap(ours, ref) <= TOL, _gap(ours, ref)
    plain = official_plms_momentum(gmm, x_T, labels, grid.sigmas, order, 1.0, name)
    assert _gap(plain, ref) > 1e6 * TOL
    if steps > 2:
        last = official_plms_momentum(gmm, x_T, labels, grid.sigmas, order, 0.5, name, momentum_on_last=True)
        assert _gap(last, ref) > 1e6 * TOL


@pytest.mark.parametrize("schedule", ["karras", "logsnr", "time_uniform"])
@pytest.mark.parametrize("steps", [3, 6, 12, 16])
def test_dpmpp_hb_matches_the_official_update(gmm, schedule, steps):
    """Reference: official_dpmpp_hb (float64, diffusers' VP variables) at beta = 0.8 and 0.5: equal to
    TOL, and far from DPM-Solver++(2M) without momentum (beta = 1) from 4 steps on (momentum starts
    at the third step and the last one goes to 0)."""
    grid, x_T, labels = _setup(gmm, schedule, steps)
    for beta in (0.8, 0.5):
        ours = _native(gmm, "dpmpp_hb", grid, x_T, labels, beta=beta)
        ref = official_dpmpp_hb(gmm, x_T, labels, grid.sigmas, beta)
        assert _gap(ours, ref) <= TOL, _gap(ours, ref)
    plain = official_dpmpp_hb(gmm, x_T, labels, grid.sigmas, 1.0)
    assert _gap(plain, _native(gmm, "dpmpp", grid, x_T, labels)) <= TOL
    if steps >= 4:
        assert _gap(plain, ref) > 1e6 * TOL


# -- convergence ------------------------------------------------------------------------------------


def test_convergence_orders_on_the_analytic_model(gmm):
    """Reference: the exact probability-flow ODE solved to sigma_min (scipy DOP853, rtol 1e-10) plus
    the same final jump to 0 every sampler takes (metrics.reference.solve_with_floor). Doubling the
    steps on karras from 40 to 80 to 160: heavy ball (hb, dpmpp_hb) at beta = 0.8 halves the error
    (first order, the paper's theorem; measured ratios 1.91-1.96), while at beta = 1 (iPNDM-4,
    DPM-Solver++(2M)) and GHVB at beta = 0.8 divide it by about 4 (measured 4.07-4.43): GHVB keeps the
    base method's order, as the paper claims."""
    idx = list(range(16))
    _, x_T, labels = _setup(gmm, "karras", 2, idx)
    _, floor_points = solve_with_floor(gmm, x_T, labels, 1.0)

    def ratios(name, **opts):
        errs = []
        for steps in (40, 80, 160):
            out = _native(
                gmm, name, make_grid({"name": "karras"}, gmm.noise_schedule, steps), x_T, labels, **opts
            )
            errs.append(((out - floor_points) ** 2).mean(1).sqrt().mean().item())
        return [a / b for a, b in itertools.pairwise(errs)]

    for name, opts in (("hb", {"order": 4}), ("dpmpp_hb", {})):
        assert all(1.7 < r < 2.3 for r in ratios(name, beta=0.8, **opts)), (
            name,
            ratios(name, beta=0.8, **opts),
        )
        assert all(r > 3.5 for r in ratios(name, beta=1.0, **opts)), name
    assert all(r > 3.5 for r in ratios("ghvb", order=4, beta=0.8))


# -- bad values -------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.8", None])
def test_bad_beta_is_refused(gmm, beta):
    """beta must be a number in (0, 1]: a ValueError from the function, a one-line UsageError naming
    the fix from the registry's check (what the CLI runs when it plans a sweep, before any cell)."""
    grid, x_T, labels = _setup(gmm, "karras", 4)
    x = gmm.noise_schedule.initial_state(x_T, float(grid.sigmas[0]))
    for fn in (sample_hb, sample_ghvb, sample_dpmpp_hb):
        with pytest.raises(ValueError, match=r"must be a number in \(0, 1\]"):
            fn(lambda y, s: gmm.denoise(y, s, labels), x, grid.sigmas, beta=beta)
    for name in ("hb", "ghvb", "dpmpp_hb"):
        with pytest.raises(
            UsageError, match=r"sampler.beta=.* must be a number in \(0, 1\] .*e.g. sampler.beta=0.8"
        ):
            get_sampler(name).check({"beta": beta})
        get_sampler(name).check({"beta": 1})  # an integer 1 is fine
    with pytest.raises(ValueError):
        check_beta(beta)


@pytest.mark.parametrize("order", [0, 5])
def test_bad_order_is_refused(gmm, order):
    grid, x_T, labels = _setup(gmm, "karras", 4)
    x = gmm.noise_schedule.initial_state(x_T, float(grid.sigmas[0]))
    for fn, name in ((sample_hb, "hb"), (sample_ghvb, "ghvb")):
        with pytest.raises(ValueError, match=f"sampler.order for {name} must be 1, 2, 3 or 4"):
            fn(lambda y, s: gmm.denoise(y, s, labels), x, grid.sigmas, order=order)
        with pytest.raises(UsageError, match=f"sampler.order={order} is not valid for sampler={name}"):
            get_sampler(name).check({"order": order})
