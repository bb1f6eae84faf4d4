"""Image models through the very path users take (`model=sd15 model.path=...`), on tiny random
pipelines saved in the upstream diffusers format by tests/tiny_models.py."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tiny_models  # tests/tiny_models.py
import torch

from samplebench import store
from samplebench.config import plan
from samplebench.errors import UsageError
from samplebench.generate import generate

BUILDERS = {
    "sd15": tiny_models.make_tiny_sd,
    "sdxl": tiny_models.make_tiny_sdxl,
    "dit": tiny_models.make_tiny_dit,
    "ddpm_cifar10": tiny_models.make_tiny_ddpm,
}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def overrides(tmp_path, model, path, run, *extra):
    return [
        f"model={model}",
        f"model.path={path}",
        f"results_dir={tmp_path}",
        f"run={run}",
        "num_images=4",
        "batch_size=2",
        "shard_size=2",
        *extra,
    ]


def cells_on_disk(tmp_path, run):
    out = {}
    for cell in store.find_cells(tmp_path / run):
        shards = list(cell.iter_shards())
        out[cell.key] = {
            k: np.concatenate([s[k] for s in shards])
            for k in ("samples", "images", "nfe", "prompt_ids", "indices")
        }
    return out


@pytest.mark.parametrize("model", sorted(BUILDERS))
def test_sweep_counts_exact_nfe_and_shares_noise_and_prompts(tmp_path, pipelines, model):
    guidance = "guidance=1" if model == "ddpm_cifar10" else "guidance=1,3"  # DDPM is unconditional
    sweep = overrides(
        tmp_path, model, pipelines[model], "s", "sampler=ddim,dpmpp,euler_a", "nfe=3,5", guidance
    )
    generate(plan(sweep))
    cells = cells_on_disk(tmp_path, "s")
    assert len(cells) == (6 if model == "ddpm_cifar10" else 12)
    first = next(iter(cells.values()))
    for (label, sampler, nfe, g), c in cells.items():
        assert label == model
        assert (c["nfe"] == nfe).all(), (sampler, nfe, g, c["nfe"])  # counted, guided steps once
        assert c["images"].dtype == np.uint8 and c["images"].shape[-1] == 3
        assert np.isfinite(c["samples"]).all()
        np.testing.assert_array_equal(c["prompt_ids"], first["prompt_ids"])  # same prompt/label for image i
        np.testing.assert_array_equal(c["indices"], np.arange(4))
    if model != "ddpm_cifar10":  # guidance changes the images
        a, b = cells[(model, "dpmpp · karras", 5, 1.0)], cells[(model, "dpmpp · karras", 5, 3.0)]
        assert not np.array_equal(a["samples"], b["samples"])


@pytest.mark.parametrize("model", ["sd15", "dit"])
def test_same_seed_same_images_and_batch_size_does_not_matter(tmp_path, pipelines, model):
    base = ["sampler=dpmpp,euler_a", "nfe=4", "guidance=2"]
    generate(plan(overrides(tmp_path, model, pipelines[model], "a", *base)))
    generate(plan(overrides(tmp_path, model, pipelines[model], "b", *base)))
    generate(plan([*overrides(tmp_path, model, pipelines[model], "one", *base), "batch_size=1"]))
    generate(
        plan([*overrides(tmp_path, model, pipelines[model], "four", *base), "batch_size=4", "shard_size=4"])
    )
    a, b = cells_on_disk(tmp_path, "a"), cells_on_disk(tmp_path, "b")
    one, four = cells_on_disk(tmp_path, "one"), cells_on_disk(tmp_path, "four")
    for k in a:
        np.testing.assert_array_equal(a[k]["images"], b[k]["images"])  # same seed: identical
        # Batch size changes only the reduction order of float32 batched kernels (GEMMs, convolutions,
        # attention): about sqrt(K) * 6e-8 relative per layer, grown by a few dozen layers, 4 solver
        # steps and guidance w=2 (which triples a difference of the two passes) to ~1e-5 of the
        # sample's norm. One element near zero can be off by far more *relative to itself* (2e-3 was
        # seen), so the bound is on the whole sample and on elements relative to the sample's scale.
        s1, s4 = one[k]["samples"].astype(np.float64), four[k]["samples"].astype(np.float64)
        for i in range(len(s4)):
            assert np.linalg.norm(s1[i] - s4[i]) <= 1e-4 * np.linalg.norm(s4[i]), (k, i)
            assert np.abs(s1[i] - s4[i]).max() <= 1e-3 * np.abs(s4[i]).max(), (k, i)
        assert np.abs(one[k]["images"].astype(int) - four[k]["images"]).max() <= 1  # round-off only


def test_resumed_run_equals_uninterrupted(tmp_path, pipelines, monkeypatch):
    sweep = ["sampler=ddim,euler_a", "nfe=3", "guidance=1,2"]
    generate(plan(overrides(tmp_path, "sd15", pipelines["sd15"], "whole", *sweep)))
    real = store.write_shard
    calls = []

    def crash(*args, **kwargs):
        if len(calls) == 3:
            raise RuntimeError("simulated crash mid-sweep")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "write_shard", crash)
    with pytest.raises(RuntimeError):
        generate(plan(overrides(tmp_path, "sd15", pipelines["sd15"], "resumed", *sweep)))
    monkeypatch.setattr(store, "write_shard", real)
    summary = generate(plan(overrides(tmp_path, "sd15", pipelines["sd15"], "resumed", *sweep)))
    assert summary.shards_skipped == 3 and summary.shards_written == 8 - 3
    whole, resumed = cells_on_disk(tmp_path, "whole"), cells_on_disk(tmp_path, "resumed")
    for k in whole:
        np.testing.assert_array_equal(whole[k]["images"], resumed[k]["images"])


def test_generic_diffusers_model_reads_the_pipeline_kind(tmp_path, pipelines):
    generate(
        plan(overrides(tmp_path, "diffusers", pipelines["dit"], "g", "sampler=ddim", "nfe=3", "guidance=4"))
    )
    (cell,) = cells_on_disk(tmp_path, "g").values()
    assert cell["images"].shape == (4, 64, 64, 3)
    assert list(cell["prompt_ids"]) == ["class:0", "class:1", "class:2", "class:3"]


def test_text_prompts_from_a_file(tmp_path, pipelines):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    generate(
        plan(
            overrides(
                tmp_path,
                "sd15",
                pipelines["sd15"],
                "f",
                "sampler=ddim",
                "nfe=3",
                "prompts=file",
                f"prompts.path={prompts}",
            )
        )
    )
    (cell,) = store.find_cells(tmp_path / "f")
    texts = np.concatenate([s["prompts"] for s in cell.iter_shards()])
    assert list(texts) == ["a red cube", "a blue sphere", "a red cube", "a blue sphere"]


def test_bad_model_folders_and_options_are_usage_errors(tmp_path, pipelines):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no model_index.json"):
        generate(plan(overrides(tmp_path, "sd15", empty, "e", "sampler=ddim", "nfe=3")))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text((pipelines["sd15"] / "model_index.json").read_text())
    with pytest.raises(UsageError, match="missing unet"):
        generate(plan(overrides(tmp_path, "sd15", broken, "e2", "sampler=ddim", "nfe=3")))
    with pytest.raises(UsageError, match="unconditional"):
        generate(
            plan(
                overrides(
                    tmp_path,
                    "ddpm_cifar10",
                    pipelines["ddpm_cifar10"],
                    "u",
                    "sampler=ddim",
                    "nfe=3",
                    "guidance=2",
                )
            )
        )
    with pytest.raises(UsageError, match="class labels"):
        generate(
            plan(
                overrides(
                    tmp_path,
                    "dit",
                    pipelines["dit"],
                    "c",
                    "sampler=ddim",
                    "nfe=3",
                    "prompts=coco",
                    f"prompts.path={tmp_path}/x.json",
                )
            )
        )


def test_offline_hub_model_without_local_copy_fails_fast_with_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "samplebench.cli",
            "sweep",
            "model=sd15",
            "sampler=dpmpp",
            "nfe=5",
            f"results_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in lines[0] and "model.path=" in lines[0]
    assert "Traceback" not in r.stderr


def test_network_is_asked_at_the_schedulers_integer_timesteps(pipelines, monkeypatch):
    """Reference: diffusers' own numbers for the tiny SD pipeline's scheduler config. The model's
    training sigmas are ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5 of diffusers' alphas_cumprod,
    and at each level of diffusers' EulerDiscreteScheduler the UNet gets the timestep that scheduler
    pairs with it (what StableDiffusionPipeline hands the UNet): the integer training timesteps of
    timestep_spacing='leading', and with use_karras_sigmas the fractional ones of its own log-sigma
    interpolation (EulerDiscreteScheduler._sigma_to_t)."""
    from diffusers import EulerDiscreteScheduler

    from samplebench.models import load_model

    model = load_model({"name": "sd15", "path": str(pipelines["sd15"]), "dtype": "fp32"}, "cpu")
    config = model.pipe.scheduler.config
    # diffusers keeps alphas_cumprod in float32; the formula in float64 on those values is exact
    # arithmetic the model must reproduce bit for bit, and diffusers' own float32 sigma table
    # (EulerDiscreteScheduler.sigmas before set_timesteps, highest first, then 0) agrees to float32
    # rounding of a division and a square root (2 ulps, 2.4e-7).
    ac = EulerDiscreteScheduler.from_config(config).alphas_cumprod.double()
    torch.testing.assert_close(model.train_sigmas, ((1 - ac) / ac) ** 0.5, rtol=0, atol=0)
    table = EulerDiscreteScheduler.from_config(config).sigmas[:-1].flip(0)
    torch.testing.assert_close(model.train_sigmas.float(), table, rtol=2.4e-7, atol=0)

    asked = []
    forward = model.net.forward

    def recording_forward(sample, timestep, *args, **kwargs):
        asked.append(torch.as_tensor(timestep).detach().double().reshape(-1).clone())
        return forward(sample, timestep, *args, **kwargs)

    monkeypatch.setattr(model.net, "forward", recording_forward)
    cond = model.encode(["a photo of a cat"])
    x = torch.zeros(1, *model.sample_shape)
    for flags in ({"timestep_spacing": "leading"}, {"use_karras_sigmas": True}):
        euler = EulerDiscreteScheduler.from_config(config, **flags)
        euler.set_timesteps(10)
        asked.clear()
        for sigma in euler.sigmas[:-1]:
            model.denoise(x, torch.tensor([float(sigma)], dtype=torch.float64), cond)
        # The model interpolates log sigma in float64 from the float32 level diffusers stores, diffusers
        # in float32 (karras) or not at all (leading): the float32 level's rounding (1.2e-7 relative)
        # over the log-sigma spacing near t = 999 (6e-3 per timestep) is 2e-5 of a timestep, and the
        # float32 timestep itself is exact to 6e-5 at 999; 1e-3 of a timestep covers both.
        torch.testing.assert_close(torch.cat(asked), euler.timesteps.double(), rtol=0, atol=1e-3)
        if "timestep_spacing" in flags:
            assert euler.timesteps.tolist() == [float(t) for t in range(901, 0, -100)]
