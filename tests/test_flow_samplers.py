"""The flow-matching foundation: the flow noise schedule and schedule=flow against diffusers' own
flow schedulers, Euler and Heun in flow time against diffusers' FlowMatch schedulers driven by hand
on the exact velocity of model=gmm_flow, and the guidance kinds.

References: diffusers FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler /
DPMSolverMultistepScheduler(use_flow_sigmas) (their sigmas and their step()), and the closed-form
identity that Euler in flow time is DDIM (both are exact for a constant denoiser).
"""

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)

from samplebench.config import plan
from samplebench.errors import UsageError
from samplebench.models import load_model
from samplebench.models.base import FLOW_T1_SIGMA, flow_schedule
from samplebench.samplers import get_sampler
from samplebench.samplers.base import CountingDenoiser, guided_denoiser
from samplebench.schedules import make_grid

# diffusers computes its sigmas in float32: 1.2e-7 relative, and t = 1 is our 1 - 1e-8.
F32 = 3e-7


@pytest.fixture(scope="module")
def flow():
    return load_model({"name": "gmm_flow", "shift": 3.0}, "cpu")


def times(grid):
    return (grid.sigmas / (1 + grid.sigmas)).numpy()


@pytest.mark.parametrize("shift,n", [(1.0, 4), (3.0, 10), (3.0, 1)])
def test_flow_schedule_is_flowmatch_eulers_sd3_spacing(shift, n):
    model = load_model({"name": "gmm_flow", "shift": shift}, "cpu")
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(n)
    grid = make_grid({"name": "flow"}, model.noise_schedule, n)
    np.testing.assert_allclose(times(grid), ref.sigmas.double().numpy(), rtol=F32, atol=F32)
    assert float(grid.sigmas[0]) == FLOW_T1_SIGMA


@pytest.mark.parametrize("mu,n", [(0.5, 4), (1.15, 28)])
def test_flow_schedule_is_fluxs_dynamic_shift(flow, mu, n):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)  # what FluxPipeline passes
    grid = make_grid({"name": "flow", "mu": mu, "end": "1/N"}, flow.noise_schedule, n)
    np.testing.assert_allclose(times(grid), ref.sigmas.double().numpy(), rtol=F32, atol=F32)


@pytest.mark.parametrize("n", [5, 12])
def test_flow_schedule_start_train_is_use_flow_sigmas(flow, n):
    ref = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    ref.set_timesteps(n)
    grid = make_grid({"name": "flow", "start": "train", "end": "1/N"}, flow.noise_schedule, n)
    np.testing.assert_allclose(times(grid), ref.sigmas.double().numpy(), rtol=F32, atol=F32)


def test_flow_training_levels_and_time_map():
    noise = flow_schedule(1000, 3.0)
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    t = (noise.train_sigmas / (1 + noise.train_sigmas)).numpy()
    np.testing.assert_allclose(t[::-1], ref.sigmas.double().numpy()[1:], rtol=F32)  # all but t = 1
    sigma = torch.tensor([1e-3, 0.5, 3.0, 999.0], dtype=torch.float64)
    torch.testing.assert_close(noise.t_to_sigma(noise.sigma_to_t(sigma)), sigma, rtol=1e-12, atol=0)
    # the transformer's timestep is T t (SD3: timestep = sigma * num_train_timesteps)
    half = torch.tensor([500.0], dtype=torch.float64)
    torch.testing.assert_close(noise.sigma_to_t(torch.tensor([1.0])), half)


def test_vp_only_schedules_refuse_flow_models(flow):
    for name in ("time_uniform", "trailing", "ays"):
        with pytest.raises(UsageError, match=f"schedule={name} is defined on a discrete") as e:
            make_grid({"name": name}, flow.noise_schedule, 8)
        assert "\n" not in str(e.value) and "flow" in str(e.value)


def _start(model, grid, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, 16, generator=g, dtype=torch.float64)
    labels = model.conditions(list(range(n)), seed)
    return x_T, labels, model.noise_schedule.initial_state(x_T, float(grid.sigmas[0]))


@pytest.mark.parametrize("model_name", ["gmm_flow", "gmm"])
def test_euler_in_flow_time_is_ddim_and_euler_in_sigma(model_name):
    """x_t' = x_t + (t' - t) v and x' = D + (sigma'/sigma)(x - D) are the same map (exact for constant D),
    on any model: equal up to float64 rounding of the coordinate changes."""
    model = load_model({"name": model_name}, "cpu")
    name = "flow" if model_name == "gmm_flow" else "karras"
    grid = make_grid({"name": name}, model.noise_schedule, 7)
    _, labels, x = _start(model, grid)
    den = guided_denoiser(model, labels, 1.0)
    out = {s: get_sampler(s).run(den, x, grid, {}, None) for s in ("flow_euler", "euler", "ddim")}
    scale = float(x.abs().max()) * 1e-14  # rounding of x (1 + sigma) round trips at sigma up to 1e8
    torch.testing.assert_close(out["flow_euler"], out["euler"], rtol=0, atol=max(scale, 1e-12))
    torch.testing.assert_close(out["flow_euler"], out["ddim"], rtol=0, atol=max(scale, 1e-12))


