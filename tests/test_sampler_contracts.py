"""Registry-wide contracts: every sampler, every schedule it takes, NFE 3..30 (issue 11, item 5).

Separate from test_samplers.py so pytest-xdist runs the two files side by side.
"""

import numpy as np
import pytest
import torch
from test_samplers import GRID_SCHEDULES, options, run, schedule_cfg, takes

from samplebench.errors import UsageError
from samplebench.samplers import SAMPLERS


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


@pytest.mark.parametrize("name", sorted(SAMPLERS))
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
