"""The run's plan (plan.json): written once by the sweep, read by workers and the metrics stage; a cell
whose inputs changed is refused or, with on_change=restart, started over (issue 12)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from cli_run import cli  # tests/cli_run.py

from samplebench import plan as run_plan
from samplebench import store
from samplebench.config import plan
from samplebench.errors import UsageError
from samplebench.generate import generate


def _overrides(root, *extra):
    return [f"results_dir={root}", "run=r", "num_images=32", "batch_size=32", "timing.repeats=1", *extra]


def test_the_plan_holds_every_cell_and_each_invocation(tmp_path):
    cells, first = run_plan.record(plan(_overrides(tmp_path, "sampler=ddim,dpmpp", "nfe=5")))
    _, second = run_plan.record(plan(_overrides(tmp_path, "sampler=unipc", "nfe=5")))
    assert (first, second) == (0, 1)
    saved = json.loads((tmp_path / "r" / "plan.json").read_text())
    assert sorted(saved["cells"]) == ["gmm/ddim/karras/nfe=5/cfg=1", "gmm/dpmpp/karras/nfe=5/cfg=1",
                                      "gmm/unipc/karras/nfe=5/cfg=1"]  # fmt: skip
    # A worker reads its invocation's cells back exactly as planned (same identity, same config).
    back = run_plan.planned_cells(tmp_path / "r", 0)
    assert [c.config_hash for c in back] == [c.config_hash for c in cells]
    assert [c.config for c in back] == [c.config for c in cells]
    assert [c.sampler_label for c in run_plan.planned_cells(tmp_path / "r", 1)] == ["unipc"]


def test_a_changed_config_is_refused_at_plan_time_before_any_work(tmp_path):
    generate(plan(_overrides(tmp_path, "sampler=ddim", "nfe=5")))
    (cell,) = store.find_cells(tmp_path / "r")
    shard = cell.shards()[0][2]
    before = shard.read_bytes()
    # The seed is not part of the folder name: the same folder, other samples.
    with pytest.raises(UsageError, match=r"seed= changed since it was made.*on_change=restart"):
        run_plan.record(plan(_overrides(tmp_path, "sampler=ddim", "nfe=5", "seed=3")))
    assert shard.read_bytes() == before
    saved = json.loads((tmp_path / "r" / "plan.json").read_text())
    assert len(saved["invocations"]) == 1  # the refused sweep planned nothing


def test_on_change_restart_starts_the_changed_cell_over(tmp_path):
    generate(plan(_overrides(tmp_path, "sampler=ddim", "nfe=5")))
    (old,) = store.find_cells(tmp_path / "r")
    cells = plan(_overrides(tmp_path, "sampler=ddim", "nfe=5", "seed=7", "on_change=restart"))
    generate(cells)
    (new,) = store.find_cells(tmp_path / "r")
    assert new.path == old.path and new.info["seed"] == 7 and new.complete()
    assert new.info["config_hash"] == cells[0].config_hash


def test_the_metrics_stage_scores_with_the_sweeps_metrics_settings(tmp_path):
    common = [f"results_dir={tmp_path}", "run=m", "sampler=ddim", "nfe=5", "num_images=50"]
    r = cli("sweep", *common, "metrics.names=[traj_err]", "metrics.bootstrap=50")
    assert r.returncode == 0, r.stderr
    first = pd.read_csv(tmp_path / "m" / "metrics.csv")
    assert list(first.metric) == ["traj_err"]
    # Scoring again without metrics.* keeps the sweep's names (not the defaults, which add fd_exact) ...
    r = cli("metrics", f"results_dir={tmp_path}", "run=m")
    assert r.returncode == 0, r.stderr
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "m" / "metrics.csv"), first)
    # ... and a metrics.* key given now goes on top of them.
    r = cli("metrics", f"results_dir={tmp_path}", "run=m", "metrics.names=[fd_exact,traj_err]")
    assert r.returncode == 0, r.stderr
    assert sorted(pd.read_csv(tmp_path / "m" / "metrics.csv").metric) == ["fd_exact", "traj_err"]


def test_a_worker_refuses_a_device_or_dtype_other_than_the_cells(tmp_path):
    generate(plan(_overrides(tmp_path, "sampler=ddim", "nfe=5")))
    (cell,) = store.find_cells(tmp_path / "r")
    assert cell.info["resolved"] == {"device": "cpu", "dtype": "torch.float64".removeprefix("torch.")}
    info = dict(cell.info, resolved={"device": "cuda", "dtype": "float64"})  # as if a GPU worker made it
    store.write_json(cell.path / "cell.json", info)
    with pytest.raises(UsageError, match=r"made with device=cuda but this worker resolves device=cpu"):
        generate(plan(_overrides(tmp_path, "sampler=ddim", "nfe=5", "num_images=64")))
    assert len(cell.shards()) == 1  # nothing added
