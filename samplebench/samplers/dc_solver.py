"""DC-Solver: UniPC with dynamic compensation (Zhao, Wang, Zhou & Lu, "DC-Solver: Improving
Predictor-Corrector Diffusion Sampler via Dynamic Compensation", ECCV 2024, arXiv:2409.03755; official
code wl-zhao/DC-Solver, `diffusers/src/diffusers/schedulers/scheduling_dcsolver_multistep.py`:
`dynamic_compensation`, `find_optim_ratio`, `cascade_polynomial_regression`, `_step`, `_step_search`,
and `diffusers/scripts/sample_dc_solver.py`). Written here from those sources, not copied.

The base solver is our UniPC (samplers/unipc.py: data prediction, B(h) = e^h - 1 by default, UniC after
every step). A predictor-corrector sampler evaluates the model at the *predicted* state, then corrects
the state; the model output it keeps is therefore misaligned with the corrected state. DC-Solver
replaces the newest output m_i, just before the predictor of step i uses it, by the Lagrange polynomial
through the last dc_order + 1 outputs (newest first m_i, m_{i-1}, ...) evaluated at

    t' = t_{i-1} + rho_i (t_i - t_{i-1})

in the model's discrete-timestep units (NoiseSchedule.sigma_to_t, fractional training index: the
official code interpolates in the scheduler's integer timesteps). rho_i = 1 returns m_i (a Lagrange
polynomial through its nodes), and such steps are skipped, so all-ones ratios are UniPC itself. The
compensated value stays in the history, as in the official scheduler (which overwrites
model_outputs[-1]): the next corrector and predictor see it. Steps i < dc_order have too little history
and are never compensated (the official search starts at step index 2 with dc_order = 2, and its CPR
returns rho = 1 for steps 1 and 2, 1-based).

Ratios (`sampler.ratios`):
  * `search` (default): searched once per (model, grid, guidance, settings), as `find_optim_ratio` does:
    greedily, step by step along a calibration batch, AdamW (lr 0.1, 20 iterations, starting at
    rho = 1) minimises the MSE between "this step's predictor + the next step's corrector" (which
    evaluates the model at the predicted state) and the reference state at the next level. The
    calibration batch has its own seed (sampler.calibration_seed), never the cell's samples; it calls
    context.model with the cell's guidance, not the counted denoiser, so the search is outside the
    cell's NFE (its evaluations and seconds are printed once and stored in the cache file).
    Reference: on the analytic model the exact probability-flow ODE (scipy DOP853, rtol = atol = 1e-10,
    as metrics/reference.py) at every level of the grid; on other models (or sampler.reference=solver)
    DPM-Solver++(2M) with about sampler.reference_steps steps on a grid that refines the cell's grid
    (each interval split evenly in log sigma), run with the same model and guidance. The official
    diffusers script uses 200 steps of the pipeline's default scheduler (DDIM for SD 2.1; its README
    says a 999-step DDIM); 2M on the refined grid is more accurate at the same cost and visits every
    level of the cell's grid exactly.
  * `none`: rho = 1 everywhere (UniPC with this module's corrector setting).
  * `cpr:<file>`: the cascade polynomial regression of the official code, with coefficients from a
    .npy written by `save_cpr` (or the official `dc_solver/cpr_coeffs_path/sd2.1.npy`, 36 numbers).
  * a list of N numbers (one per step; entries for steps < dc_order are ignored).

Deviations from the official code (all noted in the registry's tests or below):
  * the search keeps the best ratio AdamW visited (the start, rho = 1, included), not its last
    iterate, so a searched ratio never has a larger step loss than rho = 1;
  * the official search compares with the 200-step reference at the fine step *after* the target
    timestep (its callback stores the latent after each step under that step's timestep), and at the
    second-to-last step with the final state; here every step is compared with the reference at
    exactly the level the step reaches;
  * the grid ends at sigma = 0 (the last step returns the, compensated, denoiser output); the official
    scheduler ends at sigma(t=0) with a first-order step;
  * `correct_first` (default false) is the official `disable_corrector=[0]`: the state after the first
    step is not corrected. Our `unipc` corrects it; correct_first=true gives our unipc exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samplebench import cache
from samplebench.errors import UsageError, brief
from samplebench.samplers.base import Denoiser, SamplerContext, guided_denoiser
from samplebench.samplers.euler import _at, _levels
from samplebench.samplers.unipc import VARIANTS, corrector_step, predictor_step
from samplebench.schedules import Grid

DC_ORDERS = (1, 2, 3)
REFERENCES = ("auto", "solver")
CPR_TERMS = 4  # the official sd2.1.npy holds 36 = 4 x 3 x 3 coefficients: cubic in step / NFE
# Searched ratios of this process, by cache key (the registry's tests run without a cache folder).
_MEMO: dict[str, dict[str, np.ndarray]] = {}


# -- dynamic compensation ------------------------------------------------------------------------
def lagrange_weights(nodes: list[float], at: Any) -> list[Any]:
    """w_k(at) = prod_{j != k} (at - t_j) / (t_k - t_j): sum_k w_k f(t_k) is the polynomial through
    (t_k, f(t_k)) evaluated at `at` (a float, or a tensor when its gradient is wanted)."""
    weights = []
    for k, tk in enumerate(nodes):
        w = 1.0
        for j, tj in enumerate(nodes):
            if j != k:
                w = w * ((at - tj) / (tk - tj))
        weights.append(w)
    return weights


def compensate(d_hist: list[torch.Tensor], t_hist: list[float], ratio: Any, dc_order: int) -> torch.Tensor:
    """The Lagrange polynomial through the newest dc_order + 1 outputs (newest first, at timesteps
    t_hist) at t' = t_{i-1} + ratio (t_i - t_{i-1}) (official `dynamic_compensation`)."""
    nodes = t_hist[: dc_order + 1]
    at = nodes[1] + ratio * (nodes[0] - nodes[1])
    out = None
    for w, d in zip(lagrange_weights(nodes, at), d_hist, strict=False):
        w = w.to(d.dtype) if isinstance(w, torch.Tensor) else w
        out = w * d if out is None else out + w * d
    return out


