"""The papers' samplers (issue 13) through the user path of the image models (`model=sd15
model.path=...` on a tiny random pipeline in the upstream format): counted NFE equal to the request,
finite images, and teleportation's moments from a reference image folder."""

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
from samplebench.samplers.teleport import reference_moments

# name -> extra sampler overrides (teleport's reference folder is filled in by the test)
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
}
# dc_solver runs its ratio search through this same path in test_dc_solver.py (sd15, DiT, DDPM);
# dpm_solver_v3 on image models is refused in one line (their statistics need JVPs over encoded
# reference data, not built yet): test_dpm_solver_v3.py.


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
    if name == "teleport":
        extra.append(f"sampler.moments={reference_images}")
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
    # the second call reads the cache (the same arrays, bit for bit)
    again = reference_moments(model, reference_images, tmp_path / "cache")
    assert all(torch.equal(a, b) for a, b in zip((mean, vectors, values), again, strict=True))


def test_teleport_on_an_image_model_without_moments_is_refused_at_plan_time(tmp_path, sd):
    with pytest.raises(UsageError, match="needs the data's statistics: set sampler.moments="):
        generate(plan(overrides(tmp_path, "sd15", sd, "q", "sampler=teleport", "nfe=5")))
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").rglob("*.npz"))
