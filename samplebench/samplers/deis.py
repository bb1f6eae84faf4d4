"""DEIS (Zhang & Chen 2023, arXiv:2204.13902, "Fast Sampling of Diffusion Models with Exponential
Integrator"). `sample_deis` (sampler=deis) is the multistep variant its authors contributed to diffusers
(DEISMultistepScheduler, algorithm_type='deis'): on y = x_0 + rho n (rho = sigma) the
probability-flow ODE is dy/drho = eps, and each step integrates a Lagrange polynomial through the
last `order` noise predictions, polynomial in log rho, exactly:

    y' = y + sum_j eps_j integral_rho^rho' L_j(log tau) dtau.

The paper's own three variants follow below: tAB-DEIS (polynomial in the model's time t,
sampler=deis_tab), rhoAB-DEIS (polynomial in rho, sampler=deis_rhoab) and rhoRK-DEIS (Runge-Kutta
in rho, sampler=deis_rhork).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from numpy.polynomial import polynomial as P

from samplebench.models.base import NoiseSchedule
from samplebench.samplers.base import Denoiser
from samplebench.samplers.dpm_solver import _order
from samplebench.samplers.euler import _at, _levels


def _exp_poly_antiderivative(coefs: np.ndarray, u: float) -> float:
    """F(u) with F' = p(u) e^u for p = sum_k coefs[k] u^k: e^u sum_k c_k sum_m (-1)^(k-m) k!/m! u^m."""
    total = 0.0
    for k, c in enumerate(coefs):
        total += c * sum((-1) ** (k - m) * math.factorial(k) / math.factorial(m) * u**m for m in range(k + 1))
    return math.exp(u) * total


def deis_coefficients(rho: float, rho_next: float, nodes: list[float]) -> list[float]:
    """integral over [rho, rho_next] of each Lagrange basis polynomial in u = log tau through the
    nodes' log values (nodes[0] = rho, the newest)."""
    logs = [math.log(n) for n in nodes]
    out = []
    for j, lj in enumerate(logs):
        others = [lk for k, lk in enumerate(logs) if k != j]
        basis = P.polyfromroots(others) / np.prod([lj - lk for lk in others]) if others else np.array([1.0])
        out.append(
            _exp_poly_antiderivative(basis, math.log(rho_next)) - _exp_poly_antiderivative(basis, logs[0])
        )
    return out


def sample_deis(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generators=None,
    order: int = 3,
    lower_order_final: bool = True,
) -> torch.Tensor:
    """rho-AB DEIS of order 1-3 (order 1 is DDIM); warm-up and lower_order_final as in diffusers; the
    step to 0 is first-order, y' = y - rho eps = D."""
    if order not in (1, 2, 3):
        raise ValueError("sampler.order for deis must be 1, 2 or 3")
    s = _levels(sigmas)
    steps = len(s) - 1
    eps_hist: list[torch.Tensor] = []
    for i in range(steps):
        sig, nxt = s[i], s[i + 1]
        eps_hist.insert(0, (x - denoise(x, _at(sig))) / sig)
        del eps_hist[3:]
        o = _order(order, i, steps, len(eps_hist), nxt == 0, lower_order_final)
        if o == 1:
            x = x + (nxt - sig) * eps_hist[0]
            continue
        coefs = deis_coefficients(sig, nxt, s[i - o + 1 : i + 1][::-1])
        x = x + sum(c * e for c, e in zip(coefs, eps_hist[:o], strict=True))
    return x