@dataclasses.dataclass(frozen=True)
class Setting:
    """The solver's fixed settings (the conf keys that shape the update, not the ratios)."""

    order: int = 2
    variant: str = "bh2"
    dc_order: int = 2
    lower_order_final: bool = True
    corrector: bool = True
    correct_first: bool = False

    def corrects(self, i: int) -> bool:
        """Whether the state reached by step i - 1 is corrected when the model is evaluated at step i."""
        return self.corrector and i >= 1 and (i > 1 or self.correct_first)


def _solve(
    denoise: Denoiser,
    x: torch.Tensor,
    s: list[float],
    ts: list[float],
    ratios: list[float],
    st: Setting,
    search=None,
) -> torch.Tensor:
    """UniPC-p with dynamic compensation. `search(i, x, d_hist, lam_hist, t_hist, this_order)`, when
    given, returns the ratio of step i (searched there) instead of ratios[i]."""
    steps = len(s) - 1
    keep = max(st.order, st.dc_order + 1)
    d_hist: list[torch.Tensor] = []  # newest first
    lam_hist: list[float] = []
    t_hist: list[float] = []
    prev_x, prev_order = None, 0
    for i in range(steps):
        sig, nxt = s[i], s[i + 1]
        d = denoise(x, _at(sig))
        if st.corrects(i) and prev_x is not None:
            x = corrector_step(prev_x, s[i - 1], sig, d, d_hist, lam_hist, prev_order, st.variant)
        d_hist.insert(0, d)
        lam_hist.insert(0, -math.log(sig))
        t_hist.insert(0, ts[i])
        del d_hist[keep:], lam_hist[keep:], t_hist[keep:]
        this_order = min(st.order, steps - i) if st.lower_order_final else st.order
        this_order = min(this_order, len(d_hist))
        prev_x, prev_order = x, this_order
        if len(d_hist) > st.dc_order:
            ratio = search(i, x, d_hist, lam_hist, t_hist, this_order) if search else ratios[i]
            if ratio != 1.0:
                d_hist[0] = compensate(d_hist, t_hist, ratio, st.dc_order)
        x = predictor_step(x, sig, nxt, d_hist, lam_hist, this_order, st.variant)
    return x


