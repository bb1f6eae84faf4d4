"""Files samplebench did not just make are checked, not trusted (issue 12, item 4), through the CLI.

Caches: a cache file that is damaged, altered, or has no checksum is named in one stderr line and
recomputed; the run exits 0 with exactly a clean run's numbers. References (metrics.ref=) and the
metric networks' weights files: anything unusable is one line, `error: ...` naming the file and the
fix, exit code 2, no traceback. Finished shards keep their bytes in every case.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tiny_models  # tests/tiny_models.py
import torch
from cli_run import cli_here as cli  # tests/cli_run.py: in-process, same entry point
from PIL import Image

from samplebench import cache

GMM = ["sampler=ddim", "nfe=5", "num_images=64", "shard_size=32", "metrics.bootstrap=50", "run=gmm"]
SCORE = ["metrics.names=[fid,is]", "metrics.is.splits=2", "metrics.fid.bootstrap=20"]


def option(overrides: list[str], *extra: str) -> list[str]:
    """`overrides` with the keys set in `extra` replaced by extra's values."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [o for o in overrides if o.split("=", 1)[0] not in keys] + list(extra)


def shards(results: Path) -> dict[Path, bytes]:
    """The bytes of every finished shard of the runs (not the traj_mse cache files, named after them)."""
    return {p: p.read_bytes() for p in sorted(results.rglob("shard-*.npz")) if ".cache" not in p.parts}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """An image run (tiny SD, one cell, 8 images in 2 shards, every image metric), a run of the analytic
    model, and a `samplebench score` of an image folder: each with its caches and clean results."""
    root = tmp_path_factory.mktemp("untrusted")
    inputs = tiny_models.make_metric_inputs(root)
    results = root / "results"
    sd = tiny_models.make_tiny_sd(root / "sd")
    gen = ["model=sd15", f"model.path={sd}", "sampler=ddim", "nfe=3", "guidance=3", "batch_size=4"]
    img = [*gen, "shard_size=4", "num_images=8", "run=img", f"results_dir={results}", *inputs["overrides"]]
    r = cli("sweep", *img)
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli("sweep", *GMM, f"results_dir={results}")
    assert r.returncode == 0, r.stderr[-3000:]
    folder = root / "gen"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    prompts = root / "prompts.txt"
    prompts.write_text("".join(f"a photo of a red cube {i}\n" for i in range(8)))
    score = [
        "score",
        str(folder),
        "--ref",
        str(inputs["ref"]),
        f"metrics.inception_weights={inputs['inception']}",
        *SCORE,
    ]
    r = cli(*score, "--out", str(root / "score.csv"), f"results_dir={results}")
    assert r.returncode == 0, r.stderr[-3000:]
    # A reference .npz as samplebench saves it (mu, sigma, protocol), with the reference features too.
    from samplebench.metrics.image import ImageContext, load_reference

    cfg = {"inception_weights": str(inputs["inception"]), "fid": {"mode": "legacy"}}
    ref = load_reference(ImageContext(cfg, results / ".cache"), str(inputs["ref"]))
    good = {
        "mu": ref.mu,
        "sigma": ref.sigma,
        "pool": ref.pool,
        "protocol": np.asarray(__import__("json").dumps(ref.protocol, sort_keys=True)),
    }
    return {
        **inputs,
        "root": root,
        "results": results,
        "img": img,
        "score": score,
        "folder": folder,
        "prompts": prompts,
        "cell": next((results / "img").rglob("cell.json")).parent,
        "clean": {
            "img": pd.read_csv(results / "img" / "metrics.csv"),
            "gmm": pd.read_csv(results / "gmm" / "metrics.csv"),
            "score": pd.read_csv(root / "score.csv"),
        },
        "good_ref": good,
    }


# -- caches: named, recomputed, same numbers as a clean run ------------------------------------------
def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def altered(path: Path) -> None:
    """A valid .npz, checksum entry kept, its values changed (what a stray edit or a bit flip does): every
    float array, so that whichever the metric reads would change it."""
    arrays = _npz(path)
    _write_npz(path, {k: v * 1.5 + 1 if v.dtype.kind == "f" else v for k, v in arrays.items()})


def unchecked(path: Path) -> None:
    """The same arrays without a checksum, as an older samplebench wrote them."""
    _write_npz(path, {k: v for k, v in _npz(path).items() if k != cache.CHECKSUM_KEY})


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def empty(path: Path) -> None:
    path.write_bytes(b"")


WHY = {
    altered: "does not match its checksum",
    unchecked: "has no checksum",
    truncated: "is unreadable",
    random_bytes: "is unreadable",
    empty: "is unreadable",
}

