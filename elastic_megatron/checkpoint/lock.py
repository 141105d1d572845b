"""One writer per run directory: an exclusive lock on `<run_dir>/.lock` held for the run's life.

Two jobs writing the same run directory (a Slurm requeue racing its predecessor, a
copy-pasted sbatch line) interleave checkpoints and trackers and silently destroy the
run. `RunLock` makes the second one fail at start-up with a message naming the first.

Two mechanisms, each covering the other's blind spot:

* `fcntl.flock(LOCK_EX | LOCK_NB)` on an open file. The kernel drops it when the holder
  dies, even on kill -9, so a crash never leaves a lock behind. When flock says "held",
  the answer is final.
* The file's JSON content, a lease naming the holder: host, pid, process start time,
  Slurm job id, time acquired. Shared filesystems (Lustre without `-o flock`, NFS with
  `nolock`) may grant flock to everyone, or only coordinate within one node. So when
  flock is granted, the lease is checked: a holder on THIS host whose process is alive
  (same pid, same start time) still owns the run and we refuse; a dead pid, or a pid
  reused by another process, is stale and taken over. A holder on ANOTHER host cannot be
  checked from here: flock is the authority, and the lease is taken over with a note
  (a job requeued onto another node must be able to resume).

A takeover is reported in `RunLock.note` (returned by `acquire()`) and printed to stderr.
`release()` marks the lease released (so the next holder does not report a takeover),
unlocks and closes; it never deletes the file (deleting a flock file lets two processes
lock two different inodes). Releasing twice is harmless.

Multi-rank jobs: only global rank 0 takes the lock, before any rank writes; the caller
decides that (this module does not import torch.distributed). The lock fd is not
inherited across exec; a forked child (e.g. a DataLoader worker) shares it, keeps it
held while alive, and its `release()` does not unlock the parent's lock.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

import psutil

LOCK_NAME = ".lock"
START_TIME_TOLERANCE_S = 1.0  # process start times are derived from clock ticks and boot time


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory. `holder`: its lease (dict) or None if unknown."""

    def __init__(self, run_dir: str | Path, holder: Optional[dict], why: str = ""):
        self.run_dir = Path(run_dir)
        self.holder = holder
        super().__init__(f"run dir {self.run_dir} is in use by {describe_holder(holder)}{why}; "
                         "wait for that process to end or stop it (two writers would corrupt the run), "
                         "or use another run.dir")


def describe_holder(holder: Optional[dict]) -> str:
    if not holder:
        return "another process (holder not recorded yet)"
    details = [f"started {holder['started']}" if holder.get("started") else None,
               f"slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else None,
               f"locked at {holder['acquired_at']}" if holder.get("acquired_at") else None]
    extra = ", ".join(d for d in details if d)
    return f"pid {holder.get('pid')} on host {holder.get('host')}" + (f" ({extra})" if extra else "")


def process_start_time(pid: int) -> Optional[float]:
    """Start time (epoch seconds) of a live, non-zombie process; None if there is none."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # exited, fds (and flocks) already closed
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


class RunLock:
    """Exclusive lock on `<run_dir>/.lock`; `with RunLock(run_dir) as lock:` or acquire()/release()."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.note: Optional[str] = None
        self._fd: Optional[int] = None
        self._owner_pid: Optional[int] = None
        self._lease: Optional[dict] = None

    @property
    def held(self) -> bool:
        return self._fd is not None and self._owner_pid == os.getpid()

    def acquire(self) -> Optional[str]:
        """Take the lock or raise `RunDirLocked`. Returns a note when a stale lease was taken over."""
        if self.held:
            return self.note
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            flock_note = self._flock(fd)
            previous = _read_lease(fd)
            takeover = self._judge(previous)
            me = _my_lease()
            _write_lease(fd, me)
        except BaseException:
            os.close(fd)  # closing drops our flock, if we got it
            raise
        self._fd, self._owner_pid, self._lease = fd, os.getpid(), me
        notes = [n for n in (flock_note, takeover) if n]
        self.note = "; ".join(notes) if notes else None
        if self.note:
            print(f"[run lock] {self.path}: {self.note}", file=sys.stderr, flush=True)
        return self.note

    def release(self) -> None:
        """Mark the lease released, unlock, close. Harmless when not held (or called twice)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._owner_pid == os.getpid():  # a forked child must not unlock its parent's lock
                lease = dict(self._lease or {}, released_at=_now())
                try:
                    _write_lease(fd, lease)
                except OSError:
                    pass  # a full disk must not keep the lock held; the pid check covers a stale lease
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _flock(self, fd: int) -> Optional[str]:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirLocked(self.run_dir, _read_lease(fd)) from None
            # ENOSYS/ENOLCK/EOPNOTSUPP: the filesystem offers no flock; the lease is all we have.
            return f"flock unsupported here ({os.strerror(e.errno)}); relying on the lease alone"
        return None

    def _judge(self, lease: Optional[dict]) -> Optional[str]:
        """flock granted: decide from the previous lease. Raise if its holder is alive on this
        host; return a takeover note if it was never released; None for a clean start."""
        if not lease or lease.get("released_at"):
            return None
        who = describe_holder(lease)
        if lease.get("host") != socket.gethostname():
            return f"took over the lock of {who}: another host, flock granted (holder gone, e.g. requeued job)"
        pid, recorded = lease.get("pid"), lease.get("start_time")
        actual = process_start_time(pid) if isinstance(pid, int) else None
        if actual is None:
            return f"took over the stale lock of {who}: that process is no longer running"
        if not isinstance(recorded, (int, float)) or abs(actual - recorded) > START_TIME_TOLERANCE_S:
            return f"took over the stale lock of {who}: pid {pid} now belongs to another process"
        raise RunDirLocked(self.run_dir, lease, " (alive on this host, although flock was granted: "
                                                "this filesystem does not enforce flock)")


def _my_lease() -> dict:
    pid = os.getpid()
    start = process_start_time(pid)
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "start_time": start,
        "started": _iso(start) if start is not None else None,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "acquired_at": _now(),
        "argv": sys.argv[:8],
    }


def _read_lease(fd: int) -> Optional[dict]:
    """The JSON in the lock file, or None if empty/unparseable (a writer mid-write, an old file)."""
    try:
        data = os.pread(fd, 1 << 16, 0)
        lease = json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None
    return lease if isinstance(lease, dict) else None


def _write_lease(fd: int, lease: dict) -> None:
    """Rewrite the lock file in place (the inode must stay: it carries the flock)."""
    data = (json.dumps(lease, indent=1) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _iso(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def _now() -> str:
    return _iso(time.time())
