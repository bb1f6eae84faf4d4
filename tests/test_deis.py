"""The paper's three DEIS variants (deis_tab, deis_rhoab, deis_rhork): exact properties.

References: Zhang & Chen 2023 (ICLR), arXiv:2204.13902 (eqs. 14-16, Sec. 4); qsh-zh/deis
th_deis/sampler.py (get_sampler_t_ab, get_sampler_rho_ab, get_sampler_rho_rk), multistep.py
(get_ab_eps_coef) and rk.py; zju-pi/diff-sampler diff-solvers-main/solver_utils.py
(edm2t, cal_intergrand, get_deis_coeff_list). In our scale x = x_0 + sigma n (DEIS's v, rho = sigma)
a step is x' = x + sum_j eps_j C_j with C_j = integral_sigma^sigma' l_j dsigma.

Tolerances: "round-off" is 1e-12 relative to the quantity's scale (float64, a few operations per
step over at most 30 steps); comparisons with scipy's adaptive quadrature use 1e-10; comparisons with
diff-sampler's 10000-point Riemann sum use that sum's own O(1/N) error.
"""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from test_samplers import run

from samplebench.errors import UsageError
from samplebench.models.base import NoiseSchedule
from samplebench.samplers import SAMPLERS
from samplebench.samplers.base import CountingDenoiser
from samplebench.samplers.deis import (
    RK_TABLEAUX,
    ModelTime,
    deis_coefficients,
    lagrange_basis,
    log_sigma_quadrature,
    rhoab_coefficients,
    sample_deis,
    sample_deis_rhoab,
    sample_deis_rhork,
    sample_deis_tab,
    tab_coefficients,
)
from samplebench.samplers.euler import lms_coefficient
from samplebench.schedules import make_grid

ROUND_OFF = 1e-12
RK_ORDER = {"1euler": 1, "2heun": 2, "3kutta": 3, "3ral": 3, "3heun": 3, "3vdh": 3, "3ssprk": 3, "4rk": 4}


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


def karras(gmm, steps):
    return make_grid({"name": "karras"}, gmm.noise_schedule, steps)


def toy(eps_of_sigma):
    """A denoiser whose noise prediction depends on sigma alone: D(x; sigma) = x - sigma eps(sigma)."""

    def denoise(x, sigma):
        s = float(sigma)
        return x - s * eps_of_sigma(s)

    return denoise


def trajectory(sampler, denoise, x, sigmas, **options):
    """(x at each level the sampler evaluates, the final x): the recorded calls are the trajectory."""
    counter = CountingDenoiser(denoise, record=True)
    out = sampler(counter, x, sigmas, **options)
    return [v[0] for v in counter.visits], out


# -- order 1 is DDIM -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,opts",
    [
        ("deis_tab", {"order": 1}),
        ("deis_rhoab", {"order": 1}),
        ("deis_rhork", {"method": "1euler"}),
    ],
)
@pytest.mark.parametrize("schedule", ["karras", "time_uniform"])
def test_first_order_is_ddim(gmm, name, opts, schedule):
    # Paper Sec. 3 (eq. 16 with r = 0): one prediction held constant over the step, integrated
    # exactly, is DDIM; rk.py's rk1_euler is the same step in rho. Both are x' = x + (s' - s) eps,
    # DDIM (our sample_ddim) computes D + s' eps: equal to round-off.
    idx = list(range(8))
    out, calls = run(gmm, name, 10, idx, opts=opts, schedule=schedule)
    ddim, ddim_calls = run(gmm, "ddim", 10, idx, opts={"eta": 0.0}, schedule=schedule)
    assert calls == ddim_calls == 10
    assert rel(out, ddim) <= ROUND_OFF


# -- constant eps: every variant is exact ----------------------------------------------------------


