"""Few-step models and samplers: LCM (consistency boundary condition in D, guidance as a w embedding),
the lcm / tcd samplers against diffusers' LCMScheduler / TCDScheduler driven by hand, LCM's own grid
(schedule=lcm), a tiny LatentConsistencyModelPipeline through the CLI against the pipeline's own
output, and one sweep mixing sd15 with few-step models (paths=) into one leaderboard and one Pareto plot.
"""

import os

import diffusers
import numpy as np
import pandas as pd
import pytest
import tiny_fewstep_models
import tiny_models
import torch
from cli_run import cli, cli_here

from samplebench import store
from samplebench.models import load_model
from samplebench.prompts import BUILTIN_PROMPTS
from samplebench.samplers import get_sampler
from samplebench.samplers.base import CountingDenoiser, guided_denoiser, noise_like
from samplebench.schedules import make_grid
from samplebench.seeds import initial_noise, sampler_generators

SEED, N_IMAGES = 0, 2


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewstep")
    return {
        "lcm": tiny_fewstep_models.make_tiny_lcm(root / "lcm"),
        "sd15": tiny_models.make_tiny_sd(root / "sd15"),
    }


@pytest.fixture(scope="module")
def lcm_model(pipelines):
    return load_model(
        {
            "name": "lcm",
            "path": str(pipelines["lcm"]),
            "dtype": "fp32",
            "guidance_kind": "embedded",
            "boundary_condition": "lcm",
        },
        "cpu",
    )


def _same_noise(monkeypatch, module, generators):
    """Make diffusers' scheduler draw its step noise as samplebench's samplers do (noise_like over the
    per-sample generators), so the two runs see the same noise."""

    def randn_tensor(shape, generator=None, device=None, dtype=None, **kw):
        return noise_like(torch.empty(shape, dtype=dtype or torch.float32), generators)

    monkeypatch.setattr(module, "randn_tensor", randn_tensor)


# -- schedule=lcm --------------------------------------------------------------------------------
@pytest.mark.parametrize("original", [50, 25, 1000])
def test_lcm_schedule_is_the_lcm_and_tcd_schedulers_timesteps(lcm_model, original):
    """Reference: LCMScheduler.set_timesteps(N, original_inference_steps=K) and TCDScheduler's: its
    default (K from its config, 50) and, given any original_inference_steps, all T timesteps (K = T):
    the grid's levels are the training sigmas at exactly their integer timesteps."""
    noise = lcm_model.noise_schedule
    config = lcm_model.pipe.scheduler.config
    for n in range(1, 9):
        grid = make_grid({"name": "lcm", "original_steps": original}, noise, n)
        lcm = diffusers.LCMScheduler.from_config(config)
        lcm.set_timesteps(n, original_inference_steps=original)
        tcd = diffusers.TCDScheduler.from_config(config, original_inference_steps=original)
        if original == 1000:
            tcd.set_timesteps(n, original_inference_steps=50)  # any value: TCD's "customised" grid
        else:
            tcd.set_timesteps(n)
        for sched in (lcm, tcd):
            t = sched.timesteps.long()
            torch.testing.assert_close(grid.sigmas[:-1], noise.train_sigmas[t], rtol=0, atol=0)
        assert float(grid.sigmas[-1]) == 0.0


