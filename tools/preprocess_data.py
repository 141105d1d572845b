"""Tokenise text into a Megatron indexed dataset for training.

    python tools/preprocess_data.py --input python-stdlib --output-prefix .cache/data/stdlib --tokenizer byte
    python tools/preprocess_data.py --input corpus.jsonl --json-key text --output-prefix data/corpus \\
        --tokenizer hf --tokenizer-path /models/nemotron-nano --workers 16
    python tools/preprocess_data.py --input a.txt b.txt --split-lines --output-prefix data/ab --train-bpe 4096

Writes <output-prefix>_text_document.bin/.idx (pass that prefix as data.prefixes) and
<output-prefix>.tokenizer.meta.json (training rebuilds the tokenizer from it).

A corpus too large for one node (slurm/preprocess.sh runs this as an array job):

    python tools/preprocess_data.py --input web/*.jsonl --output-prefix data/web --shard 3/64 --workers 16 ...
    python tools/preprocess_data.py --write-blend blend.yaml --corpora 0.7 data/web 0.3 data/chat

--shard I/N tokenises the I-th of N contiguous runs of the input files into
<output-prefix>.shardIIIII-of-NNNNN; a shard finished before is skipped. --write-blend writes
every shard's prefix with its weight (corpus weight x its share of the corpus's tokens; no
weights: each output's share of all tokens).

Chat data (JSON-lines of "messages", rendered with the tokenizer directory's chat template):

    python tools/preprocess_data.py --input-format chat --input sft.jsonl --output-prefix data/sft \\
        --tokenizer hf --tokenizer-path /models/nemotron-nano [--earlier-reasoning drop] [--on-bad-line skip]

Data tokenised elsewhere (Megatron-LM) train with data.tokenizer=<dir>; --record-tokenizer PREFIX
checks every token id of such data and writes the tokenizer record beside them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elastic_megatron.cli import run_tool, tool_parser  # noqa: E402
from elastic_megatron.config.errors import ConfigError  # noqa: E402
from elastic_megatron.data.chat import BAD_LINE_ACTIONS, EARLIER_REASONING, ChatOptions  # noqa: E402
from elastic_megatron.data.indexed import (  # noqa: E402
    EMBEDDED_CORPUS, check_inputs, data_prefix, finished_output, iter_documents, parse_shard, preprocess, record_tokenizer,
    shard_inputs, shard_output_prefix, write_blend,
)
from elastic_megatron.data.tokenizer import TOKENIZER_TYPES, build_tokenizer, train_bpe  # noqa: E402


def corpora_of(items: list[str]) -> list[tuple]:
    """--corpora P1 P2 ... or Megatron's flattened W1 P1 W2 P2 ... -> [(weight or None, prefix)]."""
    from elastic_megatron.config.schema import split_blend

    try:
        prefixes, weights = split_blend(items, None)
    except ConfigError:
        raise ConfigError("--corpora", items, "output prefixes with a weight before each (0.7 data/web 0.3 data/chat) "
                          "or before none (data/web data/chat)") from None
    return list(zip(weights or [None] * len(prefixes), prefixes))


