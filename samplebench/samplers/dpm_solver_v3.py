"""DPM-Solver-v3 (Zheng, Lu, Chen & Zhu, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical
Model Statistics", NeurIPS 2023, arXiv:2310.13268; official code thu-ml/DPM-Solver-v3, dpm_solver_v3.py:
DPM_Solver_v3.__init__, weighted_cumsumexp_trapezoid, get_g, compute_high_order_derivatives,
multistep_predictor_update, multistep_corrector_update, sample). Our own code on our denoiser contract.

The scale. Samplers here work on x = x_0 + sigma n, which is the VP input divided by alpha
(x = x_vp / alpha, sigma = sigma_vp / alpha, lambda = log(alpha / sigma_vp) = -log sigma). In this scale
the paper's alpha factors drop out: with eps = (x - D) / sigma the probability-flow ODE is
dx/dlambda = -sigma eps. The empirical model statistics (EMS) l, s, b are functions of lambda, one value
per element of x. Writing

    f = sigma eps - l x          (= N_theta / alpha of the paper; l = 1 gives f = -D),
    dx/dlambda = -l x - f,

and assuming f' = s f + b, the quantity g = e^{S_s - S} f - e^{S_s} (B - B_s) (S = int s, B = int e^{-S} b,
g(lambda_s) = f_s) is what is expanded in a Taylor series. The first-order step from lambda_s to
lambda_t (our scale of the paper's eq. 14 / the official predictor) is

    x_t = e^{L_s - L_t} x_s - e^{-L_t - S_s} (I_t - I_s) g_s - e^{-L_t} (C_t - C_s - B_s (I_t - I_s)),

with L = int l, I = int e^{L+S}, C = int e^{L+S} B, all cumulative trapezoid integrals on the EMS grid
(weighted_cumsumexp_trapezoid). Order k + 1 adds - e^{L_s - L_t} int_s^t e^{(L+S) - (L+S)_s}
(lambda - lambda_s)^k / k! dlambda * g^(k), the derivatives g^(k) from the previous evaluations by
solving the Taylor system (pseudo=False) or by divided differences (pseudo-order, pseudo=True).
With l = 1, s = b = 0 the first order is DDIM and the Taylor form is DPM-Solver++ ('heun').

The corrector (UniPC-like, the official multistep_corrector_update): after the model is evaluated at
the new point x_t it redoes the step s -> t with g at t among the points (order = the predictor's
order, + 1 with c_pseudo), without another evaluation; then x_t is replaced and f_t kept (the official
code keeps N = sigma eps - l x fixed and rewrites eps, which is keeping f).

Differences from the official code, all deliberate:
- No snapping. The official code rounds each timestep to the nearest EMS grid point (so the solver
  visits other levels than the schedule's). Here the schedule's levels are inserted into the EMS grid
  (l, s, b interpolated linearly in lambda there) and the integrals are taken on that union grid, so
  the sampler visits exactly grid.sigmas and compares with other samplers on the same levels. Levels
  outside the EMS range extend it with the end values of l, s, b (constant extrapolation).
- The grid end. The official sampler stops at t_end > 0 (sigma_min) and returns x there. Every sampler
  here ends at sigma = 0 (lambda = infinity, outside any EMS grid): the last step, from the last
  positive level to 0, is the denoiser's output D, as in our DPM-Solver++ (after the corrector, D is
  re-derived from the kept f: D = (1 - l) x - f; that is the evaluated D when nothing is corrected).
  Given sigmas that end at a positive level, the solver stops there (no evaluation at that level).
- lower_order_final follows the official rule (order <= the number of remaining steps, at any N),
  counted over the steps between positive levels (the step to 0 is first-order anyway).
- No `half` flag (the official README says it corrects only for t <= 0.5, its code only for t > 0.5).
- Device-agnostic (the official code hard-codes .cuda()); statistics and coefficients in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from samplebench.models import is_analytic
from samplebench.samplers.base import Denoiser
from samplebench.samplers.euler import _at, _levels


@dataclass(frozen=True, eq=False)
class EMS:
    """Empirical model statistics on an increasing logSNR grid: lambdas (G,), l, s, b (G, *shape),
    shape the shape of one sample (broadcast against x's per-sample shape)."""

    lambdas: np.ndarray
    l: np.ndarray  # noqa: E741 - the paper's name
    s: np.ndarray
    b: np.ndarray

    def __post_init__(self) -> None:
        lam = np.asarray(self.lambdas, dtype=np.float64)
        if lam.ndim != 1 or len(lam) < 2 or not np.all(np.diff(lam) > 0):
            raise ValueError("EMS lambdas must be an increasing 1-d grid of at least 2 points")
        for name in ("l", "s", "b"):
            a = np.asarray(getattr(self, name))
            if a.shape[0] != len(lam):
                raise ValueError(f"EMS {name} has {a.shape[0]} grid points, lambdas {len(lam)}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.asarray(self.l).shape[1:])

    @classmethod
    def trivial(cls, lambdas: np.ndarray, shape: tuple[int, ...] = ()) -> EMS:
        """l = 1, s = b = 0: DPM-Solver++ (the paper's Appendix A.2, the official `degenerated`)."""
        lam = np.asarray(lambdas, dtype=np.float64)
        ones = np.ones((len(lam), *shape))
        return cls(lam, ones, np.zeros_like(ones), np.zeros_like(ones))


def _cumtrapz(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Cumulative trapezoid integral along axis 0, starting at 0 (weighted_cumsumexp_trapezoid with a = 0)."""
    dx = np.diff(x).reshape((-1,) + (1,) * (y.ndim - 1))
    out = np.cumsum(0.5 * dx * (y[1:] + y[:-1]), axis=0)
    return np.concatenate([np.zeros_like(y[:1]), out], axis=0)


class _Integrals:
    """L, S, I, B, C of the official __init__, on the EMS grid with the solver's levels inserted."""

    def __init__(self, ems: EMS, step_lambdas: list[float]):
        lam = np.asarray(ems.lambdas, dtype=np.float64)
        grid = np.union1d(lam, np.asarray(step_lambdas, dtype=np.float64))
        self.grid = grid
        self.index = {float(v): int(np.searchsorted(grid, v)) for v in step_lambdas}

        def interp(a: np.ndarray) -> np.ndarray:
            a = np.asarray(a, dtype=np.float64)
            flat = a.reshape(len(lam), -1)
            pos = np.clip(np.searchsorted(lam, grid, side="right") - 1, 0, len(lam) - 2)
            w = np.clip((grid - lam[pos]) / (lam[pos + 1] - lam[pos]), 0.0, 1.0)[:, None]
            out = flat[pos] * (1 - w) + flat[pos + 1] * w  # constant beyond the ends (w clipped)
            return out.reshape((len(grid),) + a.shape[1:])

        self.l, s, b = interp(ems.l), interp(ems.s), interp(ems.b)
        self.L = _cumtrapz(self.l, grid)
        self.S = _cumtrapz(s, grid)
        self.LS = self.L + self.S
        self.I = _cumtrapz(np.exp(self.LS), grid)
        self.B = _cumtrapz(np.exp(-self.S) * b, grid)
        self.C = _cumtrapz(np.exp(self.LS) * self.B, grid)
        self._coef: dict[tuple[int, int, int], np.ndarray] = {}

    def taylor_coefficient(self, i_s: int, i_t: int, k: int) -> np.ndarray:
        """e^{L_s - L_t} int_s^t e^{(L+S)(lambda) - (L+S)(lambda_s)} (lambda - lambda_s)^k / k! dlambda
        (compute_exponential_coefficients_high_order times the official e^{L_s - L_t} factor)."""
        key = (i_s, i_t, k)
        if key not in self._coef:
            seg = slice(i_s, i_t + 1)
            x = self.grid[seg]
            w = ((x - x[0]) ** k / math.factorial(k)).reshape((-1,) + (1,) * (self.l.ndim - 1))
            y = np.exp(self.LS[seg] - self.LS[i_s]) * w
            integral = np.sum(0.5 * np.diff(x).reshape(w[1:].shape) * (y[1:] + y[:-1]), axis=0)
            self._coef[key] = np.exp(self.L[i_s] - self.L[i_t]) * integral
        return self._coef[key]


def _derivatives(lams: list[float], gs: list[torch.Tensor], pseudo: bool) -> list[torch.Tensor]:
    """g^(1) .. g^(n) at lams[0] from n + 1 points (compute_high_order_derivatives): the Taylor system
    sum_k g^(k) (lambda_i - lambda_0)^k / k! = g_i - g_0, or divided differences times k! (pseudo)."""
    n = len(gs) - 1
    if pseudo:
        table = [list(gs)]
        for i in range(1, n + 1):
            prev = table[-1]
            table.append([(prev[j] - prev[j + 1]) / (lams[j] - lams[i + j]) for j in range(n - i + 1)])
        return [table[i][0] * math.factorial(i) for i in range(1, n + 1)]
    r = torch.tensor(
        [[(lams[i] - lams[0]) ** k for k in range(1, n + 1)] for i in range(1, n + 1)], dtype=torch.float64
    )
    inv = torch.linalg.inv(r).to(device=gs[0].device, dtype=gs[0].dtype)
    diffs = torch.stack([g - gs[0] for g in gs[1:]])
    sol = torch.tensordot(inv, diffs, dims=1)
    return [sol[k - 1] * math.factorial(k) for k in range(1, n + 1)]


def _tensor(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(a, device=like.device).to(like.dtype)


def _step(
    ints: _Integrals,
    points: list[tuple[torch.Tensor, torch.Tensor, float, int]],
    i_t: int,
    pseudo: bool,
) -> torch.Tensor:
    """x at grid index i_t from points[0] = (x_s, f_s, lambda_s, i_s) and, for order len(points), the
    other points' f (the official predictor/corrector update; points[1:] may include t itself)."""
    x_s, _, lam_s, i_s = points[0]
    e_s = np.exp(ints.S[i_s])
    gs = [
        _tensor(np.exp(ints.S[i_s] - ints.S[i]), f) * f - _tensor(e_s * (ints.B[i] - ints.B[i_s]), f)
        for _, f, _, i in points
    ]
    first = ints.taylor_coefficient(i_s, i_t, 0)  # = e^{-L_t - S_s} (I_t - I_s) up to the quadrature
    rest = np.exp(-ints.L[i_t]) * (ints.C[i_t] - ints.C[i_s] - ints.B[i_s] * (ints.I[i_t] - ints.I[i_s]))
    x_t = (
        _tensor(np.exp(ints.L[i_s] - ints.L[i_t]), x_s) * x_s
        - _tensor(first, x_s) * gs[0]
        - _tensor(rest, x_s)
    )
    if len(points) > 1:
        lams = [p[2] for p in points]
        for k, g_k in enumerate(_derivatives(lams, gs, pseudo), start=1):
            x_t = x_t - _tensor(ints.taylor_coefficient(i_s, i_t, k), x_s) * g_k
    return x_t


def _check(order: int) -> None:
    if order not in (1, 2, 3):
        raise ValueError("sampler.order for dpm_solver_v3 must be 1, 2 or 3")


def sample_dpm_solver_v3(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generators=None,
    ems: EMS | None = None,
    order: int = 3,
    p_pseudo: bool = False,
    use_corrector: bool = True,
    c_pseudo: bool = True,
    lower_order_final: bool = True,
) -> torch.Tensor:
    """DPM-Solver-v3 (multistep predictor of `order`, optional corrector) over `sigmas` with the EMS
    `ems` (the official sample() with its defaults: order 3, p_pseudo off, corrector on with c_pseudo,
    lower_order_final). One evaluation per positive level; a final 0 is the step to D."""
    _check(order)
    if ems is None:
        raise ValueError("dpm_solver_v3 needs its empirical model statistics (ems=)")
    s = _levels(sigmas)
    positive = [v for v in s if v > 0]
    to_zero = s[-1] == 0
    if len(positive) != len(s) - int(to_zero):
        raise ValueError("sigmas must be positive levels, then optionally a final 0")
    lams = [-math.log(v) for v in positive]
    ints = _Integrals(ems, lams)
    idx = [ints.index[v] for v in lams]
    evaluated = len(positive) if to_zero else len(positive) - 1
    moves = len(positive) - 1  # predictor steps between positive levels
    hist: list[tuple[torch.Tensor, torch.Tensor, float, int]] = []  # (x, f, lambda, grid index), newest last
    p_order = 0
    for i in range(evaluated):
        l_i = _tensor(ints.l[idx[i]], x)
        f = (1 - l_i) * x - denoise(x, _at(positive[i]))  # sigma eps - l x with eps = (x - D) / sigma
        hist.append((x, f, lams[i], idx[i]))
        c_order = p_order + int(c_pseudo)
        if use_corrector and i > 0 and c_order > 1:
            # points s, t, then older ones (the official corrector's ordering)
            pts = [hist[-2], hist[-1]] + [hist[-j] for j in range(3, c_order + 1)]
            x = _step(ints, pts, idx[i], c_pseudo)
            hist[-1] = (x, f, lams[i], idx[i])  # f (the official N) kept, x replaced
        del hist[:-4]
        if i == moves:  # the last positive level: the step to 0 is D = x - sigma eps = (1 - l) x - f
            return (1 - l_i) * x - f
        p_order = min(order, i + 1)
        if lower_order_final:
            p_order = min(p_order, moves - i)
        x = _step(ints, hist[::-1][:p_order], idx[i + 1], p_pseudo)
    return x


V3_OPTIONS = (
    "order",
    "p_pseudo",
    "use_corrector",
    "c_pseudo",
    "lower_order_final",
    "ems_grid",
    "ems_samples",
    "ems_data",
)


def validate_v3(options: dict) -> None:
    """sampler.ems_grid and ems_samples: whole numbers in range (a one-line UsageError)."""
    from samplebench.errors import UsageError
    from samplebench.samplers.ems import SMOOTH_WINDOW

    for key, low in (("ems_grid", 2 * SMOOTH_WINDOW + 2), ("ems_samples", 2)):
        value = options.get(key, low)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UsageError(f"sampler.{key}={value} must be a whole number >= {low}")
    data = options.get("ems_data")
    if data is not None and not isinstance(data, str):
        raise UsageError(f"sampler.ems_data={data} must be a folder of reference images")


def model_check_v3(options: dict, model_cfg: dict) -> None:
    """At plan time: the analytic model has exact data and takes no folder; image models need
    sampler.ems_data, an existing folder (one-line UsageErrors)."""
    from pathlib import Path

    from samplebench.errors import UsageError
    from samplebench.samplers.ems import missing_message

    data = options.get("ems_data")
    name = model_cfg.get("name")
    if is_analytic(str(name)):
        if data:
            raise UsageError("sampler.ems_data is for image models; model=gmm has exact data draws (drop it)")
        return
    if not data:
        raise UsageError(missing_message(name))
    if not Path(str(data)).expanduser().is_dir():
        raise UsageError(f"sampler.ems_data={data} is not a folder; point it at a folder of reference images")


def run_dpm_solver_v3(denoise, x, grid, options, generators, context=None) -> torch.Tensor:
    """Registry entry: the statistics of (model, guidance, ems_grid, ems_samples) from this process's
    memo or <results_dir>/.cache/ems/ (written by `samplebench ems` or a sweep's preparation), else
    computed now for the analytic model (its cost then falls in this call; sweeps compute them before
    generating, see cli.prepare_ems), else a one-line error saying how to make them."""
    from samplebench.samplers.ems import DEFAULT_GRID, DEFAULT_SAMPLES, load_or_compute

    if context is None:
        raise ValueError("dpm_solver_v3 needs a SamplerContext (the model, for its statistics)")
    opts = {k: v for k, v in options.items() if k in V3_OPTIONS}
    grid_size = int(opts.pop("ems_grid", DEFAULT_GRID))
    n_samples = int(opts.pop("ems_samples", DEFAULT_SAMPLES))
    data = opts.pop("ems_data", None)
    ems, _ = load_or_compute(
        context.model, float(context.guidance), grid_size, n_samples, context.cache_root, data=data
    )
    return sample_dpm_solver_v3(denoise, x, grid.sigmas, generators, ems=ems, **opts)


run_dpm_solver_v3.accepts = V3_OPTIONS  # type: ignore[attr-defined]
