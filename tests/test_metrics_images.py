"""The metrics stage on a real (tiny) Stable-Diffusion run, with every metric network in its upstream
file format and random weights, through the options users set."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import tiny_models  # tests/tiny_models.py
from cli_run import cli  # tests/cli_run.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgmetrics")
    sd = tiny_models.make_tiny_sd(root / "sd")
    inputs = tiny_models.make_metric_inputs(root)
    metrics, ref, inception = inputs["overrides"], inputs["ref"], inputs["inception"]
    gen = [
        "model=sd15",
        f"model.path={sd}",
        "sampler=ddim,dpmpp",
        "nfe=3,5",
        "guidance=3",
        "batch_size=4",
        "shard_size=4",
        f"results_dir={root / 'results'}",
        "run=r",
    ]
    r = cli("sweep", *gen, "num_images=8", *metrics)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "gen": gen, "metrics": metrics, "ref": ref, "inception": inception, "first": r}


def test_every_metric_has_a_row_with_an_interval_and_a_protocol(setup):
    run = setup["root"] / "results" / "r"
    df = pd.read_csv(run / "metrics.csv")
    names = {
        "fid",
        "kid",
        "precision",
        "recall",
        "is",
        "clip_score",
        "clip_score_paper",
        "image_reward",
        "traj_mse",
    }
    assert set(df.metric) == names
    assert len(df) == 4 * len(names) and (df.n_images == 8).all()
    assert (df.ci_low <= df.ci_high).all() and df[["value", "ci_low", "ci_high"]].notna().all().all()
    means = df[df.metric.isin(["clip_score", "image_reward", "traj_mse"])]
    assert ((means.ci_low <= means.value) & (means.value <= means.ci_high)).all()
    assert (df[df.metric == "traj_mse"].value > 0).all()
    both = df.pivot_table(index=["sampler", "nfe"], columns="metric", values="value")
    np.testing.assert_allclose(
        both["clip_score_paper"], both["clip_score"] * 0.025, rtol=1e-9
    )  # same cosines
    sidecar = json.loads((run / "metrics.protocol.json").read_text())["rows"]
    fid = sidecar["sd15|dpmpp|karras|5|3.0|fid"]
    assert fid["mode"] == "legacy" and len(fid["weights_sha256"]) == 64 and fid["reference_images"] == "12"
    assert "reference_hash" in fid
    assert "scaling" in sidecar["sd15|dpmpp|karras|5|3.0|clip_score"]
    assert sidecar["sd15|ddim|karras|3|3.0|traj_mse"]["reference_sampler"] == "dpmpp_3m"
    paired = pd.read_csv(run / "paired.csv")
    assert {"clip_score", "image_reward", "traj_mse"} <= set(paired.metric)


def test_a_second_pass_hits_the_cache_and_more_images_compute_only_the_new_shards(setup):
    root, gen, metrics = setup["root"], setup["gen"], setup["metrics"]
    assert "blocks computed" in setup["first"].stderr
    before = (root / "results" / "r" / "metrics.csv").read_text()
    again = cli("metrics", "run=r", f"results_dir={root / 'results'}", *metrics)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "blocks computed" not in again.stderr  # nothing recomputed
    assert (root / "results" / "r" / "metrics.csv").read_text() == before
    grown = cli("sweep", *gen, "num_images=12", *metrics)
    assert grown.returncode == 0, grown.stderr[-2000:]
    computed = int(re.search(r"(\d+) feature or reference blocks computed", grown.stderr).group(1))
    # One new shard per cell: Inception, CLIP and ImageReward per cell (4 cells), and one reference
    # solve shared by all four cells (same model, guidance, seed and prompts).
    assert computed == 4 * 3 + 1
    assert (pd.read_csv(root / "results" / "r" / "metrics.csv").n_images == 12).all()


def test_score_on_a_cell_folder_equals_the_metrics_stage(setup):
    root = setup["root"]
    cell = root / "results" / "r" / "sd15" / "dpmpp" / "karras" / "nfe=5" / "cfg=3"
    out = root / "score.csv"
    r = cli(
        "score",
        str(cell),
        "--ref",
        str(setup["ref"]),
        "--out",
        str(out),
        f"results_dir={root / 'results'}",
        f"metrics.inception_weights={setup['inception']}",
        "metrics.names=[fid,is]",
        "metrics.is.splits=2",
        "metrics.fid.bootstrap=20",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    scored = pd.read_csv(out).set_index("metric")["value"]
    rows = pd.read_csv(root / "results" / "r" / "metrics.csv")
    fid = rows[(rows.sampler == "dpmpp") & (rows.nfe == 5) & (rows.metric == "fid")].value.item()
    assert scored["fid"] == pytest.approx(fid, rel=1e-9)


def test_a_reference_with_another_protocol_is_refused(setup, tmp_path):
    from samplebench.metrics.image import ImageContext, load_reference, save_reference

    cfg = {"inception_weights": str(setup["inception"]), "fid": {"mode": "legacy"}, "batch_size": 8}
    ref = load_reference(ImageContext(cfg, tmp_path / "cache"), str(setup["ref"]))
    saved = tmp_path / "ref.npz"
    save_reference(ref, saved)
    assert load_reference(ImageContext(cfg, tmp_path / "cache"), str(saved)).mu.shape == (2048,)
    clean = {**cfg, "fid": {"mode": "clean"}}
    with pytest.raises(Exception, match="different protocol"):
        load_reference(ImageContext(clean, tmp_path / "cache"), str(saved))