def grid_timesteps(grid: Grid) -> list[float]:
    """The grid's levels in the model's discrete-timestep units (fractional training index)."""
    ts = [float(t) for t in grid.noise.sigma_to_t(grid.sigmas)]
    positive = [t for t, sig in zip(ts, _levels(grid.sigmas), strict=True) if sig > 0]
    if len(set(positive)) != len(positive):
        raise UsageError(
            "sampler=dc_solver interpolates in the model's timesteps, and two levels of this grid map to "
            "the same timestep (levels outside the training range are clipped); use another schedule"
        )
    return ts


# -- the search ----------------------------------------------------------------------------------
def exact_states(
    model: Any, x: torch.Tensor, cond: Any, guidance: float, sigmas: list[float]
) -> torch.Tensor:
    """States of the analytic model's exact probability-flow ODE at every level of `sigmas` after the
    first (DOP853, rtol = atol = 1e-10, dy/dsigma = eps_w(y, sigma) as metrics/reference.py)."""
    from scipy.integrate import solve_ivp

    from samplebench.metrics.reference import ReferenceSolveError, _guided_eps_rows

    n, dim = x.shape[0], int(np.prod(x.shape[1:]))
    labels = cond.to(model.device)

    def rhs(sigma: float, flat: np.ndarray) -> np.ndarray:
        y = torch.from_numpy(flat).to(model.device).view(n, dim)
        return _guided_eps_rows(model, y, sigma, labels, guidance).cpu().numpy().ravel()

    y0 = x.double().cpu().reshape(n, dim).numpy().ravel()
    sol = solve_ivp(
        rhs, (sigmas[0], sigmas[-1]), y0, method="DOP853", rtol=1e-10, atol=1e-10, t_eval=sigmas[1:]
    )
    if not sol.success:
        raise ReferenceSolveError(f"the exact ODE solve for dc_solver's search failed ({sol.message})")
    states = torch.from_numpy(sol.y.T.copy()).reshape(len(sigmas) - 1, *x.shape)
    return states.to(device=x.device, dtype=x.dtype)