# -- the lcm sampler and the LCM model's D against LCMScheduler + the raw UNet ------------------------
@pytest.mark.parametrize("sampler", ["lcm", "diffusers:lcm"])
def test_lcm_sampler_on_lcm_model_equals_lcmscheduler_driven_by_hand(lcm_model, monkeypatch, sampler):
    """Reference: LatentConsistencyModelPipeline's loop written out: the raw UNet (eps prediction) given
    w = guidance - 1 through get_guidance_scale_embedding, LCMScheduler.step (which applies LCM's
    boundary condition itself), the same x_T and the same step noise. samplebench's side goes through
    the model's D (boundary condition inside) and the registered sampler on schedule=lcm."""
    m, steps, guidance = lcm_model, 4, 3.0
    idx = list(range(N_IMAGES))
    x_T = initial_noise(SEED, idx, m.sample_shape, torch.float32, m.device)
    cond = m.encode([BUILTIN_PROMPTS[i] for i in idx])
    grid = make_grid({"name": "lcm", "original_steps": 50}, m.noise_schedule, steps)

    _same_noise(monkeypatch, diffusers.schedulers.scheduling_lcm, sampler_generators(SEED, idx))
    sched = diffusers.LCMScheduler.from_config(m.pipe.scheduler.config)
    sched.set_timesteps(steps)
    w = torch.tensor(guidance - 1).repeat(N_IMAGES)
    w_emb = m.pipe.get_guidance_scale_embedding(w, embedding_dim=m.net.config.time_cond_proj_dim)
    latents = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            eps = m.net(latents, t, timestep_cond=w_emb, encoder_hidden_states=cond.embeds).sample
            latents, denoised = sched.step(eps, t, latents, return_dict=False)

    _same_noise(monkeypatch, diffusers.schedulers.scheduling_lcm, sampler_generators(SEED, idx))
    counter = CountingDenoiser(guided_denoiser(m, cond, guidance))
    spec = get_sampler(sampler)
    with torch.no_grad():
        x = m.noise_schedule.initial_state(x_T, float(grid.sigmas[0]))
        out = spec.run(counter, x, grid, {}, sampler_generators(SEED, idx))
    assert counter.calls == steps
    # float32 on both sides: the VP input x_T (1 + s^2)^(1/2) / (1 + s^2)^(1/2) is x_T to 1 ulp, the
    # boundary coefficients are computed in float64 here and float32 there (c_out = 1 - O(1e-9)), and
    # the random UNet's output moves by a few ulps (6e-8 relative) per input ulp through ~20 layers:
    # 1e-5 of the sample's scale bounds 4 steps of that with margin (4e-7 measured); a wrong w (the
    # embedding of g instead of g - 1) moves the result by 0.2 of its scale (checked below). At these
    # timesteps (>= 259) c_skip < 1e-6: the boundary condition is pinned where it matters, near t = 0,
    # by test_lcm_denoiser_is_the_consistency_function_at_small_timesteps.
    scale = float(denoised.abs().max())
    torch.testing.assert_close(out, denoised, rtol=0, atol=1e-5 * scale)
    assert (out - denoised).abs().max() < 1e-3 * float((out - latents).abs().max() + scale)

    wrong = CountingDenoiser(guided_denoiser(m, cond, guidance + 1))  # w off by one
    _same_noise(monkeypatch, diffusers.schedulers.scheduling_lcm, sampler_generators(SEED, idx))
    with torch.no_grad():
        off = spec.run(wrong, x, grid, {}, sampler_generators(SEED, idx))
    assert float((off - denoised).abs().max()) > 1e-3 * scale


@pytest.mark.parametrize("t", [0, 1, 3, 10, 50])
def test_lcm_denoiser_is_the_consistency_function_at_small_timesteps(lcm_model, t):
    """Reference: one LCMScheduler.step at custom timestep t (its last step returns `denoised` =
    c_skip(t) x_t + c_out(t) x0 with c_skip = 0.25 / ((10 t)^2 + 0.25)) on the raw UNet's eps: the
    model's D at the level of t is that. At t = 0, c_skip = 1 and D = x_t; at t = 1, c_skip = 2.5e-3; the
    plain x0 denoiser (boundary condition dropped) differs there by far more than the tolerance."""
    m, idx = lcm_model, list(range(N_IMAGES))
    x_t = initial_noise(SEED, idx, m.sample_shape, torch.float32, m.device)
    cond = m.encode([BUILTIN_PROMPTS[i] for i in idx])
    cond_w = m.with_guidance(cond, 3.0)
    sched = diffusers.LCMScheduler.from_config(m.pipe.scheduler.config)
    sched.set_timesteps(timesteps=[t])
    with torch.no_grad():
        eps = m.net(
            x_t, torch.tensor(t), timestep_cond=cond_w.timestep_cond, encoder_hidden_states=cond.embeds
        )
        _, denoised = sched.step(eps.sample, torch.tensor(t), x_t, return_dict=False)
        sigma = m.noise_schedule.train_sigmas[t]
        x = x_t * (1 + sigma**2) ** 0.5  # EDM's x at that level for the VP input x_t
        d = m.denoise(x.float(), sigma.reshape(1).expand(N_IMAGES), cond_w)
    scale = float(denoised.abs().max())
    # float32 both sides: x_t -> x -> x_t is 1 ulp, then the network (a few ulps through ~20 layers) and
    # x0 = (x_t - s eps) / a, a >= 0.9991: 1e-5 of the scale, as above
    torch.testing.assert_close(d, denoised, rtol=0, atol=1e-5 * scale)
    if t <= 3:
        plain = (x_t - (1 - sched.alphas_cumprod[t]).sqrt() * eps.sample) / sched.alphas_cumprod[t].sqrt()
        assert float((plain - denoised).abs().max()) > 1e-4 * scale  # 10x the tolerance