@pytest.mark.parametrize(
    "name,opts",
    [("deis_tab", {"order": o}) for o in (1, 2, 3, 4)]
    + [("deis_rhoab", {"order": o}) for o in (1, 2, 3, 4)]
    + [("deis_rhork", {"method": m}) for m in RK_TABLEAUX],
)
def test_constant_eps_is_integrated_exactly(gmm, name, opts):
    # dx/dsigma = e (constant) has x(0) = x(sigma_0) - sigma_0 e. The Lagrange basis sums to 1, so the
    # AB coefficients sum to sigma' - sigma (paper eq. 15 with eps constant); RK weights sum to 1.
    e = torch.linspace(-1.0, 2.0, 16, dtype=torch.float64)
    grid = karras(gmm, 12)
    x = torch.ones(2, 16, dtype=torch.float64) * 3.0
    fn = SAMPLERS[name].run.__wrapped__
    extra = {"noise": gmm.noise_schedule} if name == "deis_tab" else {}
    out = fn(toy(lambda s: e), x, grid.sigmas, None, **opts, **extra)
    exact = x - float(grid.sigmas[0]) * e
    assert rel(out, exact) <= ROUND_OFF


# -- rhoAB: polynomials in rho of degree order - 1 are integrated exactly ---------------------------


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_rhoab_is_exact_for_polynomials_in_sigma(gmm, order):
    # Paper Sec. 4 (rhoAB-DEIS): eps approximated by the Lagrange polynomial in rho through the last
    # `order` predictions, integrated exactly; a step using k predictions reproduces any eps that is a
    # polynomial in rho of degree <= k - 1. With degree order - 1: exact on every step once the history
    # is full (i >= order - 1), and not exact on the warm-up steps (fewer predictions) - the test has
    # teeth. The step to 0 is first-order by design and is left out.
    rng = np.random.default_rng(order)
    a = rng.normal(size=order)  # eps(sigma) = sum_k a_k (sigma / 10)^k c
    c = torch.linspace(0.5, 1.5, 4, dtype=torch.float64)

    def p(s):
        return sum(ak * (s / 10) ** k for k, ak in enumerate(a))

    def antiderivative(s):
        return sum(ak * 10 * (s / 10) ** (k + 1) / (k + 1) for k, ak in enumerate(a))

    grid = karras(gmm, 12)
    s = [float(v) for v in grid.sigmas]
    xs, _ = trajectory(
        sample_deis_rhoab,
        toy(lambda v: p(v) * c),
        torch.zeros(1, 4, dtype=torch.float64),
        grid.sigmas,
        order=order,
        lower_order_final=False,
    )
    for i in range(len(xs) - 1):
        exact = (antiderivative(s[i + 1]) - antiderivative(s[i])) * c
        err = rel(xs[i + 1] - xs[i], exact)
        if i >= order - 1:
            assert err <= ROUND_OFF, (order, i, err)
        else:
            assert err > 1e-6, (order, i, err)


# -- tAB: polynomials in the model's time t of degree order - 1 are integrated exactly --------------


def model_time_integral(noise, q, a, b):
    """integral_a^b q(t(sigma)) dsigma by scipy's adaptive quadrature, split at the training levels
    (where t(sigma) = sigma_to_t has kinks): an independent reference for tAB's quadrature."""
    lo, hi = min(a, b), max(a, b)
    train = noise.train_sigmas.numpy()
    pts = np.concatenate([[lo], train[(train > lo) & (train < hi)], [hi]])

    def f(v):
        return q(float(noise.sigma_to_t(torch.tensor([v], dtype=torch.float64))[0]))

    total = sum(
        quad(f, x0, x1, epsabs=0, epsrel=1e-13, limit=200)[0]
        for x0, x1 in zip(pts[:-1], pts[1:], strict=True)
    )
    return total if b > a else -total