def _by_hand(scheduler, model, labels, x_T, guidance=1.0):
    """diffusers' own loop (as StableDiffusion3Pipeline runs it) on the exact guided velocity."""
    x_t = x_T.clone()
    for t in scheduler.timesteps:
        tt = float(t) / 1000.0
        tt = min(tt, 1.0 - 1e-12)
        ts = torch.full((len(x_t),), tt, dtype=torch.float64)
        v = model.velocity(x_t, ts, labels)
        if guidance != 1.0:
            u = model.velocity(x_t, ts, torch.full_like(labels, -1))
            v = u + guidance * (v - u)
        x_t = scheduler.step(v, t, x_t).prev_sample
    return x_t


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("n", [3, 8])
def test_flow_euler_and_heun_equal_diffusers_flowmatch_schedulers(flow, n, guidance):
    grid = make_grid({"name": "flow"}, flow.noise_schedule, n)
    x_T, labels, x = _start(flow, grid)
    for name, cls, evals in (
        ("flow_euler", FlowMatchEulerDiscreteScheduler, n),
        ("flow_heun", FlowMatchHeunDiscreteScheduler, 2 * n - 1),
    ):
        ref_sched = cls(num_train_timesteps=1000, shift=3.0)
        ref_sched.set_timesteps(n)
        ref = _by_hand(ref_sched, flow, labels, x_T, guidance)
        counter = CountingDenoiser(guided_denoiser(flow, labels, guidance))
        ours = get_sampler(name).run(counter, x, grid, {}, None)
        assert counter.calls == evals == get_sampler(name).rule({}, {}).nfe(n)
        # diffusers steps with float32 sigmas (1e-7 relative in each dt) on float64 states of size ~5
        torch.testing.assert_close(ours, ref, rtol=0, atol=5e-6)


def test_flow_heun_is_second_order_and_flow_euler_first(flow):
    """Errors against a fine flow_heun solution (1024 steps) halve / quarter as the steps double."""
    fine_grid = make_grid({"name": "flow"}, flow.noise_schedule, 1024)
    _, labels, x = _start(flow, fine_grid)
    den = guided_denoiser(flow, labels, 1.0)
    fine = get_sampler("flow_heun").run(den, x, fine_grid, {}, None)
    for name, order in (("flow_euler", 1), ("flow_heun", 2)):
        errs = []
        for n in (32, 64, 128):
            grid = make_grid({"name": "flow"}, flow.noise_schedule, n)
            out = get_sampler(name).run(den, x, grid, {}, None)
            errs.append(float((out - fine).pow(2).mean().sqrt()))
        rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
        assert np.all(np.abs(rates - order) < 0.3), (name, errs, rates)


class _Embedded:
    """A stand-in model of guidance_kind "embedded": the condition carries w, one pass per call."""

    guidance_kind = "embedded"

    def __init__(self):
        self.calls = []

    def with_guidance(self, cond, w):
        return (cond, w)

    def denoise(self, x, sigma, cond):
        self.calls.append((len(x), cond))
        return x * 0 + cond[1]


def test_embedded_guidance_is_one_pass_with_w_in_the_condition():
    model = _Embedded()
    den = guided_denoiser(model, "prompt", 3.5)
    out = den(torch.zeros(2, 3), torch.tensor(1.0))
    assert model.calls == [(2, ("prompt", 3.5))] and float(out[0, 0]) == 3.5


def test_a_model_without_guidance_runs_at_guidance_1_in_a_guided_sweep(capsys):
    from omegaconf import OmegaConf

    from samplebench.config import conf_dir

    assert OmegaConf.load(conf_dir() / "model" / "gmm.yaml").get("guidance_kind") is None
    cells = plan(["model=gmm", "+model.guidance_kind=none", "sampler=ddim", "nfe=5", "guidance=1,7.5"])
    assert [c.guidance for c in cells] == [1.0]
    assert "takes no guidance" in capsys.readouterr().err
    with pytest.raises(UsageError, match="guidance_kind=maybe is unknown"):
        plan(["model=gmm", "+model.guidance_kind=maybe", "sampler=ddim", "nfe=5"])


def test_samplers_on_vp_training_time_refuse_flow_models_in_one_line(flow):
    spec = get_sampler("deis_tab")
    with pytest.raises(UsageError, match="sampler=deis_tab needs a discrete diffusion") as e:
        spec.model_check({}, {"name": "gmm_flow"})
    assert "\n" not in str(e.value)
    spec.model_check({}, {"name": "gmm"})  # a VP model is fine
    grid = make_grid({"name": "flow"}, flow.noise_schedule, 4)
    _, labels, x = _start(flow, grid)
    with pytest.raises(UsageError, match="deis_rhoab or deis_rhork"):  # the generate-time check too
        spec.run(guided_denoiser(flow, labels, 1.0), x, grid, {}, None)


def test_flow_models_default_to_the_flow_schedule_unless_one_is_chosen():
    """model.default_schedule (flow models: flow) applies where the sweep names no schedule."""
    (cell,) = plan(["model=gmm_flow", "sampler=flow_euler", "nfe=5"])
    assert cell.schedule["name"] == "flow"
    (cell,) = plan(["model=gmm_flow", "sampler=flow_euler", "nfe=5", "schedule=karras"])
    assert cell.schedule["name"] == "karras"
    cells = plan(["model=gmm,gmm_flow", "sampler=euler", "nfe=5"])
    assert {c.model["name"]: c.schedule["name"] for c in cells} == {"gmm": "karras", "gmm_flow": "flow"}
