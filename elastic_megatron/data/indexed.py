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

import glob
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.data.chat import (
    BAD_LINE_ACTIONS, BAD_LINES_SHOWN, ChatOptions, ChatRenderer, bad_chat_lines, chat_conversations, describe_bad_lines,
)
from elastic_megatron.data.stdlib_corpus import stdlib_source_files
from elastic_megatron.data.tokenizer import same_tokenizer, tokenizer_from_description

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


# Documents per task sent to a worker, and tasks in flight per worker: enough to keep the
# workers busy, few enough that reading never runs far ahead of writing (bounded memory).
CHUNK_DOCUMENTS = 64
TASKS_PER_WORKER = 4


class _Encoder:
    """Documents (text, or conversations rendered with the chat template) -> token ids
    followed by the end-of-document token, as arrays of the dataset's dtype; empty
    documents give empty arrays. One per process: the same code for 1 worker or N."""

    def __init__(self, tokenizer, chat: Optional[ChatOptions] = None):
        self.tokenizer = tokenizer
        self.renderer = ChatRenderer(chat) if chat is not None else None
        self.dtype = _token_dtype(tokenizer.vocab_size)

    def __call__(self, documents: list) -> list[np.ndarray]:
        out = []
        for doc in documents:
            ids = self.tokenizer.encode(self.renderer.render(doc) if self.renderer else doc)
            out.append(np.array(ids + [self.tokenizer.eod] if ids else [], dtype=self.dtype))
        return out


_worker_encoder: Optional[_Encoder] = None


def _start_worker(tokenizer_description: dict, chat: Optional[ChatOptions]) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: --workers says how many
    _worker_encoder = _Encoder(tokenizer_from_description(tokenizer_description), chat)