@pytest.mark.parametrize("order", [2, 3, 4])
def test_tab_is_exact_for_polynomials_in_model_time(gmm, order):
    # Paper eq. 14-15 (tAB-DEIS): eps approximated by the Lagrange polynomial in t through the last
    # `order` predictions, C_j = integral l_j(t(tau)) dsigma(tau). If eps is a polynomial in t of degree
    # order - 1, the full-history steps are exact: each increment equals the integral of eps, computed
    # here by scipy (model_time_integral) to 1e-13. Warm-up steps are not exact (teeth).
    noise = gmm.noise_schedule
    rng = np.random.default_rng(10 + order)
    a = rng.normal(size=order)
    c = torch.linspace(0.5, 1.5, 4, dtype=torch.float64)

    def q(t):  # a polynomial in t / 1000 (t runs over the training indices 0..999)
        return sum(ak * (t / 1000) ** k for k, ak in enumerate(a))

    def eps(s):
        return q(float(noise.sigma_to_t(torch.tensor([s], dtype=torch.float64))[0])) * c

    grid = karras(gmm, 8)
    s = [float(v) for v in grid.sigmas]
    xs, _ = trajectory(
        sample_deis_tab,
        toy(eps),
        torch.zeros(1, 4, dtype=torch.float64),
        grid.sigmas,
        order=order,
        lower_order_final=False,
        noise=noise,
    )
    for i in range(len(xs) - 1):
        exact = model_time_integral(noise, q, s[i], s[i + 1]) * c
        err = rel(xs[i + 1] - xs[i], exact)
        if i >= order - 1:
            assert err <= 1e-10, (order, i, err)
        else:
            assert err > 1e-6, (order, i, err)


def test_model_time_is_sigma_to_t_and_continues_linearly_in_log_sigma(gmm):
    # tAB's time variable is the model's t (NoiseSchedule.sigma_to_t, what vp_denoise feeds the
    # network) inside the training range; outside it, where sigma_to_t clips, it continues with the
    # end pieces' slopes in log sigma so that levels beyond the range stay distinct nodes.
    noise = gmm.noise_schedule
    time = ModelTime.of(noise)
    inside = torch.exp(
        torch.linspace(math.log(noise.sigma_min), math.log(noise.sigma_max), 997, dtype=torch.float64)
    )
    assert np.abs(time(inside.log().numpy()) - noise.sigma_to_t(inside).numpy()).max() <= 1e-9
    L = noise.train_sigmas.log().numpy()
    u = np.array([L[-1] + 0.3, L[0] - 0.7])
    expected = [999 + 0.3 / (L[-1] - L[-2]), -0.7 / (L[1] - L[0])]
    np.testing.assert_allclose(time(u), expected, rtol=1e-12)


@pytest.mark.parametrize(
    "rho,rho_next,nodes",
    [
        (5.0, 1.0, [5.0, 9.0]),
        (1.0, 0.2, [1.0, 3.0, 7.0, 14.0]),  # spans hundreds of training levels
        (0.06, 0.0300001, [0.06, 0.1, 0.2]),
        (20.0, 12.0, [20.0, 30.0, 45.0]),  # above sigma_max: the extrapolated map
        (0.05, 0.01, [0.05, 0.2, 1.0, 2.0]),  # below sigma_min
    ],
)
def test_tab_quadrature_matches_scipy(gmm, rho, rho_next, nodes):
    # The tAB coefficients are integral_rho^rho' l_j(t(sigma)) dsigma (paper eq. 15 in our scale);
    # ours: 8-point Gauss-Legendre in log sigma on pieces ending at the training levels. Reference:
    # scipy.integrate.quad in sigma on the same pieces, relative 1e-13.
    time = ModelTime.of(gmm.noise_schedule)
    ours = tab_coefficients(rho, rho_next, nodes, time, time.knots)
    t_nodes = time(np.log(nodes))
    knots = np.exp(time.knots)
    lo, hi = rho_next, rho
    pts = np.concatenate([[lo], knots[(knots > lo) & (knots < hi)], [hi]])
    for j in range(len(nodes)):

        def basis(v, j=j):
            return float(lagrange_basis(time(np.log([v])), list(t_nodes))[j][0])

        ref = -sum(
            quad(basis, a, b, epsabs=0, epsrel=1e-13, limit=200)[0]
            for a, b in zip(pts[:-1], pts[1:], strict=True)
        )
        assert ours[j] == pytest.approx(ref, rel=1e-10, abs=1e-12 * (rho - rho_next)), j


