"""Generate text from a checkpoint at any of its budgets, or with elastic budget control.

    python tools/generate.py --checkpoint runs/demo-stage2 --budget small --prompt "def parse(" --max-new-tokens 64
    python tools/generate.py --checkpoint runs/demo-stage2 --prompts-file prompts.txt --temperature 0.8 --top-p 0.9
    python tools/generate.py --checkpoint runs/demo-stage2 --think-budget small --answer-budget full \
        --delimiter "</think>" --max-think-tokens 256 --prompt "..."

Works on a parent, an elastic checkpoint (any recorded budget, one copy of the weights for
all of them), a sliced checkpoint and an imported HF model. Tokens stream to the terminal
(one prompt); a batch of prompts (--prompts-file, one per line) is decoded together and
printed when done. Timing per phase goes to stderr (and --report FILE as JSON).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from elastic_megatron.cli import run_tool, tool_parser

    parser = tool_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="run dir or iter_* checkpoint dir")
    parser.add_argument("--budget", default=None, help="budget name recorded in an elastic checkpoint (default: the largest)")
    parser.add_argument("--prompt", default=None, help="the prompt text")
    parser.add_argument("--prompts-file", default=None, help="one prompt per line, decoded as one batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json to use instead of the checkpoint's")
    parser.add_argument("--precision", default=None, choices=("bf16", "fp8", "nvfp4"),
                        help="every budget fake-quantized with one set of scales: a QAD checkpoint's own, else "
                             "post-training quantization calibrated at every budget (default: as stored)")
    parser.add_argument("--calibration-batches", type=int, default=16, help="--precision PTQ: training micro-batches")
    parser.add_argument("--think-budget", default=None, help="budget control: the budget that writes the reasoning trace")
    parser.add_argument("--answer-budget", default=None, help="budget control: the budget that writes the answer")
    parser.add_argument("--delimiter", default="</think>", help="budget control: where thinking ends")
    parser.add_argument("--max-think-tokens", type=int, default=256, help="budget control: the delimiter is forced after this many")
    parser.add_argument("--contiguous-budgets", action="store_true",
                        help="copy a budget's strided weight views into contiguous tensors (faster reads, more memory: printed)")
    parser.add_argument("--cuda-graph", action="store_true", help="run each decode step as a captured CUDA graph (CUDA only)")
    parser.add_argument("--compile", action="store_true", help="run each decode step compiled (torch.compile: inductor "
                        "on CPU, CUDA graphs on CUDA); one compile per budget and batch size, on its first step")
    parser.add_argument("--report", default=None, help="write tokens and timings as JSON here")
    args = parser.parse_args(argv)

    def job():
        from elastic_megatron.config.errors import ConfigError
        from elastic_megatron.inference.generator import ElasticGenerator, Sampling, write_report
        from elastic_megatron.parallel.setup import distributed
        import torch

        if (args.prompt is None) == (args.prompts_file is None):
            raise ConfigError("--prompt", args.prompt, "give exactly one of --prompt and --prompts-file")
        if args.prompts_file is not None:
            if not Path(args.prompts_file).is_file():
                raise ConfigError("--prompts-file", args.prompts_file, "is not a file")
            prompts = [line for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
            if not prompts:
                raise ConfigError("--prompts-file", args.prompts_file, "holds no prompt (one per line)")
        else:
            prompts = [args.prompt]
        control = args.think_budget is not None or args.answer_budget is not None
        if control and (args.think_budget is None or args.answer_budget is None or len(prompts) != 1):
            raise ConfigError("--think-budget", args.think_budget, "budget control needs --think-budget, --answer-budget and one --prompt")
        if control and args.budget is not None:
            raise ConfigError("--budget", args.budget, "not with budget control (--think-budget/--answer-budget)")
        if args.cuda_graph and not torch.cuda.is_available():
            raise ConfigError("--cuda-graph", True, "needs a CUDA device; this machine has none")
        if args.cuda_graph and args.compile:
            raise ConfigError("--compile", True, "is a decode step of its own; choose it or --cuda-graph")
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
        stream = (lambda i, text: print(text, end="", flush=True)) if len(prompts) == 1 else None
        with distributed(1, 1, 1, seed=args.seed):
            gen = ElasticGenerator.from_checkpoint(args.checkpoint, tokenizer=args.tokenizer, precision=args.precision,
                                                   calibration_batches=args.calibration_batches,
                                                   contiguous=args.contiguous_budgets, cuda_graph=args.cuda_graph, compiled=args.compile)
            if control:
                print(prompts[0], end="", flush=True)
                out = gen.budget_control(prompts[0], args.think_budget, args.answer_budget, args.delimiter,
                                         args.max_think_tokens, args.max_new_tokens, sampling, on_text=stream)
            else:
                if stream:
                    print(prompts[0], end="", flush=True)
                out = gen.generate(prompts, args.budget, args.max_new_tokens, sampling, on_text=stream)
        if stream:
            print(flush=True)  # the streamed text ends its line before the timings
        if args.report:
            write_report(out, args.report)
        return prompts, out, stream is not None, gen.view_stats

    def done(result) -> str:
        prompts, out, streamed, view_stats = result
        for name, stats in view_stats.items():
            if stats.copied_bytes:
                print(f"[{name}] weights: {stats.shared_bytes / 2**20:.1f} MiB views of the parent, "
                      f"{stats.copied_bytes / 2**20:.1f} MiB copied", file=sys.stderr)
        for phase in out.phases:
            rate = phase.new_tokens / phase.decode_s if phase.decode_s else float("nan")
            print(f"[{phase.budget}] prompt {phase.prompt_tokens} tokens in {phase.prefill_s:.3f} s, "
                  f"{phase.new_tokens} new tokens in {phase.decode_s:.3f} s ({rate:.1f} tok/s)", file=sys.stderr)
        if streamed:
            return ""
        return "\n".join(f"--- {i}\n{p}{t}" for i, (p, t) in enumerate(zip(prompts, out.texts)))

    return run_tool(args, job, done)


if __name__ == "__main__":
    sys.exit(main())
