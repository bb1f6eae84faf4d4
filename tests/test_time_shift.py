"""Time-shift samplers (ts_ddim, ts_dpmpp; samplebench/samplers/time_shift.py): exact properties.

Reference for the selection rule: Mingxiao-Li/TS-DPM, sampler/pnm_solver.py `PNMSolver.apply_time_shift`
(the same rule as dpm_solver_utils.py `DPM_Solver.time_shift`; deis_sampler.py
`DEIS_Sampler.apply_time_shift` differs only in using window_size itself as the half-width),
transcribed below in plain numpy float64 (`official_shift`). Reference for where the shifted time
goes: `PNMSolver.sample` (ts_ddim: the target of the DDIM transfer) and `DEIS_Sampler`'s eps_fn
(ts_dpmpp: the model input time, coefficients on the schedule).
"""

import math

import numpy as np
import pytest
import torch
from test_samplers import options, run

from samplebench.errors import UsageError
from samplebench.models.gmm import GaussianMixtureModel, MixtureSpec
from samplebench.samplers import SAMPLERS
from samplebench.samplers.base import CountingDenoiser, guided_denoiser
from samplebench.samplers.time_shift import sample_ts_ddim, sample_ts_dpmpp, select_levels
from samplebench.schedules import make_grid

IDX = list(range(16))
BASE = {"ts_ddim": "ddim", "ts_dpmpp": "dpmpp"}


@pytest.fixture(scope="module")
def narrow():
    """A mixture with a per-sample spread below the noise's (Var(x_0) ~ 0.2-0.5 per element, like
    images in [-1, 1]): its states' variances fall inside the windows, not only past their edges."""
    return GaussianMixtureModel(MixtureSpec(spread=0.4, scale=0.6, min_scale=0.3), torch.device("cpu"))


def official_shift(x_vp, alphas_cumprod, t_next, window_size, cut_off_value):
    """Float64 transcription of TS-DPM PNMSolver.apply_time_shift (sampler/pnm_solver.py): the
    unbiased per-sample variance over all elements; alpha_list = 1 - alphas_cumprod; the candidates
    alpha_list[t_next - w//2 : t_next + w//2 + 1], cut at 0 and at T (where the official code's top
    branch names a missing attribute, self.alpha_bar: written here as meant, the list's tail); the
    first argmin of the squared distance; t_next itself when t_next <= cut_off_value."""
    half = window_size // 2
    alpha_list = 1.0 - np.asarray(alphas_cumprod, dtype=np.float64)
    var = np.var(np.asarray(x_vp, dtype=np.float64).reshape(len(x_vp), -1), axis=1, ddof=1)
    if t_next - half > 0 and t_next + half + 1 < len(alpha_list):
        time_list = alpha_list[t_next - half : t_next + half + 1]
    elif t_next - half <= 0:
        time_list = alpha_list[0 : t_next + half + 1]
    else:
        time_list = alpha_list[t_next - half :]
    dist = (var[:, None] - time_list[None, :]) ** 2
    next_t = np.argmin(dist, axis=1)
    n_t = next_t + t_next - half if t_next - half > 0 else next_t
    return n_t if t_next > cut_off_value else np.full(len(var), t_next)


def _half(name, opts=None):
    return int((opts or options(name))["window"]) // 2


# -- off switches: the base sampler bit for bit ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BASE))
@pytest.mark.parametrize("schedule", ["karras", "linspace", "time_uniform"])
def test_window_zero_or_top_cutoff_is_the_base_sampler_bit_for_bit(gmm, name, schedule):
    # Reference: the base samplers ddim (eta = 0) and dpmpp, run through the same registry helper.
    for nfe in (5, 10, 20):
        base, _ = run(gmm, BASE[name], nfe, IDX, schedule=schedule)
        for off in ({"window": 0}, {"cutoff": 999}, {"cutoff": 5000}, {"window": 0, "cutoff": 0}):
            out, calls = run(gmm, name, nfe, IDX, schedule=schedule, opts={**options(name), **off})
            assert calls == nfe and torch.equal(out, base), (name, schedule, nfe, off)
        # ...and at the defaults the shift does act on this model (the equality above is not vacuous).
        shifted, _ = run(gmm, name, nfe, IDX, schedule=schedule)
        assert float((shifted - base).abs().max() / base.abs().max()) > 1e-3, (name, schedule, nfe)


# -- a state whose variance is exactly 1 - abar is not shifted ---------------------------------------


def _unit_variance_rows(rows, dim, seed=0):
    z = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(1, keepdim=True)
    return z / z.std(1, keepdim=True)  # unbiased variance 1 per row, to round-off


