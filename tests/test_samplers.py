"""Contract tests every registered sampler must pass (as diffusers' test_schedulers.py does).

The reference for convergence is scipy's DOP853 solution of the exact probability-flow ODE
(samplebench.metrics.reference), independent of every sampler under test.
"""

import inspect

import diffusers
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from samplebench.config import conf_dir
from samplebench.errors import UsageError
from samplebench.metrics.reference import solve_with_floor
from samplebench.samplers import SAMPLERS, get_sampler
from samplebench.samplers.base import CountingDenoiser, guided_denoiser
from samplebench.seeds import initial_noise, sampler_generators

ODE = [n for n, s in SAMPLERS.items() if s.kind == "ode"]
N = 96


def options(name):
    cfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / "sampler" / f"{name}.yaml"))
    assert cfg.pop("name") == name
    return cfg


def run(gmm, name, nfe, indices, guidance=1.0, opts=None, allow_lower=False):
    spec = SAMPLERS[name]
    x_T = initial_noise(0, indices, gmm.sample_shape, torch.float64, gmm.device)
    labels = gmm.conditions(indices, 0)
    counter = CountingDenoiser(guided_denoiser(gmm, labels, guidance))
    steps = spec.nfe_rule.steps(nfe, name, allow_lower)
    x = spec.run(
        counter, x_T, steps, opts or options(name), sampler_generators(0, indices), gmm.scheduler_config()
    )
    return x, counter.calls


@pytest.fixture(scope="module")
def solution(gmm):
    idx = list(range(N))
    x_T = initial_noise(0, idx, gmm.sample_shape, torch.float64, gmm.device)
    return solve_with_floor(gmm, x_T, gmm.conditions(idx, 0), 1.0)


@pytest.fixture(scope="module")
def reference(solution):
    return solution[0]


def traj_err(x, ref):
    return ((x - ref) ** 2).mean(1).sqrt().mean().item()


def test_every_conf_file_is_registered_and_vice_versa():
    files = sorted(p.stem for p in (conf_dir() / "sampler").glob("*.yaml"))
    assert files == sorted(SAMPLERS)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_options_are_real_scheduler_arguments(name):
    run_fn = SAMPLERS[name].run
    keywords = getattr(run_fn, "keywords", None)
    if keywords is None:  # native sampler: its options are documented in its module
        return
    cls = getattr(diffusers, keywords["class_name"])
    accepted = set(inspect.signature(cls.__init__).parameters) | set(SAMPLERS[name].step_options)
    assert set(options(name)) <= accepted


def _feasible(name, target):
    rule = SAMPLERS[name].nfe_rule
    return rule.nfe(rule.steps(target, name, allow_lower=True))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_counted_nfe_equals_requested(gmm, name):
    for target in (5, 10, 21):
        nfe = _feasible(name, target)
        _, calls = run(gmm, name, nfe, [0, 1, 2])
        assert calls == nfe, f"{name}: asked for {nfe}, counted {calls}"
        _, calls = run(gmm, name, nfe, [0, 1, 2], guidance=3.0)  # a batched guided step counts once
        assert calls == nfe


def test_nfe_a_sampler_cannot_spend_is_an_error():
    with pytest.raises(UsageError, match="cannot spend exactly nfe=10"):
        get_sampler("heun").nfe_rule.steps(10, "heun", allow_lower=False)
    assert get_sampler("heun").nfe_rule.steps(10, "heun", allow_lower=True) == 5  # 9 evaluations
    with pytest.raises(UsageError, match="too small"):
        get_sampler("pndm").nfe_rule.steps(1, "pndm", allow_lower=True)


@pytest.mark.parametrize("name", ODE)
def test_ode_samplers_converge_to_the_exact_solution(gmm, solution, name):
    reference, floor_points = solution
    budgets = [_feasible(name, n) for n in (10, 20, 40, 100, 400)]
    errs = [traj_err(run(gmm, name, nfe, list(range(N)))[0], reference) for nfe in budgets]
    # No level lies between sigma(t=0) and 0, so every sampler's last step is a jump whose error
    # does not shrink with NFE: errors fall until they reach this floor (about 6e-4 here).
    floor = traj_err(floor_points, reference)
    assert 1e-4 < floor < 2e-3
    for a, b in zip(errs, errs[1:], strict=False):
        assert b <= a + 2 * floor, f"{name}: traj_err grew from {a:.2e} to {b:.2e} ({errs})"
    assert errs[-1] < 0.05 * errs[0], f"{name}: {errs}"


def test_dpmpp_beats_ddim_at_10_nfe(gmm, reference):
    idx = list(range(N))
    assert traj_err(run(gmm, "dpmpp", 10, idx)[0], reference) < traj_err(
        run(gmm, "ddim", 10, idx)[0], reference
    )


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samples_do_not_depend_on_batch_composition(gmm, name):
    # Sample i starts from noise of (seed, i) and draws its own sampler noise: a batch of one and a
    # batch of many give the same sample to float round-off.
    nfe = _feasible(name, 10)
    together, _ = run(gmm, name, nfe, list(range(8)))
    alone = torch.cat([run(gmm, name, nfe, [i])[0] for i in (0, 5, 7)])
    torch.testing.assert_close(alone, together[[0, 5, 7]], rtol=1e-10, atol=1e-10)


def test_stochastic_samplers_are_stochastic(gmm):
    a, _ = run(gmm, "euler_a", 10, [0, 1])
    b, _ = run(gmm, "euler", 10, [0, 1])
    assert not torch.allclose(a, b)
    assert np.isfinite(a.numpy()).all()


def test_visited_subschedule_fixes_ddim_when_steps_do_not_divide_1000(gmm, reference):
    # diffusers' DDIM steps by t - 1000 // N; driven directly at N=400 its updates disagree with the
    # timesteps it visits. Through our adapter it converges like any first-order solver.
    err_400 = traj_err(run(gmm, "ddim", 400, list(range(N)))[0], reference)
    err_40 = traj_err(run(gmm, "ddim", 40, list(range(N)))[0], reference)
    assert err_400 < err_40 / 5
