"""`samplebench score` end to end against the upstream libraries on the same folders and the same
random-weight Inception file (saved in torch-fidelity's format): torch-fidelity's calculate_metrics for
FID/KID/IS (legacy resize) and clean-fid's compute_fid in clean mode."""

import subprocess
import sys

import numpy as np
import pandas as pd
import torch
from test_inception import KID_SUBSET, N_CLEAN, data, fidelity, rel  # noqa: F401  (fixtures)

from samplebench.metrics import inception as inc


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


def test_score_equals_torch_fidelity(data, fidelity, tmp_path):  # noqa: F811
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


def test_score_clean_mode_equals_clean_fid(data, tmp_path):  # noqa: F811
    from cleanfid import fid as cleanfid

    ext = inc.InceptionFeatures("clean", weights_path=data["weights"], batch_size=64)
    seen = []

    def extractor(x):
        pool = inc.forward_resized(ext.net, x)[0]
        seen.append(pool.numpy().astype(np.float64))
        return pool

    try:
        expected = float(
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
    except ValueError as e:  # clean-fid's sqrtm on a singular covariance (n << 2048): same features, torch-
        assert "Imaginary component" in str(e)  # fidelity's formula
        feats = np.concatenate(seen)
        expected = inc.fid_from_features(feats[:N_CLEAN], *inc.statistics(feats[N_CLEAN:]))
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
