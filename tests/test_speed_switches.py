"""Speed switches (samplebench/speed.py) through the user path: `samplebench generate model=sd15
model.path=<tiny pipeline> model.compile=true model.channels_last=true allow_tf32=true
model.attention=math`, against the same sweep with the switches off.

References: the switches-off run of the same sweep (eager float32, torch's default SDPA backend); the
identity formula as it was before the switches existed (recomputed here by hand); the set of network
input shapes the sweep presents (counted from its batch sizes, not read from the code under test).

torch.compile runs with model.compile_backend=eager in these tests: dynamo traces, guards and caches
per shape exactly as with inductor, but the graph runs eagerly, so a compile takes ~10 s here instead
of ~130 s per shape (inductor's C++ codegen on two cores). Inductor's own numbers are measured by
bench/bench_switches.py (BENCHMARKS.md, "Speed switches on CPU").
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import pytest
import tiny_models  # tests/tiny_models.py
import torch
from cli_run import cli_here

from samplebench import store
from samplebench.config import plan

SWEEP = ["sampler=dpmpp", "nfe=3", "guidance=2", "num_images=3", "batch_size=2", "shard_size=3"]
ALL_ON = [
    "model.compile=true",
    "model.compile_backend=eager",
    "model.channels_last=true",
    "allow_tf32=true",
    "model.attention=math",
]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_models.make_tiny_sd(tmp_path_factory.mktemp("pipe") / "sd15")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path_factory.mktemp("hf"))}


def _generate(root, run, sd, env, *extra):
    r = cli_here("generate", "model=sd15", f"model.path={sd}", f"results_dir={root}", f"run={run}", *SWEEP,
                 *extra, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (cell,) = store.find_cells(root / run)
    return cell


@pytest.fixture(scope="module")
def off(tmp_path_factory, sd, env):
    return _generate(tmp_path_factory.mktemp("off"), "off", sd, env)


def _arrays(cell, key):
    return np.concatenate([s[key] for s in cell.iter_shards()])


def _assert_same_images(a, b):
    """Switched and plain runs differ only by the order of float32 sums: channels_last picks other
    convolution algorithms, the math and flash SDPA kernels form softmax(QK^T)V differently, compile's
    graphs regroup ops. One tiny-UNet call then differs by ~2e-6 of its output's scale (measured:
    1.5e-6 math vs flash, 1.9e-6 channels_last); 3 solver steps at guidance w=2 (which scales a
    difference between the two passes by up to 2w+1 = 5) bound the sample's relative difference by
    ~3 * 5 * 2e-6 = 3e-5; measured ~6e-7. 1e-4 of the sample's norm leaves room for other CPUs' kernels
    (the same bound as the batch-size test of test_image_models.py, whose differences have the same
    source); decoded uint8 images differ by at most one level (rounding at a .5 boundary)."""
    sa, sb = _arrays(a, "samples").astype(np.float64), _arrays(b, "samples").astype(np.float64)
    assert sa.shape == sb.shape
    for i in range(len(sa)):
        assert np.linalg.norm(sa[i] - sb[i]) <= 1e-4 * np.linalg.norm(sa[i]), i
    ia, ib = _arrays(a, "images").astype(int), _arrays(b, "images").astype(int)
    assert np.abs(ia - ib).max() <= 1


def _old_identity(config, analytic=False):
    """Cell.config_hash as computed before the speed switches existed (its formula copied from the
    commit before them), on the config without the switch keys (absent then)."""
    c = json.loads(json.dumps(config))
    for k in ("compile", "compile_mode", "compile_backend", "channels_last", "attention"):
        c["model"].pop(k, None)
    c.pop("allow_tf32")
    keys = (
        "model",
        "sampler",
        "schedule",
        "nfe",
        "guidance",
        "seed",
        "allow_lower_nfe",
        "prompts",
        "content",
    )
    if analytic:
        keys = tuple(k for k in keys if k != "prompts")
    ident = {k: c.get(k) for k in keys}
    if not ident["content"]:
        del ident["content"]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def test_all_switches_on_same_images_other_identity_compile_kept_out_of_timed_calls(tmp_path, sd, env, off):
    import torch._dynamo

    torch._dynamo.reset()  # compiles are counted below: none left over from other tests of this process
    on = _generate(tmp_path, "on", sd, env, *ALL_ON)
    _assert_same_images(off, on)
    assert on.info["config_hash"] != off.info["config_hash"]
    assert on.info["model_hash"] != off.info["model_hash"]
    assert on.info["model_label"] == off.info["model_label"] == "sd15"  # the label stays readable

    # Compile time never in a timed call: every timed call (the shard's batches and the timing-only
    # repeats) compiled nothing; the warm-ups compiled one graph per network input shape. This cell
    # presents batches of 2 and 1 (num_images 3, batch_size 2), doubled by guidance: shapes 4 and 2.
    calls = {k: [] for k in ("batch_kind", "batch_compiles", "batch_compile_seconds", "batch_sizes")}
    for part in [store.read_shard(p) for _, _, p in on.shards()] + [
        store.read_shard(p) for p in on.timing_files()
    ]:
        for k in calls:
            calls[k] += list(part[k])
    kinds, compiles = np.asarray(calls["batch_kind"]), np.asarray(calls["batch_compiles"])
    timed = (kinds == "sample") | (kinds == "repeat")
    assert timed.sum() == 3 and (kinds == "repeat").sum() == 1  # 2 batches + 1 repeat (timing.repeats auto)
    assert (compiles[timed] == 0).all(), calls
    assert sorted(np.asarray(calls["batch_sizes"])[kinds == "warmup"]) == [1, 2]  # each batch shape warmed
    assert compiles[kinds == "warmup"].sum() == len({2 * 2, 2 * 1})
    assert (np.asarray(calls["batch_compile_seconds"])[kinds == "warmup"] > 0).all()
    assert "compiled" not in kinds

    # Provenance: the switches in effect and torch's TF32 flags as set (read back), per model.
    prov = json.loads((tmp_path / "on" / "provenance.json").read_text())[-1]["speed"]["sd15"]
    assert (
        prov["compile"] is True and prov["compile_mode"] == "default" and prov["compile_backend"] == "eager"
    )
    assert prov["channels_last"] is True and prov["attention"] == "math" and prov["allow_tf32"] is True
    assert prov["torch_tf32"]["cuda.matmul.allow_tf32"] and prov["torch_tf32"]["cudnn.allow_tf32"]
    load = json.loads((tmp_path / "on" / "sd15" / "load.json").read_text())
    assert load["speed"]["compile"] is True
    off_prov = json.loads((off.path.parents[4] / "provenance.json").read_text())[-1]["speed"]["sd15"]
    assert off_prov["compile"] is False and off_prov["compile_mode"] is None
    assert off_prov["torch_tf32"]["cuda.matmul.allow_tf32"] is False
    assert not torch.backends.cuda.matmul.allow_tf32  # restored after the model's cells


def test_flash_attention_alone_is_applied_on_every_call_and_gives_the_same_images(
    tmp_path, sd, env, off, monkeypatch
):
    from samplebench import speed

    try:
        speed._check_attention("flash", torch.device("cpu"), torch.float32)
    except Exception:
        pytest.skip("this CPU build of torch has no flash SDPA kernel")
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):  # diffusers' AttnProcessor2_0 calls F.scaled_dot_product_attention
        frame, in_unet = sys._getframe(1), False
        while frame is not None and not in_unet:
            in_unet = frame.f_code.co_filename.endswith("unet_2d_condition.py")
            frame = frame.f_back
        if in_unet:  # the switch covers the denoising network, not the CLIP text encoder's attention
            b = torch.backends.cuda
            seen.append((b.flash_sdp_enabled(), b.math_sdp_enabled(), b.mem_efficient_sdp_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    flash = _generate(tmp_path, "flash", sd, env, "model.attention=flash")
    # the UNet's calls: 3 steps x 2 batches (+ a warm-up and a timing repeat) x its attention layers
    assert len(seen) > 10 and set(seen) == {(True, False, False)}
    assert torch.backends.cuda.math_sdp_enabled()  # the backend context was left on return
    _assert_same_images(off, flash)
    assert flash.info["config_hash"] != off.info["config_hash"]


def test_defaults_leave_the_identity_as_it_was(tmp_path, sd):
    base = ["model=sd15", f"model.path={sd}", f"results_dir={tmp_path}", *SWEEP]
    (plain,) = plan(base)
    explicit_off = [
        "model.compile=false",
        "model.compile_mode=max-autotune",  # no effect, and no identity, while compile is off
        "model.channels_last=false",
        "allow_tf32=false",
        "model.attention=default",
    ]
    (same,) = plan([*base, *explicit_off])
    assert same.config_hash == plain.config_hash and same.model_hash == plain.model_hash
    assert same.rel_dir == plain.rel_dir
    from samplebench.plan import with_content

    (recorded,) = with_content([plain], {})
    assert recorded.config_hash == _old_identity(recorded.config)
    (gmm,) = plan([f"results_dir={tmp_path}", "sampler=ddim", "nfe=5"])  # no switches in its config
    assert gmm.config_hash == _old_identity(gmm.config, analytic=True)
    for one in (*ALL_ON[2:], "model.compile=true"):
        (switched,) = plan([*base, one])
        assert switched.config_hash != plain.config_hash, one
        assert switched.rel_dir == plain.rel_dir, one  # in the hash, not in the folder label


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.compile=yes"], "model.compile=yes must be true or false"),
        (["model.channels_last=2"], "model.channels_last=2 must be true or false"),
        (["allow_tf32=on"], "allow_tf32=on must be true or false"),
        (
            ["model.compile_mode=fast"],
            "model.compile_mode=fast is unknown; choose one of default, reduce-overhead",
        ),
        (["model.attention=sage"], "model.attention=sage is unknown; choose one of default, math, flash"),
        (["model.compile=true", "model.compile_backend=nope"], "model.compile_backend=nope is unknown"),
        (["model.compile=true", "timing.warmup=false"], "model.compile=true needs timing.warmup=true"),
        (["model.attention=efficient"], "model.attention=efficient is not available on cpu with float32"),
        (["model=gmm", "model.compile=true"], "unknown key 'model.compile' for model=gmm"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path, sd, env, extra, message):
    model = [] if extra[0].startswith("model=") else ["model=sd15", f"model.path={sd}"]
    r = cli_here("generate", *model, f"results_dir={tmp_path}", "run=bad", *SWEEP, *extra, env=env)
    assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
    # (a model load may print transformers' "Loading weights" progress bar before the error)
    lines = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
