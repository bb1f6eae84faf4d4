"""`samplebench` as a user runs it: a child process, output captured (shared by the CLI tests)."""

from __future__ import annotations

import subprocess
import sys


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    """Run `python -m samplebench.cli ARGS` (kw: cwd, env); the timeout only stops a hung child."""
    return subprocess.run(
        [sys.executable, "-m", "samplebench.cli", *args], capture_output=True, text=True, timeout=900, **kw
    )
