"""Registry-wide contracts: every sampler, every schedule it takes, NFE 3..30 (issue 11, item 5).

Separate from test_samplers.py so pytest-xdist runs the two files side by side.
"""

import numpy as np
import pytest
import torch
from test_samplers import GRID_SCHEDULES, VP_SAMPLERS, options, run, schedule_cfg, takes

from samplebench.errors import UsageError
from samplebench.samplers import SAMPLERS
from samplebench.schedules import make_grid


def _order_variants(name):
    """Every order-like option value the sampler documents, one run each."""
    base = contract_options(name)
    values = dict(SAMPLERS[name].choices)
    if "solver_order" in base:  # diffusers' multistep schedulers take orders 1-3
        values["solver_order"] = (1, 2, 3)
    return [base] + [{**base, key: v} for key, vals in values.items() for v in vals]


CONTRACT_NFE = list(range(3, 31))
# Options that keep a per-grid search cheap across the 200-odd grids below (the contract is about the
# sampler's calls, not the searched values; test_dc_solver.py checks the search at its defaults).
CONTRACT_OPTIONS = {"dc_solver": {"calibration": 2, "iterations": 2}}
# dc_solver searches its ratios against an exact reference for every new grid (~1 s each here), so it
# runs the contract on a spread of the budgets instead of all 28.
CONTRACT_NFE_FOR = {"dc_solver": (3, 4, 5, 7, 10, 16, 23, 30)}


def contract_options(name):
    return {**options(name), **CONTRACT_OPTIONS.get(name, {})}


@pytest.mark.parametrize("name", VP_SAMPLERS)
def test_registry_contracts_on_every_schedule(gmm, name):
    """For NFE 3..30 on every schedule the sampler takes: the first call is at the grid's first level
    from x_T sqrt(1 + sigma_0^2); no two calls sit at one level unless the algorithm says it needs
    that (Heun's corrector); finite inputs give finite outputs for every order option."""
    spec = SAMPLERS[name]
    idx = [0, 1, 2]
    for schedule in GRID_SCHEDULES:
        if not takes(name, schedule):
            with pytest.raises(UsageError, match="cannot run schedule"):
                run(gmm, name, 10, idx, schedule=schedule, opts=contract_options(name))
            continue
        for nfe in CONTRACT_NFE_FOR.get(name, CONTRACT_NFE):
            rule = spec.rule(options(name), schedule_cfg(schedule))
            try:
                steps = rule.steps(nfe, name, allow_lower=False)
            except UsageError:
                continue
            if steps < 2:
                continue
            try:
                out, calls, counter, grid, x0 = run(
                    gmm, name, nfe, idx, schedule=schedule, record=True, opts=contract_options(name)
                )
            except UsageError as e:  # integer timesteps that collide at this N: an explained refusal
                assert "repeated" in str(e), str(e)
                continue
            first_x, first_sigma = counter.visits[0]
            s0 = float(first_sigma.reshape(-1)[0])
            if spec.skips_levels:  # teleportation: the first `skip` intervals are crossed without the network
                skip = options(name)["skip"]
                assert s0 == pytest.approx(float(grid.sigmas[skip]), rel=1e-12), (name, schedule, nfe)
            # diffusers' spacings are its own per scheduler (README); every other grid is ours exactly.
            expected = float(grid.sigmas[0])
            if spec.family == "diffusers" and "integer" in spec.grids:  # rounded to a training timestep
                noise = gmm.noise_schedule
                expected = float(noise.t_to_sigma(noise.sigma_to_t(grid.sigmas[:1]).round())[0])
            if not spec.skips_levels and not (
                spec.family == "diffusers" and schedule in ("linspace", "leading", "trailing")
            ):
                assert s0 == pytest.approx(expected, rel=1e-6), (
                    f"{name} {schedule} nfe={nfe}: first call at sigma={s0}, expected {expected}"
                )
            x_T = x0 / np.sqrt(1 + float(grid.sigmas[0]) ** 2)
            if not spec.skips_levels:  # (a teleported start is checked in test_teleport.py)
                torch.testing.assert_close(first_x, x_T * np.sqrt(1 + s0**2), rtol=1e-6, atol=1e-6)
            levels = [float(s.reshape(-1)[0]) for _, s in counter.visits]
            if not spec.repeats_levels:
                assert len(set(np.round(levels, 12))) == len(levels), (
                    f"{name} {schedule} nfe={nfe}: repeated levels {levels}"
                )
            assert torch.isfinite(out).all(), f"{name} {schedule} nfe={nfe}"
    for opt in _order_variants(name):
        for nfe in (3, 4, 7, 16, 30):
            try:
                steps = spec.rule(opt, {"name": "karras"}).steps(nfe, name, allow_lower=True)
            except UsageError:
                continue
            out, _ = run(gmm, name, spec.rule(opt, {"name": "karras"}).nfe(steps), idx, opts=opt)
            assert torch.isfinite(out).all(), f"{name} {opt} nfe={nfe}"