def solver_states(denoise: Denoiser, x: torch.Tensor, sigmas: list[float], steps: int) -> torch.Tensor:
    """States at every level of `sigmas` after the first, from DPM-Solver++(2M) (samplers/dpm_solver.py)
    on a grid that splits each positive interval into ceil(steps / intervals) parts even in log sigma
    (the step to 0 is the denoiser's output, as on every grid)."""
    from samplebench.samplers.dpm_solver import sample_dpmpp_multistep

    positive = [v for v in sigmas if v > 0]
    parts = max(1, math.ceil(steps / max(1, len(positive) - 1)))
    fine, marks = [positive[0]], []
    for a, b in zip(positive, positive[1:], strict=False):
        fine += [math.exp(math.log(a) + (math.log(b) - math.log(a)) * k / parts) for k in range(1, parts + 1)]
        marks.append(len(fine) - 1)
    seen: list[torch.Tensor] = []

    def recording(y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen.append(y)  # 2M evaluates D at the state it has reached at each level
        return denoise(y, sigma)

    end = sample_dpmpp_multistep(recording, x, torch.tensor(fine + [0.0], dtype=torch.float64), order=2)
    out = [seen[m] for m in marks]
    if sigmas[-1] == 0:
        out.append(end)
    return torch.stack(out)


def _calibration_inputs(model: Any, n: int, seed: int, sigma0: float) -> tuple[torch.Tensor, Any]:
    """The calibration batch: x at sigma0 from seed `seed` (samples 0..n-1 of that seed) and its
    conditions (the analytic model's components; random classes; the first n built-in prompts)."""
    from samplebench.seeds import STREAM_CONDITION, generator, initial_noise

    x_T = initial_noise(seed, list(range(n)), model.sample_shape, model.dtype, model.device)
    x = model.noise_schedule.initial_state(x_T, sigma0)
    kind = getattr(model, "condition_kind", "component")
    if kind == "component":
        return x, model.conditions(list(range(n)), seed)
    if kind == "class":
        labels = [
            int(torch.randint(model.num_classes, (1,), generator=generator(seed, i, STREAM_CONDITION)))
            for i in range(n)
        ]
        return x, model.encode(labels)
    if kind == "text":
        from samplebench.prompts import load_prompts

        texts, _ = load_prompts({"kind": "builtin"}, n).for_indices(list(range(n)))
        return x, model.encode(texts)
    return x, None


def model_identity(model: Any) -> dict[str, Any]:
    """What identifies a model for the cache: the analytic model's spec, or a network's name, dtype,
    shape, prediction and training levels."""
    spec = getattr(model, "spec", None)
    ident: dict[str, Any] = {"name": str(model.name), "class": type(model).__name__}
    if dataclasses.is_dataclass(spec):
        ident.update(dataclasses.asdict(spec))
    ident["dtype"] = str(getattr(model, "model_dtype", model.dtype))
    ident["shape"] = list(model.sample_shape)
    ident["prediction"] = str(model.prediction_type)
    levels = model.noise_schedule.train_sigmas.double().cpu().numpy()
    ident["levels"] = hashlib.sha256(levels.tobytes()).hexdigest()[:16]
    for extra in ("resolution", "negative_prompt"):
        if hasattr(model, extra):
            ident[extra] = getattr(model, extra)
    return ident


def _key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@dataclasses.dataclass(frozen=True)
class Search:
    """The search's settings (conf keys calibration, calibration_seed, iterations, lr, reference,
    reference_steps)."""

    calibration: int = 10
    calibration_seed: int = 1
    iterations: int = 20
    lr: float = 0.1
    reference: str = "auto"
    reference_steps: int = 200


def reference_states(
    context: SamplerContext, sigmas: list[float], search: Search
) -> tuple[torch.Tensor, torch.Tensor, Any, str]:
    """The calibration batch (x, cond) and its reference states at every level after the first,
    cached under <cache_root>/dc_solver/reference-<key>.npz."""
    from samplebench.models.gmm import GaussianMixtureModel

    model, guidance = context.model, float(context.guidance)
    x, cond = _calibration_inputs(model, search.calibration, search.calibration_seed, sigmas[0])
    exact = search.reference == "auto" and isinstance(model, GaussianMixtureModel)
    how = "exact ODE (DOP853)" if exact else f"DPM-Solver++(2M), ~{search.reference_steps} steps"
    payload = {
        "model": model_identity(model),
        "sigmas": hashlib.sha256(np.asarray(sigmas, dtype=np.float64).tobytes()).hexdigest(),
        "guidance": guidance,
        "calibration": [search.calibration, search.calibration_seed],
        "reference": "exact" if exact else ["solver", search.reference_steps],
    }
    key = "reference-" + _key(payload)
    path = None if context.cache_root is None else Path(context.cache_root) / "dc_solver" / f"{key}.npz"
    hit = _MEMO.get(key) or (cache.load(path, ("states",)) if path is not None else None)
    if hit is not None:
        states = torch.as_tensor(hit["states"]).to(device=x.device, dtype=x.dtype)
        return x, states, cond, how
    with torch.no_grad():
        if exact:
            states = exact_states(model, x, cond, guidance, sigmas)
        else:
            states = solver_states(guided_denoiser(model, cond, guidance), x, sigmas, search.reference_steps)
    arrays = {"states": states.detach().cpu().numpy()}
    _MEMO[key] = arrays
    if path is not None:
        cache.save(path, **arrays)
    return x, states, cond, how


def search_ratios(
    context: SamplerContext, grid: Grid, st: Setting, search: Search, verbose: bool = True
) -> dict[str, np.ndarray]:
    """Per-step ratios searched on the calibration batch (see the module docstring), cached under
    <cache_root>/dc_solver/ratios-<key>.npz with the step losses at rho = 1 and at the searched rho
    (NaN where a step is not searched), the reference's distance of the calibration endpoints with
    rho = 1 and with the searched ratios, and the search's model evaluations and seconds."""
    if context is None or context.model is None:
        raise ValueError("dc_solver's ratio search needs a SamplerContext with the model")
    s = _levels(grid.sigmas)
    ts = grid_timesteps(grid)
    model, guidance = context.model, float(context.guidance)
    payload = {
        "model": model_identity(model),
        "sigmas": hashlib.sha256(np.asarray(s, dtype=np.float64).tobytes()).hexdigest(),
        "guidance": guidance,
        "setting": dataclasses.asdict(st),
        "search": dataclasses.asdict(search),
    }
    key = "ratios-" + _key(payload)
    path = None if context.cache_root is None else Path(context.cache_root) / "dc_solver" / f"{key}.npz"
    hit = _MEMO.get(key) or (cache.load(path, ("ratios",)) if path is not None else None)
    if hit is not None:
        _MEMO[key] = hit
        return hit
    start = time.perf_counter()
    x, ref, cond, how = reference_states(context, s, search)
    calib = guided_denoiser(model, cond, guidance)
    evals = [0]

    def counted(y, sigma):
        evals[0] += 1
        return calib(y, sigma)

    steps = len(s) - 1
    ratios = np.ones(steps)
    before, after = np.full(steps, np.nan), np.full(steps, np.nan)

    def find(i, x_i, d_hist, lam_hist, t_hist, this_order):
        target, nxt = ref[i], s[i + 1]

        def loss_at(ratio):
            d_hist_c = [compensate(d_hist, t_hist, ratio, st.dc_order)] + d_hist[1:]
            x_next = predictor_step(x_i, s[i], nxt, d_hist_c, lam_hist, this_order, st.variant)
            if nxt > 0 and st.corrects(i + 1):
                d_next = counted(x_next, _at(nxt))
                x_next = corrector_step(x_i, s[i], nxt, d_next, d_hist_c, lam_hist, this_order, st.variant)
            return torch.mean((x_next.double() - target.double()) ** 2)

        param = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64, device=x_i.device))
        optimizer = torch.optim.AdamW([param], lr=search.lr)
        best, best_loss = 1.0, math.inf
        with torch.enable_grad():
            for it in range(search.iterations + 1):
                optimizer.zero_grad()
                loss = loss_at(param)
                value = float(loss.detach())
                if it == 0:
                    before[i] = value
                if value < best_loss:
                    best, best_loss = float(param.detach()), value
                if it == search.iterations:
                    break
                loss.backward()
                optimizer.step()
        after[i] = best_loss
        ratios[i] = best
        return best

    with torch.no_grad():
        end = _solve(counted, x, s, ts, ratios, st, search=find)
        plain = _solve(counted, x, s, ts, [1.0] * steps, st)
    seconds = time.perf_counter() - start
    err = lambda y: float(((y - ref[-1]) ** 2).reshape(len(y), -1).mean(1).sqrt().mean())  # noqa: E731
    hit = {
        "ratios": ratios,
        "loss_one": before,
        "loss_searched": after,
        "endpoint_err_one": np.asarray(err(plain)),
        "endpoint_err_searched": np.asarray(err(end)),
        "search_evaluations": np.asarray(evals[0]),
        "search_seconds": np.asarray(seconds),
    }
    _MEMO[key] = hit
    if path is not None:
        cache.save(path, **hit)
    if verbose:
        _say(
            f"dc_solver: searched {steps} ratios on {search.calibration} calibration samples against the "
            f"{how} in {seconds:.1f} s ({evals[0]} model evaluations, not counted in NFE)"
            + (f"; cached in {path}" if path is not None else "")
        )
    return hit


