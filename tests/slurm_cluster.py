"""A real Slurm cluster on localhost, for the launcher tests: one controller and two
compute nodes (n1, n2), each its own slurmd on this machine.

Installs Debian's slurm-wlm and munge if missing (CI is root on Debian), writes a
slurm.conf for this machine into a temporary directory (no systemd, no cgroups), starts
munged, slurmctld and one `slurmd -N <node>` per node entry (both on 127.0.0.1, on their
own ports, spool dirs and logs), waits for the nodes to be idle, and stops everything it
started afterwards. A job with --nodes=2 is a real multi-node launch: srun starts its
tasks through both slurmds, with per-node SLURM_NODEID/SLURM_LOCALID.

Each node advertises GPUS_PER_NODE GPUs (gres/gpu), so the launchers' `#SBATCH
--gpus-per-node=8` header is scheduled as on a GPU cluster. Slurm 22.05's gres/gpu plugin
drops GPUs without a File= ("Removing file-less GPU") and rejects a File= that is not a
character or block device, so gres.conf names GPUS_PER_NODE symlinks to /dev/null
(AutoDetect=off; no cgroups, so nothing is constrained). A job that asks for GPUs then gets
SLURM_GPUS_ON_NODE, SLURM_JOB_GPUS, CUDA_VISIBLE_DEVICES=0,...,7 (and GPU_DEVICE_ORDINAL,
ROCR_VISIBLE_DEVICES, ZE_AFFINITY_MASK) like on real GPUs; CPU-only torch ignores them.
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


NODES = ("n1", "n2")
GPUS_PER_NODE = 8  # as slurm/*.sh ask for (#SBATCH --gpus-per-node=8)


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
        for sub in ("state", "log", "dev", *(f"spool-{node}" for node in NODES)):
            (self.dir / sub).mkdir()
        # Stand-in GPU device files: gres/gpu needs File= entries that are character devices.
        for i in range(GPUS_PER_NODE):
            (self.dir / "dev" / f"gpu{i}").symlink_to("/dev/null")
        # Read by slurmd from the directory of slurm.conf (SLURM_CONF).
        (self.dir / "gres.conf").write_text(
            f"AutoDetect=off\nName=gpu File={self.dir}/dev/gpu[0-{GPUS_PER_NODE - 1}]\n")
        self.conf.write_text(f"""
ClusterName=emtest
SlurmctldHost={host}
SlurmctldPort=17817
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
GresTypes=gpu
KillWait=30
# Slurm 22.05 holds a requeued job for the job-credential lifetime + 1 s before it may start
# again (120 s by default); 20 s is still ample to launch a step on this machine and keeps the
# requeue tests from idling two minutes each.
AuthInfo=cred_expire=20
MinJobAge=600
# Job ids (and so the launchers' log names, logs/<name>-<id>.restart<N>.log) differ from one
# test cluster to the next: a test never reads the log of an earlier run's job.
FirstJobId={1000 + int(time.time()) % 5_000_000}
StateSaveLocation={self.dir}/state
SlurmdSpoolDir={self.dir}/spool-%n
SlurmctldPidFile={self.dir}/slurmctld.pid
SlurmdPidFile={self.dir}/slurmd-%n.pid
SlurmctldLogFile={self.dir}/log/slurmctld.log
SlurmdLogFile={self.dir}/log/slurmd-%n.log
""" + "".join(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={17818 + i} CPUs={cpus} "
              f"RealMemory={memory_mb // len(NODES)} Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN\n" for i, node in enumerate(NODES))
            + f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP\n")

    def start(self) -> "SlurmCluster":
        self.install()
        self._start_munge()
        self._write_conf()
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env, timeout=60)
        self.started.append(self.dir / "slurmctld.pid")
        time.sleep(1)
        for node in NODES:
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", node], check=True, env=self.env, timeout=60)
            self.started.append(self.dir / f"slurmd-{node}.pid")
        deadline = time.time() + 90
        while time.time() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%t").stdout.split()
            if len(states) == len(NODES) and all(st in ("idle", "mix") for st in states):
                return self
            time.sleep(1)
        raise RuntimeError(f"Slurm nodes never became idle (sinfo: {states!r})\n{self.daemon_logs()}")

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
        for name in ("slurmctld.log", *(f"slurmd-{node}.log" for node in NODES)):
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