def test_tcd_sampler_equals_tcdscheduler_driven_by_hand(pipelines, monkeypatch):
    """Reference: TCDScheduler.step driven by hand (eta = gamma = 0.3, its own timesteps, the same noise)
    with the raw UNet of a tiny SD pipeline loaded as model=tcd: every state the network sees agrees,
    and the native result is TCDScheduler's x0 prediction at the last step (TCDScheduler itself returns
    x0 noised to training timestep 0, sigma_min; samplebench's grids end at sigma = 0). diffusers:tcd is
    TCDScheduler itself and returns that noised end: checked against the same hand-driven run."""
    m = load_model({"name": "tcd", "path": str(pipelines["sd15"]), "dtype": "fp32"}, "cpu")
    steps, idx = 4, list(range(N_IMAGES))
    x_T = initial_noise(SEED, idx, m.sample_shape, torch.float32, m.device)
    cond = m.encode([BUILTIN_PROMPTS[i] for i in idx])
    grid = make_grid({"name": "lcm", "original_steps": 50}, m.noise_schedule, steps)
    tcd_module = diffusers.schedulers.scheduling_tcd

    _same_noise(monkeypatch, tcd_module, sampler_generators(SEED, idx))
    sched = diffusers.TCDScheduler.from_config(m.pipe.scheduler.config)
    sched.set_timesteps(steps)
    latents, seen = x_T.clone(), []
    with torch.no_grad():
        for t in sched.timesteps:
            seen.append(latents.clone())
            eps = m.net(latents, t, encoder_hidden_states=cond.embeds).sample
            ac = sched.alphas_cumprod[t]
            x0 = (latents - (1 - ac).sqrt() * eps) / ac.sqrt()
            latents = sched.step(eps, t, latents, eta=0.3).prev_sample

    inputs = []
    inner = guided_denoiser(m, cond, 1.0)

    def recording(x, sigma):
        inputs.append(x / (1 + float(sigma) ** 2) ** 0.5)  # the VP input the network is given
        return inner(x, sigma)

    for name, expected in (("tcd", x0), ("diffusers:tcd", latents)):
        _same_noise(monkeypatch, tcd_module, sampler_generators(SEED, idx))
        inputs.clear()
        counter = CountingDenoiser(recording)
        opts = {"gamma": 0.3} if name == "tcd" else {"eta": 0.3}
        with torch.no_grad():
            x = m.noise_schedule.initial_state(x_T, float(grid.sigmas[0]))
            out = get_sampler(name).run(counter, x, grid, opts, sampler_generators(SEED, idx))
        assert counter.calls == steps
        scale = float(x_T.abs().max())
        for a, b in zip(inputs, seen, strict=True):  # float32 round-off of the EDM <-> VP scaling
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * scale)


def test_boundary_condition_and_guidance_kind_errors(pipelines):
    from samplebench.errors import UsageError

    with pytest.raises(UsageError, match="time_cond_proj_dim"):
        load_model(
            {"name": "lcm", "path": str(pipelines["sd15"]), "dtype": "fp32", "guidance_kind": "embedded"},
            "cpu",
        )
    with pytest.raises(UsageError, match="boundary_condition"):
        load_model(
            {"name": "lcm", "path": str(pipelines["lcm"]), "dtype": "fp32", "boundary_condition": "x"}, "cpu"
        )


# -- through the CLI: the adapter against LatentConsistencyModelPipeline itself ------------------------
def _cells(run_dir):
    out = {}
    for cell in store.find_cells(run_dir):
        shards = list(cell.iter_shards())
        out[cell.key] = {k: np.concatenate([s[k] for s in shards]) for k in ("samples", "nfe", "prompt_ids")}
    return out


