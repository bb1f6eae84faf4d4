"""traj_mse's reference solve runs on its own fixed schedule, not on the cell's (issue 11)."""

from samplebench.config import plan
from samplebench.metrics.trajectory import reference_cell


def _info(cell):
    return {"config": cell.config, "model_label": cell.model_label, "guidance": cell.guidance}


def test_every_schedule_of_a_model_shares_one_reference_on_karras():
    ays, karras = plan(["sampler=ddim", "schedule=ays,karras", "nfe=5", "num_images=4"])
    refs = [reference_cell(_info(c), "dpmpp_3m", 200) for c in (ays, karras)]
    assert {r.schedule["name"] for r in refs} == {"karras"} and refs[0].schedule_label == "karras"
    # ays stops at sigma = 0.152: a reference on the cell's own schedule would never reach sigma_min.
    assert refs[0].config_hash == refs[1].config_hash
    assert reference_cell(_info(ays), "dpmpp_3m", 200, "logsnr").schedule["name"] == "logsnr"


def test_list_metrics_shows_every_metric_with_its_direction_and_default():
    import os

    from cli_run import cli

    from samplebench.metrics.names import ALL

    r = cli("list", "metrics", env={**os.environ, "COLUMNS": "200"})  # one table row per line
    assert r.returncode == 0, r.stderr
    rows = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if line.count("│") > 3}
    assert set(ALL) <= set(rows)
    assert "lower is better" in rows["fid"] and "higher is better" in rows["is"]
    assert "yes" in rows["traj_err"] and "no" in rows["image_reward"]
