"""Tokenise text into a Megatron indexed dataset for training.

    python tools/preprocess_data.py --input python-stdlib --output-prefix .cache/data/stdlib --tokenizer byte
    python tools/preprocess_data.py --input corpus.jsonl --json-key text --output-prefix data/corpus \\
        --tokenizer hf --tokenizer-path /models/nemotron-nano/tokenizer.json
    python tools/preprocess_data.py --input a.txt b.txt --split-lines --output-prefix data/ab --train-bpe 4096

Writes <output-prefix>_text_document.bin/.idx (pass that prefix as data.prefixes) and
<output-prefix>.tokenizer.meta.json (training rebuilds the tokenizer from it).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elastic_megatron.cli import run_tool, tool_parser  # noqa: E402
from elastic_megatron.config.errors import ConfigError  # noqa: E402
from elastic_megatron.data.indexed import EMBEDDED_CORPUS, check_inputs, data_prefix, iter_documents, preprocess  # noqa: E402
from elastic_megatron.data.tokenizer import TOKENIZER_TYPES, build_tokenizer, train_bpe  # noqa: E402


def main(argv=None) -> int:
    ap = tool_parser(__doc__, whole_doc=True)
    ap.add_argument("--input", nargs="+", required=True, help=f".jsonl or .txt files, or {EMBEDDED_CORPUS!r}")
    ap.add_argument("--output-prefix", required=True)
    ap.add_argument("--tokenizer", choices=TOKENIZER_TYPES, default="byte")
    ap.add_argument("--tokenizer-path", help="hf: a local tokenizer.json or a directory holding one")
    ap.add_argument("--eod-token", help="hf: the end-of-document token (default: the first of <|endoftext|>, </s>, <eos>)")
    ap.add_argument("--train-bpe", type=int, metavar="VOCAB", help="train a byte-level BPE of this size on the inputs and use it")
    ap.add_argument("--json-key", default="text")
    ap.add_argument("--split-lines", action="store_true", help=".txt: one document per non-empty line")
    ap.add_argument("--max-bytes", type=int, help="stop after this many bytes of text")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    def job() -> dict:
        check_inputs(args.input)
        if args.train_bpe:
            if args.train_bpe < 260:
                raise ConfigError("--train-bpe", args.train_bpe, "a byte-level BPE needs a vocabulary of at least 260")
            out = Path(f"{args.output_prefix}.tokenizer.json")
            if out.exists() and not args.overwrite:
                raise ConfigError("--output-prefix", args.output_prefix, f"{out} exists; pass --overwrite to replace it")
            tokenizer = train_bpe(iter_documents(args.input, args.json_key, args.split_lines, args.max_bytes), args.train_bpe, out)
        else:
            tokenizer = build_tokenizer(args.tokenizer, args.tokenizer_path, args.eod_token)
        return preprocess(args.input, args.output_prefix, tokenizer, args.json_key, args.split_lines, args.max_bytes, args.overwrite)

    return run_tool(args, job, lambda stats: (
        f"wrote {data_prefix(args.output_prefix)}.bin/.idx: {stats['documents']:,} documents, {stats['tokens']:,} tokens, "
        f"vocabulary {stats['vocab_size']:,}"))


if __name__ == "__main__":
    sys.exit(main())
