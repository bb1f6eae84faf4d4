"""A cell never mixes inputs: changed prompts or weights under the same run are refused (issue 12).

A cell's identity hashes what it reads from disk (the prompt file's texts, a fingerprint of the
weights folder) and the resolved device type and dtype, not only their configuration.
"""

import json
import os

import pytest
import tiny_models  # tests/tiny_models.py
from cli_run import cli

from samplebench import store


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_models.make_tiny_sd(tmp_path_factory.mktemp("pipe") / "sd")


def _generate(root, path, prompts, n):
    return cli(
        "generate",
        "model=sd15",
        f"model.path={path}",
        "prompts=file",
        f"prompts.path={prompts}",
        "sampler=ddim",
        "nfe=2",
        f"num_images={n}",
        "batch_size=2",
        "shard_size=2",
        f"results_dir={root}",
        "run=r",
    )


def _cell_prompts(root):
    (cell,) = store.find_cells(root / "r")
    return [str(p) for s in cell.iter_shards() for p in s["prompts"]], cell


def test_editing_the_prompt_file_between_two_generates_is_refused(tmp_path, sd):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    first = _generate(tmp_path, sd, prompts, 2)
    assert first.returncode == 0, first.stderr[-2000:]
    prompts.write_text("a green cone\na yellow torus\n")
    again = _generate(tmp_path, sd, prompts, 4)
    assert again.returncode == 2, again.stderr[-2000:]
    err = again.stderr.strip().splitlines()
    assert len(err) == 1 and "prompt file's contents" in err[0] and "run=" in err[0], err
    texts, cell = _cell_prompts(tmp_path)
    assert texts == ["a red cube", "a blue sphere"]  # nothing of the new file got in
    assert cell.info["config"]["content"]["prompts"]
    # With the original texts back (same content), the cell resumes and grows.
    prompts.write_text("a red cube\na blue sphere\n")
    os.utime(prompts)  # a new mtime alone does not change the prompts' identity
    grown = _generate(tmp_path, sd, prompts, 4)
    assert grown.returncode == 0, grown.stderr[-2000:]
    assert _cell_prompts(tmp_path)[0] == ["a red cube", "a blue sphere"] * 2


def test_new_weights_under_the_same_model_path_are_refused(tmp_path, sd):
    import shutil

    path = tmp_path / "sd"
    shutil.copytree(sd, path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n")
    assert _generate(tmp_path, path, prompts, 2).returncode == 0
    tiny_models.make_tiny_sd(path, seed=1)  # other weights, same folder
    again = _generate(tmp_path, path, prompts, 4)
    assert again.returncode == 2
    assert "weights under model.path=" in again.stderr and "Traceback" not in again.stderr
    (cell,) = store.find_cells(tmp_path / "r")
    assert len(cell.shards()) == 1  # the first two images only, from the first weights
    info = json.loads((cell.path / "cell.json").read_text())
    assert set(info["config"]["content"]) == {"prompts", "weights"}
    assert info["resolved"] == {"device": "cpu", "dtype": "float32"}  # what the worker ran it with


def test_a_worker_refuses_prompts_edited_after_the_sweep_planned(tmp_path, sd):
    # A launched worker (a Slurm job, say) starts after the sweep planned; the file changed meanwhile.
    from samplebench import plan as run_plan
    from samplebench.config import plan
    from samplebench.errors import UsageError
    from samplebench.generate import generate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n")
    overrides = [f"model.path={sd}", "model=sd15", "prompts=file", f"prompts.path={prompts}", "sampler=ddim"]
    overrides += ["nfe=2", "num_images=2", f"results_dir={tmp_path}", "run=r"]
    _, invocation = run_plan.record(plan(overrides))
    prompts.write_text("a green cone\n")
    with pytest.raises(UsageError, match="prompt file's contents .* changed since the sweep planned"):
        generate(run_plan.planned_cells(tmp_path / "r", invocation))
    assert not list((tmp_path / "r").rglob("shard-*.npz"))
