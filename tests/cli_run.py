"""`samplebench` as a user runs it, output captured (shared by the CLI tests).

`cli` runs a child process, exactly as a user does. `cli_here` runs the same entry point
(samplebench.cli.main, with its exit codes and its one-line errors) inside the test process: the same
code path without the ~10 s of imports a fresh interpreter pays, for tables of many small cases.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    """Run `python -m samplebench.cli ARGS` (kw: cwd, env); the timeout only stops a hung child."""
    return subprocess.run(
        [sys.executable, "-m", "samplebench.cli", *args], capture_output=True, text=True, timeout=900, **kw
    )


def cli_here(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`samplebench ARGS` through samplebench.cli.main in this process: exit code, stdout and stderr
    (`env`: the environment for the call, restored after)."""
    import os

    from samplebench import cli as entry

    out, err = io.StringIO(), io.StringIO()
    code = 0
    saved, saved_env = sys.argv, dict(os.environ)
    sys.argv = ["samplebench", *args]
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                entry.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
        if env is not None:
            os.environ.clear()
            os.environ.update(saved_env)
    return subprocess.CompletedProcess(["samplebench", *args], code, out.getvalue(), err.getvalue())