# -- cascade polynomial regression ---------------------------------------------------------------
def _cpr_features(guidance: float, nfe: int, step: int, terms: int = CPR_TERMS) -> np.ndarray:
    """rho = sum_{k,j,l} A[k, j, l] n^(2-l) g^(2-j) x^k with n = NFE / 50, g = guidance / 12 and
    x = step / NFE (step 1-based): the official `cascade_polynomial_regression` (a quadratic in n gives
    each coefficient of a quadratic in g, which gives each coefficient of a polynomial in x), which
    is linear in A, flattened in the official order (A reshaped to (terms, 3, 3))."""
    n, g, x = nfe / 50.0, guidance / 12.0, step / nfe
    out = np.empty((terms, 3, 3))
    for k in range(terms):
        for j in range(3):
            for m in range(3):
                out[k, j, m] = n ** (2 - m) * g ** (2 - j) * x**k
    return out.ravel()


def cpr_ratios(coefficients: np.ndarray, guidance: float, nfe: int, first: int = 2) -> list[float]:
    """Ratios of steps 0..nfe-1 predicted by the CPR coefficients; 1 for the first `first` steps (the
    official code: rho = 1 for 1-based steps < 3)."""
    coefficients = np.asarray(coefficients, dtype=np.float64).ravel()
    terms = coefficients.size // 9
    if terms * 9 != coefficients.size or terms < 1:
        raise UsageError(f"CPR coefficients come in multiples of 9 (terms x 3 x 3), not {coefficients.size}")
    return [
        1.0 if i < first else float(_cpr_features(guidance, nfe, i + 1, terms) @ coefficients)
        for i in range(nfe)
    ]


