"""bench/bench_gpu.py keeps working: its --smoke mode runs every part on the CPU (tiny SD pipeline, one
Inception and DINOv2 batch, compile with dynamo's eager backend once samplebench has model.compile) and
prints well-formed markdown tables; its section writer replaces its own section and nothing else.

What is checked is the shape of the output, never the timings' values: every table row has its header's
number of cells, numeric columns parse, and the columns that are functions of each other agree with each
other to the rounding of the printed digits (the reference is the row's own other cells).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = mod  # its dataclasses look their module up while it is being executed
    spec.loader.exec_module(mod)
    return mod


def tables(text: str) -> list[list[list[str]]]:
    """Markdown tables: runs of lines starting with '|', each line split into stripped cells."""
    out, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            assert line.rstrip().endswith("|"), line
            current.append([c.strip() for c in line.strip()[1:-1].split("|")])
        elif current:
            out.append(current)
            current = []
    return out


def close(a: float, b: float, rel: float, abs_: float = 0.0) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b)) + abs_


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One --smoke run writing into a copy of a BENCHMARKS.md with sections before and after."""
    out = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## Earlier\n\nkept\n")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--write", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,  # only stops a hung child
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


def test_smoke_prints_well_formed_tables(smoke):
    proc, _ = smoke
    text = proc.stdout
    assert text.startswith("## GPU benchmarks (bench/bench_gpu.py)\n")
    assert "on **CPU" in text and "SMOKE sizes" in text
    found = tables(text)
    for t in found:
        header, sep, rows = t[0], t[1], t[2:]
        assert all(re.fullmatch(r":?-{3,}:?", c) for c in sep), sep
        assert len(sep) == len(header) and rows
        for row in rows:
            assert len(row) == len(header), (header, row)
            for cell, s in zip(row, sep, strict=True):
                if s.endswith(":"):  # right-aligned columns are numbers
                    float(cell)
    by_header = {t[0][0]: t for t in found}

    gen = by_header["side"]
    names = [r[0] for r in gen[2:]]
    assert names == [  # --smoke: the native sampler only (the GPU run adds samplebench's diffusers:dpmpp)
        "samplebench dpmpp, recorded (sampling)",
        "samplebench dpmpp, wall clock",
        "bare diffusers loop, wall clock",
    ]
    for r in gen[2:]:
        # images/s (3 decimals) and s/image (4 significant digits) are reciprocals
        assert close(float(r[1]) * float(r[2]), 1.0, 1e-3, 5e-4 / float(r[1])), r
    # the wall-clock rows: s/image (4 significant digits) = the one round's wall seconds (3) / 2 images
    for r in (gen[3], gen[4]):
        assert close(float(r[2]) * 2, float(r[4]), 5e-3), r

    feats = by_header["extractor"]
    assert [r[0] for r in feats[2:]] == ["Inception-v3"] * 3 + ["DINOv2 vit-s-14"] * 2
    for r in feats[2:]:
        n, rate, secs = int(r[2]), float(r[3]), float(r[4])
        assert n == 1
        assert close(rate, n / secs, 5e-3, 0.05), r  # images/s has 1 decimal, seconds 3 significant digits
    assert "torch-fidelity get_featuresdict_from_dataset + IS" in feats[3][1]
    assert "Dinov2Model" in feats[6][1] and "22.1M" in feats[5][1] and "22.1M" in feats[6][1]

    part3 = text.split("### torch.compile in samplebench (model.compile)\n", 1)[1]
    if "model.compile" in by_header:  # samplebench has the switch: off and on, both timed
        assert [r[0] for r in by_header["model.compile"][2:]] == ["off", "on"]
        assert "steady-state speed-up with compile" in part3
    else:
        assert part3.lstrip().startswith(
            "Skipped: the installed samplebench does not take `model.compile=true"
        )


def test_smoke_writes_its_section_after_the_others(smoke):
    proc, out = smoke
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\n## Earlier\n\nkept\n\n## GPU benchmarks (bench/bench_gpu.py)\n")
    assert text.count("## GPU benchmarks") == 1
    assert text.rstrip("\n") == ("# Benchmarks\n\n## Earlier\n\nkept\n\n" + proc.stdout).rstrip("\n")


def test_write_section_replaces_only_its_own(tmp_path):
    mod = _module()
    path = tmp_path / "B.md"
    head = f"## {mod.SECTION}"
    path.write_text(f"# B\n\n## A\n\na\n\n{head}\n\nold\n### sub\nold too\n\n## C\n\nc\n")
    mod.write_section(path, f"{head}\n\nnew\n")
    assert path.read_text() == f"# B\n\n## A\n\na\n\n{head}\n\nnew\n\n## C\n\nc\n"
    mod.write_section(path, f"{head}\n\nnewer\n")  # again: still one section, in the same place
    assert path.read_text() == f"# B\n\n## A\n\na\n\n{head}\n\nnewer\n\n## C\n\nc\n"
    fresh = tmp_path / "new.md"
    mod.write_section(fresh, f"{head}\n\nx\n")
    assert fresh.read_text() == f"{head}\n\nx\n"


def test_unknown_part_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        _module().main(["--parts", "generate,bogus", "--device", "cpu"])
    assert e.value.code == 2
    assert "--parts: unknown bogus" in capsys.readouterr().err
