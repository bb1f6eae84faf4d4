"""InceptionFeatures + metric functions against torch-fidelity's and clean-fid's own end-to-end runs.

No network: the Inception is randomly initialised and saved in torch-fidelity's upstream weights format,
and both libraries load it from that file. Random weights do not make FID meaningful, but equality of
the pipelines does not depend on the weight values. A CPU forward costs about 0.1 s per image on two
cores (several times that on a busy machine), so each expensive result is computed once per module.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from samplebench.errors import UsageError
from samplebench.metrics import inception as inc
from samplebench.metrics.images import iter_image_batches, list_images

N_IMAGES = 40  # per folder
KID_SUBSET = 20
ISC_SPLITS = 10
N_CLEAN = 8  # per folder, for the clean-fid comparison
RTOL = 1e-4


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def write_images(folder: Path, n: int, kind: int, seed: int, size: int = 48) -> Path:
    """Smooth gradients with a blob (kind 0) or stripes with a different palette (kind 1), plus noise."""
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    for i in range(n):
        if kind == 0:
            a, b = rng.uniform(0, 255, (2, 3))
            img = a * xx[..., None] + b * yy[..., None]
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.uniform(0, 255, 3)
        else:
            freq, phase = rng.uniform(2, 8), rng.uniform(0, 2 * np.pi)
            stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx + rng.uniform(-1, 1) * yy) + phase)
            img = stripes[..., None] * rng.uniform(100, 255, 3) + (1 - stripes[..., None]) * rng.uniform(
                0, 80, 3
            )
        img = img + rng.normal(0, 8, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inception")
    weights = inc.save_random_weights(root / inc.WEIGHTS_FILENAME, seed=0)
    f1 = write_images(root / "gen", N_IMAGES, kind=0, seed=1)
    f2 = write_images(root / "ref", N_IMAGES, kind=1, seed=2)
    c1 = write_images(root / "gen_clean", N_CLEAN, kind=0, seed=3)
    c2 = write_images(root / "ref_clean", N_CLEAN, kind=1, seed=4)
    return dict(weights=weights, f1=f1, f2=f2, c1=c1, c2=c2)


@pytest.fixture(scope="module")
def legacy(data) -> inc.InceptionFeatures:
    return inc.InceptionFeatures("legacy", weights_path=data["weights"], batch_size=64)


def folder_features(ext: inc.InceptionFeatures, folder: Path) -> dict[str, np.ndarray]:
    parts = [ext(b) for b in iter_image_batches(list_images(folder), 64)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(scope="module")
def ours(data, legacy) -> dict:
    return {"gen": folder_features(legacy, data["f1"]), "ref": folder_features(legacy, data["f2"])}


@pytest.fixture(scope="module")
def fidelity(data) -> dict:
    import torch_fidelity

    return torch_fidelity.calculate_metrics(
        input1=str(data["f1"]),
        input2=str(data["f2"]),
        isc=True,
        fid=True,
        kid=True,
        prc=True,
        feature_extractor="inception-v3-compat",  # prc defaults to VGG16 otherwise
        feature_extractor_weights_path=str(data["weights"]),
        kid_subset_size=KID_SUBSET,
        isc_splits=ISC_SPLITS,
        cuda=False,
        verbose=False,
        cache=False,
        save_cpu_ram=True,
    )


def test_weights_file_has_upstream_layout(data, legacy) -> None:
    state = torch.load(data["weights"], weights_only=True)
    assert type(state) is dict  # torch-fidelity's converter saves a plain dict
    expected = {k for k in legacy.net.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(state) == expected and len(state) == 472  # 94 convs, 94 batch norms x 4, fc weight + bias
    assert all(v.dtype == torch.float32 for v in state.values())


def test_fid_kid_isc_prc_match_torch_fidelity(ours, fidelity) -> None:
    gen, ref = ours["gen"], ours["ref"]
    assert gen["pool"].shape == (N_IMAGES, 2048) and gen["logits"].shape == (N_IMAGES, 1008)
    mu, sigma = inc.statistics(ref["pool"])
    fid = inc.fid_from_features(gen["pool"], mu, sigma)
    kid_mean, kid_std = inc.kid_from_features(gen["pool"], ref["pool"], subsets=100, subset_size=KID_SUBSET)
    isc_mean, isc_std = inc.isc_from_logits(gen["logits"], splits=ISC_SPLITS)
    precision, recall = inc.prc_from_features(gen["pool"], ref["pool"], neighborhood=3)
    assert fid > 1 and kid_mean > 0 and isc_mean > 1.01  # not a degenerate network
    assert rel(fid, fidelity["frechet_inception_distance"]) < RTOL
    assert rel(kid_mean, fidelity["kernel_inception_distance_mean"]) < RTOL
    assert rel(kid_std, fidelity["kernel_inception_distance_std"]) < RTOL
    assert rel(isc_mean, fidelity["inception_score_mean"]) < RTOL
    assert rel(isc_std, fidelity["inception_score_std"]) < RTOL
    assert precision == pytest.approx(fidelity["precision"], abs=1e-9)
    assert recall == pytest.approx(fidelity["recall"], abs=1e-9)


def test_kid_subset_size_is_capped_like_a_smaller_torch_fidelity_subset(ours) -> None:
    from torch_fidelity.metric_kid import kid_features_to_metric

    gen, ref = ours["gen"]["pool"][:10], ours["ref"]["pool"]
    capped = inc.kid_from_features(gen, ref, subsets=20, subset_size=1000)
    direct = kid_features_to_metric(
        torch.from_numpy(gen), torch.from_numpy(ref), kid_subsets=20, kid_subset_size=10, verbose=False
    )
    assert capped == (direct["kernel_inception_distance_mean"], direct["kernel_inception_distance_std"])
    assert inc.kid_from_features(gen, ref, subsets=20, subset_size=1000, seed=1) != capped


def clean_fid_reference(data) -> tuple[float | None, np.ndarray, np.ndarray]:
    """clean-fid's compute_fid on c1 vs c2 with our network as its custom extractor (the reference).

    Returns its FID and the pooled features it extracted for c1 and c2. clean-fid's scipy sqrtm can
    leave an imaginary part on singular covariances (n << 2048) and raise: then the FID is None and
    callers use torch-fidelity's formula on clean-fid's own features.
    """
    from cleanfid import fid as cleanfid

    ext = inc.InceptionFeatures("clean", weights_path=data["weights"], batch_size=64)
    seen: list[np.ndarray] = []

    def extractor(x: torch.Tensor) -> torch.Tensor:
        # clean-fid hands over float32 NCHW in 0..255 after its own resize to 299
        assert x.dtype == torch.float32 and tuple(x.shape[1:]) == (3, 299, 299)
        pool = inc.forward_resized(ext.net, x)[0]
        seen.append(pool.numpy().astype(np.float64))
        return pool

    try:
        expected: float | None = float(
            cleanfid.compute_fid(
                str(data["c1"]),
                str(data["c2"]),
                mode="clean",
                custom_feat_extractor=extractor,
                num_workers=0,
                device=torch.device("cpu"),
                batch_size=64,
                verbose=False,
            )
        )
    except ValueError as e:
        assert "Imaginary component" in str(e)
        expected = None
    feats = np.concatenate(seen)
    return expected, feats[:N_CLEAN], feats[N_CLEAN:]


def test_clean_mode_matches_clean_fid(data, legacy) -> None:
    ext = inc.InceptionFeatures("clean", weights_path=data["weights"], batch_size=64)
    expected, clean_gen, clean_ref = clean_fid_reference(data)
    gen, ref = folder_features(ext, data["c1"]), folder_features(ext, data["c2"])
    np.testing.assert_allclose(gen["pool"], clean_gen, rtol=1e-5, atol=1e-5 * np.abs(clean_gen).max())
    np.testing.assert_allclose(ref["pool"], clean_ref, rtol=1e-5, atol=1e-5 * np.abs(clean_ref).max())
    if expected is None:
        expected = inc.fid_from_features(clean_gen, *inc.statistics(clean_ref))
    got = inc.fid_from_features(gen["pool"], *inc.statistics(ref["pool"]))
    assert rel(got, expected) < RTOL
    assert ext.protocol["mode"] == "clean" and ext.fingerprint() != legacy.fingerprint()


def test_forward_resized_is_torch_fidelity_forward_at_299(legacy) -> None:
    """The float path used by clean mode runs the same network as torch-fidelity's uint8 forward."""
    rng = np.random.RandomState(5)
    x = torch.from_numpy(rng.randint(0, 256, (2, 3, 299, 299)).astype(np.uint8))
    with torch.no_grad():
        pool_ref, logits_ref = legacy.net(x)
        pool, logits = inc.forward_resized(legacy.net, x.float())
    torch.testing.assert_close(pool, pool_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)