def test_log_sigma_quadrature_integrates_exp_times_polynomial():
    # The rule itself: pieces end at every knot and are at most 0.5 wide; integral of u^3 e^u over
    # [-4, 3] is known in closed form, e^u (u^3 - 3u^2 + 6u - 6).
    knots = np.array([-3.9, -1.0, 0.25, 2.999])
    u, w = log_sigma_quadrature(-4.0, 3.0, knots)
    assert w.sum() == pytest.approx(7.0, rel=1e-15)
    assert u.min() > -4.0 and u.max() < 3.0

    def F(v):
        return math.exp(v) * (v**3 - 3 * v**2 + 6 * v - 6)

    assert float(np.sum(w * u**3 * np.exp(u))) == pytest.approx(F(3.0) - F(-4.0), rel=1e-14)


def test_tab_on_a_log_linear_schedule_is_the_log_rho_deis(gmm):
    # If the training levels are geometric, t is affine in log sigma, and a Lagrange basis is
    # invariant under an affine change of variable: tAB's polynomial in t is the diffusers form's
    # polynomial in log rho (sampler=deis, integrated there in closed form, deis_coefficients).
    # Coefficients and whole runs agree to round-off.
    noise = NoiseSchedule(
        "vp_discrete", torch.exp(torch.linspace(math.log(0.03), math.log(15.0), 1000, dtype=torch.float64))
    )
    time = ModelTime.of(noise)
    for rho, nxt, nodes in [
        (3.0, 1.0, [3.0, 7.0]),
        (1.0, 0.4, [1.0, 2.0, 5.0]),
        (0.5, 0.2, [0.5, 0.9, 2.0, 4.0]),
    ]:
        ours = tab_coefficients(rho, nxt, nodes, time, time.knots)
        np.testing.assert_allclose(ours, deis_coefficients(rho, nxt, nodes), rtol=1e-12, atol=0)
    grid = make_grid({"name": "karras"}, noise, 10)
    labels = gmm.conditions(list(range(4)), 0)
    x = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 15.0

    def D(y, s):
        return gmm.denoise(y, s, labels)

    for order in (2, 3):  # sampler=deis takes orders 1-3
        tab = sample_deis_tab(D, x, grid.sigmas, order=order, noise=noise)
        assert rel(tab, sample_deis(D, x, grid.sigmas, order=order)) <= ROUND_OFF


