"""Ctrl-C during a sweep: exit 130, one line saying what is kept and how to resume (issue 12)."""

import signal
import subprocess
import sys
import time


def test_ctrl_c_exits_130_and_keeps_finished_shards(tmp_path):
    cmd = [sys.executable, "-m", "samplebench.cli", "sweep", "sampler=ddim", "nfe=5", "num_images=400000"]
    cmd += ["shard_size=500", "batch_size=500", f"results_dir={tmp_path}", "run=r"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cell = tmp_path / "r" / "gmm" / "ddim" / "karras" / "nfe=5" / "cfg=1"
    deadline = time.monotonic() + 300  # only stops a hung child; the test waits for a shard, not a time
    while not list(cell.glob("shard-*.npz")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]  # 800 shards: still generating
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted:") and "re-run" in lines[-1] and "Traceback" not in err
    assert list(cell.glob("shard-*.npz"))  # what was finished is kept