def test_batch_size_does_not_change_features(data, ours) -> None:
    small = inc.InceptionFeatures("legacy", weights_path=data["weights"], batch_size=7)
    images = next(iter_image_batches(list_images(data["f1"])[:8], 64))
    got = small(images)  # batches of 7 and 1, against one batch of 16
    for key in ("pool", "logits"):
        ref = ours["gen"][key][:8]
        assert np.abs(got[key] - ref).max() <= 1e-5 * np.abs(ref).max()  # float32 kernels differ by batch


def test_protocol_records_the_weights_hash(data, legacy) -> None:
    assert legacy.protocol == {
        "extractor": "torch-fidelity inception-v3-compat",
        "weights_sha256": hashlib.sha256(Path(data["weights"]).read_bytes()).hexdigest(),
        "mode": "legacy",
        "resolution": "299",
        "torch_fidelity": "0.4.0",
    }
    assert len(legacy.fingerprint()) == 16


def test_missing_weights_file_is_a_usage_error(tmp_path) -> None:
    with pytest.raises(UsageError, match="metrics.inception_weights") as e:
        inc.InceptionFeatures(weights_path=tmp_path / "nope.pth")
    assert "nope.pth" in str(e.value) and "\n" not in str(e.value)


def test_not_a_weights_file_is_a_usage_error(tmp_path) -> None:
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    with pytest.raises(UsageError, match="not torch-fidelity's Inception state_dict"):
        inc.InceptionFeatures(weights_path=bad)


