"""A one-machine Slurm cluster for the tests: munge, slurmctld and slurmd as root, all state
under a temporary folder, one node named after this host. Needs Debian's slurmctld, slurmd,
slurm-client and munge (`.ci/run` installs them); tests skip with the reason when it cannot
start."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from launcher.sweep import slurm_job_state

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")

CONF = """ClusterName=moetest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
RequeueExit=75
KillWait=30
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
NodeName={host} CPUs=4 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing() -> str | None:
    """Why a cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root"
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    return f"not installed: {', '.join(absent)}" if absent else None


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class Cluster:
    def __init__(self, root: Path):
        self.root, self.host = root, socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 60) -> None:
        for d in ("state", "spool", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONF.format(host=self.host, root=self.root, ctld_port=_free_port(),
                                         d_port=_free_port()))
        key, sock = self.root / "munge" / "munge.key", self.root / "munge" / "munge.socket"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.env["MUNGE_SOCKET"] = str(sock)  # not read by Slurm: it uses the default socket
        # Slurm's auth/munge talks to the default socket, so munged runs there.
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        subprocess.run([_binary("munged"), "--force", f"--key-file={key}"], check=True,
                       env=self.env, capture_output=True)
        for daemon in ("slurmctld", "slurmd"):
            self.procs.append(subprocess.Popen([_binary(daemon), "-D", "-f", str(self.conf)],
                                               env=self.env, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm did not come up (sinfo: {state!r}); logs in {self.root}")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check)

    def job_state(self, job: str) -> dict[str, str]:
        return slurm_job_state(job, self.env)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        subprocess.run(["pkill", "-f", f"munged --force --key-file={self.root}"], check=False)
