"""Read the records of an offline W&B run file (`run-<id>.wandb`).

The file is a 7-byte header (":W&B", magic, version) followed by a LevelDB-style log:
32 KiB blocks of records, each with a 7-byte header (crc32c, little-endian length, type:
1 full, 2 first, 3 middle, 4 last), payloads being `wandb_internal_pb2.Record` messages.
wandb no longer ships a reader, and offline runs write no summary file, so tests read the
log itself to see what was logged.
"""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            break
        pending += payload
        if kind in (1, 4):  # full or last fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history(path: Path) -> list[dict]:
    """The rows passed to run.log(), as {key: json value}."""
    import json

    rows = []
    for r in read_records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def config_keys(path: Path) -> set[str]:
    keys = set()
    for r in read_records(path):
        if r.WhichOneof("record_type") == "config":
            keys.update(i.key or "/".join(i.nested_key) for i in r.config.update)
        if r.WhichOneof("record_type") == "run":
            keys.update(i.key or "/".join(i.nested_key) for i in r.run.config.update)
    return keys