# -- the three variants of the paper: tAB-, rhoAB- and rhoRK-DEIS ----------------------------------
#
# Zhang & Chen 2023 (ICLR), arXiv:2204.13902, Sec. 3-4 (eqs. 14-16, "tAB-DEIS", "rhoAB-DEIS",
# "rhoRK-DEIS"); reference code qsh-zh/deis th_deis/sampler.py (get_sampler_t_ab,
# get_sampler_rho_ab, get_sampler_rho_rk), th_deis/multistep.py (get_ab_eps_coef) and th_deis/rk.py,
# and the torch re-implementation zju-pi/diff-sampler diff-solvers-main/solver_utils.py
# (get_deis_coeff_list, deis_mode 'tab' / 'rhoab') with solvers.py deis_sampler. Written here from
# the paper's formulas; nothing is copied.
#
# DEIS's rescaled variables v = x_vp / alpha and rho = sigma_vp / alpha are EDM's x = x_0 + sigma n
# and sigma, so the exponential integrator's step is, with eps_j the last predictions at sigma_j,
#
#     x' = x + sum_j eps_j C_j,   C_j = integral_sigma^sigma' l_j(tau) dsigma(tau),
#
# l_j the Lagrange basis through the nodes in the variable the noise prediction is assumed
# polynomial in: the VP time t for tAB (the paper's C_ij = integral Psi(t', tau) 1/2 G^2 L^-T l_j dtau
# on x_vp, divided by the mean coefficient sqrt(alpha_t') to come to this scale), rho = sigma itself
# for rhoAB.
#
# Orders. Our `order` is the number of predictions a step uses (its convergence order), as in
# diff-sampler's max_order and diffusers' solver_order. The official code's `ab_order` is the
# polynomial degree r of the paper (ab_order=3: four predictions): order = ab_order + 1.

_GL = np.polynomial.legendre.leggauss(8)  # exact for polynomials of degree <= 15
_MAX_PIECE = 0.5  # widest quadrature piece in u = log sigma


def _check_order(name: str, order: int) -> None:
    if order not in (1, 2, 3, 4):
        raise ValueError(
            f"sampler.order for {name} must be 1, 2, 3 or 4 (use sampler.order=4 for DEIS's default)"
        )


def lagrange_basis(points: np.ndarray, nodes: list[float]) -> np.ndarray:
    """l_j(points) for the Lagrange basis through `nodes`, in product form; shape
    (len(nodes), *points.shape)."""
    points = np.asarray(points, dtype=np.float64)
    out = np.ones((len(nodes), *points.shape))
    for j, nj in enumerate(nodes):
        for k, nk in enumerate(nodes):
            if k != j:
                out[j] *= (points - nk) / (nj - nk)
    return out


def rhoab_coefficients(rho: float, rho_next: float, nodes: list[float]) -> list[float]:
    """rhoAB-DEIS: integral over [rho, rho_next] of each Lagrange basis polynomial in tau = sigma
    through the nodes (nodes[0] = rho, the newest). The integrands are polynomials of degree <= 3,
    so 8-point Gauss-Legendre integrates them exactly (to round-off); diff-sampler writes the same
    integrals in closed form, the official code sums 10000 points."""
    x, w = _GL
    half = 0.5 * (rho_next - rho)
    tau = half * x + 0.5 * (rho_next + rho)
    return [float(c) for c in half * (lagrange_basis(tau, nodes) @ w)]


@dataclass(frozen=True, eq=False)
class ModelTime:
    """tAB-DEIS's time variable: the model's own time, t(sigma) = NoiseSchedule.sigma_to_t (the
    fractional training timestep, linear in u = log sigma between training levels), as a function of u.

    Inside the training range it is sigma_to_t exactly; outside it continues linearly in u with the
    end pieces' slopes (sigma_to_t clips there, which would make two levels beyond the range one
    node). `knots` are the u where its slope changes; quadrature pieces end there."""

    knots: np.ndarray  # log of the training levels, ascending

    @classmethod
    def of(cls, noise: NoiseSchedule) -> ModelTime:
        if noise.kind != "vp_discrete":
            from samplebench.errors import UsageError

            raise UsageError(
                f"sampler=deis_tab needs a discrete diffusion (VP) model's training time, not a {noise.kind} "
                "model's; use sampler=deis_rhoab or deis_rhork"
            )
        return cls(noise.train_sigmas.double().log().numpy())

    def __call__(self, u: np.ndarray) -> np.ndarray:
        u = np.asarray(u, dtype=np.float64)
        k = self.knots
        t = np.interp(u, k, np.arange(len(k), dtype=np.float64))
        t = np.where(u < k[0], (u - k[0]) / (k[1] - k[0]), t)
        return np.where(u > k[-1], len(k) - 1 + (u - k[-1]) / (k[-1] - k[-2]), t)


