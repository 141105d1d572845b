"""What the checkpoint integrity manifest costs: hashing throughput of the chosen algorithm
next to plain reading of the same file (the floor: a verifier must read every byte) and
the other candidate hashes, then write/verify times for a checkpoint-shaped directory, by
one process and spread over several (the checkpoint store's collective manifest: each
rank hashes a balanced share of the files).

    python benchmarks/checkpoint_hashing.py                    # 512 MiB file and checkpoint
    python benchmarks/checkpoint_hashing.py --size-mb 4096 --dir /lustre/scratch/me
    python benchmarks/checkpoint_hashing.py --processes 1 2 4 --shards 8

Everything is measured in this run on this machine. "cached" reads come from the page
cache (the file was just written); "cold" rows first evict the file's pages with
posix_fadvise(DONTNEED) after an fsync, so they read from the storage under --dir. The
process rows start N gloo ranks on this machine; on a cluster the ranks sit on many nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elastic_megatron.cli import benchmark_parser, run_benchmark  # noqa: E402
from elastic_megatron.config.errors import ConfigError  # noqa: E402
from elastic_megatron.checkpoint.manifest import (  # noqa: E402
    DEFAULT_HASH,
    DEFAULT_WORKERS,
    HASHES,
    hash_throughput,
    verify_manifest,
    write_manifest,
)


def write_random(path: Path, size: int, block: int = 16 << 20) -> None:
    """`size` bytes of random data (incompressible, so no filesystem shortcut), fsynced."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(block, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def evict(path: Path) -> None:
    """Drop the file's clean pages from the page cache, so the next read hits the storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def spread(ckpt: Path, processes: int) -> dict[str, float]:
    """Seconds for `processes` gloo ranks to write and verify `ckpt`'s manifest together."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = ckpt.parent / f"spread_{processes}.json"
    mp.spawn(_spread_rank, args=(processes, port, str(ckpt), str(result)), nprocs=processes, join=True)
    return json.loads(result.read_text())


def _spread_rank(rank: int, world: int, port: int, ckpt: str, result: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    directory = Path(ckpt)

    def seconds(fn, cold: bool = False) -> float:
        if cold and rank == 0:
            for p in directory.iterdir():
                evict(p)
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - start

    times = {
        "write": min(seconds(lambda: write_manifest(directory, collective=True)) for _ in range(3)),
        "verify": min(seconds(lambda: verify_manifest(directory, collective=True)) for _ in range(3)),
        "verify_cold": seconds(lambda: verify_manifest(directory, collective=True), cold=True),
    }
    if rank == 0:
        Path(result).write_text(json.dumps(times))
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--size-mb", type=positive_int, default=512, help="size of the test file and of the checkpoint "
                        "in MiB (default: 512)")
    parser.add_argument("--dir", default=None, help="where to write the temporary files (default: $TMPDIR); a "
                        "cluster filesystem's path measures that filesystem")
    parser.add_argument("--shards", type=positive_int, default=6, help="shard files in the checkpoint directory "
                        "(default: 6)")
    parser.add_argument("--processes", type=positive_int, nargs="+", default=[1, 2], metavar="N",
                        help="process counts (gloo ranks on this machine) that write and verify the checkpoint's "
                        "manifest together, each hashing its share (default: 1 2)")
    args = parser.parse_args(argv)
    return run_benchmark(args, lambda: run(args))


def run(args) -> None:
    if args.dir is not None and not Path(args.dir).is_dir():
        raise ConfigError("--dir", args.dir, "an existing directory to write the temporary files in")
    size = args.size_mb << 20
    gb = 1e9
    work = Path(tempfile.mkdtemp(prefix="ckpt_hashing_", dir=args.dir))
    rows: list[tuple[str, float, float]] = []  # (what, GB/s, seconds)
    try:
        data = work / "blob.bin"
        write_random(data, size)

        def measure(label: str, algorithm, cold: bool = False) -> float:
            if cold:
                evict(data)
                rate, seconds = hash_throughput(data, algorithm)
            else:  # best of 3: the first pass also makes sure the file is cached
                rate, seconds = max(hash_throughput(data, algorithm) for _ in range(3))
            rows.append((label, rate / gb, seconds))
            return rate

        read_cached = measure("read only (cached)", None)
        measure(f"{DEFAULT_HASH} (cached)  <- chosen", DEFAULT_HASH)
        for name in HASHES:
            if name != DEFAULT_HASH:
                measure(f"{name} (cached)", name)
        read_cold = measure("read only (cold)", None, cold=True)
        measure(f"{DEFAULT_HASH} (cold)", DEFAULT_HASH, cold=True)
        data.unlink()

        print(f"\nfile: {args.size_mb} MiB random bytes in {work.parent}, chunk 8 MiB, one thread")
        print(f"{'what':36s} {'GB/s':>7s} {'seconds':>8s} {'time/read':>9s}")
        for label, rate, seconds in rows:
            base = read_cold if "(cold)" in label else read_cached
            print(f"{label:36s} {rate:7.2f} {seconds:8.3f} {base / gb / rate:9.2f}")

        # A checkpoint-shaped directory: small metadata files and `--shards` equal shards.
        ckpt = work / "iter_0000100"
        ckpt.mkdir()
        (ckpt / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
        write_random(ckpt / ".metadata", 200 << 10)
        write_random(ckpt / "common.pt", 1 << 20)
        shard = max(1, (size - (1 << 20)) // args.shards)
        for i in range(args.shards):
            write_random(ckpt / f"__{i}_0.distcp", shard)
        total = sum(p.stat().st_size for p in ckpt.iterdir())
        nfiles = len(list(ckpt.iterdir()))

        print(f"\ncheckpoint dir: {nfiles} files, {total / 2**20:.0f} MiB, {DEFAULT_HASH}, "
              f"{DEFAULT_WORKERS} workers unless noted")
        print(f"{'operation':36s} {'seconds':>8s} {'GB/s':>7s}")

        def timed(label: str, fn, cold: bool = False, rate: bool = True) -> None:
            if cold:
                for p in ckpt.iterdir():
                    evict(p)
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
            print(f"{label:36s} {seconds:8.3f} {f'{total / gb / seconds:7.2f}' if rate else '    n/a':>7s}")

        timed("write_manifest (cached)", lambda: write_manifest(ckpt))
        timed("verify, hashes (cached)", lambda: verify_manifest(ckpt))
        timed("verify, hashes, 1 worker (cached)", lambda: verify_manifest(ckpt, workers=1))
        timed("verify, hashes (cold)", lambda: verify_manifest(ckpt), cold=True)
        timed("verify, sizes only", lambda: verify_manifest(ckpt, check_hashes=False), rate=False)

        print(f"\nspread over processes (gloo ranks on this machine, {os.cpu_count()} CPUs), collective manifest, "
              f"{DEFAULT_WORKERS} reader threads per process; seconds, best of 3 (cached) / one pass (cold)")
        print(f"{'processes':>9s} {'write':>8s} {'verify':>8s} {'verify cold':>11s} {'GB/s (verify)':>14s}")
        for n in args.processes:
            times = spread(ckpt, n)
            print(f"{n:9d} {times['write']:8.3f} {times['verify']:8.3f} {times['verify_cold']:11.3f} "
                  f"{total / gb / times['verify']:14.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
