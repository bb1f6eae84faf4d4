"""The report's pictures and page: sampler x NFE image grids, GMM projections, and one self-contained
index.html checked in a real headless browser (every image must load from disk, no server)."""

from __future__ import annotations

import html as html_lib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from samplebench.report.grids import gmm_projections, image_grids
from samplebench.report.html import write_html
from samplebench.report.leaderboard import leaderboard_tables, render_html
from samplebench.report.pareto import plot_metric

CHROMIUM = "/usr/bin/chromium"
SAMPLERS = ("ddim", "dpmpp")
NFES = (5, 10)
GUIDANCES = (1.0, 2.0)

# Fake image run: 3 samplers x 3 NFE at guidance 1 and 3, image i of cell c a solid colour unique to (c, i).
FAKE_SAMPLERS = ("ddim", "euler", "heun")
FAKE_NFES = (3, 5, 8)
FAKE_GUIDANCES = (1.0, 3.0)
FAKE_SIZE = 32
PROMPTS = ("a red cube on a table", "a blue sphere")


def _colour(sampler: str, nfe: int, guidance: float, index: int) -> tuple[int, int, int]:
    s, n, g = FAKE_SAMPLERS.index(sampler), FAKE_NFES.index(nfe), FAKE_GUIDANCES.index(guidance)
    return (40 + 60 * s, 40 + 60 * n, 30 + 100 * g + 50 * index)


