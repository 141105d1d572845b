"""Lazy, random-access tensor sources and a streaming safetensors writer.

Conversion and slicing never hold a whole model: a `TensorSource` names its tensors and
produces one on request; views (renaming, fusing q/k/v, slicing an axis) are sources
built on other sources. Asking a view for `spec(name)` runs the same code on meta
tensors, so shapes and dtypes of the output are known before a single byte is read,
which the writers need (safetensors headers, dist-checkpoint plans).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from elastic_megatron.config.errors import ConfigError

# safetensors dtype codes (the format's own names).
_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_ST_FROM_CODE = {v: k for k, v in _ST_DTYPES.items()}

HF_INDEX = "model.safetensors.index.json"


class TensorSource:
    """Named tensors produced on request. Subclasses implement `names` and `_get`."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def _get(self, name: str, meta: bool) -> torch.Tensor:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        return self._get(name, meta=False)

    def spec(self, name: str) -> torch.Tensor:
        """A meta tensor with the shape and dtype `get(name)` will have."""
        return self._get(name, meta=True)


class MappedSource(TensorSource):
    """Each output name is a function of some input tensors of `base`:
    `rules[name] = (input names, fn)`, fn(*inputs) -> tensor (also run on meta tensors)."""

    def __init__(self, base: TensorSource, rules: dict[str, tuple[tuple[str, ...], Callable]]):
        self.base = base
        self.rules = rules

    def names(self) -> list[str]:
        return list(self.rules)

    def _get(self, name: str, meta: bool) -> torch.Tensor:
        inputs, fn = self.rules[name]
        args = [self.base._get(i, meta) for i in inputs]
        return fn(*args)


# Encoded (FP8) tensors are floating point too, but never cast.
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class CastSource(TensorSource):
    """Floating-point tensors cast to `dtype`, except names for which `keep(name)`."""

    def __init__(self, base: TensorSource, dtype: torch.dtype, keep: Callable[[str], bool] = lambda n: False):
        self.base, self.dtype, self.keep = base, dtype, keep

    def names(self) -> list[str]:
        return self.base.names()

    def _get(self, name: str, meta: bool) -> torch.Tensor:
        t = self.base._get(name, meta)
        if t.dtype in _CASTABLE and not self.keep(name) and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t


# --- safetensors -------------------------------------------------------------------

def _read_header(path: Path) -> tuple[dict, int]:
    """(header dict, data start offset) of one .safetensors file, checking its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConfigError("safetensors shard", str(path), "is truncated (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ConfigError("safetensors shard", str(path), f"is truncated (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("not a JSON object")
            for k, v in header.items():
                if k != "__metadata__" and not (isinstance(v, dict) and {"dtype", "shape", "data_offsets"} <= set(v)):
                    raise ValueError(f"entry {k!r} lacks dtype/shape/data_offsets")
        except (UnicodeDecodeError, ValueError) as err:
            raise ConfigError("safetensors shard", str(path), f"has a corrupt header ({err})") from None
    start = 8 + n
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if start + end > size:
        raise ConfigError("safetensors shard", str(path), f"is truncated: tensors need {start + end} bytes, the file has {size}")
    return header, start


class SafetensorsSource(TensorSource):
    """The tensors of a directory of safetensors shards (with or without an index file),
    read one at a time from disk (no mmap of whole shards)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        index = self.dir / HF_INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise ConfigError("safetensors index", str(index), f"is not a valid index ({type(err).__name__}: {err})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise ConfigError("checkpoint", str(self.dir), "has no *.safetensors files")
        self.where: dict[str, tuple[Path, dict, int]] = {}
        for fname in files:
            path = self.dir / fname
            if not path.exists():
                raise ConfigError("safetensors shard", str(path), f"is listed in {HF_INDEX} but missing")
            header, start = _read_header(path)
            for k, v in header.items():
                if k != "__metadata__":
                    self.where[k] = (path, v, start)
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.where))
            if missing:
                raise ConfigError("safetensors shards", str(self.dir), f"{len(missing)} tensors of {HF_INDEX} are in no shard, e.g. {missing[0]!r}")

    def names(self) -> list[str]:
        return list(self.where)

    def _get(self, name: str, meta: bool) -> torch.Tensor:
        path, info, start = self.where[name]
        dtype = _ST_FROM_CODE[info["dtype"]]
        shape = info["shape"]
        if meta:
            return torch.empty(shape, dtype=dtype, device="meta")
        lo, hi = info["data_offsets"]
        with open(path, "rb") as f:
            f.seek(start + lo)
            buf = bytearray(f.read(hi - lo))
        if len(buf) != hi - lo:
            raise ConfigError("safetensors shard", str(path), f"is truncated inside tensor {name!r}")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def write_safetensors(directory: str | Path, source: TensorSource, names: Optional[list[str]] = None,
                      max_shard_bytes: int = 5 * 2**30, metadata: Optional[dict] = None,
                      desc: Optional[str] = "writing safetensors") -> dict:
    """Write `source` as HF-style safetensors shards into `directory`, one tensor in memory
    at a time: the header is written from the meta specs, then each tensor's bytes.
    Returns the index (weight_map, total_size). Writes an index file when there is more
    than one shard."""
    directory = Path(directory)
    names = list(names if names is not None else source.names())
    specs = {n: source.spec(n) for n in names}
    shards: list[list[str]] = [[]]
    used = 0
    for n in names:
        nbytes = specs[n].numel() * specs[n].element_size()
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(n)
        used += nbytes
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    bar = tqdm(total=len(names), desc=desc, unit="tensor", disable=desc is None)
    for fname, shard in zip(files, shards):
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        for n in shard:
            s = specs[n]
            nbytes = s.numel() * s.element_size()
            header[n] = {"dtype": _ST_DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        with open(directory / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for n in shard:
                t = source.get(n)
                s = specs[n]
                if t.shape != s.shape or t.dtype != s.dtype:
                    raise RuntimeError(f"tensor {n!r}: produced {tuple(t.shape)} {t.dtype}, planned {tuple(s.shape)} {s.dtype}")
                f.write(_tensor_bytes(t))
                del t
                bar.update(1)
            f.flush()
            os.fsync(f.fileno())
        for n in shard:
            weight_map[n] = fname
        total += offset
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    if len(shards) > 1:
        (directory / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())

