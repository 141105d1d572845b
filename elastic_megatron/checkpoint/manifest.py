"""Integrity manifest of a checkpoint directory: every file with its size and a fast hash.

A dist checkpoint is dozens of shard files written by many ranks onto a shared
filesystem. A lost shard, a file cut short by a full disk or a node that died mid-write,
or bits flipped in storage all load "fine" or fail deep inside torch with an error that
names nothing useful. `write_manifest` records what the checkpoint was when it was
complete; `verify_manifest` compares the directory against that record before anything
is loaded and raises `CheckpointCorrupt` naming the file and what is wrong with it.

The hash guards against accidents, not attackers: xxHash XXH3-128 (the `xxhash`
package) runs an order of magnitude faster than any hashlib algorithm, so hashing costs
little beyond reading the bytes (see benchmarks/checkpoint_hashing.py). Without the
package the manifest falls back to BLAKE2b-128; the manifest names its algorithm, so a
verifier always uses the one the writer used.

`verify_manifest(..., check_hashes=False)` checks presence and sizes only: a stat per
file, the fast path for huge checkpoints. Checkpoints written before manifests existed
have none: `verify_manifest(..., allow_missing=True)` returns False for them and the
caller decides what to say.

With `collective=True` (the checkpoint store, under a process group) every rank calls
them and the hashing is spread: rank 0 lists the files (or reads the manifest) and checks
presence and sizes, each rank hashes its share (`balanced_shares`: files by size, largest
first, each to the share with the fewest bytes), and the digests or the problems found
are gathered, so a save writes the manifest a single process would write and a corrupt
file in any rank's share makes every rank raise the same `CheckpointCorrupt`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import heapq
import json
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from elastic_megatron.parallel.collectives import all_gather_objects, broadcast_from_rank0, rank_and_world

try:
    import xxhash
except ImportError:  # pragma: no cover - xxhash is a dependency; the fallback keeps old envs working
    xxhash = None

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "elastic_megatron.checkpoint.manifest"
MANIFEST_VERSION = 1
CHUNK_SIZE = 8 << 20  # bytes per read; one reused buffer per worker bounds the memory
DEFAULT_WORKERS = 4  # files hashed concurrently; parallel filesystems serve several streams faster

# Algorithm name (as written into the manifest) -> hasher factory.
HASHES: dict[str, Callable[[], Any]] = {
    "blake2b-128": lambda: hashlib.blake2b(digest_size=16),
    "blake2b-512": lambda: hashlib.blake2b(digest_size=64),
    "sha1": hashlib.sha1,
    "md5": hashlib.md5,
}
if xxhash is not None:
    HASHES["xxh3_128"] = xxhash.xxh3_128
    HASHES["xxh3_64"] = xxhash.xxh3_64
DEFAULT_HASH = "xxh3_128" if xxhash is not None else "blake2b-128"

# Files that may appear in a finished checkpoint directory without being corruption:
# NFS "silly rename" leftovers of files deleted while open, and this module's own
# in-flight temp manifest. Matched against the file name. (Not "all hidden files":
# torch_dist writes its index as `.metadata`.)
ALWAYS_IGNORED = (".nfs*", f".{MANIFEST_NAME}.*.tmp")


class CheckpointCorrupt(RuntimeError):
    """A checkpoint directory does not match its manifest (or has none, or an unreadable one).

    `path`: the offending file (or the checkpoint directory / manifest file);
    `problem`: one short phrase, e.g. "missing", "size 123 != 456 in manifest",
    "hash mismatch", "not listed in the manifest", "no manifest.json",
    "manifest unreadable: ...".
    """

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"corrupt checkpoint: {self.path}: {problem}")


def hash_file(path: str | Path, algorithm: str = DEFAULT_HASH, *, chunk_size: int = CHUNK_SIZE,
              buffer: Optional[bytearray] = None) -> str:
    """Hex digest of a file, read in `chunk_size` pieces into one reused buffer."""
    hasher = _hasher(algorithm)
    buf = buffer if buffer is not None else bytearray(chunk_size)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            hasher.update(view[:n])
    return hasher.hexdigest()


def hash_throughput(path: str | Path, algorithm: Optional[str] = DEFAULT_HASH, *,
                    chunk_size: int = CHUNK_SIZE) -> tuple[float, float]:
    """(bytes per second, seconds) to hash `path`; `algorithm=None` only reads it (the floor)."""
    size = os.path.getsize(path)
    start = time.perf_counter()
    if algorithm is None:
        view = memoryview(bytearray(chunk_size))
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    else:
        hash_file(path, algorithm, chunk_size=chunk_size)
    seconds = time.perf_counter() - start
    return size / max(seconds, 1e-9), seconds


def has_manifest(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST_NAME).is_file()


def balanced_shares(sizes: list[int], parts: int) -> list[list[int]]:
    """Indices of `sizes` in `parts` shares of near-equal total size, each in ascending
    order: largest first, each to the share with the fewest bytes so far (ties: the lower
    share). Deterministic, so every rank computes the same shares."""
    shares: list[list[int]] = [[] for _ in range(parts)]
    lightest = [(0, part) for part in range(parts)]  # (bytes so far, share)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        total, part = heapq.heappop(lightest)
        shares[part].append(index)
        heapq.heappush(lightest, (total + sizes[index], part))
    return [sorted(share) for share in shares]


def write_manifest(directory: str | Path, *, exclude: Iterable[str] = (), algorithm: str = DEFAULT_HASH,
                   workers: int = DEFAULT_WORKERS, collective: bool = False) -> Path:
    """Hash every regular file under `directory` into `directory/manifest.json`; returns its path.

    `exclude`: fnmatch patterns (matched against the relative POSIX path and the file
    name) of files to leave out; they are recorded, and `verify_manifest` tolerates files
    matching them. Call only once the checkpoint is complete and nothing writes to it.
    The manifest is written atomically (temp file, fsync, rename, fsync of the directory),
    so a crash leaves either no manifest or a whole one.

    `collective`: call on every rank of the default process group; each hashes its share
    of the files, rank 0 writes the manifest. A file no rank could read raises OSError
    on every rank.
    """
    directory = Path(directory)
    exclude = list(exclude)
    _hasher(algorithm)  # fail on an unknown name before reading gigabytes
    rank, world = rank_and_world() if collective else (0, 1)
    listing: tuple[Optional[list], Optional[tuple[bool, str]]] = (None, None)  # (files, (an OSError?, message))
    if rank == 0:
        try:
            listing = (_regular_files(directory, exclude), None)
        except (OSError, ValueError) as err:
            listing = (None, (isinstance(err, OSError), str(err)))
    files, problem = broadcast_from_rank0(listing) if world > 1 else listing
    if problem is not None:
        raise (OSError if problem[0] else ValueError)(problem[1])
    share = balanced_shares([size for _, size in files], world)[rank]
    try:
        mine = (dict(zip(share, _hash_many([directory / files[i][0] for i in share], algorithm, workers))), None)
    except OSError as err:
        if world == 1:
            raise
        mine = (None, f"{type(err).__name__}: {err}")
    gathered = all_gather_objects(mine) if world > 1 else [mine]
    for _, problem in gathered:
        if problem is not None:
            raise OSError(f"cannot write a manifest for {directory}: {problem}")
    digests = {i: digest for part, _ in gathered for i, digest in part.items()}
    path = directory / MANIFEST_NAME
    if rank != 0:
        return path
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "hash": algorithm,
        "exclude": exclude,
        "total_bytes": sum(size for _, size in files),
        "files": [{"path": rel, "size": size, "hash": digests[i]} for i, (rel, size) in enumerate(files)],
    }
    tmp = directory / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(directory)
    return path


def verify_manifest(directory: str | Path, *, check_hashes: bool = True, allow_missing: bool = False,
                    workers: int = DEFAULT_WORKERS, collective: bool = False) -> bool:
    """Check `directory` against its manifest; raise `CheckpointCorrupt` on the first problem.

    Order: listed files missing or of another size, then unlisted files, then hashes
    (skipped with `check_hashes=False`), so cheap failures come before reading any data;
    among hash failures, the first file in manifest order.
    Returns True when verified; False only when there is no manifest.json and
    `allow_missing` is set (a legacy checkpoint: the caller warns and loads it anyway).

    `collective`: call on every rank of the default process group; rank 0 makes the
    cheap checks, each rank hashes its share, and every rank returns or raises alike.
    """
    directory = Path(directory)
    rank, world = rank_and_world() if collective else (0, 1)
    listed = checked_on_rank0(lambda: _check_listing(directory, allow_missing)) if world > 1 else \
        _check_listing(directory, allow_missing)
    if listed is None:
        return False
    entries, algorithm = listed
    if check_hashes:
        share = balanced_shares([size for _, size, _ in entries], world)[rank]
        mine = _first_hash_failure(directory, [(i, *entries[i]) for i in share], algorithm, workers)
        failures = [f for f in (all_gather_objects(mine) if world > 1 else [mine]) if f is not None]
        if failures:
            _, path, problem = min(failures)
            raise CheckpointCorrupt(path, problem)
    return True


def checked_on_rank0(check: Callable[[], Any]) -> Any:
    """Run `check()` on rank 0 of the default process group (the files are shared); every
    rank gets its result, or the CheckpointCorrupt it raised."""
    outcome: tuple = (None, None)
    if rank_and_world()[0] == 0:
        try:
            outcome = (check(), None)
        except CheckpointCorrupt as err:
            outcome = (None, (str(err.path), err.problem))
    result, problem = broadcast_from_rank0(outcome)
    if problem is not None:
        raise CheckpointCorrupt(*problem)
    return result


def _check_listing(directory: Path, allow_missing: bool) -> Optional[tuple[list[tuple[str, int, str]], str]]:
    """The checks that read no data: the manifest, every listed file present with its
    size, nothing unlisted. ((path, size, hash) of each listed file, the algorithm), or
    None when there is no manifest and `allow_missing`."""
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise CheckpointCorrupt(directory, "not a directory")
    if not path.exists():
        if allow_missing:
            return None
        raise CheckpointCorrupt(directory, f"no {MANIFEST_NAME}")
    manifest = _read_manifest(path)

    listed = {entry["path"]: entry for entry in manifest["files"]}
    for rel, entry in listed.items():
        try:
            st = (directory / rel).lstat()
        except FileNotFoundError:
            raise CheckpointCorrupt(directory / rel, "missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointCorrupt(directory / rel, "not a regular file")
        if st.st_size != entry["size"]:
            raise CheckpointCorrupt(directory / rel, f"size {st.st_size} != {entry['size']} in manifest")
    for rel, _ in _walk(directory, manifest["exclude"]):
        if rel not in listed:
            raise CheckpointCorrupt(directory / rel, "not listed in the manifest")
    return [(rel, entry["size"], entry["hash"]) for rel, entry in listed.items()], manifest["hash"]


def _first_hash_failure(directory: Path, entries: list[tuple[int, str, int, str]], algorithm: str,
                        workers: int) -> Optional[tuple[int, str, str]]:
    """(manifest index, path, problem) of the first of `entries` (index, path, size, hash)
    whose file is unreadable or hashes otherwise, or None."""
    paths = [directory / rel for _, rel, _, _ in entries]
    digests = _hash_many(paths, algorithm, workers, verifying=True)
    for (index, rel, _, expected), path, digest in zip(entries, paths, digests):
        if isinstance(digest, CheckpointCorrupt):
            return index, str(digest.path), digest.problem
        if digest != expected:
            return index, str(path), "hash mismatch"
    return None


def _hasher(algorithm: str):
    try:
        return HASHES[algorithm]()
    except KeyError:
        hint = " (pip install xxhash)" if algorithm.startswith("xxh") else ""
        raise ValueError(f"unknown hash algorithm {algorithm!r}{hint}; available: {sorted(HASHES)}") from None


def _hash_many(paths: list[Path], algorithm: str, workers: int, *, verifying: bool = False) -> list:
    """Digests of `paths` in order, `workers` files at a time (file reads release the GIL).
    While verifying, a file that cannot be read gives a `CheckpointCorrupt` in its place."""
    def one(path: Path, buffer: Optional[bytearray] = None):
        try:
            return hash_file(path, algorithm, buffer=buffer)
        except OSError as e:
            if verifying:
                return CheckpointCorrupt(path, f"unreadable: {e.strerror or e}")
            raise

    if workers <= 1 or len(paths) <= 1:
        buf = bytearray(CHUNK_SIZE)
        return [one(p, buf) for p in paths]
    with ThreadPoolExecutor(max_workers=min(workers, len(paths))) as pool:
        return list(pool.map(one, paths))


def _regular_files(directory: Path, exclude: list[str]) -> list[tuple[str, int]]:
    """(relative path, size) of the files a manifest of `directory` lists, sorted."""
    files = []
    for rel, st in _walk(directory, exclude):
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"cannot write a manifest for {directory}: {rel} is not a regular file")
        files.append((rel, st.st_size))
    return files


def _walk(directory: Path, exclude: Iterable[str]) -> list[tuple[str, os.stat_result]]:
    """(relative POSIX path, lstat) of every non-directory entry, sorted, minus the manifest,
    `ALWAYS_IGNORED` names and `exclude` patterns. Symlinks are not followed."""
    patterns = list(exclude)
    found = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in names:
            full = Path(root, name)
            rel = full.relative_to(directory).as_posix()
            if rel == MANIFEST_NAME or any(fnmatch.fnmatchcase(name, p) for p in ALWAYS_IGNORED):
                continue
            if any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns):
                continue
            found.append((rel, full.lstat()))
    found.sort(key=lambda item: item[0])
    return found


def _read_manifest(path: Path) -> dict:
    """Parse and validate manifest.json; any defect is `CheckpointCorrupt("manifest unreadable: ...")`."""
    def bad(why: str) -> CheckpointCorrupt:
        return CheckpointCorrupt(path, f"manifest unreadable: {why}")

    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise bad(f"{type(e).__name__}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise bad("not a checkpoint manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise bad(f"version {manifest.get('version')!r}, this code reads {MANIFEST_VERSION}")
    if manifest.get("hash") not in HASHES:
        raise bad(f"hash algorithm {manifest.get('hash')!r} not available here ({sorted(HASHES)}); pip install xxhash?")
    exclude, files = manifest.get("exclude"), manifest.get("files")
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise bad("'exclude' is not a list of patterns")
    if not isinstance(files, list):
        raise bad("'files' is not a list")
    seen = set()
    for entry in files:
        ok = (isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("hash"), str)
              and type(entry.get("size")) is int and entry["size"] >= 0)
        if not ok:
            raise bad(f"bad file entry {entry!r}")
        rel = entry["path"]
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or rel in seen:
            raise bad(f"bad or duplicate path {rel!r}")
        seen.add(rel)
    return manifest


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
