"""The papers' samplers (issue 13) through the user path of the image models (`model=sd15
model.path=...` on a tiny random pipeline in the upstream format): counted NFE equal to the request,
finite images, teleportation's moments and DPM-Solver-v3's statistics from a reference image folder."""

import os

import numpy as np
import pytest
import tiny_models  # tests/tiny_models.py
import torch
from omegaconf import OmegaConf
from PIL import Image
from test_image_models import cells_on_disk, overrides

from samplebench.config import conf_dir, plan
from samplebench.errors import UsageError
from samplebench.generate import generate
from samplebench.models import load_model
from samplebench.samplers import teleport
from samplebench.samplers.teleport import reference_moments

# name -> extra sampler overrides (teleport's and dpm_solver_v3's reference folder is filled in by the
# test; v3's statistics on the smallest grid and one sample per image, computed inside the first cell's call)
PAPER_SAMPLERS = {
    "hb": [],
    "ghvb": [],
    "dpmpp_hb": [],
    "deis_tab": [],
    "deis_rhoab": [],
    "deis_rhork": [],
    "teleport": ["sampler.skip=2"],
    "ts_ddim": [],
    "ts_dpmpp": [],
    "dpm_solver_v3": ["sampler.ems_grid=12", "sampler.ems_samples=6"],
}
REFERENCE_OPTION = {"teleport": "sampler.moments", "dpm_solver_v3": "sampler.ems_data"}
# dc_solver runs its ratio search through this same path in test_dc_solver.py (sd15, DiT, DDPM).


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_models.make_tiny_sd(tmp_path_factory.mktemp("pipelines") / "sd15")


@pytest.fixture(scope="module")
def reference_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(0)
    for i in range(6):  # smooth random images at another size than the model's 64 px (resized)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((48, 48), Image.BILINEAR).save(folder / f"{i}.png")
    return folder


def _nfe(name, extra, target=5):
    from samplebench.samplers import SAMPLERS

    opts = {k.split("=")[0].removeprefix("sampler."): int(k.split("=")[1]) for k in extra if "=" in k}
    spec = SAMPLERS[name]
    from test_samplers import options

    rule = spec.rule({**options(name), **opts}, {"name": "karras"})
    return rule.nfe(rule.steps(target, name, allow_lower=True))


@pytest.mark.parametrize("name", sorted(PAPER_SAMPLERS))
def test_counted_nfe_is_the_request_on_the_tiny_sd_pipeline(tmp_path, sd, reference_images, name):
    extra = list(PAPER_SAMPLERS[name])
    nfe = _nfe(name, extra)
    if name in REFERENCE_OPTION:
        extra.append(f"{REFERENCE_OPTION[name]}={reference_images}")
    generate(
        plan(overrides(tmp_path, "sd15", sd, "p", f"sampler={name}", f"nfe={nfe}", "guidance=1,3", *extra))
    )
    cells = cells_on_disk(tmp_path, "p")
    assert len(cells) == 2
    for key, c in cells.items():
        assert (c["nfe"] == nfe).all(), (key, c["nfe"])
        assert np.isfinite(c["samples"]).all() and c["images"].dtype == np.uint8


def test_teleport_moments_are_the_encoded_reference_images_mean_and_covariance(
    tmp_path, sd, reference_images
):
    """Against numpy on the same states, encoded here with diffusers' AutoencoderKL directly (posterior
    mean times the scaling factor) after the same PIL bicubic resize."""
    from diffusers import AutoencoderKL

    cfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / "model" / "sd15.yaml"))
    model = load_model({**cfg, "path": str(sd), "dtype": "float32"}, "cpu")
    teleport._MOMENTS.clear()  # (a sweep above may have computed them in this process)
    mean, vectors, values = reference_moments(model, reference_images, tmp_path / "cache")
    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae")
    imgs = [
        np.asarray(Image.open(p).convert("RGB").resize((64, 64), Image.BICUBIC))
        for p in sorted(reference_images.iterdir())
    ]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = (
            (vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
            .reshape(len(imgs), -1)
            .double()
            .numpy()
        )
    np.testing.assert_allclose(mean.numpy(), z.mean(0), rtol=0, atol=1e-5 * np.abs(z).max())
    cov = (vectors * values) @ vectors.T
    np.testing.assert_allclose(cov.numpy(), np.cov(z.T), rtol=0, atol=1e-5 * np.abs(np.cov(z.T)).max())
    assert vectors.shape[1] == len(imgs) - 1  # rank n - 1
    # a later batch of the process takes them from memory; a new process reads the cache file (the
    # same arrays, bit for bit) without encoding the images again
    assert reference_moments(model, reference_images, tmp_path / "cache")[1] is vectors
    teleport._MOMENTS.clear()
    model.encode_images = None  # encoding again would fail
    again = reference_moments(model, reference_images, tmp_path / "cache")
    assert all(torch.equal(a, b) for a, b in zip((mean, vectors, values), again, strict=True))
    # a reference image touched but unchanged keeps its digest (content, not mtime); an edited one is
    # read again and moves the cache key, so the moments are computed anew (and encoding fails here)
    first = sorted(reference_images.iterdir())[0]
    original = first.read_bytes()
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    assert reference_moments(model, reference_images, tmp_path / "cache")[1] is again[1]
    try:
        Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(first)
        with pytest.raises(TypeError):
            reference_moments(model, reference_images, tmp_path / "cache")
    finally:
        first.write_bytes(original)


def test_teleport_on_an_image_model_without_moments_is_refused_at_plan_time(tmp_path, sd):
    with pytest.raises(UsageError, match="needs the data's statistics: set sampler.moments="):
        generate(plan(overrides(tmp_path, "sd15", sd, "q", "sampler=teleport", "nfe=5")))
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").rglob("*.npz"))


def _sd_model(sd):
    cfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / "model" / "sd15.yaml"))
    return load_model({**cfg, "path": str(sd), "dtype": "float32"}, "cpu")


