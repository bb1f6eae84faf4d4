"""Rectified-flow image models (models/flow_pipelines.py: sd3, flux_schnell, flux_dev, instaflow) on tiny
random pipelines saved in the upstream diffusers format (tests/tiny_flow_models.py, tests/tiny_models.py).

References: diffusers' own StableDiffusion3Pipeline and FluxPipeline (FlowMatchEulerDiscreteScheduler) run
from the same latents and prompt embeddings, and for InstaFlow a hand transcription of its published
Euler loop (pipeline_rf.py). The sweeps go through the user's path: `samplebench generate model=<name>
model.path=<folder>` with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tiny_flow_models
import tiny_models
import torch
from cli_run import cli, cli_here

from samplebench import store
from samplebench.errors import UsageError
from samplebench.models import load_model
from samplebench.samplers.base import guided_denoiser
from samplebench.samplers.flow import sample_flow_euler
from samplebench.schedules import make_grid

FLOW = {"name": "flow", "shift": None, "mu": None, "end": None, "start": "1"}  # conf/schedule/flow.yaml
PROMPTS = ["a red cube", "a photo of a cat"]
BUILDERS = {
    "sd3": tiny_flow_models.make_tiny_sd3,
    "flux_dev": tiny_flow_models.make_tiny_flux_dev,
    "flux_schnell": tiny_flow_models.make_tiny_flux_schnell,
    "sana": tiny_flow_models.make_tiny_sana,
    "instaflow": tiny_models.make_tiny_sd,  # an SD 1.5-shaped pipeline, read as a velocity UNet
}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_pipelines")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def models(pipelines):
    return {name: load_model(_cfg(name, pipelines[name]), "cpu") for name in BUILDERS}


def _cfg(name, path):
    return {
        "name": name,
        "path": str(path),
        "dtype": "fp32",
        "resolution": 64,
        "max_sequence_length": tiny_flow_models.MAX_SEQUENCE_LENGTH,
    }


def _x_T(model, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *model.sample_shape), generator=g, dtype=torch.float64)


def _ours(model, cond, x_T, steps, guidance):
    grid = make_grid(FLOW, model.noise_schedule, steps)
    x = model.noise_schedule.initial_state(x_T, float(grid.sigmas[0]))
    return sample_flow_euler(guided_denoiser(model, cond, guidance), x, grid.sigmas)


def _pack(x):  # FluxPipeline._pack_latents
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c)


def _unpack(x, c, h, w):  # FluxPipeline._unpack_latents
    b = x.shape[0]
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# Tolerance for the pipeline comparisons: both sides run the same float32 network on the same inputs; they
# differ in float32 rounding only (the pipeline keeps latents, sigmas and its Euler step in float32, we keep
# the state and the step in float64 and round the timestep once), a few ulps (1.2e-7 relative) per operation
# on values |x| <= 5, compounded over 4 steps through a random network: measured <= 4e-6, bound 1e-4. A
# wrong timestep convention (t vs 1000 t), a wrong packing order, guidance applied differently or a wrong
# schedule change the result by O(0.1 - 1), checked below to be far above the bound.
ATOL = 1e-4


@pytest.mark.parametrize("steps", [1, 4])
def test_sd3_equals_the_pipeline_with_cfg(models, steps):
    """Reference: StableDiffusion3Pipeline (FlowMatchEulerDiscreteScheduler, shift 3) from the same
    latents and prompts, guidance_scale=4 (classifier-free, negative prompt '')."""
    m = models["sd3"]
    cond = m.encode(PROMPTS)
    x_T = _x_T(m)
    ours = _ours(m, cond, x_T, steps, 4.0)
    ref = m.pipe(
        prompt=PROMPTS,  # the pipeline encodes the prompts and the negative prompt '' itself
        max_sequence_length=tiny_flow_models.MAX_SEQUENCE_LENGTH,
        latents=x_T.float(),
        num_inference_steps=steps,
        guidance_scale=4.0,
        height=64,
        width=64,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours.float(), ref, rtol=0, atol=ATOL)
    unguided = _ours(m, cond, x_T, steps, 1.0)
    assert (unguided - ours).abs().max() > 1e3 * ATOL  # cfg is not a no-op on this network


@pytest.mark.parametrize("name", ["flux_dev", "flux_schnell"])
def test_flux_equals_the_pipeline(models, name):
    """Reference: FluxPipeline (linspace(1, 1/N, N) sigmas; FLUX.1-dev's dynamic shift mu from the image
    token count, schnell's shift 1; guidance embedding 3.5 for dev) from the same packed latents and
    prompts, 4 steps."""
    m = models[name]
    cond = m.encode(PROMPTS)
    x_T = _x_T(m)
    c, h, w = m.sample_shape
    w_dev = 3.5 if name == "flux_dev" else 1.0
    ours = _ours(m, cond, x_T, 4, w_dev)
    ref = m.pipe(
        prompt=PROMPTS,  # the pipeline encodes the prompts itself
        max_sequence_length=tiny_flow_models.MAX_SEQUENCE_LENGTH,
        latents=_pack(x_T.float()),
        num_inference_steps=4,
        guidance_scale=3.5,  # ignored by the schnell-like transformer (no guidance embedding)
        height=64,
        width=64,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours.float(), _unpack(ref, c, h, w), rtol=0, atol=ATOL)
    if name == "flux_dev":  # the embedded value matters, far beyond the tolerance
        assert (_ours(m, cond, x_T, 4, 1.0) - ours).abs().max() > 1e3 * ATOL
    # the pipeline's own schedule: mu = calculate_shift(16 tokens) for dev, none for schnell
    expected = m.pipe.scheduler.sigmas.double()
    grid = make_grid(FLOW, m.noise_schedule, 4).sigmas
    t = grid / (1 + grid)
    t[0] = 1.0
    torch.testing.assert_close(t, expected, rtol=0, atol=1e-6)  # diffusers keeps sigmas in float32


@pytest.mark.parametrize("name", ["sd3", "flux_schnell"])
def test_decode_equals_the_pipelines_images(models, name):
    """Reference: the pipeline's own decoding (latents / scaling_factor + shift_factor, the VAE, then
    (x / 2 + 0.5) clipped), output_type='np', after one step from the same latents. Ours rounds to uint8:
    at most half a level (0.5 / 255) apart, plus float32 noise in the step (above, <= 1e-4)."""
    m = models[name]
    cond = m.encode(PROMPTS[:1])
    x_T = _x_T(m, n=1)
    ours = m.decode(_ours(m, cond, x_T, 1, 1.0))
    kw = dict(num_inference_steps=1, guidance_scale=1.0, height=64, width=64, output_type="np")
    if name == "sd3":
        ref = m.pipe(prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled, latents=x_T.float(), **kw)
    else:
        ref = m.pipe(
            prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled, latents=_pack(x_T.float()), **kw
        )
    assert ours.dtype == np.uint8 and ours.shape == ref.images.shape
    np.testing.assert_allclose(ours / 255.0, ref.images, rtol=0, atol=0.5 / 255 + 1e-3)
    assert ours.std() > 1  # not a constant image


def test_sana_equals_the_pipeline_with_cfg(models):
    """Reference: SanaPipeline (its complex human instruction, Gemma attention masks, timestep_scale,
    classifier-free guidance 4.5) with FlowMatchEulerDiscreteScheduler at the folder's flow_shift (3) in
    place of its DPM-Solver, 3 steps, against flow_euler on schedule=flow end=train (that scheduler's
    grid). And the model's default grid with schedule.start=train is the folder's own
    DPMSolverMultistepScheduler (use_flow_sigmas) grid."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    m = models["sana"]
    cond = m.encode(PROMPTS)
    x_T = _x_T(m)
    grid = make_grid({**FLOW, "end": "train"}, m.noise_schedule, 3)
    x = m.noise_schedule.initial_state(x_T, float(grid.sigmas[0]))
    ours = sample_flow_euler(guided_denoiser(m, cond, 4.5), x, grid.sigmas)
    own = m.pipe.scheduler
    m.pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=own.config.flow_shift)
    try:
        ref = m.pipe(
            prompt=PROMPTS,  # the pipeline encodes them (with its instruction) and the negative prompt ''
            max_sequence_length=tiny_flow_models.MAX_SEQUENCE_LENGTH,
            latents=x_T.float(),
            num_inference_steps=3,
            guidance_scale=4.5,
            height=64,
            width=64,
            use_resolution_binning=False,
            output_type="latent",
        ).images
    finally:
        m.pipe.scheduler = own
    torch.testing.assert_close(ours.float(), ref, rtol=0, atol=ATOL)
    assert (sample_flow_euler(guided_denoiser(m, cond, 1.0), x, grid.sigmas) - ours).abs().max() > 1e3 * ATOL
    dpm = DPMSolverMultistepScheduler.from_config(own.config)
    dpm.set_timesteps(5)
    levels = make_grid({**FLOW, "start": "train"}, m.noise_schedule, 5).sigmas
    torch.testing.assert_close(levels / (1 + levels), dpm.sigmas.double(), rtol=0, atol=1e-6)


