"""Checkpoint hashing spread over ranks, for tests/test_integrity.py.

Run with torchrun (gloo on CPU):

    torchrun --nproc_per_node N tests/manifest_worker.py OUT CKPT RUN_DIR

On CKPT (a checkpoint-shaped directory without a manifest) every rank writes the manifest
collectively and verifies it; then, for each rank r, rank 0 flips a byte of a file that
rank r hashes and every rank verifies again. On RUN_DIR (checkpoints with manifests, the
newest damaged by the caller) every rank asks `resume_step`. Each rank writes
OUT/rank<r>.json: the files it hashed in each phase and what each call returned or raised.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from elastic_megatron.checkpoint import manifest, store
from elastic_megatron.checkpoint.manifest import CheckpointCorrupt, verify_manifest, write_manifest


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def main(out: Path, ckpt: Path, run_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    record: dict = {"hashed": {}, "verdicts": {}}
    phase = ["write"]
    real_hash_file = manifest.hash_file

    def recording_hash_file(path, *args, **kwargs):  # the real hash; which rank read which file
        record["hashed"].setdefault(phase[0], []).append(Path(path).relative_to(ckpt if phase[0] != "resume" else run_dir).as_posix())
        return real_hash_file(path, *args, **kwargs)

    manifest.hash_file = recording_hash_file

    def verdict(name: str, check) -> None:
        phase[0] = name
        try:
            record["verdicts"][name] = ["ok", check()]
        except CheckpointCorrupt as err:
            record["verdicts"][name] = ["corrupt", str(err.path), err.problem]
        dist.barrier()

    verdict("write", lambda: str(write_manifest(ckpt, collective=True)))
    verdict("verify", lambda: verify_manifest(ckpt, collective=True))
    # Every rank hashed some files: damage the largest file each rank reads, one at a time.
    shares = [json.loads(s) for s in _all_gather(json.dumps(record["hashed"]["verify"]))]
    sizes = {f["path"]: f["size"] for f in json.loads((ckpt / "manifest.json").read_text())["files"]}
    for r, share in enumerate(shares):
        target = ckpt / max(share, key=lambda rel: sizes[rel])
        if rank == 0:
            flip_byte(target, sizes[target.relative_to(ckpt).as_posix()] // 2)
        dist.barrier()
        verdict(f"corrupt_in_share_of_rank{r}", lambda: verify_manifest(ckpt, collective=True))
        verdict(f"sizes_only_with_rank{r}_damage", lambda: verify_manifest(ckpt, check_hashes=False, collective=True))
        if rank == 0:
            flip_byte(target, sizes[target.relative_to(ckpt).as_posix()] // 2)
        dist.barrier()
    verdict("resume", lambda: store.resume_step(run_dir))
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def _all_gather(text: str) -> list[str]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, text)
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
