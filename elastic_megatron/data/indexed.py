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
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

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