def diff_sampler_tab(t_steps, max_order, N=10000):
    """Float64 numpy transcription of zju-pi/diff-sampler get_deis_coeff_list(deis_mode='tab'):
    EDM sigma -> linear-beta VP t by edm2t (defaults epsilon_s = 1e-3, sigma in [0.002, 80]); integrand
    -0.5 dlog(alpha)/dt / sqrt(alpha (1 - alpha)) (= dsigma/dt; the derivative of log alpha written out
    instead of autograd); N points of linspace(t_cur, t_next, N) times (t_next - t_cur) / N."""
    eps_s, smin, smax = 1e-3, 0.002, 80.0
    beta_d = 2 * (math.log(smin**2 + 1) / eps_s - math.log(smax**2 + 1)) / (eps_s - 1)
    beta_min = math.log(smax**2 + 1) - 0.5 * beta_d
    t = (np.sqrt(beta_min**2 + 2 * beta_d * np.log(np.asarray(t_steps) ** 2 + 1)) - beta_min) / beta_d
    b0, b1 = beta_min, beta_d + beta_min
    out = []
    for i in range(len(t) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            out.append([])
            continue
        taus = np.linspace(t[i], t[i + 1], N)
        dtau = (t[i + 1] - t[i]) / N
        alpha = np.exp(-0.5 * taus**2 * (b1 - b0) - taus * b0)
        integrand = -0.5 * (-taus * (b1 - b0) - b0) / np.sqrt(alpha * (1 - alpha))
        prev = [t[i - k] for k in range(order)]
        row = []
        for j in range(order):
            poly = np.ones_like(taus)
            for k in range(order):
                if k != j:
                    poly *= (taus - prev[k]) / (prev[j] - prev[k])
            row.append(float(np.sum(integrand * poly) * dtau))
        out.append(row)
    return out, (beta_min, beta_d)


def test_tab_coefficients_match_diff_sampler():
    # Our integral with diff-sampler's time variable (edm2t: its linear-beta VP fitted to sigma in
    # [0.002, 80] at t = 1e-3 and 1, beta_min = -0.0048, beta_d = 17.54) in place of the model's: the
    # same coefficients as its 'tab' mode to the error of its N-point sum, which is O(1/N) of the step:
    # at most 4.3e-5 of it at N = 10^4 and 100x less at N = 10^6 (the sum converging to ours).
    sig = (80 ** (1 / 7) + np.arange(10) / 9 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    ref, (beta_min, beta_d) = diff_sampler_tab(sig, 4)
    fine, _ = diff_sampler_tab(sig, 4, N=10**6)

    def vp_time(u):
        return (np.sqrt(beta_min**2 + 2 * beta_d * np.log(np.exp(2 * np.asarray(u)) + 1)) - beta_min) / beta_d

    for i in range(1, len(sig) - 1):
        o = min(i + 1, 4)
        ours = tab_coefficients(sig[i], sig[i + 1], list(sig[i - o + 1 : i + 1][::-1]), vp_time, np.array([]))
        h = sig[i] - sig[i + 1]
        assert np.abs(np.array(ours) - ref[i]).max() <= 1e-4 * h, i
        assert np.abs(np.array(ours) - fine[i]).max() <= 1e-6 * h, i


# -- rhoAB coefficients: closed forms ----------------------------------------------------------------


def diff_sampler_rhoab(t_cur, t_next, prev):
    """Transcription of diff-sampler get_deis_coeff_list(deis_mode='rhoab'): its closed-form
    integrals of the Lagrange basis in rho through prev (newest first), 2 to 4 nodes."""
    if len(prev) == 2:
        return [
            ((t_next - prev[1]) ** 2 - (t_cur - prev[1]) ** 2) / (2 * (t_cur - prev[1])),
            (t_next - t_cur) ** 2 / (2 * (prev[1] - t_cur)),
        ]

    def i2(a, b, start, end, c):
        return ((end**3 - start**3) / 3 - (end**2 - start**2) * (a + b) / 2 + (end - start) * a * b) / (
            (c - a) * (c - b)
        )

    def i3(a, b, c, start, end, d):
        coeff = (
            (end**4 - start**4) / 4
            - (end**3 - start**3) * (a + b + c) / 3
            + (end**2 - start**2) * (a * b + a * c + b * c) / 2
            - (end - start) * a * b * c
        )
        return coeff / ((d - a) * (d - b) * (d - c))

    if len(prev) == 3:
        p0, p1, p2 = prev
        return [i2(p1, p2, t_cur, t_next, p0), i2(p0, p2, t_cur, t_next, p1), i2(p0, p1, t_cur, t_next, p2)]
    p0, p1, p2, p3 = prev
    return [
        i3(p1, p2, p3, t_cur, t_next, p0),
        i3(p0, p2, p3, t_cur, t_next, p1),
        i3(p0, p1, p3, t_cur, t_next, p2),
        i3(p0, p1, p2, t_cur, t_next, p3),
    ]


def test_rhoab_coefficients_match_closed_forms_and_lms(gmm):
    # rhoAB's coefficients against diff-sampler's closed forms and k-diffusion's LMS integrals
    # (euler.lms_coefficient, the same Lagrange basis in sigma on the same nodes): round-off.
    s = [float(v) for v in karras(gmm, 12).sigmas]
    for i in range(1, 11):
        for o in range(2, min(i + 1, 4) + 1):
            nodes = s[i - o + 1 : i + 1][::-1]
            ours = rhoab_coefficients(s[i], s[i + 1], nodes)
            scale = s[i] - s[i + 1]
            assert np.abs(np.array(ours) - diff_sampler_rhoab(s[i], s[i + 1], nodes)).max() <= 1e-11 * scale
            lms = [lms_coefficient(s, i, j, o) for j in range(o)]
            assert np.abs(np.array(ours) - lms).max() <= ROUND_OFF * scale


# -- rhoRK: the Butcher tableaux of th_deis/rk.py ----------------------------------------------------


def rk_reference(method, x, t, dt, fn):
    """Float64 transcription of qsh-zh/deis th_deis/rk.py (rk1_euler ... rk4), one step."""
    if method == "1euler":
        return x + dt * fn(x, t)
    if method == "2heun":
        g1 = fn(x, t)
        g2 = fn(x + g1 * dt, t + dt)
        return x + dt / 2 * (g1 + g2)
    if method == "4rk":
        g1 = fn(x, t)
        g2 = fn(x + g1 * dt / 2, t + dt / 2)
        g3 = fn(x + g2 * dt / 2, t + dt / 2)
        g4 = fn(x + g3 * dt, t + dt)
        return x + dt / 6 * (g1 + 2 * g2 + 2 * g3 + g4)
    c2, c3, a21, a31, a32, b1, b2, b3 = {
        "3kutta": (0.5, 1.0, 0.5, -1.0, 2.0, 1 / 6, 4 / 6, 1 / 6),
        "3ral": (1 / 2, 3 / 4, 1 / 2, 0.0, 3 / 4, 2 / 9, 1 / 3, 4 / 9),
        "3heun": (1 / 3, 2 / 3, 1 / 3, 0.0, 2 / 3, 1 / 4, 0.0, 3 / 4),
        "3vdh": (8 / 15, 2 / 3, 8 / 15, 1 / 4, 5 / 12, 1 / 4, 0.0, 3 / 4),
        "3ssprk": (1.0, 0.5, 1.0, 0.25, 0.25, 1 / 6, 1 / 6, 2 / 3),
    }[method]
    k1 = fn(x, t)
    k2 = fn(x + dt * a21 * k1, t + dt * c2)
    k3 = fn(x + dt * a31 * k1 + dt * a32 * k2, t + dt * c3)
    return x + dt * (b1 * k1 + b2 * k2 + b3 * k3)


@pytest.mark.parametrize("method", list(RK_TABLEAUX))
def test_rhork_follows_the_official_rk_and_counts_its_stages(gmm, method):
    # get_sampler_rho_rk steps rk_fn(v, rho, rho' - rho, eps_fn) between levels; ours does the same,
    # with the step to 0 first-order (x' = D). On the analytic model, 8 steps of karras: the run
    # equals the transcription to round-off, and spends s (N - 1) + 1 evaluations.
    grid = karras(gmm, 8)
    idx = list(range(6))
    labels = gmm.conditions(idx, 0)
    x = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 14.0

    def eps(y, s):
        return (y - gmm.denoise(y, torch.as_tensor(s, dtype=torch.float64), labels)) / s

    counter = CountingDenoiser(lambda y, s: gmm.denoise(y, s, labels), record=True)
    out = sample_deis_rhork(counter, x, grid.sigmas, method=method)
    s = [float(v) for v in grid.sigmas]
    ref = x
    for a, b in zip(s[:-2], s[1:-1], strict=True):
        ref = rk_reference(method, ref, a, b - a, eps)
    ref = ref + (0 - s[-2]) * eps(ref, s[-2])
    assert rel(out, ref) <= ROUND_OFF
    stages = len(RK_TABLEAUX[method][0])
    assert counter.calls == stages * 7 + 1
    assert SAMPLERS["deis_rhork"].rule({"method": method}, {}).nfe(8) == counter.calls


@pytest.mark.parametrize("method", list(RK_TABLEAUX))
def test_rhork_is_exact_to_its_order(method):
    # An explicit s-stage RK method of order p = s (all of rk.py's): (1) for eps = p(rho) of degree
    # <= p - 1 (x-independent) one step is exact (its quadrature conditions sum b c^k = 1/(k+1));
    # (2) for the linear eps = lam x one step multiplies x by sum_{k<=s} (lam h)^k / k! exactly (its
    # stability polynomial: the conditions b A^k 1 = 1/(k+1)!). Both to round-off, on a step
    # 1.0 -> 0.55 (the sigmas do not end at 0, so no first-order last step).
    p = RK_ORDER[method]
    sigmas = torch.tensor([1.0, 0.55], dtype=torch.float64)
    h = -0.45
    rng = np.random.default_rng(p)
    a = rng.normal(size=p)
    c = torch.linspace(0.5, 1.5, 4, dtype=torch.float64)
    x0 = torch.ones(1, 4, dtype=torch.float64)
    out = sample_deis_rhork(
        toy(lambda s: sum(ak * s**k for k, ak in enumerate(a)) * c), x0, sigmas, method=method
    )
    exact = x0 + sum(ak * (0.55 ** (k + 1) - 1.0) / (k + 1) for k, ak in enumerate(a)) * c
    assert rel(out - x0, exact - x0) <= ROUND_OFF
    lam = 0.8
    out = sample_deis_rhork(lambda x, s: x - float(s) * lam * x, x0, sigmas, method=method)
    R = sum((lam * h) ** k / math.factorial(k) for k in range(p + 1))
    assert rel(out, R * x0) <= ROUND_OFF
    assert rel(out, math.exp(lam * h) * x0) > 1e-7  # a truncated exponential, not the exact one


# -- the registry entries and bad options ----------------------------------------------------------


def test_registry_entries():
    # Defaults are the official ones: ab_order=3 (four predictions: our order 4) and rk_method="3kutta"
    # (qsh-zh/deis get_sampler and its README).
    assert SAMPLERS["deis_rhork"].rule({}, {}).nfe(10) == 28  # 3 (N - 1) + 1
    assert SAMPLERS["deis_tab"].rule({}, {}).nfe(10) == 10
    for name in ("deis_tab", "deis_rhoab", "deis_rhork"):
        assert SAMPLERS[name].source.startswith("Zhang & Chen 2023 (ICLR), arXiv:2204.13902; qsh-zh/deis ")
    assert SAMPLERS["deis_rhork"].repeats_levels  # stages at c = 1 sit on the next step's level


def test_bad_options_are_one_line_errors(gmm):
    x = torch.zeros(1, 16, dtype=torch.float64)
    sig = karras(gmm, 4).sigmas
    D = toy(lambda s: torch.zeros(16, dtype=torch.float64))
    cases = [
        (lambda: sample_deis_tab(D, x, sig, order=5, noise=gmm.noise_schedule), "sampler.order=4"),
        (lambda: sample_deis_rhoab(D, x, sig, order=0), "must be 1, 2, 3 or 4"),
        (lambda: sample_deis_rhork(D, x, sig, method="5rk"), "3kutta"),
        (lambda: sample_deis_tab(D, x, sig), "noise=grid.noise"),
        (
            lambda: sample_deis_tab(D, x, sig, noise=NoiseSchedule("flow", gmm.noise_schedule.train_sigmas)),
            "deis_rhoab",
        ),
    ]
    for call, fix in cases:
        with pytest.raises((ValueError, UsageError)) as e:
            call()
        assert fix in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="choose one of 1euler"):
        SAMPLERS["deis_rhork"].rule({"method": "rk4"}, {})
    with pytest.raises(UsageError, match="choose one of 1, 2, 3, 4"):
        SAMPLERS["deis_tab"].check({"order": 5})
