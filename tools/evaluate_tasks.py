"""Downstream task scores of every budget x precision of one checkpoint, with lm-evaluation-harness through the project's OpenAI-compatible server.

    python tools/evaluate_tasks.py --list-tasks
    python tools/evaluate_tasks.py --checkpoint runs/demo-stage2 --tasks stdlib_cloze,stdlib_identifier \
        --sorted runs/demo-importance --out runs/demo-tasks
    python tools/evaluate_tasks.py --checkpoint runs/demo-small-nvfp4/hf --precisions nvfp4 --tasks stdlib_cloze --out runs/t
    python tools/evaluate_tasks.py --checkpoint ckpt/elastic --tasks mmlu_pro,gpqa_diamond_zeroshot --limit 200 --out runs/t
    python tools/evaluate_tasks.py --endpoint http://node1:8000/v1 --api-key "$KEY" --tasks mmlu_pro --out runs/t

For each (model, precision) it starts tools/serve.py on 127.0.0.1 at a free port and runs
lm-eval's `local-completions` model against it for every budget (model id
`<name>:<budget>`): log-likelihood tasks through `echo` + `logprobs`, generation greedily.
Why the server and not an in-process lm-eval model: one code path for serving and
evaluation (the scores are those of the model users are served), a budget is just a model
id and budget control just extra body fields (`think_budget`, `answer_budget`,
`max_think_tokens`, `think_delimiter`), and it is how NeMo Evaluator, NeMo-Skills and any
OpenAI client reach a model.

--endpoint URL instead of --checkpoint: no server is started; the budgets a running server
lists (`<name>:<budget>`: tools/serve.py, or its front end over vLLM/SGLang/llama.cpp engines,
slurm/serve_fleet.sh), or each model id of any other OpenAI endpoint, are evaluated as they
are served (--budgets picks some; tokenization through its /tokenize).

--tasks: the shipped tasks (--list-tasks; elastic_megatron/eval_tasks, data in the
package), tasks of --include-path directories of lm-eval YAMLs, or any lm-eval task whose
data are in the local datasets cache: nothing is downloaded (HF_DATASETS_OFFLINE /
HF_HUB_OFFLINE are set). --precisions: bf16 is the checkpoint as stored (a quantized HF
export is its own format, e.g. --precisions nvfp4); fp8/nvfp4 of an elastic checkpoint are
its budgets fake-quantized with one set of scales, served by tools/serve.py --precision:
post-training quantization calibrated at every budget, or --qad <QAD run> (its own scales)
for the QAD run's format. --sorted: the sorted parent served at the same
budgets (the untrained slices of the same sizes), in bf16.

Writes <out>/results.json (per task, budget, precision: metric, stderr, samples, seconds),
results.md (the table, printed too) and results.png, and logs the table and the figure to
the W&B run of the checkpoint's run when that run used W&B. Every input is checked before a
server starts; nothing is written when one is wrong.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _names(text):
    return [n.strip() for n in text.split(",") if n.strip()] if text else []


def main(argv=None) -> int:
    from elastic_megatron.cli import run_tool, tool_parser

    parser = tool_parser(__doc__, whole_doc=True)
    parser.add_argument("--list-tasks", action="store_true", help="print the shipped tasks (and --include-path's), one a line")
    parser.add_argument("--checkpoint", help="elastic, plain or sliced checkpoint, or an HF directory (BF16, FP8, NVFP4)")
    parser.add_argument("--endpoint", default=None, help="instead of --checkpoint: the base URL of a running OpenAI-compatible "
                        "server (e.g. http://node1:8000/v1), evaluated as it serves")
    parser.add_argument("--api-key", default=None, help="--endpoint's API key (default: $OPENAI_API_KEY)")
    parser.add_argument("--tasks", default="", help="comma-separated lm-eval task names")
    parser.add_argument("--budgets", default="all", help="all, or comma-separated budget names (default all)")
    parser.add_argument("--precisions", default="bf16", help="comma-separated: bf16, fp8, nvfp4 (default bf16)")
    parser.add_argument("--include-path", action="append", default=[], help="a directory of lm-eval task YAMLs (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="the first N documents of each task")
    parser.add_argument("--qad", default=None, help="QAD run dir: its format's precision is served with its own scales")
    parser.add_argument("--sorted", default=None, help="sorted parent (importance run dir): the untrained slices as baseline")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per request, and the server's --max-batch (default 8)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the server's weights and activations")
    parser.add_argument("--log-samples", action="store_true", help="also <out>/samples/*.jsonl: every document's request and answer")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to the checkpoint run's W&B")
    parser.add_argument("--out", help="directory for results.json, results.md and results.png")
    args = parser.parse_args(argv)

    from elastic_megatron.config.errors import ConfigError
    from elastic_megatron.jobs.tasks import TaskRequest, list_tasks, render_table, run_tasks

    def job():
        if args.list_tasks:
            return list_tasks(args.include_path)
        if args.endpoint and args.checkpoint:
            raise ConfigError("--endpoint", args.endpoint, "not with --checkpoint: evaluate one or the other")
        for key in ("out",) if args.endpoint else ("checkpoint", "out"):
            if not getattr(args, key):
                raise ConfigError(f"--{key}", None, "is required (or --list-tasks)")
        budgets = None if args.budgets.strip() == "all" else _names(args.budgets)
        req = TaskRequest(args.checkpoint, _names(args.tasks), args.out, budgets, _names(args.precisions),
                          args.include_path, args.limit, args.qad, args.sorted, args.batch_size, args.dtype,
                          log_samples=args.log_samples, wandb=not args.no_wandb, endpoint=args.endpoint,
                          api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or None)
        return run_tasks(req)

    def done(result):
        if args.list_tasks:
            return "\n".join(result)
        text = f"{render_table(result.scores)}\nwrote {', '.join(str(p) for p in result.paths.values())}"
        if result.wandb_run:
            text += f"\nlogged to W&B run {result.wandb_run}"
        return text

    return run_tool(args, job, done)


if __name__ == "__main__":
    sys.exit(main())
