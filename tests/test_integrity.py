"""Checkpoint manifest and run-directory lock against real faults: bytes flipped, files cut
short, deleted or added on disk; a lock holder in another process, killed with SIGKILL;
stale and foreign leases written by hand."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from elastic_megatron.checkpoint import store
from elastic_megatron.checkpoint.lock import RunDirLocked, RunLock, process_start_time
from elastic_megatron.checkpoint.manifest import (
    DEFAULT_HASH,
    HASHES,
    CheckpointCorrupt,
    balanced_shares,
    has_manifest,
    hash_file,
    verify_manifest,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- manifest


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A directory shaped like a torch_dist checkpoint, one file spanning several read chunks."""
    d = tmp_path / "iter_0000100"
    d.mkdir()
    (d / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (d / ".metadata").write_bytes(os.urandom(3000))
    (d / "common.pt").write_bytes(os.urandom(10_000))
    (d / "__0_0.distcp").write_bytes(os.urandom((8 << 20) * 2 + 12345))
    (d / "__1_0.distcp").write_bytes(b"")
    (d / "sub").mkdir()
    (d / "sub" / "extra_state.pt").write_bytes(os.urandom(777))
    return d


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def _corrupt(directory: Path, **kw) -> CheckpointCorrupt:
    with pytest.raises(CheckpointCorrupt) as e:
        verify_manifest(directory, **kw)
    return e.value


def test_manifest_round_trip(ckpt):
    assert not has_manifest(ckpt)
    path = write_manifest(ckpt)
    assert path == ckpt / "manifest.json" and has_manifest(ckpt)
    manifest = json.loads(path.read_text())
    assert manifest["hash"] == DEFAULT_HASH and manifest["version"] == 1
    assert [f["path"] for f in manifest["files"]] == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "common.pt", "metadata.json", "sub/extra_state.pt"]
    sizes = {f["path"]: f["size"] for f in manifest["files"]}
    assert sizes["__0_0.distcp"] == (ckpt / "__0_0.distcp").stat().st_size
    assert sorted(p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")) == []  # no temp file left
    assert verify_manifest(ckpt) is True
    assert verify_manifest(ckpt, check_hashes=False) is True
    assert verify_manifest(ckpt, workers=1) is True
    write_manifest(ckpt)  # rewriting is idempotent: the old manifest is not listed in the new one
    verify_manifest(ckpt)


def test_hash_file_is_chunking_independent(ckpt):
    data = (ckpt / "__0_0.distcp").read_bytes()
    one_shot = HASHES[DEFAULT_HASH]()
    one_shot.update(data)
    for chunk in (1 << 16, 1 << 20, 8 << 20, 64 << 20):
        assert hash_file(ckpt / "__0_0.distcp", chunk_size=chunk) == one_shot.hexdigest()
    assert hash_file(ckpt / "__1_0.distcp") == HASHES[DEFAULT_HASH]().hexdigest()


@pytest.mark.parametrize("offset", [0, (8 << 20) + 5, -1])
def test_flipped_byte_same_length(ckpt, offset):
    write_manifest(ckpt)
    shard = ckpt / "__0_0.distcp"
    _flip_byte(shard, offset % shard.stat().st_size)
    e = _corrupt(ckpt)
    assert e.path == shard and e.problem == "hash mismatch"
    assert str(shard) in str(e) and "hash mismatch" in str(e)
    verify_manifest(ckpt, check_hashes=False)  # same size: the fast path cannot see it, by design


def test_truncated_file(ckpt):
    write_manifest(ckpt)
    shard = ckpt / "__0_0.distcp"
    size = shard.stat().st_size
    os.truncate(shard, size - 100)
    for check_hashes in (True, False):
        e = _corrupt(ckpt, check_hashes=check_hashes)
        assert e.path == shard and e.problem == f"size {size - 100} != {size} in manifest"


def test_missing_file(ckpt):
    write_manifest(ckpt)
    (ckpt / "sub" / "extra_state.pt").unlink()
    for check_hashes in (True, False):
        e = _corrupt(ckpt, check_hashes=check_hashes)
        assert e.path == ckpt / "sub" / "extra_state.pt" and e.problem == "missing"


def test_extra_file(ckpt):
    write_manifest(ckpt)
    (ckpt / "__2_0.distcp").write_bytes(b"stray shard of another save")
    for check_hashes in (True, False):
        e = _corrupt(ckpt, check_hashes=check_hashes)
        assert e.path == ckpt / "__2_0.distcp" and e.problem == "not listed in the manifest"


def test_tolerated_extras_and_exclude(ckpt):
    write_manifest(ckpt, exclude=["*.log"])
    (ckpt / ".nfs000000000001").write_bytes(b"x")  # NFS silly-rename leftover
    (ckpt / ".manifest.json.999.tmp").write_bytes(b"{")  # a writer's in-flight temp file
    (ckpt / "save.log").write_text("excluded by the writer")
    verify_manifest(ckpt)
    (ckpt / ".hidden").write_bytes(b"x")  # other hidden names are not exempt (torch_dist writes .metadata)
    assert _corrupt(ckpt).path == ckpt / ".hidden"


def test_missing_manifest(ckpt):
    e = _corrupt(ckpt)
    assert e.path == ckpt and e.problem == "no manifest.json"
    assert verify_manifest(ckpt, allow_missing=True) is False  # legacy checkpoint: the caller warns


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "not_manifest", "bad_entry", "escape"])
def test_unreadable_manifest(ckpt, damage):
    path = write_manifest(ckpt)
    text = path.read_text()
    manifest = json.loads(text)
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "empty":
        path.write_text("")
    elif damage == "garbage":
        path.write_bytes(b"\xff\xfe\x00binary")
    elif damage == "not_manifest":
        path.write_text("[1, 2, 3]")
    elif damage == "bad_entry":
        manifest["files"][0]["size"] = "12"
        path.write_text(json.dumps(manifest))
    elif damage == "escape":
        manifest["files"][0]["path"] = "../outside"
        path.write_text(json.dumps(manifest))
    for allow_missing in (False, True):  # a damaged manifest is never "legacy"
        e = _corrupt(ckpt, allow_missing=allow_missing, check_hashes=False)
        assert e.path == path and e.problem.startswith("manifest unreadable: ")


