"""One self-contained HTML page per report: open index.html from disk, no server, nothing fetched.

A results folder is what a reviewer asks for; a single page holding the protocol (how every number
was made), the leaderboards, the figures and the timings is what they can actually read. Every
figure is copied next to the page and referenced by a relative path, so the folder can be zipped,
mailed or attached to a paper as it is. A tiny inline script records on <body> how many images
loaded (`data-images-loaded` of `data-images-total`), which a headless browser can check.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from samplebench import store
from samplebench.report import quality_rows

CSS = """
:root { --ink: #1d1d1f; --muted: #5f6368; --rule: #d0d4d9; --soft: #f5f6f8; --accent: #1f4e8c; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0; color: var(--ink); background: #fff;
  font: 15px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial,
        "Noto Sans", "DejaVu Sans", sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 32px 40px 64px; }
header { border-bottom: 2px solid var(--ink); padding-bottom: 14px; margin-bottom: 8px; }
h1 { font-size: 26px; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 20px; margin: 40px 0 12px; padding-bottom: 4px; border-bottom: 1px solid var(--rule); }
h3 { font-size: 16px; margin: 26px 0 8px; }
h4 { font-size: 14.5px; margin: 18px 0 6px; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas,
  "DejaVu Sans Mono", monospace; }
p, li { max-width: 80ch; }
.sub { color: var(--muted); margin: 0; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace;
  font-size: 0.9em; }