def _encode_in_worker(documents: list) -> list[np.ndarray]:
    return _worker_encoder(documents)


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def encoded_documents(documents: Iterator, tokenizer, workers: int = 1, chat: Optional[ChatOptions] = None) -> Iterator[np.ndarray]:
    """Each document's token ids (+ end of document), in input order, tokenised in this
    process (workers=1) or in `workers` processes: the same arrays either way."""
    if workers <= 1:
        encoder = _Encoder(tokenizer, chat)
        for chunk in _chunks(documents, CHUNK_DOCUMENTS):
            yield from encoder(chunk)
        return
    import multiprocessing
    from collections import deque

    # spawn: no fork of a process that may hold threads (tokenizers, torch, gloo).
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_start_worker, initargs=(tokenizer.describe(), chat)) as pool:
        pending: deque = deque()
        for chunk in _chunks(documents, CHUNK_DOCUMENTS):
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= workers * TASKS_PER_WORKER:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N), 0 <= I < N."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise ConfigError("--shard", text, "I/N with 0 <= I < N, e.g. 0/8 (Slurm: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return index, count


def shard_inputs(inputs: Sequence[str], index: int, count: int) -> list[str]:
    """Shard `index` of `count`: a contiguous run of the input files, so shards 0..N-1 in
    order hold the documents of one unsharded run in its order."""
    if len(inputs) < count:
        raise ConfigError("--shard", f"{index}/{count}", f"{count} shards of {len(inputs)} input files would leave shards "
                          "empty; shards split the input files: give at least as many files as shards")
    return list(inputs[index * len(inputs) // count:(index + 1) * len(inputs) // count])


def shard_output_prefix(output_prefix: str | Path, index: int, count: int) -> str:
    return f"{output_prefix}.shard{index:05d}-of-{count:05d}"


def finished_output(output_prefix: str | Path) -> Optional[dict]:
    """The record of a finished preprocessing output (its record is renamed into place
    last, and the pair must check against it), else None."""
    meta_file = meta_path(output_prefix)
    if not meta_file.is_file():
        return None
    try:
        check_indexed_dataset(data_prefix(output_prefix))
        return json.loads(meta_file.read_text())
    except (ConfigError, OSError, ValueError):
        return None


def preprocess(inputs: Sequence[str], output_prefix: str | Path, tokenizer, json_key: str = "text",
               split_lines: bool = False, max_bytes: Optional[int] = None, overwrite: bool = False,
               progress: bool = True, workers: int = 1, shard: Optional[tuple[int, int]] = None,
               chat: Optional[ChatOptions] = None, on_bad_line: str = "error") -> dict:
    """Tokenise `inputs` into `<output_prefix>_text_document.{bin,idx}`; returns counts.

    `shard` (I, N): only the I-th of N contiguous runs of the input files, into
    `shard_output_prefix`; a shard finished before from the same inputs is skipped
    (stats["skipped"]). `chat`: the inputs are conversations (data/chat.py), bad lines
    refused before anything is written (on_bad_line='error') or skipped and counted."""
    check_inputs(inputs)
    if workers < 1:
        raise ConfigError("--workers", workers, "must be >= 1")
    if on_bad_line not in BAD_LINE_ACTIONS:
        raise ConfigError("--on-bad-line", on_bad_line, f"allowed: {list(BAD_LINE_ACTIONS)}")
    if chat is not None and EMBEDDED_CORPUS in inputs:
        raise ConfigError("--input", EMBEDDED_CORPUS, "is text, not chat: --input-format chat reads .jsonl files of messages")
    if chat is not None and max_bytes is not None:
        raise ConfigError("--max-bytes", max_bytes, "applies to text input; chat files are read whole")
    if shard is not None:
        inputs = shard_inputs(inputs, *shard)
        output_prefix = shard_output_prefix(output_prefix, *shard)
        done = finished_output(output_prefix)
        if done is not None and not overwrite:
            if done.get("inputs") != list(inputs) or not same_tokenizer(done.get("tokenizer") or {}, tokenizer.describe()):
                raise ConfigError("--output-prefix", str(output_prefix), f"holds a finished shard made from {done.get('inputs')} "
                                  f"with {done.get('tokenizer')}, not this shard's {list(inputs)} with {tokenizer.describe()}; "
                                  "pass --overwrite to replace it")
            return {**done, "skipped": True, "output_prefix": str(output_prefix)}
        overwrite = True  # an unfinished shard (killed before its record was renamed) is made again
    if chat is not None:
        ChatRenderer(chat)  # refuses a tokenizer without a template before anything is read
        bad = bad_chat_lines(inputs)
        if bad and on_bad_line == "error":
            raise ConfigError("--input", list(inputs), f"{describe_bad_lines(bad)}; fix them, or pass --on-bad-line skip "
                              "to leave them out")
    prefix = data_prefix(output_prefix)
    outputs = [Path(prefix + ".bin"), Path(prefix + ".idx"), meta_path(output_prefix)]
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not overwrite:
        raise ConfigError("--output-prefix", str(output_prefix), f"outputs exist ({', '.join(existing)}); pass --overwrite to replace them")
    # megatron.core takes seconds to import: only after the refusals above.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = {p: p.with_name(p.name + ".tmp") for p in outputs}
    skipped: list = []
    if chat is not None:
        documents = chat_conversations(inputs, skipped)
    else:
        documents = iter_documents(inputs, json_key, split_lines, max_bytes)
    try:
        builder = IndexedDatasetBuilder(str(tmp[outputs[0]]), dtype=_token_dtype(tokenizer.vocab_size))
        n_docs = tokens = 0
        for ids in tqdm(encoded_documents(documents, tokenizer, workers, chat), desc="tokenising", unit="doc",
                        disable=not progress):
            if not len(ids):
                continue
            builder.add_document(ids, [len(ids)])
            n_docs += 1
            tokens += len(ids)
        if n_docs == 0:
            raise ConfigError("--input", list(inputs), "contains no non-empty documents")
        builder.finalize(str(tmp[outputs[1]]))
        stats = {"tokenizer": tokenizer.describe(), "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod,
                 "documents": n_docs, "tokens": tokens, "inputs": list(inputs)}
        if chat is not None:
            stats["chat"] = {"earlier_reasoning": chat.earlier_reasoning, "template_kwargs": chat.template_kwargs,
                             "bad_lines_skipped": len(skipped),
                             "bad_line_numbers": [f"{path}:{n}" for path, n, _ in skipped[:BAD_LINES_SHOWN]]}
        tmp[outputs[2]].write_text(json.dumps(stats, indent=2) + "\n")
    except BaseException:
        for temp in tmp.values():
            temp.unlink(missing_ok=True)
        raise
    # The record last: a pair without it is an unfinished output.
    for final, temp in tmp.items():
        os.replace(temp, final)
    return {**stats, "output_prefix": str(output_prefix)}


def record_tokenizer(prefix: str, tokenizer, overwrite: bool = False) -> dict:
    """Check every token id of the data `prefix` (made elsewhere, e.g. by Megatron-LM)
    against `tokenizer`, then write the tokenizer record beside them: training then needs
    no data.tokenizer for them. Only on request (tools/preprocess_data.py --record-tokenizer)."""
    record = meta_path(output_prefix_of(prefix))
    if record.exists() and not overwrite:
        raise ConfigError("--record-tokenizer", prefix, f"{record} exists; pass --overwrite to replace it")
    summary = check_indexed_dataset(prefix)
    scanned = check_token_ids(prefix, tokenizer.vocab_size, str(tokenizer.describe()), full=True)
    stats = {"tokenizer": tokenizer.describe(), "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod,
             "documents": summary.documents, "tokens": summary.tokens, "inputs": ["recorded by --record-tokenizer"]}
    temp = record.with_name(record.name + ".tmp")
    temp.write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(temp, record)
    return {"prefix": prefix, "record": str(record), "tokens": scanned}


# ---------------------------------------------------------------------------------------
# Blends: the finished outputs of several corpora (each sharded or not), weighted.

_SHARD_NAME = re.compile(r"\.shard(\d{5})-of-(\d{5})$")


def corpus_outputs(output_prefix: str) -> list[tuple[str, dict]]:
    """(data prefix, record) of every output of the corpus `output_prefix` (as given to
    --output-prefix): its shards 0..N-1 in order, or its one unsharded output. Refuses a
    corpus with a shard missing or unfinished."""
    whole = finished_output(output_prefix)
    if whole is not None:
        return [(data_prefix(output_prefix), whole)]
    base = Path(output_prefix)
    found: dict[int, set] = {}
    for meta_file in base.parent.glob(f"{glob.escape(base.name)}.shard*-of-*.tokenizer.meta.json"):
        match = _SHARD_NAME.search(meta_file.name[: -len(".tokenizer.meta.json")])
        if match:
            found.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
    if not found:
        raise ConfigError("--corpora", output_prefix, f"no finished output {meta_path(output_prefix)} and no shards "
                          f"{output_prefix}.shardIIIII-of-NNNNN: give the --output-prefix preprocessing was run with")
    if len(found) > 1:
        raise ConfigError("--corpora", output_prefix, f"holds shards of several splits ({sorted(found)} shards): "
                          "remove the outputs of the split not used")
    count = next(iter(found))
    outputs, missing = [], []
    for index in range(count):
        shard = shard_output_prefix(output_prefix, index, count)
        record = finished_output(shard) if index in found[count] else None
        if record is None:
            missing.append(index)
        else:
            outputs.append((data_prefix(shard), record))
    if missing:
        raise ConfigError("--corpora", output_prefix, f"shards {missing} of {count} are missing or unfinished: run their "
                          "array tasks again (finished shards are skipped)")
    return outputs


def write_blend(corpora: list[tuple[Optional[float], str]], out_file: str | Path) -> dict:
    """Write the data blend of `corpora` ((weight or None, output prefix) each) to
    `out_file` as a data recipe (prefixes + weights): every output's data prefix with a
    weight of corpus weight x its share of the corpus's tokens, or with no corpus weights
    given, its share of all tokens (one epoch's mix). Returns {prefixes, weights, tokens}."""
    given = [w for w, _ in corpora if w is not None]
    if given and len(given) != len(corpora):
        raise ConfigError("--corpora", [p for _, p in corpora], "give a weight before every corpus or before none")
    if any(w < 0 for w in given) or (given and sum(given) <= 0):
        raise ConfigError("--corpora", given, "weights must be >= 0 with a positive sum")
    rows, tokenizer = [], None
    for weight, corpus in corpora:
        outputs = corpus_outputs(corpus)
        corpus_tokens = sum(record["tokens"] for _, record in outputs)
        for prefix, record in outputs:
            if tokenizer is None:
                tokenizer = record["tokenizer"]
            elif not same_tokenizer(tokenizer, record["tokenizer"]):
                raise ConfigError("--corpora", corpus, f"{prefix} was made with {record['tokenizer']}, the others with "
                                  f"{tokenizer}: a blend needs one tokenizer")
            share = record["tokens"] / corpus_tokens
            rows.append((prefix, record["tokens"], corpus, weight * share if weight is not None else None))
    total = sum(tokens for _, tokens, _, _ in rows)
    weights = [w if w is not None else tokens / total for _, tokens, _, w in rows]
    lines = [f"# Data blend written by tools/preprocess_data.py --write-blend: {len(rows)} prefixes, {total:,} tokens.",
             "# Use it as a data recipe (copy it to recipes/data/<name>.yaml and pass data=<name>), or pass",
             "# data.prefixes and data.weights with these values.",
             "prefixes:"]
    lines += [f"  - {json.dumps(prefix)}  # {tokens:,} tokens of {corpus}" for prefix, tokens, corpus, _ in rows]
    lines.append("weights:")
    lines += [f"  - {w!r}" for w in weights]
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    temp = out_file.with_name(out_file.name + ".tmp")
    temp.write_text("\n".join(lines) + "\n")
    os.replace(temp, out_file)
    return {"prefixes": [r[0] for r in rows], "weights": weights, "tokens": [r[1] for r in rows]}


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


# Scanning a .bin for foreign token ids: a sample of blocks spread over the file (its
# start and end included), about 16M tokens at most, or every token when asked.
SCAN_BLOCK = 1 << 20
SCAN_SAMPLE_BLOCKS = 16


def _index_dtype(prefix: str) -> np.dtype:
    from megatron.core.datasets.indexed_dataset import DType

    with open(f"{prefix}.idx", "rb") as f:
        code = _HEADER.unpack(f.read(_HEADER.size))[2]
    return np.dtype(DType(code).name)


def check_token_ids(prefix: str, vocab_size: int, tokenizer_name: str, full: bool = False) -> int:
    """Refuse `<prefix>.bin` when its token dtype cannot hold `vocab_size` ids or when a
    scanned token lies outside [0, vocab_size); returns how many tokens were scanned.
    For data without our tokenizer record, whose tokenizer the user named: a .bin made
    with another tokenizer nearly always holds ids the named one does not have."""
    dtype = _index_dtype(prefix)  # the pair itself was checked by check_indexed_dataset
    if np.iinfo(dtype).max < vocab_size - 1:
        raise ConfigError("data.tokenizer", tokenizer_name, f"has {vocab_size:,} token ids but {prefix}.idx stores "
                          f"{dtype.name} ids (at most {np.iinfo(dtype).max:,}): the data were written for a smaller "
                          "vocabulary, by another tokenizer")
    tokens = np.memmap(f"{prefix}.bin", mode="r", dtype=dtype)
    n = len(tokens)
    if full or n <= SCAN_BLOCK * SCAN_SAMPLE_BLOCKS:
        starts = range(0, n, SCAN_BLOCK)
    else:
        starts = sorted({int(s) for s in np.linspace(0, n - SCAN_BLOCK, SCAN_SAMPLE_BLOCKS)})
    scanned = 0
    for start in starts:
        block = np.asarray(tokens[start:start + SCAN_BLOCK])
        scanned += len(block)
        bad = np.flatnonzero((block >= vocab_size) | (block < 0))
        if len(bad):
            at = start + int(bad[0])
            raise ConfigError("data.tokenizer", tokenizer_name, f"has {vocab_size:,} token ids but {prefix}.bin holds id "
                              f"{int(tokens[at]):,} at token {at:,}: the data were tokenized with another tokenizer; "
                              "name that one")
    del tokens
    return scanned


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