# name: (which result, cache files under results_dir (the first is damaged), damage)
CACHES = {
    "inception features truncated": ("img", ".cache/features/inception/*/*.npz", truncated),
    "inception features altered (IS)": ("img", ".cache/features/inception/*/*.npz", altered),
    "inception features without checksum": ("img", ".cache/features/inception/*/*.npz", unchecked),
    "clip cosines random bytes": ("img", ".cache/features/clip/*/*.npz", random_bytes),
    "image_reward scores altered": ("img", ".cache/features/image_reward/*/*.npz", altered),
    "reference features empty file": ("img", ".cache/features/reference/*/*.npz", empty),
    "traj_mse reference latents altered": ("img", ".cache/traj_ref/*/*.npz", altered),
    "traj_mse reference latents truncated": ("img", ".cache/traj_ref/*/*.npz", truncated),
    "traj_err ODE endpoints altered": ("gmm", ".cache/traj/*.npz", altered),
    "traj_err ODE endpoints random bytes": ("gmm", ".cache/traj/*.npz", random_bytes),
    "score folder features altered": ("score", ".cache/features/folders/*/*.npz", altered),
    "score reference features truncated": ("score", ".cache/features/reference/*/*.npz", truncated),
}


@pytest.mark.parametrize("name", sorted(CACHES))
def test_bad_cache_is_named_recomputed_and_changes_nothing(world, name, tmp_path):
    which, pattern, damage = CACHES[name]
    results = tmp_path / "results"
    shutil.copytree(world["results"], results)
    target = sorted(results.glob(pattern))[0]
    damage(target)
    before = shards(results)
    if which == "score":
        out = tmp_path / "score.csv"
        r = cli(*world["score"], "--out", str(out), f"results_dir={results}")
    else:
        (results / which / "metrics.csv").unlink()
        args = world["img"] if which == "img" else ["run=gmm", "metrics.bootstrap=50"]
        r = cli("metrics", *option(args, f"results_dir={results}"))
        out = results / which / "metrics.csv"
    assert r.returncode == 0, (name, r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    said = [line for line in r.stderr.splitlines() if "cache file" in line]
    assert len(said) == 1, (name, r.stderr[-3000:])
    assert str(target) in said[0] and WHY[damage] in said[0] and "recomputing" in said[0], said[0]
    pd.testing.assert_frame_equal(pd.read_csv(out), world["clean"][which], check_exact=True)
    assert cache.load(target) is not None  # rewritten, with a checksum that holds
    assert shards(results) == before


# -- references and weights files: one line naming the file and the fix, exit 2 ---------------------
def ref_npz(change):
    """A reference .npz made from the good one by `change(arrays)` (which edits or returns bytes)."""

    def make(world, path: Path) -> Path:
        arrays = {k: v.copy() for k, v in world["good_ref"].items()}
        data = change(arrays)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            _write_npz(path, arrays)
        return path

    return make


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _no_sigma(a: dict) -> None:
    del a["sigma"]


def _mu_2d(a: dict) -> None:
    a["mu"] = a["mu"][None]


def _sigma_not_square(a: dict) -> None:
    a["sigma"] = a["sigma"][:, :100]


def _width_64(a: dict) -> None:
    a["mu"], a["sigma"] = a["mu"][:64], a["sigma"][:64, :64]


def _emptied(a: dict) -> None:
    a["mu"], a["sigma"] = np.zeros(0), np.zeros((0, 0))


def _pool_width(a: dict) -> None:
    a["pool"] = a["pool"][:, :100]


def _first(key: str, value: float):
    def change(a: dict) -> None:
        a[key].flat[0] = value

    return change


def empty_folder(world, path: Path) -> Path:
    path = path.with_suffix("")
    path.mkdir()
    (path / "notes.txt").write_text("no images here")
    return path


def gmm_run(world, path: Path) -> Path:
    return world["results"] / "gmm"


def weights(kind: str, source: str):
    """A damaged copy of one of the metric networks' weights files, or a state_dict of another model."""

    def make(world, path: Path) -> Path:
        good = {
            "inception": world["inception"],
            "clip": world["clip_checkpoint"],
            "reward": world["reward"]["checkpoint"],
        }[source]
        path = path.with_suffix(good.suffix)
        if kind == "truncated":
            path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        elif kind == "random":
            path.write_bytes(np.random.default_rng(0).bytes(4096))
        elif kind == "empty":
            path.write_bytes(b"")
        else:
            torch.save({"fc.weight": torch.zeros(3, 2)}, path)
        return path

    return make


def metrics_with(*options: str):
    """The metrics stage on the image run, with `options` (and only the metric that reads them)."""
    names = "metrics.names=[image_reward]" if "image_reward" in options[0] else "metrics.names=[fid]"
    return lambda world: ["metrics", *option(world["img"], names, *options)]


def score_ref(bad: str):
    return lambda world: [
        "score",
        str(world["cell"]),
        "--ref",
        bad,
        f"metrics.inception_weights={world['inception']}",
        *SCORE,
        f"results_dir={world['results']}",
    ]


def score_with(*options: str, prompts: bool = False):
    def args(world):
        base = [
            f"metrics.inception_weights={world['inception']}",
            "metrics.names=[is,clip_score]" if prompts else "metrics.names=[is]",
            "metrics.is.splits=2",
            f"metrics.clip.model={tiny_models.TINY_CLIP}",
            f"metrics.clip.pretrained={world['clip_checkpoint']}",
            f"metrics.clip.model_config={world['clip_config']}",
            f"results_dir={world['results']}",
        ]
        extra = ["--prompts", str(world["prompts"])] if prompts else []
        return ["score", str(world["folder"]), *extra, *option(base, *options)]

    return args


# name: (make the bad file from (world, a path), what the one line says besides the file's name)
BAD = {
    "ref npz is random bytes": (
        ref_npz(lambda a: np.random.default_rng(0).bytes(5000)),
        "not a readable .npz",
    ),
    "ref npz is truncated": (ref_npz(lambda a: _npz_bytes(a)[:20000]), "not a readable .npz"),
    "ref npz is an empty file": (ref_npz(lambda a: b""), "not a readable .npz"),
    "ref npz without sigma": (ref_npz(_no_sigma), "has no sigma array"),
    "ref npz mu not 1-d": (ref_npz(_mu_2d), "mu has shape (1, 2048)"),
    "ref npz sigma not square": (ref_npz(_sigma_not_square), "sigma has shape (2048, 100)"),
    "ref npz of another feature width": (
        ref_npz(_width_64),
        "have 64 features, but Inception's pool features",
    ),
    "ref npz with a NaN mean": (ref_npz(_first("mu", np.nan)), "mu has 1 non-finite"),
    "ref npz with an inf covariance": (ref_npz(_first("sigma", np.inf)), "sigma has 1 non-finite"),
    "ref npz with empty arrays": (ref_npz(_emptied), "mu and sigma are empty"),
    "ref npz pool of another width": (ref_npz(_pool_width), "pool has shape (12, 100)"),
    "ref npz pool not finite": (ref_npz(_first("pool", np.nan)), "pool has 1 non-finite"),
    "ref folder without images": (empty_folder, "holds no images"),
    "ref folder of shards without images": (gmm_run, "shards without images"),
    "inception weights truncated": (weights("truncated", "inception"), "is damaged or not a PyTorch file"),
    "inception weights random bytes": (weights("random", "inception"), "is damaged or not a PyTorch file"),
    "inception weights of another model": (weights("other", "inception"), "not torch-fidelity's Inception"),
    "clip checkpoint truncated": (weights("truncated", "clip"), "is damaged, not a PyTorch or safetensors"),
    "clip checkpoint random bytes": (weights("random", "clip"), "is damaged, not a PyTorch or safetensors"),
    "clip checkpoint empty file": (weights("empty", "clip"), "is damaged, not a PyTorch or safetensors"),
    "clip checkpoint of another model": (weights("other", "clip"), "does not load into open_clip model"),
    "image_reward checkpoint truncated": (weights("truncated", "reward"), "is damaged, not a PyTorch file"),
    "image_reward checkpoint random bytes": (weights("random", "reward"), "is damaged, not a PyTorch file"),
    "image_reward checkpoint of another model": (weights("other", "reward"), "lacks"),
}
# How each case runs, as a user would: `samplebench score CELL --ref BAD` unless named here (the metrics
# stage, or `score` of an image folder for the weights files).
HOW = {
    "ref npz with a NaN mean": lambda bad: metrics_with(f"metrics.ref={bad}"),
    "ref folder without images": lambda bad: metrics_with(f"metrics.ref={bad}"),
    "ref folder of shards without images": lambda bad: metrics_with(f"metrics.ref={bad}"),
    **{
        n: (lambda bad: score_with(f"metrics.inception_weights={bad}"))
        for n in BAD
        if n.startswith("inception")
    },
    **{
        n: (lambda bad: score_with(f"metrics.clip.pretrained={bad}", prompts=True))
        for n in BAD
        if "clip" in n
    },
    **{n: (lambda bad: metrics_with(f"metrics.image_reward.checkpoint={bad}")) for n in BAD if "reward" in n},
}


def test_the_good_reference_npz_is_accepted(world, tmp_path):
    good = ref_npz(lambda a: None)(world, tmp_path / "ref.npz")
    r = cli(*score_ref(str(good))(world))
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_reference_or_weights_is_one_line_and_exit_2(world, name, tmp_path):
    make, message = BAD[name]
    bad = make(world, tmp_path / "bad.npz")
    args = HOW.get(name, score_ref)(str(bad))(world)
    before = shards(world["results"])
    r = cli(*args)
    assert r.returncode == 2, (name, r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, r.stderr[-3000:])
    assert str(bad) in lines[0] and message in lines[0], (name, lines[0])
    assert shards(world["results"]) == before
