"""Side-by-side pictures of a sweep: samplers (rows) x NFE budgets (columns) for the same sample.

Numbers say which sampler is better; the grid says how: every tile shows sample `index` of its cell,
which starts from the same noise and prompt in every cell, so differences between tiles are the
sampler's alone (the X/Y plot image-generation users know). The analytic model gets the same layout as
scatter plots over the true density, projected on the mixture's two leading principal axes.

Each PNG carries its layout in text chunks (`samplebench.rows`, `samplebench.cols`, ...), so a figure
found later says what it shows, and tests can check it without reading pixels.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samplebench.models import is_analytic
from samplebench.store import CellRecord, find_cells, read_shard

TILE_MIN = 128  # tiny test images are upscaled so labels stay readable next to them
TILE_MAX = 384  # large images are downscaled so an 8 x 8 page stays a few MB
GAP = 4
BACKGROUND = (255, 255, 255)
MISSING_TILE = (236, 236, 236)
INK = (20, 20, 20)
MUTED = (110, 110, 110)

GroupKey = tuple[str, float]


def _safe(text: str) -> str:
    """A model label as a file-name fragment (labels are free text in cell.json)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def _page_name(prefix: str, model: str, guidance: float, page: int) -> str:
    return f"{prefix}_{_safe(model)}_cfg{guidance:g}_p{page}.png"


def _pages(rows: Sequence[Any], cols: Sequence[Any], max_rows: int, max_cols: int) -> list[tuple[list, list]]:
    """Split a rows x cols layout into pages of at most max_rows x max_cols, row blocks outermost."""
    if max_rows < 1 or max_cols < 1:
        raise ValueError(f"max_rows and max_cols must be >= 1 (got {max_rows}, {max_cols})")
    out = []
    for r in range(0, len(rows), max_rows):
        for c in range(0, len(cols), max_cols):
            out.append((list(rows[r : r + max_rows]), list(cols[c : c + max_cols])))
    return out


def _group(cells: Iterable[CellRecord]) -> dict[GroupKey, dict[tuple[str, int], CellRecord]]:
    """(model, guidance) -> {(sampler, nfe): cell}, in a stable order."""
    groups: dict[GroupKey, dict[tuple[str, int], CellRecord]] = defaultdict(dict)
    for cell in cells:
        model, sampler, nfe, guidance = cell.key
        groups[(model, guidance)][(sampler, nfe)] = cell
    return dict(sorted(groups.items()))


def _layout(members: dict[tuple[str, int], Any]) -> tuple[list[str], list[int]]:
    """Rows = samplers by name (as in the leaderboard), columns = NFE ascending."""
    return sorted({s for s, _ in members}), sorted({n for _, n in members})