def test_instaflow_equals_its_published_euler_loop(models):
    """Reference: InstaFlow's pipeline_rf.py loop, transcribed by hand: timesteps (1 - i/N) 1000,
    v = unet(latents, t, prompt_embeds), latents += v / N, from the noise itself (no shift, no scaling)."""
    m = models["instaflow"]
    cond = m.encode(PROMPTS)
    x_T = _x_T(m)
    steps = 3
    latents = x_T.float()
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((2,), (1 - i / steps) * 1000.0)
            latents = latents + m.net(latents, t, encoder_hidden_states=cond.embeds).sample / steps
    ours = _ours(m, cond, x_T, steps, 1.0)
    torch.testing.assert_close(ours.float(), latents, rtol=0, atol=ATOL)


class _CountCalls:
    """Counts the network's calls and the batch sizes it is given."""

    def __init__(self, net):
        self.batches: list[int] = []
        self.handle = net.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.batches.append(x.shape[0])


@pytest.mark.parametrize(
    "name, guidance, per_call",
    [("sd3", 4.0, 4), ("sana", 4.5, 4), ("flux_dev", 3.5, 2), ("flux_dev", 1.0, 2), ("flux_schnell", 1.0, 2)],
)
def test_guidance_kinds_cost_one_network_call_per_step(models, name, guidance, per_call):
    """cfg (sd3) batches the conditional and unconditional passes in one call of twice the batch;
    embedded (flux_dev) and none (flux_schnell) make one call of the batch."""
    m = models[name]
    counter = _CountCalls(m.net)
    try:
        _ours(m, m.encode(PROMPTS), _x_T(m), 3, guidance)
    finally:
        counter.handle.remove()
    assert counter.batches == [per_call] * 3


