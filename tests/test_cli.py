"""The command line as a user meets it: one-line errors with exit code 2, and a full sweep."""

import pandas as pd
import pytest
from cli_run import cli  # tests/cli_run.py

BAD = [
    (["sweep", "sampler=foo"], "sampler=foo is unknown"),
    (["sweep", "sampler=ddim,dpmp"], "did you mean dpmpp"),
    (["sweep", "model=sd99"], "model=sd99 is unknown"),
    (["sweep", "nfe=0"], "nfe=0 must be a positive integer"),
    (["sweep", "nfe=ten"], "nfe=ten must be a positive integer"),
    (["sweep", "nfe=2.5"], "must be a positive integer"),
    (["sweep", "guidance=-1"], "guidance=-1 must be a number >= 0"),
    (["sweep", "sampelr=ddim"], "unknown key 'sampelr' (did you mean sampler?)"),
    (["sweep", "sampler=unipc", "sampler.ordr=3"], "did you mean order?"),
    (["sweep", "sampler=heun", "nfe=10"], "cannot spend exactly nfe=10"),
    (["sweep", "sampler=hb", "sampler.beta=1.5"], "sampler.beta=1.5 must be a number in (0, 1]"),
    (["sweep", "sampler=ghvb", "sampler.beta=0"], "sampler.beta=0 must be a number in (0, 1]"),
    (["sweep", "sampler=dpmpp_hb", "sampler.beta=-0.2"], "sampler.beta=-0.2 must be a number in (0, 1]"),
    (["sweep", "sampler=ghvb", "sampler.order=5"], "sampler.order=5 is not valid for sampler=ghvb"),
    (["sweep", "run=../escape"], "must be a plain folder name"),
    (["sweep", "nfe=[1"], "cannot parse overrides"),
    (["metrics", "run=does-not-exist"], "does not exist"),
    (["list", "things"], "cannot list 'things'"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    extra = [] if args[0] == "list" else [f"results_dir={tmp_path}"]
    r = cli(*args, *extra, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert message in lines[0]
    assert "Traceback" not in r.stderr + r.stdout


def test_debug_shows_the_traceback(tmp_path):
    r = cli("--debug", "sweep", "sampler=foo", f"results_dir={tmp_path}")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_list_samplers_shows_nfe_rules():
    r = cli("list", "samplers")
    assert r.returncode == 0
    for name, rule in [("dpmpp", "N"), ("heun", "2N-1"), ("diffusers:pndm", "N+1"), ("dpm_single", "3N-2")]:
        assert any(
            line.split("│")[1].strip() == name and rule in line
            for line in r.stdout.splitlines()
            if "│" in line
        ), (name, r.stdout)


def test_list_samplers_shows_the_papers_samplers_paper_year_and_nfe_rule():
    """Issue 13: each paper's sampler is listed with its paper, year and NFE rule (on its defaults)."""
    r = cli("list", "samplers")
    assert r.returncode == 0
    rows, last = {}, None
    for line in r.stdout.splitlines():  # a row's wrapped cells continue on lines with an empty name
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) != 8:
            continue
        if cells[0]:
            last = rows[cells[0]] = cells
        elif last is not None:
            last[:] = [f"{a} {b}".strip() for a, b in zip(last, cells, strict=True)]
    expected = {
        "hb": ("Wizadwongsa et al. 2024 (ICLR)", "2024", "N"),
        "ghvb": ("Wizadwongsa et al. 2024 (ICLR)", "2024", "N"),
        "dpmpp_hb": ("Wizadwongsa et al. 2024 (ICLR)", "2024", "N"),
        "deis_tab": ("Zhang & Chen 2023 (ICLR)", "2023", "N"),
        "deis_rhoab": ("Zhang & Chen 2023 (ICLR)", "2023", "N"),
        "deis_rhork": ("Zhang & Chen 2023 (ICLR)", "2023", "3N-2"),
        "teleport": ("Wang & Vastola 2024 (TMLR)", "2024", "N-2"),
        "ts_ddim": ("Li et al. 2024 (ICLR)", "2024", "N"),
        "ts_dpmpp": ("Li et al. 2024 (ICLR)", "2024", "N"),
        "dc_solver": ("Zhao et al. 2024 (ECCV)", "2024", "N"),
        "dpm_solver_v3": ("Zheng et al. 2023 (NeurIPS)", "2023", "N"),
    }
    for name, (paper, year, rule) in expected.items():
        assert name in rows, (name, r.stdout)
        assert rows[name][3] == rule and rows[name][5] == paper and rows[name][6] == year, rows[name]


def test_sweep_end_to_end(tmp_path):
    r = cli(
        "sweep",
        "sampler=ddim,dpmpp",
        "nfe=5,10",
        "guidance=1,2",
        "num_images=200",
        "run=e2e",
        f"results_dir={tmp_path}",
        "metrics.bootstrap=100",
    )
    assert r.returncode == 0, r.stderr
    run = tmp_path / "e2e"
    df = pd.read_csv(run / "metrics.csv")
    assert list(df.columns) == [
        "model",
        "sampler",
        "schedule",
        "nfe",
        "guidance",
        "metric",
        "value",
        "ci_low",
        "ci_high",
        "n_images",
        "sec_per_image",
        "nfe_actual",
        "sec_per_image_min",
        "sec_per_image_max",
    ]
    assert len(df) == 2 * 2 * 2 * 3  # samplers x NFE x guidance x (fd_exact, traj_err, mmd_exact)
    assert (df["nfe"] == df["nfe_actual"]).all() and (df["n_images"] == 200).all()
    assert (df["ci_low"] <= df["value"]).all() and (df["value"] <= df["ci_high"]).all()
    te = df[df.metric == "traj_err"].set_index(["sampler", "nfe", "guidance"])["value"]
    assert te["dpmpp", 10, 1.0] < te["ddim", 10, 1.0]
    mmd = df[df.metric == "mmd_exact"].set_index(["sampler", "nfe", "guidance"])
    assert mmd.loc[("dpmpp", 10, 1.0), "ci_high"] < mmd.loc[("ddim", 10, 1.0), "ci_low"]
    board = (run / "leaderboard.md").read_text()
    assert board.count("### gmm · ") == 6 and board.count("### best sampler per budget") == 6
    for png in ["traj_err_vs_nfe.png", "traj_err_vs_time.png", "fd_exact_vs_nfe.png", "mmd_exact_vs_nfe.png"]:
        assert (run / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    assert "metrics.csv" in r.stderr and "leaderboard.md" in r.stderr
    # The stages run alone on what the sweep left: metrics again changes nothing.
    before = (run / "metrics.csv").read_text()
    r2 = cli("metrics", "run=e2e", f"results_dir={tmp_path}", "metrics.bootstrap=100")
    assert r2.returncode == 0, r2.stderr
    assert (run / "metrics.csv").read_text() == before


def test_report_merges_runs(tmp_path):
    common = ["nfe=5,10", "num_images=100", f"results_dir={tmp_path}", "metrics.bootstrap=50"]
    assert cli("sweep", "sampler=ddim", "run=old", *common).returncode == 0
    assert cli("sweep", "sampler=unipc", "run=new", *common).returncode == 0
    r = cli("report", "run=old,new", f"results_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    merged = tmp_path / "old+new"
    df = pd.read_csv(merged / "metrics.csv")
    assert set(df.sampler) == {"ddim", "unipc"} and len(df) == 2 * 2 * 3
    board = (merged / "leaderboard.md").read_text()
    assert "| ddim · karras |" in board and "| unipc · karras |" in board
    page = (merged / "report" / "index.html").read_text()
    assert "old" in page and "new" in page


def test_list_models_shows_source_and_guidance_kind():
    r = cli("list", "models")
    assert r.returncode == 0
    rows = {
        c[0]: c for c in ([x.strip() for x in line.split("│")[1:-1]] for line in r.stdout.splitlines()) if c
    }
    assert rows["gmm_flow"][1:] == ["exact, analytic", "cfg"]
    assert rows["sd15"][1] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