@pytest.mark.parametrize("centre", [640.0, 640.37, 301.5, 998.2, 3.0])
def test_selection_keeps_the_scheduled_time_when_the_variance_matches_it(gmm, centre):
    # Reference: the selection rule (the distance is 0 at the scheduled time, >= ~1e-8 at any other).
    noise = gmm.noise_schedule
    sigma_c = float(noise.t_to_sigma(torch.tensor(centre, dtype=torch.float64)))
    sigma_state = 2.7  # any level: the state's VP input is x / sqrt(1 + sigma_state^2)
    target = sigma_c**2 / (1 + sigma_c**2)
    x = _unit_variance_rows(4, 16) * math.sqrt(target * (1 + sigma_state**2))
    var = x.reshape(4, -1).div(math.sqrt(1 + sigma_state**2)).var(1).numpy()
    sig, shifted = select_levels(var, centre, sigma_c, 15, noise)
    assert not shifted.any() and (sig == sigma_c).all()
    # The variance of the training timestep k a few steps up: the same call moves every sample to k.
    k = min(round(centre) + 5, 999)
    sigma_k = float(noise.train_sigmas[k])
    sig, shifted = select_levels(var / target * sigma_k**2 / (1 + sigma_k**2), centre, sigma_c, 15, noise)
    assert shifted.all() and (sig == sigma_k).all()


def _vp_prior_denoiser(x, sigma):
    """D for x_0 ~ N(0, I): x / (1 + sigma^2) (a scalar or one level per sample)."""
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (x.dim() - 1)))
    return x / (1 + s**2)


@pytest.mark.parametrize("name", sorted(BASE))
def test_a_state_with_the_scheduled_variance_is_not_shifted(gmm, name):
    # Reference: the base sampler bit for bit, on a start constructed so that the one state the
    # shift may act on (step 1) has Var(x_vp) = 1 - abar of the window's centre exactly, with
    # D = x / (1 + sigma^2): every step is then x -> k x, k a scalar computed here.
    noise = gmm.noise_schedule
    steps = 4 if name == "ts_ddim" else 3  # karras: the last positive level is t = 0, never shifted
    grid = make_grid({"name": "karras"}, noise, steps)
    s = [float(v) for v in grid.sigmas]
    if name == "ts_ddim":  # step 0: x1 = D + s1 (x - D) / s0; window centred on t_2
        k = 1 / (1 + s[0] ** 2) + s[1] / s[0] * (1 - 1 / (1 + s[0] ** 2))
        centre = s[2]
    else:  # DPM-Solver++ first-order step 0: x1 = (s1/s0) x - expm1(-h) D; window centred on t_1
        k = s[1] / s[0] - math.expm1(-math.log(s[0] / s[1])) / (1 + s[0] ** 2)
        centre = s[1]
    var_x1 = centre**2 / (1 + centre**2) * (1 + s[1] ** 2)  # Var(x1) for Var(x1_vp) = 1 - abar
    z = _unit_variance_rows(6, 16, seed=3)
    opts = {"window": 60, "cutoff": 0}
    for scale, same in ((1.0, True), (1.05, False)):
        x = z * math.sqrt(var_x1) / abs(k) * scale
        counter = CountingDenoiser(_vp_prior_denoiser, record=True)
        out = SAMPLERS[name].run(counter, x, grid, opts, None)
        base = SAMPLERS[BASE[name]].run(_vp_prior_denoiser, x, grid, options(BASE[name]), None)
        assert torch.equal(out, base) == same, (name, scale)
        levels = [v.reshape(-1) for _, v in counter.visits]
        assert all((lv == s[i]).all() for i, lv in enumerate(levels)) == (same or name == "ts_ddim")


# -- the shift never leaves the window ----------------------------------------------------------------


def _in_window(noise, level, s_i, t_i, t_prev, t_next, half):
    """A visited level is the scheduled one, or an integer training timestep's level within `half`
    of the scheduled time t_i and nearer it than either neighbour (the module's midpoint clip)."""
    if level == s_i:
        return "scheduled"
    tau = float(noise.sigma_to_t(torch.tensor(level, dtype=torch.float64)))
    k = round(tau)
    ok = abs(tau - k) < 1e-6 and 0 <= k <= noise.num_train_timesteps - 1 and abs(k - t_i) <= half
    ok = ok and 0.5 * (t_i + t_next) < k < 0.5 * (t_prev + t_i)
    assert ok, f"level {level} (t = {tau}) outside the window around t = {t_i} (half-width {half})"
    assert level == float(noise.train_sigmas[k]), "a shifted level is the training level itself"
    return "shifted"