# ---------------------------------------------------------------- hashing spread over ranks


def _checkpoint_files(d: Path, seed: int) -> Path:
    """A checkpoint-shaped directory whose shards differ in size (the shares must balance)."""
    rng = random.Random(seed)
    d.mkdir(parents=True)
    for name, size in (("__0_0.distcp", 400_000), ("__1_0.distcp", 300_000), ("__2_0.distcp", 200_000),
                       ("common.pt", 100_000), (".metadata", 3000), ("sub/extra_state.pt", 777)):
        (d / name).parent.mkdir(exist_ok=True)
        (d / name).write_bytes(rng.randbytes(size))
    (d / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    return d


def test_balanced_shares():
    sizes = [5, 100, 0, 60, 40, 30, 30]
    shares = balanced_shares(sizes, 3)
    assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
    assert [sum(sizes[i] for i in share) for share in shares] == [100, 90, 75]  # largest first, to the lightest
    assert balanced_shares(sizes, 1) == [list(range(len(sizes)))]
    assert balanced_shares([], 2) == [[], []]


def test_hashing_is_spread_over_ranks_and_every_rank_agrees(tmp_path):
    """Two gloo ranks: the manifest they write together is byte for byte the one a single
    process writes; each hashed a balanced share; a byte flipped in either rank's share
    makes both ranks refuse the checkpoint naming the same file; resume skips a newest
    checkpoint damaged in rank 1's share on both ranks and moves it aside once."""
    from test_parallel import torchrun

    ckpt = _checkpoint_files(tmp_path / "ckpt", seed=1)
    single = _checkpoint_files(tmp_path / "single", seed=1)
    write_manifest(single)
    run_dir = tmp_path / "run"
    for step in (2, 4):
        write_manifest(_checkpoint_files(store.iteration_dir(run_dir, step), seed=step))
    (store.checkpoint_root(run_dir) / store.TRACKER).write_text("4\n")
    newest = store.iteration_dir(run_dir, 4)
    listed = json.loads((newest / "manifest.json").read_text())["files"]
    damaged = listed[balanced_shares([f["size"] for f in listed], 2)[1][0]]["path"]
    _flip_byte(newest / damaged, 7)

    out = tmp_path / "out"
    out.mkdir()
    proc = torchrun(2, str(REPO / "tests" / "manifest_worker.py"), str(out), str(ckpt), str(run_dir), timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    assert (ckpt / "manifest.json").read_text() == (single / "manifest.json").read_text()
    sizes = {f["path"]: f["size"] for f in json.loads((single / "manifest.json").read_text())["files"]}
    for phase in ("write", "verify"):
        shares = [set(r["hashed"][phase]) for r in ranks]
        assert shares[0] and shares[1] and not shares[0] & shares[1] and shares[0] | shares[1] == set(sizes)
        loads = sorted(sum(sizes[f] for f in share) for share in shares)
        assert loads[1] - loads[0] <= max(sizes.values())  # balanced within one file
    assert [r["verdicts"]["verify"] for r in ranks] == [["ok", True]] * 2
    for r in range(2):
        verdicts = [got["verdicts"][f"corrupt_in_share_of_rank{r}"] for got in ranks]
        assert verdicts[0] == verdicts[1] and verdicts[0][0] == "corrupt" and verdicts[0][2] == "hash mismatch"
        assert Path(verdicts[0][1]).relative_to(ckpt).as_posix() in ranks[r]["hashed"]["verify"]
        assert [got["verdicts"][f"sizes_only_with_rank{r}_damage"] for got in ranks] == [["ok", True]] * 2
    verify_manifest(ckpt)  # the workers put every byte back

    assert [r["verdicts"]["resume"] for r in ranks] == [["ok", 2]] * 2
    damaged_rel = f"checkpoints/{newest.name}/{damaged}"
    assert damaged_rel in ranks[1]["hashed"]["resume"] and damaged_rel not in ranks[0]["hashed"]["resume"]
    assert not newest.exists() and (store.checkpoint_root(run_dir) / "corrupt" / newest.name / damaged).exists()
    assert (store.checkpoint_root(run_dir) / store.TRACKER).read_text().strip() == "2"


# ---------------------------------------------------------------- run lock

HOLDER = textwrap.dedent("""
    import sys, time
    from elastic_megatron.checkpoint.lock import RunLock
    lock = RunLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(300)
""")


def _start_holder(run_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        raise AssertionError(f"holder did not lock: {line!r} {proc.stderr.read()}")
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lease(run_dir: Path, **lease) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".lock").write_text(json.dumps(lease))


def test_lock_held_by_another_process_then_sigkill(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    holder = _start_holder(run_dir)
    try:
        with pytest.raises(RunDirLocked) as e:
            RunLock(run_dir).acquire()
        assert f"pid {holder.pid} on host {socket.gethostname()}" in str(e.value)
        assert str(run_dir) in str(e.value)
        assert e.value.holder["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(run_dir)
    note = lock.acquire()  # the kernel dropped the flock; the lease names a dead pid
    assert lock.held and note and "stale" in note and str(holder.pid) in note
    lease = json.loads((run_dir / ".lock").read_text())
    assert lease["pid"] == os.getpid() and lease["host"] == socket.gethostname()
    lock.release()


def test_second_lock_in_same_process_fails(tmp_path):
    with RunLock(tmp_path) as first:
        with pytest.raises(RunDirLocked, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
        assert first.held
    with RunLock(tmp_path) as again:
        assert again.note is None  # released cleanly: no takeover to report


def test_stale_lease_of_dead_pid_is_taken_over(tmp_path):
    pid = _dead_pid()
    _write_lease(tmp_path, host=socket.gethostname(), pid=pid, start_time=1.0, slurm_job_id="55")
    with RunLock(tmp_path) as lock:
        assert "no longer running" in lock.note and f"pid {pid}" in lock.note and "slurm job 55" in lock.note


def test_lease_of_reused_pid_is_taken_over(tmp_path):
    me = os.getpid()  # alive, but started at another time than the lease says
    _write_lease(tmp_path, host=socket.gethostname(), pid=me, start_time=process_start_time(me) - 3600)
    with RunLock(tmp_path) as lock:
        assert "now belongs to another process" in lock.note


def test_live_lease_on_this_host_wins_without_flock(tmp_path):
    """A filesystem that grants flock to everyone: the lease of a live local process still refuses."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        _write_lease(tmp_path, host=socket.gethostname(), pid=sleeper.pid,
                     start_time=process_start_time(sleeper.pid))
        with pytest.raises(RunDirLocked, match=f"pid {sleeper.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with RunLock(tmp_path) as lock:
        assert "no longer running" in lock.note


def test_lease_from_another_host_is_taken_over_when_flock_is_free(tmp_path):
    _write_lease(tmp_path, host="node-that-died", pid=4242, start_time=1.0, slurm_job_id="77")
    with RunLock(tmp_path) as lock:
        assert "another host" in lock.note and "node-that-died" in lock.note


def test_release_twice_and_reacquire(tmp_path):
    lock = RunLock(tmp_path)
    assert lock.acquire() is None
    lock.release()
    lock.release()
    assert json.loads((tmp_path / ".lock").read_text())["released_at"]
    assert (tmp_path / ".lock").exists()  # the file stays: deleting it would split the flock
    assert lock.acquire() is None and lock.held
    lock.release()
    RunLock(tmp_path).release()  # never acquired: harmless