def _write_cell(run: Path, model: str, sampler: str, nfe: int, guidance: float, arrays: dict) -> None:
    cell = run / model / sampler / f"nfe={nfe}" / f"cfg={guidance:g}"
    cell.mkdir(parents=True)
    n = len(arrays["indices"])
    info = {
        "model_label": model,
        "sampler_label": sampler,
        "nfe": nfe,
        "guidance": guidance,
        "num_images": n,
        "config": {"model": {"name": "fake"}, "sampler": {"name": sampler}, "seed": 0},
    }
    (cell / "cell.json").write_text(json.dumps(info))
    np.savez(cell / f"shard-00000000-{n - 1:08d}.npz", **arrays)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hand-written image run (fast, and every tile's content is known), plus a latents-only model."""
    run = tmp_path_factory.mktemp("fake") / "img"
    for sampler in FAKE_SAMPLERS:
        for nfe in FAKE_NFES:
            for guidance in FAKE_GUIDANCES:
                images = np.stack(
                    [
                        np.broadcast_to(
                            np.array(_colour(sampler, nfe, guidance, i), np.uint8), (FAKE_SIZE, FAKE_SIZE, 3)
                        )
                        for i in range(2)
                    ]
                )
                arrays = {
                    "samples": np.zeros((2, 4, 4, 4), np.float32),
                    "images": images,
                    "indices": np.arange(2),
                    "prompts": np.array(PROMPTS),
                    "prompt_ids": np.array(["p0", "p1"]),
                }
                _write_cell(run, "fakesd", sampler, nfe, guidance, arrays)
    latents_only = {"samples": np.zeros((2, 4, 4, 4), np.float32), "indices": np.arange(2)}
    _write_cell(run, "latentonly", "ddim", 3, 1.0, latents_only)
    return run


@pytest.fixture(scope="module")
def gmm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A REAL small sweep through the CLI: analytic model, 2 samplers x 2 NFE x 2 guidance scales."""
    tmp = tmp_path_factory.mktemp("sweep")
    cmd = [
        sys.executable,
        "-m",
        "samplebench.cli",
        "sweep",
        "sampler=ddim,dpmpp",
        "nfe=5,10",
        "guidance=1,2",
        "num_images=200",
        "run=r",
        f"results_dir={tmp}",
        "metrics.bootstrap=100",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp / "r"
    assert (run / "metrics.csv").exists() and (run / "metrics.protocol.json").exists()
    return run


def _png_layout(path: Path) -> tuple[list, list, list]:
    """Rows, columns and missing panels that grids.py records in the PNG's text chunks."""
    with Image.open(path) as img:
        text = dict(img.text)
    return (
        json.loads(text["samplebench.rows"]),
        json.loads(text["samplebench.cols"]),
        json.loads(text["samplebench.missing"]),
    )


def _solid_pixels(path: Path, colour: tuple[int, int, int]) -> int:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    return int((pixels == np.array(colour, np.uint8)).all(-1).sum())


# ------------------------------------------------------------------------------------- image grids


def test_image_grid_one_tile_per_sampler_and_nfe(image_run: Path, tmp_path: Path) -> None:
    paths = image_grids(image_run, tmp_path)
    # One page per guidance of the image model; the latents-only model has no images and no grid.
    assert [p.name for p in paths] == ["grid_fakesd_cfg1_p1.png", "grid_fakesd_cfg3_p1.png"]
    for path, guidance in zip(paths, FAKE_GUIDANCES, strict=True):
        rows, cols, missing = _png_layout(path)
        assert rows == list(FAKE_SAMPLERS) and cols == list(FAKE_NFES) and missing == []
        with Image.open(path) as img:
            assert PROMPTS[0] in img.text["samplebench.prompt"]
            assert "guidance" in img.text["Title"]
            tile = int(img.text["samplebench.tile"])
            width, height = img.size
        assert tile >= FAKE_SIZE
        # Every (sampler, NFE) shows its own image 0 as one whole tile; no other guidance's image leaks in.
        for sampler in FAKE_SAMPLERS:
            for nfe in FAKE_NFES:
                assert _solid_pixels(path, _colour(sampler, nfe, guidance, 0)) == tile * tile, (sampler, nfe)
                assert _solid_pixels(path, _colour(sampler, nfe, guidance, 1)) == 0
        other = FAKE_GUIDANCES[1 - FAKE_GUIDANCES.index(guidance)]
        assert _solid_pixels(path, _colour("ddim", 3, other, 0)) == 0
        # The grid is 3 tiles wide and high, plus labels.
        assert width >= 3 * tile and height >= 3 * tile


def test_image_grid_pages_and_index(image_run: Path, tmp_path: Path) -> None:
    paths = image_grids(image_run, tmp_path, index=1, max_rows=2, max_cols=2, tile_px=320)
    names = [p.name for p in paths]
    assert names == [f"grid_fakesd_cfg{g:g}_p{k}.png" for g in FAKE_GUIDANCES for k in (1, 2, 3, 4)]
    first = paths[:4]
    panels = []
    for path in first:
        rows, cols, _ = _png_layout(path)
        panels += [(s, n) for s in rows for n in cols]
        for s in rows:
            for n in cols:
                # index=1: the second image of every cell, never the first.
                assert _solid_pixels(path, _colour(s, n, 1.0, 1)) == 320 * 320
                assert _solid_pixels(path, _colour(s, n, 1.0, 0)) == 0
    assert sorted(panels) == sorted((s, n) for s in FAKE_SAMPLERS for n in FAKE_NFES)  # each exactly once
    sizes = [Image.open(p).size for p in first]
    assert sizes[0][0] > sizes[1][0] and sizes[0][1] > sizes[2][1]  # 2x2 page larger than 2x1 / 1x2 pages
    with Image.open(first[0]) as img:
        assert PROMPTS[1] in img.text["samplebench.prompt"] and "page 1/4" in img.text["Title"]


def test_image_grid_skips_missing_cells_and_runs_without_images(image_run: Path, tmp_path: Path) -> None:
    assert image_grids(image_run, tmp_path, index=7) == []  # no cell has an image 7
    assert gmm_projections(image_run, tmp_path) == []  # not an analytic run


# ------------------------------------------------------------------------------------ projections


def test_gmm_projections_one_panel_per_sampler_and_nfe(gmm_run: Path, tmp_path: Path) -> None:
    paths = gmm_projections(gmm_run, tmp_path / "one", max_points=300)
    assert [p.name for p in paths] == ["proj_gmm_cfg1_p1.png", "proj_gmm_cfg2_p1.png"]
    for path in paths:
        rows, cols, missing = _png_layout(path)
        assert rows == [f"{s} · karras" for s in SAMPLERS] and cols == list(NFES) and missing == []
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image_grids(gmm_run, tmp_path / "none") == []  # the analytic model has no images
    # One column per page: two pages per guidance, each half as wide, every panel on exactly one page.
    paged = gmm_projections(gmm_run, tmp_path / "paged", max_points=300, max_cols=1)
    assert len(paged) == 4
    layouts = [_png_layout(p) for p in paged[:2]]
    assert [c for _, c, _ in layouts] == [[5], [10]]
    full_w, full_h = Image.open(paths[0]).size
    page_w, page_h = Image.open(paged[0]).size
    assert page_w < 0.75 * full_w and abs(page_h - full_h) < 0.1 * full_h


# ------------------------------------------------------------------------------------------- page


def _dump_dom(page: Path, profile: Path) -> str:
    """Load the page from disk in headless chromium and return the DOM after scripts ran."""
    binary = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(
                "chromium is not installed but CI is set: the report page must be checked in a browser"
            )
        pytest.skip("chromium not installed (apt-get install -y chromium); set CI=1 to make this a failure")
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def report_page(gmm_run: Path, image_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("page") / "report"
    df = pd.read_csv(gmm_run / "metrics.csv")
    plots = []
    for metric in sorted(df["metric"].unique()):
        plots += plot_metric(df, metric, gmm_run / "plots")  # outside `out`: the page must copy them
    grids = gmm_projections(gmm_run, out / "grids") + image_grids(image_run, out / "grids")
    protocol = json.loads((gmm_run / "metrics.protocol.json").read_text())
    timings = pd.read_csv(gmm_run / "timings.csv")
    images = {"Pareto plots": plots, "Sample grids": grids}
    return write_html(
        [gmm_run, image_run], out, images, render_html(leaderboard_tables(df)), timings, protocol
    )


def test_page_content(report_page: Path, gmm_run: Path) -> None:
    text = report_page.read_text()
    assert report_page.name == "index.html" and text.startswith("<!DOCTYPE html>")
    df = pd.read_csv(gmm_run / "metrics.csv")
    protocol = json.loads((gmm_run / "metrics.protocol.json").read_text())
    for sampler in df["sampler"].unique():
        assert sampler in text
    for metric in df["metric"].unique():
        assert metric in text
    assert protocol["git_commit"] in text
    for package, version in protocol["versions"].items():
        assert html_lib.escape(package) in text and html_lib.escape(str(version)) in text
    assert "gmm · fd_exact (lower is better) · guidance 1" in text  # the leaderboard, inserted as given
    # Identical protocols are grouped: fd_exact's definition is the same in all 8 cells and appears once;
    # traj_err differs by guidance (its schedule floor), so it gets one row per guidance.
    definitions = {r["definition"] for k, r in protocol["rows"].items() if k.endswith("|fd_exact")}
    assert len(definitions) == 1
    assert text.count(html_lib.escape(definitions.pop())) == 1
    assert "same for all 8 cells" in text
    assert "4 cells: guidance 1" in text and "4 cells: guidance 2" in text
    assert "Timings" in text and "sampling" in text
    # Self-contained: no external stylesheet, script, font or image.
    assert not re.search(r"<link\b|<script[^>]+src=|@import|url\(", text)
    assert not re.search(r"""(src|href)=["'](https?:|//)""", text)


def test_every_image_is_a_relative_file_beside_the_page(report_page: Path) -> None:
    text = report_page.read_text()
    sources = re.findall(r'<img[^>]*\bsrc="([^"]+)"', text)
    # 6 Pareto plots (fd_exact, traj_err, mmd_exact against NFE and time) + 2 projections + 2 image grids.
    assert len(sources) == 10
    root = report_page.parent.resolve()
    for src in sources:
        src = html_lib.unescape(src)
        assert not src.startswith(("/", "file:", "http")), src
        target = (report_page.parent / unquote(src)).resolve()
        assert target.is_file(), src
        assert root in target.parents, f"{src} lies outside the report folder"
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_loads_every_image_in_headless_chromium(report_page: Path, tmp_path: Path) -> None:
    dom = _dump_dom(report_page, tmp_path / "profile")
    body = re.search(r"<body\b[^>]*>", dom)
    assert body, dom[:2000]
    total = re.search(r'data-images-total="(\d+)"', body.group(0))
    loaded = re.search(r'data-images-loaded="(\d+)"', body.group(0))
    assert total and loaded, f"the load script did not run: {body.group(0)}"
    assert int(loaded.group(1)) == int(total.group(1)) == report_page.read_text().count("<img ") > 0
    # The folder is self-contained: moved elsewhere, it still loads every image.
    moved = tmp_path / "moved"
    shutil.copytree(report_page.parent, moved)
    shutil.rmtree(report_page.parent / "assets")  # the originals' copies are gone: only `moved` has them
    try:
        dom = _dump_dom(moved / "index.html", tmp_path / "profile2")
        assert 'data-images-loaded="10"' in dom and 'data-images-total="10"' in dom
    finally:
        shutil.copytree(moved / "assets", report_page.parent / "assets")
