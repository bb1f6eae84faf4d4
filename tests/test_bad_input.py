"""Every bad input is one line naming the problem and the fix, exit code 2, no traceback, and the
run's finished shards are still there afterwards."""

import subprocess
import sys

import numpy as np
import pytest
from cli_run import cli_here as cli  # tests/cli_run.py: same entry point, in-process

BASE = ["sampler=ddim", "nfe=5", "num_images=64", "shard_size=32", "run=r"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    r = cli("sweep", *BASE, f"results_dir={root}", "metrics.bootstrap=50")
    assert r.returncode == 0, r.stderr
    return root


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("shard-*.npz"))}


def corrupt_weights(root):
    folder = root / "weights"
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(
        '{"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], '
        '"scheduler": ["diffusers", "DDPMScheduler"]}'
    )
    (folder / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel", "sample_size": 8}')
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDPMScheduler"}')
    return folder


CASES = {
    "unknown model": (["model=sd99"], "model=sd99 is unknown"),
    "unknown sampler": (["sampler=dpm_fast"], "sampler=dpm_fast is unknown"),
    "unknown metric": (["metrics.names=[fid,sharpness]"], "metric sharpness is unknown"),
    "unknown prompts": (["prompts=laion"], "prompts=laion is unknown"),
    "nfe zero": (["nfe=0"], "nfe=0 must be a positive integer"),
    "nfe negative": (["nfe=-3"], "nfe=-3 must be a positive integer"),
    "nfe not integer": (["nfe=7.5"], "nfe=7.5 must be a positive integer"),
    "negative guidance": (["guidance=-2"], "guidance=-2 must be a number >= 0"),
    "nfe the sampler cannot spend": (["sampler=heun", "nfe=8"], "cannot spend exactly nfe=8"),
    "missing weights folder": (["model=sd15", "model.path={root}/nope"], "does not exist"),
    "corrupt weights file": (
        ["model=ddpm_cifar10", "model.path={weights}", "metrics.names=[traj_mse]"],
        "cannot load model.path=",
    ),
    "unwritable results folder": (["results_dir={root}/r/metrics.csv/sub"], "cannot write to"),
    "prompts are ignored by the analytic model": (["prompts=file", "prompts.path={root}/none.txt"], None),
    "worker name that is a path": (["worker=../../x"], "worker=../../x must be a plain name"),
    "custom schedule without levels": (["schedule=custom"], "schedule=custom needs schedule.sigmas"),
    "schedule a diffusers sampler cannot run": (
        ["sampler=diffusers:euler_a", "schedule=karras"],
        "cannot run schedule=karras",
    ),
    "sampler option out of range": (["sampler=unipc", "sampler.order=5"], "sampler.order=5 is not valid"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_table(run, name):
    extra, message = CASES[name]
    weights = corrupt_weights(run)
    args = [a.format(root=run, weights=weights) for a in extra]
    before = snapshot(run)
    r = cli("sweep", *BASE, f"results_dir={run}", *args)
    if message is None:  # prompts do not apply to the analytic model: not an error
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode == 2, (name, r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, r.stderr[-2000:])
    assert message in lines[0], (name, lines[0])
    assert "Traceback" not in r.stderr
    assert snapshot(run) == before  # nothing finished was lost or touched


def test_corrupt_shard_is_named_and_the_rest_kept(run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run / "r", copy / "r")
    shard = sorted((copy / "r").rglob("shard-*.npz"))[0]
    shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2])
    r = cli("metrics", "run=r", f"results_dir={copy}")
    assert r.returncode == 2
    assert "corrupt or truncated" in r.stderr and shard.name in r.stderr and "delete it" in r.stderr
    others = sorted((copy / "r").rglob("shard-*.npz"))[1:]
    assert others and all(np.load(p)["samples"].size for p in others)


def test_full_disk_while_writing_is_one_line_and_keeps_finished_shards(run, tmp_path):
    # A shard write that fails with ENOSPC (simulated in the writer) must not lose earlier shards.
    script = (
        "import errno, sys\n"
        "from samplebench import store\n"
        "from samplebench import cli\n"
        "real = store.atomic_write_bytes\n"
        "calls = []\n"
        "def full(path, data):\n"
        "    if path.name.startswith('shard-'):\n"
        "        if len(calls) >= 2:\n"
        "            raise OSError(errno.ENOSPC, 'No space left on device', str(path))\n"
        "        calls.append(path)\n"
        "    return real(path, data)\n"
        "store.atomic_write_bytes = full\n"
        "sys.argv = ['samplebench'] + sys.argv[1:]\n"
        "cli.main()\n"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "generate",
            "sampler=euler",
            "nfe=5",
            "num_images=160",
            "shard_size=32",
            "run=full",
            f"results_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "the disk is full" in lines[0] and "finished shards are kept" in lines[0]
    kept = sorted((tmp_path / "full").rglob("shard-*.npz"))
    assert len(kept) == 2 and all(np.load(p)["samples"].shape == (32, 16) for p in kept)
    assert not list((tmp_path / "full").rglob(".claim-*"))