def _metadata(
    title: str, rows: list[str], cols: list[int], missing: list[tuple[str, int]], **extra: Any
) -> dict:
    meta = {
        "Title": title,
        "Software": "samplebench",
        "samplebench.rows": json.dumps(rows),
        "samplebench.cols": json.dumps(cols),
        "samplebench.missing": json.dumps([list(m) for m in missing]),
    }
    meta.update({f"samplebench.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


# ------------------------------------------------------------------------------------------ images


def _read_row(path: Path, member: str, k: int) -> np.ndarray | None:
    """Row k of one array in an .npz without loading the rest: a shard of 1000 SDXL images is ~3 GB, and
    a grid needs one image from each of up to 64 shards. None when the member is absent; falls back to a
    full read for layouts the fast path does not handle (compressed, Fortran order, object dtype)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            name = f"{member}.npy"
            if name not in z.namelist():
                return None
            info = z.getinfo(name)
            if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
                with z.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                        version, np.lib.format.read_array_header_2_0
                    )
                    shape, fortran, dtype = read_header(f)
                    npy_header = f.tell()
                if not fortran and not dtype.hasobject and 0 <= k < shape[0]:
                    size = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                    with open(
                        path, "rb"
                    ) as raw:  # a stored member is its bytes verbatim: seek straight there
                        raw.seek(info.header_offset)
                        local = raw.read(30)
                        name_len = int.from_bytes(local[26:28], "little")
                        extra_len = int.from_bytes(local[28:30], "little")
                        start = info.header_offset + 30 + name_len + extra_len + npy_header
                        raw.seek(start + k * size)
                        data = raw.read(size)
                    if len(data) == size:
                        return np.frombuffer(data, dtype).reshape(shape[1:]).copy()
    except (OSError, ValueError, zipfile.BadZipFile):
        pass
    shard = read_shard(path, (member,))  # one-line error naming the shard if it is damaged
    return shard[member][k] if member in shard else None


def _cell_image(cell: CellRecord, index: int) -> tuple[np.ndarray, str] | None:
    """Image `index` of a cell and its prompt text; None when the cell has no images or not that one."""
    for first, last, path in cell.shards():
        if not first <= index <= last:
            continue
        shard = read_shard(path, ("indices", "prompts"))  # small arrays; images are read one row only
        hits = np.flatnonzero(shard["indices"] == index) if "indices" in shard else [index - first]
        if len(hits) == 0:
            return None
        k = int(hits[0])
        image = _read_row(path, "images", k)
        if image is None:
            return None
        prompt = str(shard["prompts"][k]) if "prompts" in shard else ""
        return np.asarray(image), prompt
    return None


def _font(size: int) -> Any:
    """DejaVu Sans from matplotlib (always installed with it), so labels look the same everywhere."""
    from matplotlib import font_manager
    from PIL import ImageFont

    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=True), size)
    except OSError:
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: fixed-size bitmap font
            return ImageFont.load_default()


def _text_size(draw: Any, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _wrap(draw: Any, text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap to a pixel width; a prompt can be a long caption."""
    chars = max(10, int(width / max(1, _text_size(draw, "n" * 20, font)[0] / 20)))
    lines = textwrap.wrap(text, chars) or [""]
    return lines[:6] if len(lines) <= 6 else [*lines[:5], lines[5][: chars - 1] + "…"]


def _render_grid(
    title: str,
    prompt: str,
    rows: list[str],
    cols: list[int],
    tiles: dict[tuple[str, int], np.ndarray],
    tile: int,
) -> Any:
    """One page as a PIL image: title, prompt, NFE header row, sampler label column, tiles."""
    from PIL import Image, ImageDraw

    label_font, title_font, small_font = _font(max(14, tile // 9)), _font(max(16, tile // 8)), _font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(10, tile // 16)
    label_w = max(_text_size(probe, s, label_font)[0] for s in rows) + 2 * pad
    grid_w = len(cols) * tile + (len(cols) - 1) * GAP
    width = max(label_w + grid_w + pad, 640)  # room for a prompt line on narrow pages
    title_lines = [title]
    prompt_lines = _wrap(probe, f"prompt: “{prompt}”", label_font, width - 2 * pad) if prompt else []
    line_h = _text_size(probe, "Hg", title_font)[1] + pad // 2
    head_h = pad + line_h * (len(title_lines) + len(prompt_lines)) + pad // 2
    col_h = _text_size(probe, "NFE 0", label_font)[1] + pad
    height = head_h + col_h + len(rows) * tile + (len(rows) - 1) * GAP + pad

    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    y = pad
    for line in title_lines:
        draw.text((pad, y), line, font=title_font, fill=INK)
        y += line_h
    for line in prompt_lines:
        draw.text((pad, y), line, font=label_font, fill=MUTED)
        y += line_h
    top = head_h + col_h
    for c, nfe in enumerate(cols):
        x = label_w + c * (tile + GAP) + tile // 2
        draw.text((x, head_h + col_h // 2), f"NFE {nfe}", font=label_font, fill=INK, anchor="mm")
    for r, sampler in enumerate(rows):
        y = top + r * (tile + GAP)
        draw.text((label_w - pad, y + tile // 2), sampler, font=label_font, fill=INK, anchor="rm")
        for c, nfe in enumerate(cols):
            x = label_w + c * (tile + GAP)
            array = tiles.get((sampler, nfe))
            if array is None:
                draw.rectangle((x, y, x + tile - 1, y + tile - 1), fill=MISSING_TILE)
                draw.text((x + tile // 2, y + tile // 2), "not run", font=small_font, fill=MUTED, anchor="mm")
                continue
            picture = Image.fromarray(array).convert("RGB")
            if picture.size != (tile, tile):
                scale = tile / max(picture.size)
                size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
                upscale_exact = scale >= 1 and float(scale).is_integer()
                resample = Image.Resampling.NEAREST if upscale_exact else Image.Resampling.LANCZOS
                picture = picture.resize(size, resample)
            img.paste(picture, (x + (tile - picture.width) // 2, y + (tile - picture.height) // 2))
    return img


def image_grids(
    run_dir: Path,
    out_dir: Path,
    index: int = 0,
    max_rows: int = 8,
    max_cols: int = 8,
    *,
    tile_px: int | None = None,
) -> list[Path]:
    """Per (model, guidance): PNG pages of samplers x NFE showing image `index` of every cell.

    Files are `grid_<model>_cfg<g>_p<k>.png` (k from 1); a sweep larger than max_rows x max_cols is
    split over several pages rather than drawn as one unreadable image. Cells without images (the
    analytic model, latents-only runs) are skipped; a (model, guidance) with none gets no file.
    tile_px fixes the tile size (default: the image size, clamped to [128, 384] px).
    """
    from PIL.PngImagePlugin import PngInfo

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    written: list[Path] = []
    for (model, guidance), members in _group(find_cells(run_dir)).items():
        found = {key: _cell_image(cell, index) for key, cell in members.items()}
        tiles = {key: v[0] for key, v in found.items() if v is not None}
        if not tiles:
            continue
        prompts = sorted({v[1] for v in found.values() if v is not None})
        prompt = prompts[0] if len(prompts) == 1 else " | ".join(prompts)  # differing prompts: show them all
        side = tile_px or int(np.clip(max(max(t.shape[:2]) for t in tiles.values()), TILE_MIN, TILE_MAX))
        rows, cols = _layout(tiles)
        pages = _pages(rows, cols, max_rows, max_cols)
        out_dir.mkdir(parents=True, exist_ok=True)
        for k, (page_rows, page_cols) in enumerate(pages, start=1):
            title = f"{model} · guidance {guidance:g} · image {index}"
            if len(pages) > 1:
                title += f" · page {k}/{len(pages)}"
            img = _render_grid(title, prompt, page_rows, page_cols, tiles, side)
            missing = [(s, n) for s in page_rows for n in page_cols if (s, n) not in tiles]
            info = PngInfo()
            meta = _metadata(title, page_rows, page_cols, missing, index=index, prompt=prompt, tile=side)
            for key, value in meta.items():
                info.add_itxt(key, value)
            path = out_dir / _page_name("grid", model, guidance, k)
            img.save(path, pnginfo=info)
            written.append(path)
    return written


# ------------------------------------------------------------------------------ analytic model


def _is_gmm(cell: CellRecord) -> bool:
    return is_analytic(str(cell.info.get("config", {}).get("model", {}).get("name", "")))


def _mixture(model_cfg: dict[str, Any]) -> Any:
    import torch

    from samplebench.models import mixture_spec
    from samplebench.models.gmm import GaussianMixtureModel

    return GaussianMixtureModel(mixture_spec(model_cfg), torch.device("cpu"))


def _first_samples(cell: CellRecord, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n samples of a cell (by index) and their component labels (-1 when absent)."""
    xs, labels, have = [], [], 0
    for _, _, path in cell.shards():
        if have >= n:
            break
        shard = read_shard(path, ("samples", "labels", "indices"))
        order = np.argsort(shard["indices"]) if "indices" in shard else slice(None)
        x = np.asarray(shard["samples"], dtype=np.float64)[order]
        lab = np.asarray(shard["labels"])[order] if "labels" in shard else np.full(len(x), -1)
        xs.append(x.reshape(len(x), -1))
        labels.append(lab)
        have += len(x)
    if not xs:
        return np.zeros((0, 2)), np.zeros(0, dtype=int)
    return np.concatenate(xs)[:n], np.concatenate(labels)[:n].astype(int)


def _principal_plane(model: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Centre, 2 x D projection onto the true covariance's leading axes, projected means/covariances."""
    mean, cov = (t.cpu().numpy() for t in model.moments())
    eigenvalues, vectors = np.linalg.eigh(cov)
    axes = vectors[:, np.argsort(eigenvalues)[::-1][:2]].T  # (2, D), or (1, D) when D = 1
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(1)])[:, None]  # deterministic signs
    if len(axes) == 1:  # a 1-d mixture: plot against a zero second axis
        axes = np.vstack([axes, np.zeros_like(axes)])
    means = (model.means.cpu().numpy() - mean) @ axes.T
    covs = axes @ model.covariances().cpu().numpy() @ axes.T
    covs = covs + 1e-9 * np.eye(2)  # keeps the degenerate 1-d case invertible
    return mean, axes, means, covs, model.weights.cpu().numpy()


def _density(grid: np.ndarray, means: np.ndarray, covs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The projected mixture's density on (..., 2) points: a mixture of the projected Gaussians."""
    out = np.zeros(grid.shape[:-1])
    for mu, cov, w in zip(means, covs, weights, strict=True):
        inv = np.linalg.inv(cov)
        d = grid - mu
        quad = np.einsum("...i,ij,...j->...", d, inv, d)
        out += w * np.exp(-0.5 * quad) / (2 * math.pi * math.sqrt(np.linalg.det(cov)))
    return out


def _mass_levels(density: np.ndarray, cell_area: float, masses: Sequence[float]) -> list[float]:
    """Density thresholds whose super-level sets hold the given probability masses (HDR contours)."""
    values = np.sort(density.ravel())[::-1]
    cumulative = np.cumsum(values) * cell_area
    levels = [float(values[min(np.searchsorted(cumulative, m), len(values) - 1)]) for m in masses]
    return sorted(set(levels))


def _limits(means: np.ndarray, covs: np.ndarray, points: list[np.ndarray]) -> tuple[float, float, float]:
    """One square window for every panel: the true mixture's 3.5-sigma box, widened to hold 99% of the
    plotted samples but never beyond twice its own size (a diverged sampler must not shrink the truth)."""
    sd = np.sqrt(np.stack([np.diag(c) for c in covs]))
    lo, hi = (means - 3.5 * sd).min(0), (means + 3.5 * sd).max(0)
    centre, half = (lo + hi) / 2, float((hi - lo).max() / 2)
    finite = [p[np.isfinite(p).all(1)] for p in points if len(p)]
    if finite:
        allp = np.concatenate(finite)
        if len(allp):
            q = np.percentile(allp, [0.5, 99.5], axis=0)
            half = max(half, min(2 * half, float(np.abs(q - centre).max())))
    return float(centre[0]), float(centre[1]), half * 1.04


def gmm_projections(
    run_dir: Path,
    out_dir: Path,
    max_points: int = 1000,
    *,
    max_rows: int = 8,
    max_cols: int = 8,
) -> list[Path]:
    """Per (model, guidance) of an analytic (model=gmm) run: samplers x NFE scatter panels of the first
    max_points samples, projected on the two leading principal axes of the TRUE mixture covariance,
    over contours of the true density projected on the same plane (50/80/95/99% of its mass).

    All panels share one window, so spread and bias compare across samplers at a glance; points are
    coloured by the component they were conditioned on. Files: `proj_<model>_cfg<g>_p<k>.png`.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    written: list[Path] = []
    mixtures: dict[str, Any] = {}
    for (model_label, guidance), members in _group(c for c in find_cells(run_dir) if _is_gmm(c)).items():
        model_cfg = next(iter(members.values())).info["config"]["model"]
        cfg_key = json.dumps(model_cfg, sort_keys=True, default=str)
        if cfg_key not in mixtures:
            mixtures[cfg_key] = _mixture(model_cfg)
        centre, axes, means, covs, weights = _principal_plane(mixtures[cfg_key])
        data = {key: _first_samples(cell, max_points) for key, cell in members.items()}
        proj = {key: ((x - centre) @ axes.T, lab) for key, (x, lab) in data.items() if len(x)}
        if not proj:
            continue
        cx, cy, half = _limits(means, covs, [p for p, _ in proj.values()])
        xs = np.linspace(cx - half, cx + half, 240)
        ys = np.linspace(cy - half, cy + half, 240)
        grid = np.stack(np.meshgrid(xs, ys), axis=-1)
        dens = _density(grid, means, covs, weights)
        levels = _mass_levels(dens, (xs[1] - xs[0]) * (ys[1] - ys[0]), (0.99, 0.95, 0.8, 0.5))
        n_comp = len(weights)
        cmap = colormaps["tab10" if n_comp <= 10 else "tab20"]
        rows, cols = _layout(proj)
        pages = _pages(rows, cols, max_rows, max_cols)
        out_dir.mkdir(parents=True, exist_ok=True)
        for k, (page_rows, page_cols) in enumerate(pages, start=1):
            fig = Figure(figsize=(0.6 + 2.3 * len(page_cols), 0.9 + 2.3 * len(page_rows)), dpi=150)
            FigureCanvasAgg(fig)
            grid_axes = fig.subplots(len(page_rows), len(page_cols), squeeze=False, sharex=True, sharey=True)
            for r, sampler in enumerate(page_rows):
                for c, nfe in enumerate(page_cols):
                    ax = grid_axes[r][c]
                    ax.contourf(xs, ys, dens, levels=[*levels, dens.max() * 1.01], cmap="Greys", alpha=0.35)
                    ax.contour(xs, ys, dens, levels=levels, colors="0.35", linewidths=0.6)
                    if (sampler, nfe) in proj:
                        p, lab = proj[(sampler, nfe)]
                        colours = np.where(lab[:, None] >= 0, cmap(np.maximum(lab, 0) % cmap.N), (0.3,) * 4)
                        ax.scatter(
                            p[:, 0], p[:, 1], s=2.5, c=colours, alpha=0.7, linewidths=0, rasterized=True
                        )
                        finite = np.isfinite(p).all(1)
                        outside = int((~(np.abs(p[finite] - [cx, cy]) <= half).all(1)).sum())
                        notes = [f"{outside} outside"] if outside else []
                        if not finite.all():  # NaN or inf: nowhere to draw them, so say how many
                            notes.append(f"{int((~finite).sum())} non-finite")
                        if notes:
                            ax.text(
                                0.97,
                                0.03,
                                ", ".join(notes),
                                transform=ax.transAxes,
                                ha="right",
                                va="bottom",
                                fontsize=6.5,
                                color="firebrick",
                            )
                    else:
                        ax.text(
                            0.5,
                            0.5,
                            "not run",
                            transform=ax.transAxes,
                            ha="center",
                            va="center",
                            fontsize=8,
                            color="0.4",
                        )
                    ax.set_xlim(cx - half, cx + half)
                    ax.set_ylim(cy - half, cy + half)
                    ax.set_aspect("equal")
                    ax.tick_params(labelsize=6.5, length=2)
                    if r == 0:
                        ax.set_title(f"NFE {nfe}", fontsize=9)
                    if c == 0:
                        ax.set_ylabel(f"{sampler}\nPC 2", fontsize=8.5)
                    if r == len(page_rows) - 1:
                        ax.set_xlabel("PC 1", fontsize=7.5)
            shown = max(len(p) for p, _ in proj.values())
            title = f"{model_label} · guidance {guidance:g} · first {shown} samples on the true PC 1-2 plane"
            if len(pages) > 1:
                title += f" · page {k}/{len(pages)}"
            fig.suptitle(
                title + "\ncontours: true density, 50/80/95/99% of its mass · colour: conditioning component",
                fontsize=9,
            )
            fig.tight_layout()
            missing = [(s, n) for s in page_rows for n in page_cols if (s, n) not in proj]
            path = out_dir / _page_name("proj", model_label, guidance, k)
            fig.savefig(
                path, dpi=150, metadata=_metadata(title, page_rows, page_cols, missing, max_points=max_points)
            )
            written.append(path)
    return written


__all__ = ["gmm_projections", "image_grids"]
