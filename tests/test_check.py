"""`samplebench check`: the project's own regression check against the committed baseline."""

from pathlib import Path

import pandas as pd
import pytest
from cli_run import cli  # tests/cli_run.py

BASELINE = Path(__file__).resolve().parents[1] / "results" / "baselines" / "gmm-small.csv"
# The same sweep's baseline as committed before presets existed (model=gmm was then the classic mixture),
# its rows relabelled gmm[preset=classic]: what `model.preset=classic` must still reproduce.
CLASSIC = BASELINE.with_name("gmm-classic-small.csv")
SWEEP = ["sampler=ddim,dpmpp,unipc", "nfe=5,10", "guidance=1,2", "num_images=500", "metrics.bootstrap=200"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    r = cli("sweep", *SWEEP, "run=ci-check", f"results_dir={root}")
    assert r.returncode == 0, r.stderr
    return root


def check(root, baseline, *extra):
    return cli("check", "run=ci-check", f"results_dir={root}", "--baseline", str(baseline), *extra)


def test_the_committed_baseline_passes(run):
    # The same small analytic sweep CI runs: it must reproduce the committed numbers.
    r = check(run, BASELINE)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check passed: 36 rows" in " ".join(r.stdout.split())


def test_the_classic_preset_reproduces_the_baseline_of_earlier_versions(tmp_path):
    r = cli("sweep", *SWEEP, "model.preset=classic", "run=ci-check", f"results_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    r = check(tmp_path, CLASSIC)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check passed: 24 rows" in " ".join(r.stdout.split())


def test_an_injected_regression_fails_with_a_table(run, tmp_path):
    # The baseline here is this machine's own run: float results of the committed baseline differ
    # from other machines' in the last digits, and the abs=0 check below needs every untouched row
    # to equal its baseline exactly. (The committed baseline is checked, within its tolerance, above.)
    metrics = run / "ci-check" / "metrics.csv"
    original = metrics.read_text()
    baseline = tmp_path / "same-machine.csv"
    baseline.write_text(original)
    try:
        df = pd.read_csv(metrics)
        worse = (df.sampler == "dpmpp") & (df.nfe == 10) & (df.metric == "traj_err") & (df.guidance == 1.0)
        df.loc[worse, "value"] *= 1.2  # lower is better: 20% worse
        df.to_csv(metrics, index=False)
        r = check(run, baseline)
        assert r.returncode == 1
        assert "1 of 36 rows regressed" in " ".join(r.stdout.split())
        assert "dpmpp" in r.stdout and "traj_err" in r.stdout
        assert check(run, baseline, "--tolerance", "rel=0.25").returncode == 0  # within a looser tolerance
        assert check(run, baseline, "--tolerance", "ci").returncode == 1  # outside the baseline's interval
        better = df.copy()
        better.loc[worse, "value"] /= 1.2 * 1.5  # an improvement is never a regression
        better.to_csv(metrics, index=False)
        assert check(run, baseline, "--tolerance", "abs=0").returncode == 0
    finally:
        metrics.write_text(original)


def test_missing_rows_fail(run, tmp_path):
    extra = pd.read_csv(BASELINE)
    extra = pd.concat([extra, extra.iloc[[0]].assign(sampler="heun")])
    path = tmp_path / "baseline.csv"
    extra.to_csv(path, index=False)
    r = check(run, path)
    assert r.returncode == 1 and "missing" in r.stdout


def test_bad_tolerance_is_a_usage_error(run):
    r = check(run, BASELINE, "--tolerance", "lots")
    assert r.returncode == 2 and r.stderr.startswith("error: --tolerance lots")