def fit_cpr(
    points: list[tuple[float, int, list[float]]], first: int = 2, terms: int = CPR_TERMS
) -> np.ndarray:
    """CPR coefficients (terms * 9, official layout) fitted by least squares to searched ratios:
    points are (guidance, NFE, ratios of steps 0..NFE-1); steps < `first` (rho = 1 by construction)
    are left out. The model is linear in its coefficients, so this is the least-squares solution the
    official curve fit converges to (the minimum-norm one when the points do not determine all)."""
    rows, values = [], []
    for guidance, nfe, ratios in points:
        if len(ratios) != nfe:
            raise ValueError(f"{len(ratios)} ratios for NFE {nfe}")
        for i in range(first, nfe):
            rows.append(_cpr_features(guidance, nfe, i + 1, terms))
            values.append(ratios[i])
    a, b = np.asarray(rows), np.asarray(values)
    scale = np.abs(a).max(0)
    scale[scale == 0] = 1
    coefficients, *_ = np.linalg.lstsq(a / scale, b, rcond=None)
    return coefficients / scale


def save_cpr(path: Path, coefficients: np.ndarray) -> None:
    """Write CPR coefficients as a plain .npy (the official format, read by sampler.ratios=cpr:<path>)."""
    np.save(Path(path), np.asarray(coefficients, dtype=np.float64))