def test_lcm_sweep_through_the_cli_equals_the_pipelines_own_output(tmp_path, pipelines, monkeypatch):
    """`samplebench generate model=lcm model.path=... sampler=lcm schedule=lcm` offline; every cell's
    counted NFE is the request, and each sample equals LatentConsistencyModelPipeline(output_type=
    'latent') from the same x_T, prompt, guidance and (multistep) step noise."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = cli(
        "generate",
        "model=lcm",
        f"model.path={pipelines['lcm']}",
        "sampler=lcm",
        "schedule=lcm",
        "nfe=1,4",
        "guidance=3",
        f"num_images={N_IMAGES}",
        f"results_dir={tmp_path}",
        "run=lcm",
        "timing.repeats=1",
        "timing.warmup=false",
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    cells = _cells(tmp_path / "lcm")
    assert len(cells) == 2
    pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(pipelines["lcm"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    idx = list(range(N_IMAGES))
    x_T = initial_noise(SEED, idx, (4, 8, 8), torch.float32, torch.device("cpu"))
    for (model, _sampler, nfe, guidance), c in cells.items():
        assert (model, guidance) == ("lcm", 3.0)
        assert (c["nfe"] == nfe).all()
        prompts = [BUILTIN_PROMPTS[int(p.split(":")[1])] for p in c["prompt_ids"]]
        _same_noise(monkeypatch, diffusers.schedulers.scheduling_lcm, sampler_generators(SEED, idx))
        with torch.no_grad():
            ref = pipe(
                prompt=prompts,
                latents=x_T.clone(),
                num_inference_steps=nfe,
                guidance_scale=guidance,
                output_type="latent",
                height=64,
                width=64,
            ).images
        # tolerance as in test_lcm_sampler_on_lcm_model_equals_lcmscheduler_driven_by_hand
        scale = float(ref.abs().max())
        np.testing.assert_allclose(c["samples"], ref.numpy(), rtol=0, atol=1e-5 * scale)


# -- one sweep over sd15 and few-step models ---------------------------------------------------------
def test_mixed_sweep_gives_one_leaderboard_and_one_pareto_plot_with_every_model(
    tmp_path, pipelines, monkeypatch
):
    """model=sd15,lcm,sd_turbo with a folder each (paths=), sampler=dpmpp,lcm, nfe=1,4, guidance=3:
    sd15 is guided by CFG at 3 (one counted evaluation per step), lcm by its w embedding, sd_turbo
    (guidance_kind none) runs at guidance 1. One leaderboard.md/.csv and one Pareto plot per metric
    hold every model's cells, each with counted NFE = the request."""
    from samplebench.report import pareto

    clip_config, clip_ckpt = tiny_models.make_tiny_clip(tmp_path / "clip")
    plotted = []
    real = pareto._plot_one

    def spy(df, metric, suffix, out_dir):
        plotted.append((metric, suffix, df.copy()))
        return real(df, metric, suffix, out_dir)

    monkeypatch.setattr(pareto, "_plot_one", spy)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = cli_here(
        "sweep",
        "model=sd15,lcm,sd_turbo",
        f"paths={{sd15:{pipelines['sd15']},lcm:{pipelines['lcm']},sd_turbo:{pipelines['sd15']}}}",
        "sampler=dpmpp,lcm",
        "nfe=1,4",
        "guidance=3",
        f"num_images={N_IMAGES}",
        f"results_dir={tmp_path}",
        "run=mixed",
        "timing.repeats=1",
        "timing.warmup=false",
        "metrics.names=[clip_score]",
        "metrics.bootstrap=50",
        f"metrics.clip.model={tiny_models.TINY_CLIP}",
        f"metrics.clip.pretrained={clip_ckpt}",
        f"metrics.clip.model_config={clip_config}",
        env=env,
    )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "sd_turbo takes no guidance" in r.stderr
    run = tmp_path / "mixed"
    cells = _cells(run)
    expected = {
        (m, s, n, g)
        for m, g in (("sd15", 3.0), ("lcm", 3.0), ("sd_turbo", 1.0))
        for s in ("dpmpp · karras", "lcm · karras")
        for n in (1, 4)
    }
    assert set(cells) == expected
    for (_, _, nfe, _), c in cells.items():
        assert (c["nfe"] == nfe).all()
    board = pd.read_csv(run / "leaderboard.csv")
    assert set(board["model"]) == {"sd15", "lcm", "sd_turbo"}
    md = (run / "leaderboard.md").read_text()
    for heading in ("sd15 · clip_score", "lcm · clip_score", "sd_turbo · clip_score"):
        assert heading in md
    metrics = pd.read_csv(run / "metrics.csv")
    assert (metrics["nfe_actual"] == metrics["nfe"]).all() if "nfe_actual" in metrics else True
    figures = [(metric, suffix) for metric, suffix, _ in plotted]
    assert figures == [("clip_score", "nfe"), ("clip_score", "time")]  # one figure per axis, not per model
    for _, _, df in plotted:
        assert set(df["model"].astype(str)) == {"sd15", "lcm", "sd_turbo"}
        assert len(df) == len(expected)
    assert (run / "plots" / "clip_score_vs_nfe.png").exists()
