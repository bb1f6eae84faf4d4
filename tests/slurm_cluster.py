"""A real single-node Slurm cluster for the launcher tests and the scaling benchmark.

Debian's munge, slurmctld and slurmd (installed by `make system-deps`, which .ci/run runs) are started
as plain processes, without systemd or cgroups: munged as the munge user with its own key and socket,
then `slurmctld -D` and `slurmd -D`, all configured under one temporary folder and stopped by PID
afterwards. There is no accounting database (like many small clusters), which is exactly the case
where submitit's own job watcher learns nothing (it asks sacct).
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo")


def why_unavailable() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing; `make system-deps` installs it)"
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "the munge user is missing (Debian's munge package creates it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


@dataclass
class Cluster:
    """A running cluster: `env` holds SLURM_CONF for the commands (and for submitit's sbatch calls)."""

    root: Path
    cpus: int
    memory_mb: int
    env: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, check=check, timeout=60)

    def logs(self) -> str:
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    def processes(self) -> list[int]:
        """Every process started for this cluster (daemons' children, job steps, the jobs' programs):
        they all carry its SLURM_CONF in their environment. Job steps outlive slurmd (no cgroups)."""
        mark = f"SLURM_CONF={self.env['SLURM_CONF']}".encode()
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                try:
                    if mark in (proc / "environ").read_bytes().split(b"\0"):
                        found.append(int(proc.name))
                except OSError:
                    continue
        return found

    def stop(self) -> None:
        """Cancel every job, stop every daemon by PID (SIGTERM, then SIGKILL for any still alive after
        10 s), then kill whatever job process is left, so nothing outlives the cluster."""
        self.run("scancel", "--full", "--signal=KILL", "--partition=debug", check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.get(name)
            if pid:
                with _ignore_missing():
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.get(name)
            while pid and _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid and _alive(pid):
                with _ignore_missing():
                    os.kill(pid, signal.SIGKILL)
        for pid in self.processes():
            with _ignore_missing():
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


class _ignore_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, tb) -> bool:
        return kind is ProcessLookupError


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap our own children so they do not linger as zombies
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _pid_from(path: Path, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip().isdigit():
            return int(path.read_text().strip())
        time.sleep(0.1)
    raise RuntimeError(f"{path} did not appear")


def start(cpus: int | None = None) -> Cluster:
    """Write the configuration under a new temporary folder, start munged, slurmctld and slurmd, and wait
    until the node is idle. On failure the daemons already started are stopped and the logs are in the
    error. The folder is made outside pytest's (mode 700) tmp tree: munged runs as the munge user."""
    root = Path(tempfile.mkdtemp(prefix="samplebench-slurm-"))
    root.chmod(0o755)
    for sub in ("state", "spool"):
        (root / sub).mkdir(exist_ok=True)
    cpus = cpus or os.cpu_count() or 1
    memory = max(256, int(_memory_mb() * 0.9))  # below the real total, or slurmd is refused as too small
    host = socket.gethostname().split(".")[0]
    ctld_port, d_port = _free_port(), _free_port()
    munge = pwd.getpwnam("munge")
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chown(key, munge.pw_uid, munge.pw_gid)
    key.chmod(0o400)
    os.chown(root, munge.pw_uid, 0)  # munged creates its socket and pid file here
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=samplebench-test",
                f"SlurmctldHost={host}(127.0.0.1)",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                f"AuthInfo=socket={root}/munge.socket",
                "CredType=cred/munge",
                f"StateSaveLocation={root}/state",
                f"SlurmdSpoolDir={root}/spool",
                f"SlurmctldPidFile={root}/slurmctld.pid",
                f"SlurmdPidFile={root}/slurmd.pid",
                f"SlurmctldPort={ctld_port}",
                f"SlurmdPort={d_port}",
                f"SlurmctldLogFile={root}/slurmctld.log",
                f"SlurmdLogFile={root}/slurmd.log",
                "ProctrackType=proctrack/linuxproc",  # no cgroups in a container
                "TaskPlugin=task/none",
                "SchedulerType=sched/backfill",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "ReturnToService=2",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",  # no sacct: the case submitit cannot watch
                "MpiDefault=none",
                "MailProg=/bin/true",
                "KillWait=30",
                "MinJobAge=300",
                f"FirstJobId={random.randint(1000, 900000)}",  # ids of two clusters never meet
                f"NodeName=sbnode NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN",
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = Cluster(root, cpus, memory, env)
    try:
        subprocess.run(
            [
                "runuser", "-u", "munge", "--", "munged", "--force",
                f"--key-file={key}", f"--socket={root}/munge.socket", f"--log-file={root}/munged.log",
                f"--pid-file={root}/munged.pid", f"--seed-file={root}/munged.seed",
            ],
            check=True, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        cluster.pids["munged"] = _pid_from(root / "munged.pid")
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
        cluster.pids["slurmctld"] = subprocess.Popen(["slurmctld", "-D", "-i"], **quiet).pid
        cluster.pids["slurmd"] = subprocess.Popen(["slurmd", "-D", "-N", "sbnode"], **quiet).pid
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False)
            if out.returncode == 0 and out.stdout.strip() == "idle":
                return cluster
            time.sleep(0.5)
        raise RuntimeError("the Slurm node did not become idle within 60 s")
    except Exception as e:
        cluster.stop()
        detail = getattr(e, "stderr", None) or ""
        raise RuntimeError(f"could not start Slurm: {e} {detail}\n{cluster.logs()}") from e
