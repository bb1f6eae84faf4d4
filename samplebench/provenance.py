"""Provenance of a run: what made it, recorded beside the results and shown by the report."""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = (
    "samplebench",
    "torch",
    "diffusers",
    "transformers",
    "numpy",
    "scipy",
    "hydra-core",
    "torch-fidelity",
    "clean-fid",
    "open_clip_torch",
    "pandas",
)


def git_commit() -> str | None:
    """The project's git commit, with '-dirty' when the work tree has changes; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5, cwd=here
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def devices() -> list[str]:
    if torch.cuda.is_available():
        return [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return [f"cpu ({platform.processor() or platform.machine()})"]


def record(argv: list[str] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One provenance record: versions, commit, devices, host, time, command line."""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(argv if argv is not None else sys.argv),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "devices": devices(),
        "versions": versions(),
        "git_commit": git_commit(),
        **(extra or {}),
    }