nav { margin: 14px 0 0; font-size: 14px; }
nav a { margin-right: 16px; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
table { border-collapse: collapse; margin: 8px 0 18px; font-size: 13.5px;
  font-variant-numeric: tabular-nums; border-top: 1.5px solid var(--ink);
  border-bottom: 1.5px solid var(--ink); }
caption { caption-side: bottom; text-align: left; color: var(--muted); font-size: 12.5px; padding-top: 6px; }
th, td { padding: 5px 12px; text-align: left; vertical-align: top; }
thead th { border-bottom: 1px solid var(--ink); font-weight: 600; white-space: nowrap; }
tbody tr:nth-child(even) { background: var(--soft); }
td.num, th.num { text-align: right; white-space: nowrap; }
td.text { max-width: 62ch; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; margin: 8px 0 16px; }
dl.kv dt { color: var(--muted); }
dl.kv dd { margin: 0; }
.common { margin: 4px 0 10px; }
.boards { overflow-x: auto; }
tbody th { text-align: left; font-weight: 600; white-space: nowrap; }
td.best { background: #e3f0e6; }
td.tie { color: #3b4a5a; }
td.missing { color: #9aa0a6; text-align: center; }
td.nonfinite { color: #8a5a00; background: #fdf3dc; }
table.leaderboard td { white-space: nowrap; }
p.legend { color: var(--muted); font-size: 12.5px; margin: -10px 0 18px; }
.figures { display: grid; grid-template-columns: 1fr; gap: 22px; }
figure { margin: 0; border: 1px solid var(--rule); border-radius: 4px; padding: 10px; background: #fff; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { color: var(--muted); font-size: 12.5px; margin-top: 6px; text-align: center; }
.scroll { overflow-x: auto; }
footer { margin-top: 48px; color: var(--muted); font-size: 12.5px; border-top: 1px solid var(--rule);
  padding-top: 10px; }
@media print { main { max-width: none; padding: 0; } figure { break-inside: avoid; } nav { display: none; } }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; });
  document.body.setAttribute("data-images-total", String(images.length));
  document.body.setAttribute("data-images-loaded", String(loaded.length));
});
"""

KEY_FIELDS = ("model", "sampler", "nfe", "guidance")
ASSETS = "assets"


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "section"


def _fmt(x: Any) -> str:
    """Numbers as a reader wants them: integers plain, floats to 4 significant digits, NaN as a dash."""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x != x:
            return "—"
        if x.is_integer() and abs(x) < 1e6:
            return f"{x:g}"
        return f"{x:.4g}"
    return str(x)


def _table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    numeric: Sequence[bool] | None = None,
    caption: str = "",
) -> str:
    numeric = list(numeric) if numeric is not None else [False] * len(headers)
    head = "".join(
        f'<th class="{"num" if n else ""}">{_e(h)}</th>' for h, n in zip(headers, numeric, strict=True)
    )
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="{"num" if n else "text"}">{_e(_fmt(v))}</td>'
            for v, n in zip(row, numeric, strict=True)
        )
        body.append(f"<tr>{cells}</tr>")
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    table = f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


# ----------------------------------------------------------------------------------- protocol


def _split_key(key: str) -> dict[str, str]:
    """'model|sampler|nfe|guidance|metric' -> fields (a model label may itself hold '|')."""
    parts = key.rsplit("|", 4)
    if len(parts) != 5:
        return {"model": key, "sampler": "", "nfe": "", "guidance": "", "metric": "?"}
    return dict(zip((*KEY_FIELDS, "metric"), parts, strict=True))


def _sort_value(v: str) -> tuple[int, float, str]:
    try:
        return (0, float(v), v)
    except ValueError:
        return (1, 0.0, v)


def _number(v: str) -> Any:
    """'2.0' -> 2.0 so that keys print like the rest of the page (guidance 2, not 2.0)."""
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def _describe_cells(cells: list[dict[str, str]], all_cells: list[dict[str, str]]) -> str:
    """A short name for a set of cells: 'all 8 cells', a product ('4 cells: guidance 2'), or a list."""
    if len(cells) == len(all_cells):
        return f"all {len(cells)} cells"
    values = {f: sorted({c[f] for c in cells}, key=_sort_value) for f in KEY_FIELDS}
    all_values = {f: {c[f] for c in all_cells} for f in KEY_FIELDS}
    product = 1
    for f in KEY_FIELDS:
        product *= len(values[f])
    if product == len(cells):  # the group is a full product: name only the fields that restrict it
        parts = [
            f"{f} {', '.join(_fmt(_number(v)) for v in values[f])}"
            for f in KEY_FIELDS
            if set(values[f]) != all_values[f]
        ]
        return f"{len(cells)} cells: " + " · ".join(parts)
    listed = [" · ".join(_fmt(_number(c[f])) for f in KEY_FIELDS) for c in cells]
    return f"{len(cells)} cells: " + "; ".join(listed)


def _value_text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)


def _protocol_rows(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Per metric: the entries common to all its cells once, then one table row per group of cells
    sharing the rest (identical protocols are grouped, not repeated per cell)."""
    by_metric: dict[str, list[tuple[dict[str, str], dict[str, str]]]] = {}
    for key, record in rows.items():
        fields = _split_key(key)
        clean = {str(k): _value_text(v) for k, v in (record or {}).items()}
        by_metric.setdefault(fields["metric"], []).append((fields, clean))
    out = []
    for metric in sorted(by_metric):
        entries = by_metric[metric]
        all_cells = [f for f, _ in entries]
        keys = sorted({k for _, rec in entries for k in rec})
        common = {
            k: entries[0][1][k] for k in keys if all(rec.get(k) == entries[0][1].get(k) for _, rec in entries)
        }
        varying = [k for k in keys if k not in common]
        out.append(f'<h4 id="protocol-{_slug(metric)}">{_e(metric)}</h4>')
        n = len(all_cells)
        if common:
            label = f"same for all {n} cells" if not varying else f"common to all {n} cells; the rest below"
            items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in common.items())
            out.append(f'<p class="sub">{_e(label)}</p><dl class="kv common">{items}</dl>')
        if varying:
            groups: dict[tuple[str, ...], list[dict[str, str]]] = {}
            for fields, rec in entries:
                groups.setdefault(tuple(rec.get(k, "—") for k in varying), []).append(fields)
            table_rows = [(_describe_cells(cells, all_cells), *vals) for vals, cells in groups.items()]
            out.append(
                _table(
                    ["applies to", *varying],
                    table_rows,
                    caption=f"{len(groups)} distinct protocols over {len(all_cells)} cells",
                )
            )
    return "\n".join(out)


RunProtocol = tuple[str, Mapping[str, Any], list[Mapping[str, Any]]]


def _runs_of(protocol: Mapping[str, Any]) -> list[RunProtocol]:
    """(run name, metrics.protocol.json dict, provenance.json records) per run, from any of the accepted
    shapes: one metrics.protocol.json dict; {run: that dict}; or build's
    {"runs": {run: {"metrics": ..., "provenance": [...]}}}."""
    if not protocol:
        return []
    if "rows" in protocol or "versions" in protocol:
        return [("", protocol, [])]
    runs = protocol["runs"] if isinstance(protocol.get("runs"), Mapping) else protocol
    out: list[RunProtocol] = []
    for name, entry in runs.items():
        if not isinstance(entry, Mapping):
            continue
        if "rows" in entry or "versions" in entry:
            out.append((str(name), entry, []))
            continue
        metrics = entry.get("metrics") or entry.get("metrics.protocol") or {}
        prov = entry.get("provenance") or []
        prov = [prov] if isinstance(prov, Mapping) else [r for r in prov if isinstance(r, Mapping)]
        out.append((str(name), metrics, prov))
    return out


def _software(runs: list[RunProtocol]) -> str:
    """Git commit and package versions, one column per run (the metrics stage's record, else the last
    generate record), so a version difference between merged runs is visible at a glance."""
    columns = []
    for name, metrics, prov in runs:
        last = prov[-1] if prov else {}
        versions = metrics.get("versions") or last.get("versions") or {}
        commit = metrics.get("git_commit") or last.get("git_commit") or "unknown"
        columns.append((name, {"git commit": commit, **{str(k): v for k, v in versions.items()}}))
    keys = list(dict.fromkeys(k for _, col in columns for k in col))
    if len(keys) <= 1 and all(col.get("git commit") == "unknown" for _, col in columns):
        return ""
    headers = ["package", *(name or "version" for name, _ in columns)]
    rows = [(k, *(col.get(k, "—") for _, col in columns)) for k in keys]
    return "<h3>Software</h3>" + _table(headers, rows, caption="as recorded when the metrics were computed")


def _notes(runs: list[RunProtocol]) -> str:
    """Top-level definitions (what NFE and seconds per image mean, schedule floors...): once when all runs
    agree, per run otherwise."""
    skip = {"rows", "versions", "git_commit"}
    keys = list(dict.fromkeys(k for _, m, _ in runs for k in m if k not in skip))
    items = []
    for key in keys:
        values = [(name, m[key]) for name, m, _ in runs if m.get(key) not in (None, "", {}, [])]
        texts = {json.dumps(v, sort_keys=True, default=str) for _, v in values}
        shown = values[:1] if len(texts) == 1 else values
        for name, value in shown:
            if isinstance(value, Mapping):
                text = "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
            else:
                text = _fmt(value)
            label = key.replace("_", " ") + (f" ({name})" if len(shown) > 1 else "")
            items.append(f"<dt>{_e(label)}</dt><dd>{_e(text)}</dd>")
    return f'<h3>Definitions</h3><dl class="kv">{"".join(items)}</dl>' if items else ""


def _switches_text(speed: Any) -> str:
    """A generate record's speed switches (samplebench/speed.py) per model: the ones on, or "off"."""
    if not isinstance(speed, Mapping):
        return ""
    parts = []
    for model, sw in sorted(speed.items()):
        if not isinstance(sw, Mapping):
            continue
        on = []
        if sw.get("compile"):
            on.append(f"compile ({sw.get('compile_mode')}, {sw.get('compile_backend')})")
        if sw.get("channels_last"):
            on.append("channels_last")
        if sw.get("attention") not in (None, "default"):
            on.append(f"attention={sw.get('attention')}")
        flags = sw.get("torch_tf32") or {}
        if flags.get("cuda.matmul.allow_tf32") or flags.get("cudnn.allow_tf32"):
            matmul, cudnn = flags.get("cuda.matmul.allow_tf32"), flags.get("cudnn.allow_tf32")
            on.append(f"tf32 (matmul {matmul}, cudnn {cudnn})")
        parts.append(f"{model}: {', '.join(on) or 'off'}")
    return "; ".join(parts)


def _history(runs: list[RunProtocol]) -> str:
    """Every generate/metrics invocation recorded in provenance.json: when, what command, where."""
    rows = []
    for name, _, prov in runs:
        for rec in prov:
            devices = rec.get("devices") or []
            rows.append(
                (
                    name,
                    rec.get("time", ""),
                    rec.get("stage", ""),
                    rec.get("command", ""),
                    rec.get("host", ""),
                    ", ".join(map(str, devices)) if isinstance(devices, list) else devices,
                    rec.get("git_commit") or "",
                    _switches_text(rec.get("speed")),
                )
            )
    if not rows:
        return ""
    headers = ["run", "time", "stage", "command", "host", "devices", "git commit", "speed switches"]
    return "<h3>Provenance</h3>" + _table(headers, rows, caption="from provenance.json")


def _protocol_section(protocol: Mapping[str, Any]) -> str:
    """Software, definitions, one grouped protocol table per metric, provenance history.

    Rows of several runs are merged (a later run's row replaces an earlier one for the same cell, as in
    the merged metrics table), so identical protocols group across runs too."""
    runs = _runs_of(protocol)
    if not runs:
        return '<p class="sub">no protocol record (metrics.protocol.json) was given.</p>'
    rows: dict[str, Any] = {}
    for _, metrics, _ in runs:
        rows.update(metrics.get("rows") or {})
    parts = [_software(runs), _notes(runs)]
    if rows:
        parts.append("<h3>How each metric was computed</h3>" + _protocol_rows(rows))
    parts.append(_history(runs))
    return "\n".join(p for p in parts if p)


# ------------------------------------------------------------------------------------- summary


def _summary(run_dirs: Sequence[Path]) -> str:
    """What each run holds, read from disk, so the page says what was compared before how well."""
    rows = []
    for run in run_dirs:
        run = Path(run)
        try:
            cells = store.find_cells(run)
        except Exception:  # a run folder without cells still gets a row
            cells = []
        metrics_path = run / "metrics.csv"
        metrics: list[str] = []
        if metrics_path.exists():
            df = pd.read_csv(metrics_path)
            if "metric" in df.columns:
                metrics = sorted(quality_rows(df)["metric"].astype(str).unique())

        def values(i: int, cells: list = cells) -> str:
            return ", ".join(
                _fmt(v) for v in sorted({c.key[i] for c in cells}, key=lambda v: (str(type(v)), v))
            )

        images = sorted({int(c.info.get("num_images", 0)) for c in cells})
        rows.append(
            (
                run.name,
                values(0),
                values(1),
                values(2),
                values(3),
                ", ".join(map(str, images)),
                len(cells),
                ", ".join(metrics) or "—",
            )
        )
    headers = ["run", "models", "samplers", "NFE", "guidance", "samples per cell", "cells", "metrics"]
    numeric = [False, False, False, False, False, True, True, False]
    return _table(headers, rows, numeric)


# ------------------------------------------------------------------------------------- figures


def _place(src: Path, section: str, out_dir: Path, used: set[Path]) -> Path:
    """Copy a figure under out_dir/assets/<section>/ (kept in place when already under out_dir)."""
    src = Path(src).resolve()
    root = out_dir.resolve()
    if root in src.parents:
        return src
    dest_dir = root / ASSETS / _slug(section)
    dest_dir.mkdir(parents=True, exist_ok=True)
    stem, suffix = re.sub(r"[^A-Za-z0-9._-]+", "-", src.stem) or "figure", src.suffix.lower()
    dest, k = dest_dir / f"{stem}{suffix}", 2
    while dest in used:  # two runs' plots/fd_exact_vs_nfe.png must not overwrite each other
        dest, k = dest_dir / f"{stem}-{k}{suffix}", k + 1
    used.add(dest)
    shutil.copyfile(src, dest)
    return dest


def _png_title(path: Path) -> str:
    """The Title text chunk grids.py writes into its PNGs (what the figure shows), or ''."""
    try:
        from PIL import Image

        with Image.open(path) as img:
            return str(getattr(img, "text", {}).get("Title", "")).split("\n")[0]
    except Exception:  # not an image PIL reads: the caption falls back to the file name
        return ""


def _figures(images: Mapping[str, Sequence[Path]], out_dir: Path) -> tuple[str, list[tuple[str, str]]]:
    parts, toc, used = [], [], set()
    for section, paths in images.items():
        if not paths:
            continue
        anchor = f"fig-{_slug(section)}"
        toc.append((anchor, section))
        figs = []
        for p in paths:
            placed = _place(Path(p), section, out_dir, used)
            rel = quote(Path(os.path.relpath(placed, out_dir.resolve())).as_posix())
            name = Path(p).name
            title = _png_title(placed)
            caption = f"{_e(title)} · <code>{_e(name)}</code>" if title else f"<code>{_e(name)}</code>"
            figs.append(
                f'<figure><a href="{_e(rel)}"><img src="{_e(rel)}" alt="{_e(title or name)}"></a>'
                f"<figcaption>{caption}</figcaption></figure>"
            )
        parts.append(
            f'<section id="{anchor}"><h2>{_e(section)}</h2><div class="figures">{"".join(figs)}</div>'
            "</section>"
        )
    return "\n".join(parts), toc


# -------------------------------------------------------------------------------------- timings


def _timings(timings: pd.DataFrame | None) -> str:
    if timings is None or timings.empty:
        return '<p class="sub">no timings recorded.</p>'
    df = timings.copy()
    sort_by = [c for c in ("model", "sampler", "guidance", "nfe") if c in df.columns]
    if sort_by:
        df = df.sort_values(sort_by, kind="stable")
    numeric = [
        pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns
    ]
    headers = [str(c).replace("sec_per_image_", "s/image ").replace("_", " ") for c in df.columns]
    rows = [[v.item() if hasattr(v, "item") else v for v in r] for r in df.itertuples(index=False)]
    from samplebench.report import time_axis_notes

    caption = " ".join(time_axis_notes(df["model"].astype(str) if "model" in df.columns else []))
    return _table(headers, rows, numeric, caption=caption)


# ----------------------------------------------------------------------------------------- page


def write_html(
    run_dirs: list[Path],
    out_dir: Path,
    images: dict[str, list[Path]],
    leaderboard_html: str,
    timings: pd.DataFrame | None,
    protocol: dict,
) -> Path:
    """Write out_dir/index.html (and copy the figures under out_dir/assets/); returns the page's path.

    `images` maps a section title to its PNGs, in display order; `leaderboard_html` is inserted as
    given; `protocol` is a metrics.protocol.json dict (or {run name: such dict}).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [Path(r) for r in run_dirs]
    names = ", ".join(r.name for r in runs) or "samplebench"
    figures, fig_toc = _figures(images, out_dir)
    toc = [
        ("summary", "Runs"),
        ("protocol", "Protocol"),
        ("leaderboard", "Leaderboard"),
        *fig_toc,
        ("timings", "Timings"),
    ]
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in toc)
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    board = leaderboard_html.strip() or '<p class="sub">no quality metrics in these runs.</p>'
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="samplebench">
<title>samplebench report: {_e(names)}</title>
<style>{CSS}</style>
</head>
<body>
<main>
<header>
<h1>samplebench report: {_e(names)}</h1>
<p class="sub">Diffusion-sampler benchmark · generated {_e(when)}</p>
<nav>{nav}</nav>
</header>
<section id="summary"><h2>Runs</h2>
{_summary(runs)}
</section>
<section id="protocol"><h2>Protocol</h2>
{_protocol_section(protocol)}
</section>
<section id="leaderboard"><h2>Leaderboard</h2>
<div class="boards">
{board}
</div>
</section>
{figures}
<section id="timings"><h2>Timings</h2>
{_timings(timings)}
</section>
<footer>Written by samplebench. Figures are PNG files beside this page;
click one to open it at full size.</footer>
</main>
<script>{SCRIPT}</script>
</body>
</html>
"""
    path = out_dir / "index.html"
    store.atomic_write_text(path, page)
    return path


__all__ = ["write_html"]