@pytest.mark.parametrize("window", [30, 60])
@pytest.mark.parametrize("schedule", ["karras", "linspace", "time_uniform", "logsnr"])
def test_ts_dpmpp_calls_the_model_only_inside_the_window(gmm, narrow, schedule, window):
    # Reference: the window definition (window // 2 each side, TS-DPM's dpm_solver/pnm_solver).
    opts = {**options("ts_dpmpp"), "window": window}
    seen = set()
    for model in (gmm, narrow):
        noise = model.noise_schedule
        for nfe in (5, 10, 20):
            _, _, counter, grid, _ = run(
                model, "ts_dpmpp", nfe, IDX, opts=opts, schedule=schedule, record=True
            )
            s = [float(v) for v in grid.sigmas]
            t = noise.sigma_to_t(grid.sigmas).tolist()
            for i, (_, sigma) in enumerate(counter.visits):
                levels = sigma.reshape(-1).tolist()
                if i == 0 or not t[i] > opts["cutoff"]:
                    assert levels == [s[i]] * len(levels)  # the first step and those below the cutoff
                    continue
                for lv in levels:
                    seen.add(_in_window(noise, lv, s[i], t[i], t[i - 1], t[i + 1], window // 2))
    assert "shifted" in seen  # the check is not vacuous


def _ddim_targets(model, labels, counter, grid, half, cutoff):
    """Per step and sample, the training timestep each ts_ddim step went to, recovered from the
    recorded states: the one candidate k (an integer in the window, or the scheduled time) whose DDIM
    transfer x' = (D + sigma_k eps) sqrt((1 + sigma_{i+1}^2) / (1 + sigma_k^2)) is the next state."""
    noise = model.noise_schedule
    s = [float(v) for v in grid.sigmas]
    t = noise.sigma_to_t(grid.sigmas).tolist()
    found = {}
    for i in range(1, len(s) - 2):
        (x, sig), (x_next, _) = counter.visits[i], counter.visits[i + 1]
        assert sig.reshape(-1).tolist() == [s[i]]  # ts_ddim evaluates the model at scheduled levels only
        if not t[i + 1] > cutoff:
            continue
        d = model.denoise(x, torch.full((len(x),), s[i], dtype=torch.float64), labels)
        eps = (x - d) / s[i]
        ks = [k for k in range(math.ceil(t[i + 1] - half), math.floor(t[i + 1] + half) + 1) if 0 <= k < 1000]
        cands = [(t[i + 1], s[i + 1])] + [(k, float(noise.train_sigmas[k])) for k in ks]
        for b in range(len(x)):
            hits = []
            for tk, sk in cands:
                pred = (d[b] + sk * eps[b]) * math.sqrt((1 + s[i + 1] ** 2) / (1 + sk**2))
                if float((pred - x_next[b]).abs().max()) <= 1e-12 * float(x_next[b].abs().max()):
                    hits.append(tk)
            assert len(hits) >= 1, f"step {i} sample {b}: the next state is no transfer into the window"
            found[i, b] = hits[0]
    return found


@pytest.mark.parametrize("schedule", ["karras", "linspace", "time_uniform"])
def test_ts_ddim_transfers_only_to_times_inside_the_window(gmm, narrow, schedule):
    # Reference: TS-DPM PNMSolver.sample/transfer: the DDIM transfer from the scheduled t_i to tau, the
    # next step's model call at the unshifted t_{i+1}; window // 2 each side of t_{i+1}.
    opts = {**options("ts_ddim"), "window": 60}
    shifted = 0
    for model in (gmm, narrow):
        labels = model.conditions(IDX, 0)
        for nfe in (5, 10, 20):
            _, _, counter, grid, _ = run(
                model, "ts_ddim", nfe, IDX, opts=opts, schedule=schedule, record=True
            )
            t = model.noise_schedule.sigma_to_t(grid.sigmas).tolist()
            for (i, _), tau in _ddim_targets(model, labels, counter, grid, 30, opts["cutoff"]).items():
                assert abs(tau - t[i + 1]) <= 30 and 0.5 * (t[i + 1] + t[i + 2]) < tau < 0.5 * (
                    t[i] + t[i + 1]
                )
                shifted += tau != t[i + 1]
    assert shifted > 0


# -- the official selection rule, transcribed -----------------------------------------------------------


@pytest.mark.parametrize("window_size", [5, 30, 31])
@pytest.mark.parametrize("t_next", [3, 14, 300, 551, 700, 990, 999])
def test_selection_matches_the_official_rule_on_synthetic_states(gmm, t_next, window_size):
    # Reference: official_shift (TS-DPM PNMSolver.apply_time_shift, transcribed above) at an integer
    # scheduled time, on states whose variances span the window and beyond it on both sides.
    noise = gmm.noise_schedule
    half = window_size // 2
    lo, hi = max(t_next - half - 3, 0), min(t_next + half + 3, 999)
    ac = gmm.alphas_cumprod.numpy()
    targets = np.linspace(1 - ac[lo], 1 - ac[hi], 41)
    sigma_state = 1.3
    x = _unit_variance_rows(len(targets), 64, seed=t_next) * torch.tensor(
        np.sqrt(targets * (1 + sigma_state**2)) * (1 + 1e-7)  # a hair off the levels: no exact ties
    ).reshape(-1, 1)
    x_vp = (x / math.sqrt(1 + sigma_state**2)).numpy()
    var = np.var(x_vp, axis=1, ddof=1)
    sigma_c = float(noise.train_sigmas[t_next])
    for cutoff in (0, 550):
        if t_next > cutoff:  # the samplers apply the rule only above the cutoff
            sig, shifted = select_levels(var, float(t_next), sigma_c, half, noise)
        else:
            sig, shifted = np.full(len(var), sigma_c), np.zeros(len(var), bool)
        tau = official_shift(x_vp, ac, t_next, window_size, cutoff)
        np.testing.assert_array_equal(sig, noise.train_sigmas.numpy()[tau])
        np.testing.assert_array_equal(shifted, tau != t_next)
        assert len(set(tau.tolist())) > 2 or t_next <= cutoff  # the states reach many candidates


def test_samplers_pick_the_official_times_on_the_analytic_model(narrow):
    # Reference: official_shift on the states the samplers actually visit, on diffusers' linspace grid
    # (integer scheduled times, as in TS-DPM): ts_dpmpp's model call levels, and ts_ddim's transfer
    # targets recovered from its states, are the transcription's tau for every sample and step.
    noise, ac = narrow.noise_schedule, narrow.alphas_cumprod.numpy()
    labels = narrow.conditions(list(range(64)), 0)
    for nfe in (5, 10, 20):
        opts = {"window": 30, "cutoff": 300}
        _, _, counter, grid, _ = run(
            narrow, "ts_dpmpp", nfe, list(range(64)), opts=opts, schedule="linspace", record=True
        )
        t = [round(v) for v in noise.sigma_to_t(grid.sigmas).tolist()]
        for i, (x_in, sigma) in enumerate(counter.visits[1:], start=1):
            sig = sigma.reshape(-1).expand(len(x_in))
            x_vp = (x_in / (1 + sig.reshape(-1, 1) ** 2).sqrt()).numpy()  # the VP input the network saw
            tau = official_shift(x_vp, ac, t[i], 30, 300)
            np.testing.assert_array_equal(sig.numpy(), noise.train_sigmas.numpy()[tau])
        opts = {"window": 30, "cutoff": 300}
        _, _, counter, grid, _ = run(
            narrow, "ts_ddim", nfe, list(range(64)), opts=opts, schedule="linspace", record=True
        )
        t = [round(v) for v in noise.sigma_to_t(grid.sigmas).tolist()]
        for (i, b), tau in _ddim_targets(narrow, labels, counter, grid, 15, 300).items():
            x_vp = (counter.visits[i][0][b : b + 1] / math.sqrt(1 + float(grid.sigmas[i]) ** 2)).numpy()
            assert tau == official_shift(x_vp, ac, t[i + 1], 30, 300)[0], (nfe, i, b)


# -- options and plumbing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [sample_ts_ddim, sample_ts_dpmpp])
@pytest.mark.parametrize(
    "bad", [{"window": -2}, {"cutoff": -1}, {"window": 2.5}, {"cutoff": "300"}, {"window": True}]
)
def test_bad_options_are_one_line_errors(gmm, fn, bad):
    grid = make_grid({"name": "karras"}, gmm.noise_schedule, 5)
    x = torch.zeros(2, 16, dtype=torch.float64)
    key = next(iter(bad))
    with pytest.raises(
        ValueError, match=rf"^sampler\.{key}=.* must be a non-negative integer .*e\.g\. sampler\.{key}=\d+"
    ) as e:
        fn(_vp_prior_denoiser, x, grid.sigmas, None, noise=gmm.noise_schedule, **bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="noise schedule"):
        fn(_vp_prior_denoiser, x, grid.sigmas, None)
    # The registry checks them when a sweep is planned: a UsageError (one line, exit code 2).
    name = "ts_ddim" if fn is sample_ts_ddim else "ts_dpmpp"
    with pytest.raises(UsageError, match=rf"^sampler\.{key}="):
        SAMPLERS[name].check({**options(name), **bad})
    SAMPLERS[name].check(options(name))


def test_guided_denoiser_takes_one_level_per_sample(gmm):
    # Reference: the same guided denoiser called one sample at a time with a scalar level.
    idx = list(range(5))
    labels = gmm.conditions(idx, 0)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 4
    sig = torch.tensor([0.3, 1.0, 2.5, 7.0, 14.0], dtype=torch.float64)
    together = guided_denoiser(gmm, labels, 3.0)(x, sig)
    for b in idx:
        alone = guided_denoiser(gmm, labels[b : b + 1], 3.0)(x[b : b + 1], sig[b])
        torch.testing.assert_close(together[b : b + 1], alone, rtol=1e-12, atol=1e-12)