def log_sigma_quadrature(lo: float, hi: float, knots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes u and weights for integral_lo^hi f(u) du (lo < hi): 8-point Gauss-Legendre on pieces
    that end at every knot inside (lo, hi) and are at most 0.5 wide. tAB's integrand in u, a cubic
    in t(u) times e^u, is smooth on each piece, where GL-8's error is far below float64 round-off."""
    inner = knots[(knots > lo) & (knots < hi)]
    edges = np.concatenate([[lo], inner, [hi]])
    cuts = [
        np.linspace(a, b, max(1, math.ceil((b - a) / _MAX_PIECE)) + 1)[:-1]
        for a, b in zip(edges[:-1], edges[1:], strict=True)
    ]
    starts = np.concatenate(cuts)
    widths = np.diff(np.append(starts, hi))
    x, w = _GL
    u = starts[:, None] + 0.5 * widths[:, None] * (x[None, :] + 1)
    return u.ravel(), (0.5 * widths[:, None] * w[None, :]).ravel()


def tab_coefficients(
    rho: float,
    rho_next: float,
    nodes: list[float],
    time: Callable[[np.ndarray], np.ndarray],
    knots: np.ndarray,
) -> list[float]:
    """tAB-DEIS: integral over [rho, rho_next] (rho > rho_next > 0) of l_j(t(tau)) dtau, l_j the
    Lagrange basis in t through the nodes' times (nodes[0] = rho, the newest); `time` maps
    u = log sigma to t. Integrated in u, dtau = e^u du, by log_sigma_quadrature (float64)."""
    u, w = log_sigma_quadrature(math.log(rho_next), math.log(rho), knots)
    basis = lagrange_basis(time(u), [float(t) for t in time(np.log(nodes))])
    return [float(c) for c in -(basis @ (w * np.exp(u)))]


def _deis_ab(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    order: int,
    lower_order_final: bool,
    coefficients: Callable[[float, float, list[float]], list[float]],
) -> torch.Tensor:
    """The multistep loop shared by tAB and rhoAB: one prediction per step, the polynomial through
    the last min(order, history) of them (the official code's warm-up: its first steps use the
    coefficients of lower degree), lower_order_final as in diffusers (dpm_solver._order), and the
    step to 0 first-order, x' = x - sigma eps = D."""
    s = _levels(sigmas)
    steps = len(s) - 1
    history: list[torch.Tensor] = []
    for i in range(steps):
        sig, nxt = s[i], s[i + 1]
        history.insert(0, (x - denoise(x, _at(sig))) / sig)
        del history[order:]
        o = _order(order, i, steps, len(history), nxt == 0, lower_order_final)
        if o == 1:
            x = x + (nxt - sig) * history[0]
            continue
        coefs = coefficients(sig, nxt, s[i - o + 1 : i + 1][::-1])
        x = x + sum(c * e for c, e in zip(coefs, history[:o], strict=True))
    return x


def sample_deis_tab(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generators=None,
    order: int = 4,
    lower_order_final: bool = True,
    noise: NoiseSchedule | None = None,
) -> torch.Tensor:
    """tAB-DEIS (paper eq. 15; qsh-zh/deis get_sampler_t_ab): the predictions as a polynomial in the
    model's time t (ModelTime), each basis polynomial integrated against dsigma. Order 1 is DDIM.

    Time variable: the model's own t(sigma), the one its network is evaluated at (vp_denoise), as
    the official code does for discrete-time models (DiscreteVPSDE: t the training index, alpha
    interpolated linearly between indices; ours interpolates log sigma, as sigma_to_t does).
    diff-sampler instead maps every model to one linear-beta VP SDE (edm2t, beta_min 0.1,
    beta_d 19.9), which is not the time of our models' networks. `noise` is the grid's
    NoiseSchedule (the registry passes it)."""
    _check_order("deis_tab", order)
    if noise is None:
        raise ValueError("deis_tab needs the model's noise schedule: pass noise=grid.noise")
    time = ModelTime.of(noise)
    return _deis_ab(
        denoise,
        x,
        sigmas,
        order,
        lower_order_final,
        lambda a, b, nodes: tab_coefficients(a, b, nodes, time, time.knots),
    )


def sample_deis_rhoab(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generators=None,
    order: int = 4,
    lower_order_final: bool = True,
) -> torch.Tensor:
    """rhoAB-DEIS (paper Sec. 4; qsh-zh/deis get_sampler_rho_ab): Adams-Bashforth on dx/drho = eps,
    the predictions as a polynomial in rho = sigma integrated exactly (rhoab_coefficients). The
    same integrals as k-diffusion's LMS (lms_coefficient), which takes its last step at full order."""
    _check_order("deis_rhoab", order)
    return _deis_ab(denoise, x, sigmas, order, lower_order_final, rhoab_coefficients)


# Butcher tableaux (c, rows of a, b) of qsh-zh/deis th_deis/rk.py, one per `rk_method`.
RK_TABLEAUX: dict[str, tuple[tuple[float, ...], tuple[tuple[float, ...], ...], tuple[float, ...]]] = {
    "1euler": ((0.0,), ((),), (1.0,)),
    "2heun": ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "3kutta": ((0.0, 0.5, 1.0), ((), (0.5,), (-1.0, 2.0)), (1 / 6, 4 / 6, 1 / 6)),
    "3ral": ((0.0, 0.5, 0.75), ((), (0.5,), (0.0, 0.75)), (2 / 9, 1 / 3, 4 / 9)),
    "3heun": ((0.0, 1 / 3, 2 / 3), ((), (1 / 3,), (0.0, 2 / 3)), (0.25, 0.0, 0.75)),
    "3vdh": ((0.0, 8 / 15, 2 / 3), ((), (8 / 15,), (0.25, 5 / 12)), (0.25, 0.0, 0.75)),
    "3ssprk": ((0.0, 1.0, 0.5), ((), (1.0,), (0.25, 0.25)), (1 / 6, 1 / 6, 2 / 3)),
    "4rk": ((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
}


def sample_deis_rhork(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generators=None, method: str = "3kutta"
) -> torch.Tensor:
    """rhoRK-DEIS (paper Sec. 4; qsh-zh/deis get_sampler_rho_rk with th_deis/rk.py): an explicit
    Runge-Kutta step of dx/drho = eps(x, rho) between consecutive levels, stage k_m at
    rho + c_m h. Every stage is a fresh evaluation, as in rk.py (Heun's end-of-step stage sits at the
    level the next step starts from again, at another x). The step to 0 is first-order (x' = D): eps
    cannot be evaluated at sigma = 0, and the official code stops at t = eps > 0 instead. NFE:
    s (N - 1) + 1 for s stages."""
    if method not in RK_TABLEAUX:
        raise ValueError(f"sampler.method for deis_rhork must be one of {', '.join(RK_TABLEAUX)}")
    c, a, b = RK_TABLEAUX[method]
    s = _levels(sigmas)
    for sig, nxt in zip(s, s[1:], strict=False):
        h = nxt - sig
        k = [(x - denoise(x, _at(sig))) / sig]
        if nxt == 0:
            x = x + h * k[0]
            continue
        for cm, row in zip(c[1:], a[1:], strict=True):
            level = nxt if cm == 1.0 else sig + cm * h
            xm = x + h * sum(am * km for am, km in zip(row, k, strict=False) if am)
            k.append((xm - denoise(xm, _at(level))) / level)
        x = x + h * sum(bm * km for bm, km in zip(b, k, strict=True) if bm)
    return x