def test_v3_image_statistics_of_a_gaussian_denoiser_match_the_closed_form(sd, reference_images, monkeypatch):
    """The image-model estimator (reference images encoded by the tiny SD VAE, forward-mode JVPs, the
    central difference in lambda) on the tiny model's state shape, with the network replaced by the
    denoiser of element-wise Gaussian data N(mu, c): D = mu + c / (c + sigma^2) (x - mu). Its Jacobian
    is diagonal, so Hutchinson's estimate is exact: l = sigma^2 / (c + sigma^2) for any data (to
    rounding). f = sigma eps - l x = -mu l is deterministic, so s = 0, and b = E f_d with
    f_d = -mu l' - (l_d - l') x (l_d the estimator's smoothed finite difference of l, l' the exact
    derivative -2 sigma^2 c / (c + sigma^2)^2), against which b is checked at 1e-6 of its largest
    element with the lambda difference's step at 1e-3 (at the default 1e-2 the difference is 2e-4 of it:
    the central difference's h^2 truncation, c down to 0.1 here)."""
    from samplebench.samplers import ems as ems_mod

    model = _sd_model(sd)
    shape = model.sample_shape
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    c = torch.rand(shape, generator=g, dtype=torch.float64) * 2 + 0.1

    def gaussian_denoise(x, sigma, cond):
        s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1) ** 2
        return mu + c / (c + s2) * (x - mu)

    monkeypatch.setattr(model, "denoise", gaussian_denoise)
    monkeypatch.setattr(ems_mod, "LAMBDA_STEP", 1e-3)
    n = 8  # more than the 6 images: cycled
    ems = ems_mod.compute_ems_images(model, reference_images, 1.0, grid_size=16, n_samples=n)
    sig2 = np.exp(-2 * ems.lambdas).reshape(-1, 1, 1, 1)
    cn = c.numpy()
    l_exact = sig2 / (cn + sig2)
    np.testing.assert_allclose(ems.l, l_exact, rtol=0, atol=1e-12)
    assert np.all(ems.s == 0)
    l_prime = -2 * sig2 * cn / (cn + sig2) ** 2
    l_d = ems_mod._smoothed_derivative(l_exact, ems.lambdas)
    x0 = ems_mod.reference_data(model, reference_images, n)
    z, _ = ems_mod._draws(x0, 0)
    x_mean = x0.mean(0).numpy() + np.sqrt(sig2) * z.mean(0).numpy()
    b_exact = -mu.numpy() * l_prime - (l_d - l_prime) * x_mean
    scale = np.abs(b_exact).max()
    np.testing.assert_allclose(ems.b, b_exact, rtol=0, atol=1e-6 * scale)


def test_v3_on_an_image_model_ems_then_generate_reuses_the_cache_and_refusals(
    tmp_path, sd, reference_images, monkeypatch
):
    """`samplebench ems` computes the statistics from sampler.ems_data once (a file under
    <results_dir>/.cache/ems/); a generate with the same options finds the file (this process's memo
    cleared first) and computes nothing; without ems_data the refusal is one line naming the option,
    and the analytic model refuses the option."""
    from cli_run import cli_here

    from samplebench.samplers import ems as ems_mod

    res = tmp_path / "res"
    common = [
        "model=sd15",
        f"model.path={sd}",
        "model.dtype=float32",
        "sampler=dpm_solver_v3",
        "sampler.ems_grid=12",
        "sampler.ems_samples=2",
        f"sampler.ems_data={reference_images}",
        f"results_dir={res}",
    ]
    made = cli_here("ems", *common)
    assert made.returncode == 0, made.stderr
    assert "computed" in made.stderr
    files = list((res / ".cache" / "ems").glob("*.npz"))
    assert len(files) == 1
    monkeypatch.setattr(ems_mod, "_MEMO", {})
    calls = []
    monkeypatch.setattr(ems_mod, "compute_ems_images", lambda *a, **k: calls.append(a))
    gen = cli_here(
        "generate", *common, "nfe=5", "num_images=2", "batch_size=2", "shard_size=2", "run=v3", "device=cpu"
    )
    assert gen.returncode == 0, gen.stderr
    assert "computed" not in gen.stderr and not calls
    assert list((res / ".cache" / "ems").glob("*.npz")) == files
    refused = cli_here("generate", *common[:4], "nfe=5", f"results_dir={res}")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "sampler.ems_data" in refused.stderr
    gmm = cli_here("generate", "sampler=dpm_solver_v3", f"sampler.ems_data={reference_images}", "nfe=5")
    assert gmm.returncode == 2 and "model=gmm has exact data draws" in gmm.stderr