# -- the registry entry --------------------------------------------------------------------------
def _options(options: dict[str, Any]) -> tuple[Any, Setting, Search]:
    order = int(options.get("order", 2))
    variant = str(options.get("variant", "bh2"))
    dc_order = options.get("dc_order", 2)
    if order not in (1, 2, 3):
        raise UsageError(f"sampler.order={order} is not valid for sampler=dc_solver; choose 1, 2 or 3")
    if variant not in VARIANTS:
        raise UsageError(f"sampler.variant={variant} is not valid for sampler=dc_solver; choose bh1 or bh2")
    if dc_order not in DC_ORDERS:
        raise UsageError(f"sampler.dc_order={dc_order} is not valid for sampler=dc_solver; choose 1, 2 or 3")
    st = Setting(
        order=order,
        variant=variant,
        dc_order=int(dc_order),
        lower_order_final=bool(options.get("lower_order_final", True)),
        corrector=bool(options.get("corrector", True)),
        correct_first=bool(options.get("correct_first", False)),
    )
    search = Search(
        calibration=int(options.get("calibration", 10)),
        calibration_seed=int(options.get("calibration_seed", 1)),
        iterations=int(options.get("iterations", 20)),
        lr=float(options.get("lr", 0.1)),
        reference=str(options.get("reference", "auto")),
        reference_steps=int(options.get("reference_steps", 200)),
    )
    if search.calibration < 1 or search.iterations < 0 or search.reference_steps < 1 or search.lr < 0:
        raise UsageError(
            "sampler.calibration and sampler.reference_steps must be >= 1, "
            "sampler.iterations and sampler.lr >= 0"
        )
    if search.reference not in REFERENCES:
        raise UsageError(f"sampler.reference={search.reference} is not valid; choose auto or solver")
    ratios = options.get("ratios", "search")
    if not isinstance(ratios, str):
        ratios = [float(r) for r in ratios]
    elif ratios not in ("search", "none") and not ratios.startswith("cpr:"):
        raise UsageError(
            f"sampler.ratios={ratios} is not valid for sampler=dc_solver; use search, none, cpr:<file.npy> "
            "or a list of one ratio per step"
        )
    return ratios, st, search


def validate(options: dict[str, Any]) -> None:
    ratios, _, _ = _options(options)
    if isinstance(ratios, str) and ratios.startswith("cpr:") and not Path(ratios[4:]).expanduser().is_file():
        raise UsageError(f"sampler.ratios={ratios}: no such file; point cpr: at a CPR coefficient .npy file")


def steps_check(options: dict[str, Any], steps: int) -> None:
    """At plan time: a list of ratios has one entry per step of the cell."""
    ratios, _, _ = _options(options)
    if isinstance(ratios, list) and len(ratios) != steps:
        raise UsageError(f"sampler.ratios has {len(ratios)} entries; this run takes {steps} steps (one each)")


def resolve_ratios(
    grid: Grid, options: dict[str, Any], context: SamplerContext | None, verbose: bool = True
) -> list[float]:
    """The per-step ratios these options give on this grid (searching, or reading the cache)."""
    ratios, st, search = _options(options)
    steps = grid.steps
    if ratios == "none":
        return [1.0] * steps
    if ratios == "search":
        if context is None:
            raise ValueError("sampler.ratios=search needs a SamplerContext (the model, conditions, guidance)")
        return [float(r) for r in search_ratios(context, grid, st, search, verbose)["ratios"]]
    if isinstance(ratios, str):  # cpr:<file>
        file = Path(ratios[4:]).expanduser()
        try:
            coefficients = np.load(file, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - missing, unreadable or not an .npy
            raise UsageError(
                f"sampler.ratios={ratios}: cannot read CPR coefficients from {file} ({brief(e)})"
            ) from e
        guidance = 1.0 if context is None else float(context.guidance)
        return cpr_ratios(coefficients, guidance, steps, first=st.dc_order)
    if len(ratios) != steps:
        raise UsageError(f"sampler.ratios has {len(ratios)} entries; this run takes {steps} steps (one each)")
    return ratios


def run_dc_solver(
    denoise: Denoiser,
    x: torch.Tensor,
    grid: Grid,
    options: dict[str, Any],
    generators=None,
    context: SamplerContext | None = None,
) -> torch.Tensor:
    """DC-Solver on the grid: N evaluations of `denoise` for N steps (the search uses context.model)."""
    ratios = resolve_ratios(grid, options, context)
    _, st, _ = _options(options)
    return _solve(denoise, x, _levels(grid.sigmas), grid_timesteps(grid), ratios, st)


run_dc_solver.accepts = (  # type: ignore[attr-defined]
    "ratios",
    "order",
    "variant",
    "dc_order",
    "lower_order_final",
    "corrector",
    "correct_first",
    "calibration",
    "calibration_seed",
    "iterations",
    "lr",
    "reference",
    "reference_steps",
)