def test_guidance_kind_mismatches_are_usage_errors(pipelines):
    with pytest.raises(UsageError, match="has a guidance embedding"):
        load_model(_cfg("flux_schnell", pipelines["flux_dev"]), "cpu")
    with pytest.raises(UsageError, match="no guidance embedding"):
        load_model(_cfg("flux_dev", pipelines["flux_schnell"]), "cpu")
    with pytest.raises(UsageError, match="needs a FluxPipeline folder, not a StableDiffusion3Pipeline"):
        load_model(_cfg("flux_dev", pipelines["sd3"]), "cpu")
    with pytest.raises(UsageError, match="rectified-flow pipeline; use model=sd3"):
        load_model({"name": "sd15", "path": str(pipelines["sd3"]), "dtype": "fp32"}, "cpu")
    with pytest.raises(UsageError, match="must be a positive multiple of 16"):
        load_model({**_cfg("flux_dev", pipelines["flux_dev"]), "resolution": 72}, "cpu")


def _generate(tmp_path, name, path, run, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [
        "generate",
        f"model={name}",
        f"model.path={path}",
        "model.resolution=64",
        f"model.max_sequence_length={tiny_flow_models.MAX_SEQUENCE_LENGTH}",
        "model.dtype=fp32",
        "schedule=flow",
        f"results_dir={tmp_path}",
        f"run={run}",
        "num_images=3",
        "batch_size=2",
        "shard_size=3",
        "device=cpu",
        *extra,
    ]
    r = cli_here(*args, env=env)
    assert r.returncode == 0, r.stderr
    out = {}
    for cell in store.find_cells(tmp_path / run):
        shards = list(cell.iter_shards())
        out[cell.key] = {k: np.concatenate([s[k] for s in shards]) for k in ("samples", "images", "nfe")}
    return out, r


@pytest.mark.parametrize(
    "name, guidance, expected_guidance",
    [
        ("sd3", "1,3", (1.0, 3.0)),
        ("flux_dev", "1,3.5", (1.0, 3.5)),
        ("flux_schnell", "3", (1.0,)),
        ("sana", "1,4.5", (1.0, 4.5)),
    ],
)
def test_sweep_counts_exact_nfe(tmp_path, pipelines, name, guidance, expected_guidance):
    """The user's path: `samplebench generate model=<name> model.path=<folder> schedule=flow` offline,
    samplers flow_euler and dpmpp; every sample's counted NFE equals the request (a cfg step counts once),
    flux_schnell's cells run at guidance=1 whatever the sweep asks, and guidance changes sd3's and
    flux_dev's images."""
    cells, r = _generate(
        tmp_path, name, pipelines[name], "s", "sampler=flow_euler,dpmpp", "nfe=2,4", f"guidance={guidance}"
    )
    assert len(cells) == 2 * 2 * len(expected_guidance)
    assert {k[3] for k in cells} == set(expected_guidance)
    for (label, sampler, nfe, g), c in cells.items():
        assert label.split("[")[0] == name
        assert (c["nfe"] == nfe).all(), (sampler, nfe, g, c["nfe"])
        assert np.isfinite(c["samples"]).all() and c["images"].shape == (3, 64, 64, 3)
    if name == "flux_schnell":
        assert "takes no guidance" in r.stderr + r.stdout
    else:
        by_g = {k[3]: v for k, v in cells.items() if k[2] == 4 and k[1].startswith("flow_euler")}
        assert not np.array_equal(
            by_g[expected_guidance[0]]["samples"], by_g[expected_guidance[1]]["samples"]
        )


def test_offline_hub_flow_model_fails_fast_with_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = cli(  # a child process: its HF_HOME (an empty cache) is read at import
        "sweep",
        "model=flux_dev",
        "sampler=flow_euler",
        "schedule=flow",
        "nfe=4",
        f"results_dir={tmp_path}",
        env=env,
    )
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "black-forest-labs/FLUX.1-dev" in lines[0] and "model.path=" in lines[0], (
        r.stderr
    )


def test_sd3_in_bf16_runs_the_network_in_bf16(pipelines):
    """model.dtype=bf16: the transformer runs in bf16 (diffusers leaves an fp32-saved SD3 transformer in
    fp32 under torch_dtype; the adapter casts it) and the result equals the pipeline's own bf16 run from the
    same latents. Tolerance: bf16 keeps 8 bits (spacing 2^-6 = 0.016 at |x| = 4); the pipeline also holds
    its latents in bf16 between steps, we in float64, so several such roundings per step over 2 steps:
    measured 0.04 at 4 steps, bound 0.1, while the velocities themselves are O(1)."""
    m = load_model({**_cfg("sd3", pipelines["sd3"]), "dtype": "bf16"}, "cpu")
    assert m.net.dtype == torch.bfloat16 and m.dtype == torch.float64
    cond = m.encode(PROMPTS)
    x_T = _x_T(m)
    ours = _ours(m, cond, x_T, 2, 1.0)
    kw = dict(num_inference_steps=2, guidance_scale=1.0, height=64, width=64, output_type="latent")
    ref = m.pipe(prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled, latents=x_T.bfloat16(), **kw)
    torch.testing.assert_close(ours.float(), ref.images.float(), rtol=0, atol=0.1)