def main(argv=None) -> int:
    ap = tool_parser(__doc__, whole_doc=True)
    ap.add_argument("--input", nargs="+", help=f".jsonl or .txt files, or {EMBEDDED_CORPUS!r}")
    ap.add_argument("--output-prefix")
    ap.add_argument("--tokenizer", choices=TOKENIZER_TYPES, default="byte")
    ap.add_argument("--tokenizer-path", help="hf: a local tokenizer.json or a directory holding one")
    ap.add_argument("--eod-token", help="hf: the end-of-document token (default: the first of <|endoftext|>, </s>, <eos>)")
    ap.add_argument("--train-bpe", type=int, metavar="VOCAB", help="train a byte-level BPE of this size on the inputs and use it")
    ap.add_argument("--input-format", choices=("text", "chat"), default="text",
                    help="chat: JSON-lines of conversations ('messages'), rendered with the tokenizer's chat template")
    ap.add_argument("--json-key", default="text")
    ap.add_argument("--split-lines", action="store_true", help=".txt: one document per non-empty line")
    ap.add_argument("--max-bytes", type=int, help="stop after this many bytes of text")
    ap.add_argument("--workers", type=int, default=1, help="processes tokenising documents (same output for any number)")
    ap.add_argument("--shard", metavar="I/N", help="only the I-th of N contiguous runs of the input files")
    ap.add_argument("--earlier-reasoning", choices=EARLIER_REASONING, default="keep",
                    help="chat: keep the reasoning of assistant turns before the last (the template may still drop "
                         "it), or drop it")
    ap.add_argument("--chat-template-kwargs", type=json.loads, default={}, metavar="JSON",
                    help="chat: keyword arguments of the template, e.g. '{\"enable_thinking\": true}'")
    ap.add_argument("--on-bad-line", choices=BAD_LINE_ACTIONS, default="error",
                    help="chat: refuse the input before writing anything (default), or leave bad lines out")
    ap.add_argument("--write-blend", metavar="FILE", help="write the data blend of --corpora and stop")
    ap.add_argument("--corpora", nargs="+", metavar="[W] PREFIX", help="--write-blend: output prefixes, each after its weight or none")
    ap.add_argument("--record-tokenizer", metavar="DATA_PREFIX",
                    help="check every token id of data made elsewhere against --tokenizer and write the tokenizer record beside them")
    ap.add_argument("--plan", action="store_true", help="print which input files the --shard gets and whether it is "
                    "finished; tokenise nothing")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    def job() -> dict:
        if args.write_blend:
            if not args.corpora:
                raise ConfigError("--corpora", None, "--write-blend needs the output prefixes of the corpora, e.g. "
                                  "--corpora data/web or --corpora 0.7 data/web 0.3 data/chat")
            return {"blend": write_blend(corpora_of(args.corpora), args.write_blend)}
        tokenizer = None if args.train_bpe else build_tokenizer(args.tokenizer, args.tokenizer_path, args.eod_token)
        if args.record_tokenizer:
            return {"recorded": record_tokenizer(args.record_tokenizer, tokenizer, overwrite=args.overwrite)}
        for key in ("input", "output_prefix"):
            if not getattr(args, key):
                raise ConfigError(f"--{key.replace('_', '-')}", None, "required (or --write-blend / --record-tokenizer)")
        check_inputs(args.input)
        shard = parse_shard(args.shard) if args.shard else None
        if args.plan:
            return shard_plan(args.input, args.output_prefix, shard)
        chat = None
        if args.input_format == "chat":
            if args.tokenizer != "hf" or not args.tokenizer_path or args.train_bpe:
                raise ConfigError("--tokenizer", args.tokenizer, "--input-format chat renders with an HF tokenizer "
                                  "directory's chat template: pass --tokenizer hf --tokenizer-path <dir>")
            chat = ChatOptions(args.tokenizer_path, args.earlier_reasoning, args.chat_template_kwargs)
        if args.train_bpe:
            if shard is not None:
                raise ConfigError("--train-bpe", args.train_bpe, "shards need one tokenizer: train it once, then pass "
                                  "--tokenizer hf --tokenizer-path <it> to every shard")
            if args.train_bpe < 260:
                raise ConfigError("--train-bpe", args.train_bpe, "a byte-level BPE needs a vocabulary of at least 260")
            out = Path(f"{args.output_prefix}.tokenizer.json")
            if out.exists() and not args.overwrite:
                raise ConfigError("--output-prefix", args.output_prefix, f"{out} exists; pass --overwrite to replace it")
            tokenizer = train_bpe(iter_documents(args.input, args.json_key, args.split_lines, args.max_bytes), args.train_bpe, out)
        return preprocess(args.input, args.output_prefix, tokenizer, args.json_key, args.split_lines, args.max_bytes,
                          args.overwrite, workers=args.workers, shard=shard, chat=chat, on_bad_line=args.on_bad_line)

    return run_tool(args, job, done)


def shard_plan(inputs: list[str], output_prefix: str, shard) -> dict:
    files = shard_inputs(inputs, *shard) if shard else list(inputs)
    prefix = shard_output_prefix(output_prefix, *shard) if shard else output_prefix
    return {"plan": f"{'shard %d/%d' % shard if shard else 'all'}: {len(files)} files ({files[0]} ... {files[-1]}) -> "
                    f"{data_prefix(prefix)} [{'finished' if finished_output(prefix) else 'to do'}]"}


def done(stats: dict) -> str:
    if "plan" in stats:
        return stats["plan"]
    if "blend" in stats:
        blend = stats["blend"]
        return (f"wrote the blend of {len(blend['prefixes'])} prefixes, {sum(blend['tokens']):,} tokens:\n"
                f"data.prefixes=[{','.join(blend['prefixes'])}] data.weights=[{','.join(map(repr, blend['weights']))}]")
    if "recorded" in stats:
        r = stats["recorded"]
        return f"checked {r['tokens']:,} tokens of {r['prefix']} and wrote {r['record']}"
    prefix = data_prefix(stats["output_prefix"])
    skipped = stats.get("chat", {}).get("bad_lines_skipped")
    return (f"{'kept (finished before)' if stats.get('skipped') else 'wrote'} {prefix}.bin/.idx: {stats['documents']:,} "
            f"documents, {stats['tokens']:,} tokens, vocabulary {stats['vocab_size']:,}"
            + (f"; skipped {skipped} bad lines ({', '.join(stats['chat']['bad_line_numbers'])})" if skipped else ""))


if __name__ == "__main__":
    sys.exit(main())
