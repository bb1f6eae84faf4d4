"""Analytic presets (`model.preset=`, samplebench/models/gmm.py PRESETS) and what the default one must do.

References: the classic mixture is rebuilt here from the draws samplebench made before presets existed
(transcribed below, numpy's default_rng and diffusers' DDPMScheduler); the VP SDE levels from their
closed form; "every ODE sampler converges" and "mmd_exact separates first-order samplers" are checked
through the command line, as a user runs them, on the default preset.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from cli_run import cli

from samplebench.errors import UsageError
from samplebench.models import mixture_spec
from samplebench.models.gmm import DEFAULT_PRESET, GaussianMixtureModel, MixtureSpec, resolve_spec
from samplebench.samplers import SAMPLERS

CPU = torch.device("cpu")


def test_classic_preset_is_the_mixture_of_earlier_versions():
    """Bit for bit: results and baselines made before presets existed hold with model.preset=classic."""
    from diffusers import DDPMScheduler

    rng = np.random.default_rng(0)  # the old construction, transcribed
    means = rng.normal(0.0, 3.0, size=(8, 16))
    rotations = np.stack([np.linalg.qr(rng.normal(size=(16, 16)))[0] for _ in range(8)])
    stds = np.exp(rng.uniform(np.log(0.5), np.log(1.0), size=(8, 16)))
    weights = rng.dirichlet(np.full(8, 5.0))
    betas = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    ).betas.numpy()
    for spec in (resolve_spec({"preset": "classic"}), MixtureSpec()):
        model = GaussianMixtureModel(spec, CPU)
        assert np.array_equal(model.means.numpy(), means)
        assert np.array_equal(model.rotations.numpy(), rotations)
        assert np.array_equal(model.eigenvalues.numpy(), stds**2)
        assert np.array_equal(model.weights.numpy(), weights)
        assert np.array_equal(model.scheduler_config()["trained_betas"], betas)


def test_config_resolves_preset_then_overrides():
    from omegaconf import OmegaConf

    from samplebench.config import conf_dir

    cfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / "model" / "gmm.yaml"))
    assert cfg["preset"] == DEFAULT_PRESET == "image"
    spec = mixture_spec(cfg)
    assert (spec.dim, spec.components, spec.tree, spec.beta_schedule) == (16, 64, (8.0, 2.0, 0.5), "vp_sde")
    assert mixture_spec({**cfg, "dim": 8}).dim == 8
    assert mixture_spec({**cfg, "tree": [1.0, 0.5], "branch": 3}).components == 9
    classic = mixture_spec({**cfg, "preset": "classic"})
    assert classic == MixtureSpec()
    with pytest.raises(UsageError, match="model.preset=nope is unknown; choose one of classic, image"):
        mixture_spec({**cfg, "preset": "nope"})
    with pytest.raises(UsageError, match="does not match model.tree"):
        GaussianMixtureModel(mixture_spec({**cfg, "components": 10}), CPU)
    with pytest.raises(UsageError, match="model.spectrum=flat is unknown"):
        GaussianMixtureModel(mixture_spec({**cfg, "spectrum": "flat"}), CPU)


def test_image_preset_levels_are_the_vp_sde_between_its_ends():
    """sigma(t)^2 = exp(19.9 t^2 / 2 + 0.1 t) - 1 at t evenly spaced, ends at sigma_min and sigma_max."""
    model = GaussianMixtureModel(resolve_spec({"preset": "image"}), CPU)
    sig = model.noise_schedule.train_sigmas.numpy()
    assert sig[0] == pytest.approx(0.002, rel=1e-9) and sig[-1] == pytest.approx(80.0, rel=1e-9)
    t = (-0.1 + np.sqrt(0.01 + 2 * 19.9 * np.log1p(sig**2))) / 19.9
    np.testing.assert_allclose(np.diff(t), np.diff(t).mean(), rtol=1e-6)
    # the betas diffusers' samplers get rebuild the same levels
    ac = np.cumprod(1 - model.scheduler_config()["trained_betas"])
    np.testing.assert_allclose(np.sqrt((1 - ac) / ac), sig, rtol=1e-8)
    # log-spaced spectrum: every octave between min_scale and scale holds directions of every component
    stds = model.eigenvalues.sqrt().numpy()
    assert stds.max() <= 5.0 * math.exp(0.2) and stds.min() >= 0.003 * math.exp(-0.2)


def test_unknown_preset_is_one_line(tmp_path):
    r = cli("sweep", "model.preset=nope", "nfe=5", "sampler=ddim", "num_images=8", f"results_dir={tmp_path}")
    assert r.returncode == 2
    assert "model.preset=nope is unknown; choose one of classic, image" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "default").exists()  # refused before anything was planned or generated
    r = cli(
        "sweep",
        "metrics.mmd.bandwidth=-1",
        "nfe=5",
        "sampler=ddim",
        "num_images=8",
        f"results_dir={tmp_path}",
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "metrics.mmd.bandwidth=-1 must be auto or a positive number" in r.stderr
    assert not (tmp_path / "default").exists()  # refused before anything was generated


def _metrics(tmp_path, run: str, *args: str) -> pd.DataFrame:
    """generate, then metrics (the sweep without its report stage); the metrics stage reads the run's plan."""
    r = cli("generate", *args, f"run={run}", f"results_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli("metrics", f"run={run}", f"results_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    return pd.read_csv(tmp_path / run / "metrics.csv")


def test_every_ode_sampler_converges_on_the_default_preset(tmp_path):
    """Issue 16: on the default preset every ODE sampler's traj_err falls from NFE 5 to 10 to 20 (its
    default options, the default schedule; a sampler that cannot spend an NFE exactly runs the nearest
    lower budget). The flow-only samplers need a flow model and are checked on gmm_flow elsewhere."""
    names = [n for n, s in SAMPLERS.items() if s.kind == "ode" and "flow" not in n]
    assert len(names) >= 30
    df = _metrics(
        tmp_path,
        "mono",
        f"sampler={','.join(names)}",
        "nfe=5,10,20",
        "num_images=64",
        "allow_lower_nfe=true",
        "timing.repeats=1",
        "metrics.names=[traj_err]",
    )
    err = df[df.metric == "traj_err"].pivot_table(index="sampler", columns="nfe", values="value")
    assert len(err) == len(names)
    bad = err[~((err[5] > err[10]) & (err[10] > err[20]))]
    assert bad.empty, bad


def test_default_sweep_separates_first_order_samplers_at_nfe_10(tmp_path):
    """Issue 16, Done when: at the default sample count (1000) on the default preset, mmd_exact's 95%
    intervals of ddim and euler lie above those of the high-order samplers of the default sweep at
    NFE 10, without overlap."""
    df = _metrics(
        tmp_path,
        "sep",
        "sampler=ddim,euler,dpmpp,unipc,ipndm",
        "nfe=10",
        "timing.repeats=1",
        "metrics.names=[mmd_exact]",
    )
    rows = df[df.metric == "mmd_exact"].set_index("sampler")
    assert set(rows.n_images) == {1000}
    first = rows.loc[["ddim", "euler"]]
    high = rows.loc[["dpmpp", "unipc", "ipndm"]]
    assert first.ci_low.min() > high.ci_high.max(), rows[["value", "ci_low", "ci_high"]]
