"""A real Slurm controller and node on localhost, for the launcher tests.

Installs Debian's slurm-wlm and munge if missing (CI is root on Debian), writes a
slurm.conf for this machine into a temporary directory (no systemd, no cgroups), starts
munged, slurmctld and slurmd, waits for the node to be idle, and stops everything it
started afterwards.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil


class SlurmCluster:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="em-slurm-"))
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.started: list[Path] = []
        self.munged_started = False

    # -- set-up ---------------------------------------------------------------------
    @staticmethod
    def install() -> None:
        if shutil.which("slurmctld") and shutil.which("munged"):
            return
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT}
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600, **quiet)
        subprocess.run(["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], check=True, timeout=900,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, **quiet)

    def _start_munge(self) -> None:
        if any(p.info["name"] == "munged" for p in psutil.process_iter(["name"])):
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, timeout=30)
        self.munged_started = True

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        memory_mb = int(psutil.virtual_memory().available / 2**20 * 0.5)
        for sub in ("state", "spool", "log"):
            (self.dir / sub).mkdir()
        self.conf.write_text(f"""
ClusterName=emtest
SlurmctldHost={host}
SlurmctldPort=17817
SlurmdPort=17818
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
KillWait=30
MinJobAge=600
StateSaveLocation={self.dir}/state
SlurmdSpoolDir={self.dir}/spool
SlurmctldPidFile={self.dir}/slurmctld.pid
SlurmdPidFile={self.dir}/slurmd.pid
SlurmctldLogFile={self.dir}/log/slurmctld.log
SlurmdLogFile={self.dir}/log/slurmd.log
NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> "SlurmCluster":
        self.install()
        self._start_munge()
        self._write_conf()
        for daemon, pid in (("slurmctld", "slurmctld.pid"), ("slurmd", "slurmd.pid")):
            subprocess.run([daemon, "-f", str(self.conf)], check=True, env=self.env, timeout=60)
            self.started.append(self.dir / pid)
            if daemon == "slurmctld":
                time.sleep(1)
        deadline = time.time() + 90
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-o", "%t").stdout.strip()
            if out in ("idle", "mix"):
                return self
            time.sleep(1)
        raise RuntimeError(f"Slurm node never became idle (sinfo: {out!r})\n{self.daemon_logs()}")

    # -- use ------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = False, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=timeout, **kw)

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def daemon_logs(self) -> str:
        text = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.dir / "log" / name
            if path.exists():
                text.append(f"--- {name} ---\n" + "\n".join(path.read_text().splitlines()[-40:]))
        return "\n".join(text)

    def stop(self) -> None:
        for pid_file in reversed(self.started):
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, 15)
                psutil.Process(pid).wait(timeout=30)
            except (FileNotFoundError, ValueError, ProcessLookupError, psutil.NoSuchProcess):
                pass
            except psutil.TimeoutExpired:
                os.kill(pid, 9)
        if self.munged_started:
            subprocess.run(["pkill", "-x", "munged"], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