# -- flow-matching models (issue 14) ---------------------------------------------------------------
FLOW_SCHEDULES = {
    "flow": {"name": "flow"},  # SD3's spacing from t = 1 (FlowMatch schedulers' own)
    "flow[start=train,end=1/N]": {"name": "flow", "start": "train", "end": "1/N"},  # use_flow_sigmas
    "flow[end=1/N]": {"name": "flow", "end": "1/N"},  # FLUX's spacing
}
# The diffusers entries that take a flow model, and the native samplers the flow study runs.
FLOW_SAMPLERS = sorted(
    [n for n in SAMPLERS if n.startswith("diffusers:") and SAMPLERS[n].run.keywords["models"] != "vp"]
    + ["flow_euler", "flow_heun", "euler", "heun", "dpmpp", "unipc"]
)
# diffusers schedulers without a list of times run only their own spacing on a flow model.
OWN_SPACING = {
    "diffusers:flow_heun": "flow",
    "diffusers:dpmpp": "flow[start=train,end=1/N]",
    "diffusers:dpmpp_3m": "flow[start=train,end=1/N]",
}


@pytest.fixture(scope="module")
def gmm_flow():
    from samplebench.models.gmm import FlowMixtureModel, MixtureSpec

    return FlowMixtureModel(MixtureSpec(shift=3.0), torch.device("cpu"))


@pytest.mark.parametrize("name", FLOW_SAMPLERS)
def test_registry_contracts_on_a_flow_model(gmm_flow, name):
    """gmm_flow, NFE 3..30 on each flow spacing: counted NFE equals the request; the first call is at the
    scheduler's own first flow time (the grid's to 2e-6 in t: float32 rounding of the times and
    UniPC's own t = 1 - 1e-6 guard), from x_t = x_T (x = x_T (1 + sigma)); no level twice unless the
    algorithm says so; finite samples. A scheduler asked for a spacing it cannot run says so."""
    spec = SAMPLERS[name]
    idx = [0, 1, 2]
    for label, schedule in FLOW_SCHEDULES.items():
        if name in OWN_SPACING and OWN_SPACING[name] != label:
            with pytest.raises(UsageError, match="only on its own spacing"):
                run(gmm_flow, name, 9, idx, schedule=schedule, opts=options(name), allow_lower=True)
            continue
        for nfe in CONTRACT_NFE:
            try:
                spec.rule(options(name), schedule).steps(nfe, name, allow_lower=False)
            except UsageError:
                continue
            out, calls, counter, grid, x0 = run(
                gmm_flow, name, nfe, idx, schedule=schedule, record=True, opts=options(name)
            )
            assert calls == nfe, f"{name} {label}: asked for {nfe}, counted {calls}"
            first_x, first_sigma = counter.visits[0]
            s0 = float(first_sigma.reshape(-1)[0])
            g0 = float(grid.sigmas[0])
            assert s0 / (1 + s0) == pytest.approx(g0 / (1 + g0), abs=2e-6), (name, label, nfe)
            x_T = x0 / (1 + g0)
            torch.testing.assert_close(first_x, x_T * (1 + s0), rtol=1e-9, atol=0)
            levels = [float(s.reshape(-1)[0]) for _, s in counter.visits]
            if not spec.repeats_levels:
                assert len(set(np.round(levels, 9))) == len(levels), (name, label, nfe, levels)
            assert torch.isfinite(out).all(), (name, label, nfe)


@pytest.mark.parametrize("name", sorted(n for n in SAMPLERS if n.startswith("diffusers:")))
def test_diffusers_schedulers_refuse_the_other_model_kind(gmm, gmm_flow, name):
    """A VP-only diffusers scheduler on a flow model, or a FlowMatch scheduler on a VP model: a one-line
    UsageError when the sweep is planned (model_check) and, for a model the config cannot tell, when
    the sampler runs."""
    models = SAMPLERS[name].run.keywords["models"]
    check = SAMPLERS[name].model_check
    for model, cfg, wrong in (
        (gmm, {"name": "gmm"}, models == "flow"),
        (gmm_flow, {"name": "gmm_flow"}, models == "vp"),
    ):
        if not wrong:
            check(options(name), cfg)
            continue
        with pytest.raises(UsageError, match="models only") as e:
            check(options(name), cfg)
        assert "\n" not in str(e.value)
        # generate time (a model the config cannot tell): the sampler itself refuses, whatever the grid
        grid = make_grid({"name": "flow"}, model.noise_schedule, 5)
        x = model.noise_schedule.initial_state(torch.zeros(1, 16, dtype=torch.float64), float(grid.sigmas[0]))
        with pytest.raises(UsageError, match="models only"):
            SAMPLERS[name].run(lambda y, s: y, x, grid, options(name), None)


def test_a_plan_refuses_the_wrong_model_kind_in_one_line(tmp_path):
    from cli_run import cli_here

    where = f"results_dir={tmp_path}"
    r = cli_here("sweep", "model=gmm", "sampler=diffusers:flow_euler", "nfe=5", where)
    assert r.returncode == 2 and "flow-matching models only" in r.stderr, r.stderr
    r = cli_here("sweep", "model=gmm_flow", "schedule=flow", "sampler=diffusers:euler", "nfe=5", where)
    assert r.returncode == 2 and "discrete diffusion (VP) models only" in r.stderr, r.stderr
    assert not list(tmp_path.rglob("*.npz"))  # refused before anything was generated
