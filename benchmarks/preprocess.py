"""Preprocessing throughput: tools/preprocess_data.py's tokenisation with 1 and 2 (or
--workers) processes against the tokenizer's own `encode_batch` on the same documents.

    python benchmarks/preprocess.py                               # embedded corpus, a BPE trained on it
    python benchmarks/preprocess.py --tokenizer-path /models/nemotron-nano --input web.jsonl --workers 1 2 8

`encode_batch` (the `tokenizers` library's Rust batch encoder, threaded over every core
this process may use) on documents already in memory is the bound: what tokenisation alone
costs. The preprocessing rows time the whole job as the tool runs it: reading the JSON
lines, tokenising in N worker processes (each one thread; the processes' start included),
and writing the .bin/.idx through megatron-core's builder. Every row tokenises the same
documents; the run checks that all worker counts wrote identical files and that their
token count is the bound's plus one end-of-document token per document.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elastic_megatron.cli import run_tool, tool_parser  # noqa: E402
from elastic_megatron.config.errors import ConfigError  # noqa: E402
from elastic_megatron.data.indexed import EMBEDDED_CORPUS, check_inputs, data_prefix, iter_documents, preprocess  # noqa: E402
from elastic_megatron.data.tokenizer import HFTokenizer, build_tokenizer, train_bpe  # noqa: E402


def main(argv=None) -> int:
    ap = tool_parser(__doc__, whole_doc=True)
    ap.add_argument("--input", nargs="+", default=[EMBEDDED_CORPUS], help=f".jsonl/.txt files or {EMBEDDED_CORPUS!r} (default)")
    ap.add_argument("--json-key", default="text")
    ap.add_argument("--max-bytes", type=int, default=20_000_000, help="text to tokenise (default 20 MB)")
    ap.add_argument("--tokenizer-path", help="an HF tokenizer (tokenizer.json or its directory); default: a byte-level "
                                             "BPE of --vocab trained on the first 2 MB of the text")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary of the trained BPE (default 8192)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    return run_tool(args, lambda: run(args), lambda result: None)


def run(args) -> dict:
    check_inputs(args.input)
    if any(w < 1 for w in args.workers):
        raise ConfigError("--workers", args.workers, "worker counts must be >= 1")
    if args.max_bytes < 1:
        raise ConfigError("--max-bytes", args.max_bytes, "must be >= 1")
    with tempfile.TemporaryDirectory(prefix="preprocess_bench_") as tmp:
        tmp = Path(tmp)
        if args.tokenizer_path:
            tokenizer = build_tokenizer("hf", args.tokenizer_path)
        else:
            tokenizer = train_bpe(iter_documents(args.input, args.json_key, max_bytes=2_000_000), args.vocab, tmp / "bpe.json")
        assert isinstance(tokenizer, HFTokenizer)
        documents = list(iter_documents(args.input, args.json_key, max_bytes=args.max_bytes))
        source = tmp / "documents.jsonl"  # every row reads the same text
        source.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
        text_bytes = sum(len(d.encode("utf-8")) for d in documents)

        start = time.perf_counter()
        encodings = tokenizer._tok.encode_batch(documents, add_special_tokens=False)
        bound_s = time.perf_counter() - start
        bound_tokens = sum(len(e.ids) for e in encodings)
        rows = [{"what": "encode_batch (the bound)", "seconds": bound_s, "tokens": bound_tokens}]
        outputs = []
        for workers in args.workers:
            start = time.perf_counter()
            stats = preprocess([str(source)], tmp / f"w{workers}", tokenizer, progress=False, workers=workers)
            rows.append({"what": f"preprocess, {workers} worker{'s' * (workers > 1)}", "workers": workers,
                         "seconds": time.perf_counter() - start, "tokens": stats["tokens"] - stats["documents"]})
            prefix = data_prefix(tmp / f"w{workers}")
            outputs.append(Path(prefix + ".bin").read_bytes() + Path(prefix + ".idx").read_bytes())
            if stats["tokens"] - stats["documents"] != bound_tokens:
                raise AssertionError(f"{workers} workers wrote {stats['tokens'] - stats['documents']} tokens, encode_batch made {bound_tokens}")
        if any(o != outputs[0] for o in outputs):
            raise AssertionError("worker counts wrote different .bin/.idx files")

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{len(documents):,} documents, {text_bytes / 1e6:.1f} MB of text, {bound_tokens:,} tokens; tokenizer vocabulary "
          f"{tokenizer.vocab_size:,}; {cores} CPU cores; all worker counts wrote identical files")
    print(f"{'':<28}{'seconds':>9}{'tokens/s':>12}{'vs bound':>10}")
    for row in rows:
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        row["vs_bound"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        print(f"{row['what']:<28}{row['seconds']:>9.2f}{row['tokens_per_s']:>12,.0f}{row['vs_bound']:>10.2f}")
    result = {"documents": len(documents), "text_bytes": text_bytes, "cores": cores, "vocab_size": tokenizer.vocab_size,
              "inputs": args.input, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main())