def test_offline_without_cached_weights_is_a_usage_error(monkeypatch) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tfi, "load_state_dict_from_url", offline)
    with pytest.raises(UsageError) as e:
        inc.InceptionFeatures(weights_path=None)
    assert str(e.value) == (
        "Inception weights are not cached and cannot be downloaded; download "
        "weights-inception-2015-12-05-6726825d.pth where there is network and set "
        "metrics.inception_weights=<path>"
    )


def test_list_images_filters_sorts_and_rejects_empty(tmp_path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "sub" / "deep.png")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match=f"no images .* in {re.escape(str(tmp_path))}"):
        list_images(tmp_path)
    for name in ("b.PNG", "a.jpg", "c.webp", "d.bmp", "e.jpeg"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp", "d.bmp", "e.jpeg"]


def test_iter_image_batches_rgb_uint8_and_size_mismatch(tmp_path) -> None:
    Image.new("L", (6, 4), 7).save(tmp_path / "0.png")  # grey is converted to RGB, as torch-fidelity does
    Image.new("RGBA", (6, 4)).save(tmp_path / "1.png")
    Image.new("RGB", (6, 4)).save(tmp_path / "2.png")
    batches = list(iter_image_batches(list_images(tmp_path), 2))
    assert [b.shape for b in batches] == [(2, 4, 6, 3), (1, 4, 6, 3)] and batches[0].dtype == np.uint8
    assert (batches[0][0] == 7).all()
    Image.new("RGB", (5, 5)).save(tmp_path / "3.png")
    with pytest.raises(UsageError, match=r"3\.png is 5x5 but 0\.png is 6x4"):
        list(iter_image_batches(list_images(tmp_path), 100))


# -- `samplebench score` end to end, on the same folders and weights file ------------------------------
def score(folder, ref, tmp_path, *extra):
    out = tmp_path / "score.csv"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "samplebench.cli",
            "score",
            str(folder),
            "--ref",
            str(ref),
            "--out",
            str(out),
            f"results_dir={tmp_path / 'results'}",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return pd.read_csv(out).set_index("metric")["value"]


def test_score_equals_torch_fidelity(data, fidelity, tmp_path):
    got = score(
        data["f1"],
        data["f2"],
        tmp_path,
        f"metrics.inception_weights={data['weights']}",
        "metrics.names=[fid,kid,is]",
        f"metrics.kid.subset_size={KID_SUBSET}",
        "metrics.is.splits=10",
        "metrics.fid.bootstrap=10",
    )
    assert rel(got["fid"], fidelity["frechet_inception_distance"]) < 1e-4
    assert rel(got["kid"], fidelity["kernel_inception_distance_mean"]) < 1e-4
    assert rel(got["is"], fidelity["inception_score_mean"]) < 1e-4


def test_score_clean_mode_equals_clean_fid(data, tmp_path):
    expected, clean_gen, clean_ref = clean_fid_reference(data)
    if expected is None:
        expected = inc.fid_from_features(clean_gen, *inc.statistics(clean_ref))
    got = score(
        data["c1"],
        data["c2"],
        tmp_path,
        f"metrics.inception_weights={data['weights']}",
        "metrics.names=[fid]",
        "metrics.fid.mode=clean",
        "metrics.fid.bootstrap=10",
    )
    assert rel(got["fid"], expected) < 1e-4
