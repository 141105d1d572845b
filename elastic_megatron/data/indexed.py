"""Preprocessing: documents -> Megatron indexed dataset (`<prefix>_text_document.bin/.idx`).

Documents come from jsonl (one JSON object per line, text under `json_key`), plain text
files (one document per file, or per non-empty line) or the embedded corpus
(`python-stdlib`). Each document is tokenised and followed by the end-of-document token,
and written with megatron-core's own `IndexedDatasetBuilder`. Next to the data:

    <prefix>_text_document.bin / .idx   the tokens
    <prefix>.tokenizer.meta.json        how to rebuild the tokenizer, plus counts
    <prefix>.tokenizer.json             only when a BPE was trained for this data

Everything is written under temporary names and renamed at the end, so a killed run
never leaves a half-written pair behind.

Reading side: `check_indexed_dataset` verifies that a `.bin`/`.idx` pair (and the
tokenizer description next to it) belong together before training touches them, and
`index_fingerprint` names the content the dataset index caches are derived from.

The `.idx` layout (megatron-core's `_IndexWriter`, version 1, little-endian):

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    u64       version (1)
    u8        token dtype code (megatron.core.datasets.indexed_dataset.DType)
    u64       S, the sequence count
    u64       D, the document-boundary count (documents + 1: it starts at 0)
    S x i32   sequence lengths in tokens
    S x i64   sequence byte offsets into the .bin
    D x i64   document boundaries, as sequence indices: 0 ... S
   [S x i8    sequence modes, multimodal datasets only]

so the `.bin` holds exactly sum(lengths) x itemsize bytes, which is also where the last
sequence ends (pointers[-1] + lengths[-1] x itemsize).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.data.stdlib_corpus import stdlib_source_files

EMBEDDED_CORPUS = "python-stdlib"
DOCUMENT_SUFFIX = "_text_document"


def data_prefix(output_prefix: str | Path) -> str:
    """The data prefix training reads (`data.prefixes`) for a preprocessing output prefix."""
    return f"{output_prefix}{DOCUMENT_SUFFIX}"


def output_prefix_of(prefix: str | Path) -> str:
    """Inverse of `data_prefix`."""
    prefix = str(prefix)
    return prefix[: -len(DOCUMENT_SUFFIX)] if prefix.endswith(DOCUMENT_SUFFIX) else prefix


def meta_path(output_prefix: str | Path) -> Path:
    return Path(f"{output_prefix}.tokenizer.meta.json")


def check_inputs(inputs: Sequence[str]) -> None:
    if not inputs:
        raise ConfigError("--input", [], f"give at least one .jsonl/.txt file or {EMBEDDED_CORPUS!r}")
    for item in inputs:
        if item != EMBEDDED_CORPUS and not Path(item).is_file():
            raise ConfigError("--input", item, f"no such file; allowed: .jsonl or .txt files, or {EMBEDDED_CORPUS!r}")


def iter_documents(inputs: Sequence[str], json_key: str = "text", split_lines: bool = False,
                   max_bytes: Optional[int] = None) -> Iterator[str]:
    """Documents of every input in order; stops once `max_bytes` of text were yielded."""
    seen = 0
    for item in inputs:
        if item == EMBEDDED_CORPUS:
            docs: Iterator[str] = stdlib_documents()
        elif item.endswith(".jsonl"):
            docs = _jsonl_documents(item, json_key)
        elif split_lines:
            docs = (line for line in Path(item).read_text(encoding="utf-8").splitlines() if line.strip())
        else:
            docs = iter([Path(item).read_text(encoding="utf-8")])
        for doc in docs:
            if max_bytes is not None and seen >= max_bytes:
                return
            if max_bytes is not None and seen + len(doc.encode("utf-8")) > max_bytes:
                doc = doc.encode("utf-8")[: max_bytes - seen].decode("utf-8", errors="ignore")
            seen += len(doc.encode("utf-8"))
            yield doc


def stdlib_documents(min_bytes: int = 2048) -> Iterator[str]:
    """The embedded corpus as documents of >= `min_bytes`, cut at blank lines inside each
    source file: enough documents for a train/valid split even from a few files."""
    for path in stdlib_source_files():
        block: list[str] = []
        size = 0
        for part in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            block.append(part)
            size += len(part) + 2
            if size >= min_bytes:
                yield "\n\n".join(block) + "\n"
                block, size = [], 0
        if block and "".join(block).strip():
            yield "\n\n".join(block) + "\n"


def _jsonl_documents(path: str, key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if key not in obj:
                raise ConfigError("--json-key", key, f"missing in {path} line {n}; keys there: {sorted(obj)}")
            yield obj[key]


def _token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size < 65500 else np.int32


def preprocess(inputs: Sequence[str], output_prefix: str | Path, tokenizer, json_key: str = "text",
               split_lines: bool = False, max_bytes: Optional[int] = None, overwrite: bool = False,
               progress: bool = True) -> dict:
    """Tokenise `inputs` into `<output_prefix>_text_document.{bin,idx}`; returns counts."""
    check_inputs(inputs)
    prefix = data_prefix(output_prefix)
    outputs = [Path(prefix + ".bin"), Path(prefix + ".idx"), meta_path(output_prefix)]
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not overwrite:
        raise ConfigError("--output-prefix", str(output_prefix), f"outputs exist ({', '.join(existing)}); pass --overwrite to replace them")
    # megatron.core takes seconds to import: only after the refusals above.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = {p: p.with_name(p.name + ".tmp") for p in outputs}
    builder = IndexedDatasetBuilder(str(tmp[outputs[0]]), dtype=_token_dtype(tokenizer.vocab_size))
    documents = tokens = 0
    for doc in tqdm(iter_documents(inputs, json_key, split_lines, max_bytes), desc="tokenising", unit="doc", disable=not progress):
        ids = tokenizer.encode(doc)
        if not ids:
            continue
        ids.append(tokenizer.eod)
        builder.add_document(torch.tensor(ids), [len(ids)])
        documents += 1
        tokens += len(ids)
    if documents == 0:
        tmp[outputs[0]].unlink(missing_ok=True)
        raise ConfigError("--input", list(inputs), "contains no non-empty documents")
    builder.finalize(str(tmp[outputs[1]]))
    stats = {"tokenizer": tokenizer.describe(), "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod,
             "documents": documents, "tokens": tokens, "inputs": list(inputs)}
    tmp[outputs[2]].write_text(json.dumps(stats, indent=2) + "\n")
    for final, temp in tmp.items():
        os.replace(temp, final)
    return stats


# ---------------------------------------------------------------------------------------
# Reading side: is a .bin/.idx pair consistent, and what is its content's fingerprint?

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, boundary count
_CHUNK = 1 << 22  # elements per block when scanning an array of the .idx


@dataclass(frozen=True)
class IndexSummary:
    """What `check_indexed_dataset` learned about a consistent pair."""

    sequences: int
    documents: int
    tokens: int
    dtype: str


def _remake(prefix: str) -> str:
    return (f"re-run python tools/preprocess_data.py --input <files> --output-prefix {output_prefix_of(prefix)} "
            f"--overwrite to write the pair again")


def _bad(prefix: str, what: str) -> ConfigError:
    return ConfigError("data.prefixes", prefix, f"{what}; {_remake(prefix)}")


def _non_decreasing(a: np.ndarray) -> bool:
    for start in range(0, max(len(a) - 1, 0), _CHUNK):
        block = np.asarray(a[start:start + _CHUNK + 1])
        if (block[1:] < block[:-1]).any():
            return False
    return True


def check_indexed_dataset(prefix: str) -> IndexSummary:
    """Check that `<prefix>.bin` and `<prefix>.idx` are one dataset, before anything reads
    tokens: the .idx header is Megatron's, its arrays fill the file exactly, the document
    boundaries cover every sequence, the sequence lengths add up to where the pointers end
    and to the size of the .bin, and (where `<output prefix>.tokenizer.meta.json` records
    them) the token dtype holds the vocabulary and the counts match the ones preprocessing
    wrote. Reads the header, maps the .idx arrays and stats the .bin: cost is one pass over
    the .idx (about 20 bytes per document), none over the tokens. Raises `ConfigError`
    (key `data.prefixes`) naming the file and what is wrong."""
    idx_path, bin_path = f"{prefix}.idx", f"{prefix}.bin"
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size or not head.startswith(INDEX_MAGIC):
        raise _bad(prefix, f"{idx_path} is not a Megatron index file: it has {idx_size:,} bytes and starts with "
                           f"{head[:len(INDEX_MAGIC)]!r}, not {INDEX_MAGIC!r} (an .idx is written together with its .bin)")
    _magic, version, code, n_seq, n_bounds = _HEADER.unpack(head)
    if version != INDEX_VERSION:
        raise _bad(prefix, f"{idx_path} is index format version {version}; megatron-core reads version {INDEX_VERSION}")
    from megatron.core.datasets.indexed_dataset import DType

    known = {d.value: d.name for d in DType}
    if code not in known:
        raise _bad(prefix, f"{idx_path} names token dtype code {code}, which Megatron does not know "
                           f"(known: {', '.join(f'{c}={n}' for c, n in sorted(known.items()))})")
    dtype = np.dtype(known[code])
    if dtype.kind not in "iu":
        raise _bad(prefix, f"{idx_path} stores {dtype.name} values, not integer token ids")
    arrays = _HEADER.size + 12 * n_seq + 8 * n_bounds  # i32 lengths + i64 pointers + i64 boundaries
    if idx_size not in (arrays, arrays + n_seq):  # + one i8 mode per sequence when multimodal
        raise _bad(prefix, f"{idx_path} has {idx_size:,} bytes but its header ({n_seq:,} sequences, {n_bounds:,} "
                           f"document boundaries) needs {arrays:,}: the file is truncated or was overwritten")
    if n_seq == 0 or n_bounds < 2:
        raise _bad(prefix, f"{idx_path} describes an empty dataset ({n_seq:,} sequences, {max(n_bounds - 1, 0):,} documents)")

    mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = mm[_HEADER.size:_HEADER.size + 4 * n_seq].view(np.int32)
    pointers = mm[_HEADER.size + 4 * n_seq:_HEADER.size + 12 * n_seq].view(np.int64)
    bounds = mm[_HEADER.size + 12 * n_seq:arrays].view(np.int64)
    n_docs = n_bounds - 1
    if int(bounds[0]) != 0 or int(bounds[-1]) != n_seq or not _non_decreasing(bounds):
        raise _bad(prefix, f"{idx_path} is inconsistent: its {n_docs:,} documents' boundaries run from sequence "
                           f"{int(bounds[0]):,} to {int(bounds[-1]):,} (non-decreasing, 0 to {n_seq:,} expected) "
                           f"but it counts {n_seq:,} sequences")
    if int(lengths.min()) < 0:
        raise _bad(prefix, f"{idx_path} is corrupt: it has negative sequence lengths")
    tokens = int(np.sum(lengths, dtype=np.int64))
    data_bytes = tokens * dtype.itemsize
    end = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize
    if int(pointers[0]) != 0 or end != data_bytes:
        raise _bad(prefix, f"{idx_path} is corrupt: its sequence pointers end at byte {end:,} but its sequence "
                           f"lengths add up to {data_bytes:,} bytes of {dtype.name} tokens")
    del lengths, pointers, bounds, mm

    bin_size = os.path.getsize(bin_path)
    if bin_size != data_bytes:
        cause = ("truncated or partly written" if bin_size < data_bytes else "longer than its index")
        raise _bad(prefix, f"{bin_path} holds {bin_size:,} bytes but its index {idx_path} describes {data_bytes:,} bytes of "
                           f"{dtype.name} tokens ({n_docs:,} documents, {tokens:,} tokens): the .bin is {cause}, "
                           f"or the .idx belongs to another dataset")

    meta_file = meta_path(output_prefix_of(prefix))
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as err:
            raise _bad(prefix, f"{meta_file} is not readable JSON ({err})") from None
        vocab = meta.get("vocab_size")
        if isinstance(vocab, int) and vocab - 1 > np.iinfo(dtype).max:
            raise _bad(prefix, f"{meta_file} records a vocabulary of {vocab:,} tokens but {idx_path} stores "
                               f"{dtype.name} ids (at most {np.iinfo(dtype).max:,}): larger ids were wrapped when written")
        recorded = {"documents": n_docs, "tokens": tokens}
        wrong = {k: meta[k] for k, v in recorded.items() if isinstance(meta.get(k), int) and meta[k] != v}
        if wrong:
            raise _bad(prefix, f"{bin_path}/.idx hold {n_docs:,} documents and {tokens:,} tokens but {meta_file}, "
                               f"written with them, records "
                               f"{', '.join(f'{v:,} {k}' for k, v in wrong.items())}: the data were replaced "
                               f"without their tokenizer description (another tokenizer may have made them)")
    return IndexSummary(sequences=n_seq, documents=n_docs, tokens=tokens, dtype=dtype.name)


def index_fingerprint(prefix: str) -> str:
    """A digest of `<prefix>.idx`: everything Megatron derives its cached sample indices
    from (sequence lengths, document boundaries, dtype). Content, not mtimes: a dataset
    copied or staged to another disk keeps its fingerprint (every rank computes the same
    cache key, which rank 0 writes and the others only read), and a dataset re-made with
    new document lengths gets a new one. A .bin rewritten under an identical .idx (same
    lengths, other tokens) keeps the fingerprint, and rightly: the cached indices are
    positions, valid for any tokens the .bin holds there; `check_indexed_dataset` is what
    guards the .bin against its .idx."""
    with open(f"{prefix}.idx", "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
