"""Elastic budget control, accuracy against latency: every (think budget, answer budget) pair of
one elastic checkpoint and a sweep of the cap on thinking tokens, on a generate_until task with
a reasoning delimiter (the shipped `stdlib_assign` by default), with lm-evaluation-harness
through the project's server.

    python benchmarks/budget_control.py --checkpoint runs/demo-stage2 --out runs/demo-budget-control
    python benchmarks/budget_control.py --checkpoint ckpt/elastic --task aime25 --think-delimiter "</think>" \
        --caps 1024,4096,16384 --limit 30 --out runs/bc

Each configuration is lm-eval's `local-completions` model against tools/serve.py (started here
on 127.0.0.1) with the task's generation settings plus the server's budget-control body
fields, `think_budget`, `answer_budget`, `max_think_tokens` (the cap: the delimiter is forced
after it) and `think_delimiter` (default: the task YAML's `metadata.think_delimiter`), which
lm-eval passes through as they are: what any OpenAI client sends as `extra_body`. Accuracy is
the task's own metric (its regex filter and exact match), so it is the number
tools/evaluate_tasks.py reports for the task. The diagonal pairs (L->L, S->S) are single-model
budget control with the same caps, the baselines the paper compares against; S->L is elastic
budget control (the small budget thinks, the large one answers). `plain` rows are each budget
on the task as it is (no budget control).

Latency is the wall time of the task's requests divided by their number: one request at a
time (lm-eval batch size 1, prompts sent as text, so only the requests are timed), the same
documents for every configuration, interleaved: the documents are split into `--rounds`
chunks and every configuration runs on each chunk in turn, in an order rotated per chunk, so
the load of a shared machine falls on all of them alike. The Pareto front (no other
configuration at least as accurate and as fast, one of the two strictly) is marked in the
table and the figure. Writes <out>/budget_control.json, budget_control.md and
budget_control.png.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PLAIN = "plain"


@dataclass
class Config:
    think: str  # a budget, or PLAIN (no budget control)
    answer: str
    cap: Optional[int]
    correct: float = 0.0
    documents: int = 0
    per_request: list = field(default_factory=list)  # seconds per request, one value per round

    def body(self, delimiter: str) -> dict:
        if self.think == PLAIN:
            return {}
        return {"think_budget": self.think, "answer_budget": self.answer, "max_think_tokens": self.cap,
                "think_delimiter": delimiter}

    def row(self) -> dict:
        rounds = sorted(self.per_request)
        return {"think": self.think, "answer": self.answer, "cap": self.cap, "accuracy": self.correct / self.documents,
                "latency_s": statistics.median(rounds), "latency_min_s": rounds[0], "latency_max_s": rounds[-1],
                "documents": self.documents}


def pareto(rows: list[dict]) -> set[int]:
    """Indices of the rows no other row dominates (accuracy >= and latency <=, one strictly)."""
    return {i for i, r in enumerate(rows)
            if not any(o["accuracy"] >= r["accuracy"] and o["latency_s"] <= r["latency_s"]
                       and (o["accuracy"] > r["accuracy"] or o["latency_s"] < r["latency_s"]) for o in rows)}


def label(r: dict) -> str:
    if r["think"] == PLAIN:
        return f"{r['answer']} (plain)"
    return f"{r['think']} -> {r['answer']}" + (" (single model)" if r["think"] == r["answer"] else "")


def render(rows: list[dict], front: set[int], largest: str, metric: str) -> str:
    base = {r["cap"]: r["latency_s"] for r in rows if r["think"] == r["answer"] == largest}
    lines = [f"| think -> answer | max think tokens | {metric} | latency s (rounds' min-max) | L->L latency / this | Pareto |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        ratio = f"{base[r['cap']] / r['latency_s']:.2f}x" if r["cap"] in base else ""
        lines.append(f"| {label(r)} | {r['cap'] if r['cap'] is not None else '-'} | {r['accuracy']:.3f} | "
                     f"{r['latency_s']:.3f} ({r['latency_min_s']:.3f}-{r['latency_max_s']:.3f}) | {ratio} | "
                     f"{'*' if i in front else ''} |")
    return "\n".join(lines)


def draw(rows: list[dict], front: set[int], task: str, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    largest, smallest = rows[0]["answer"], [r["answer"] for r in rows if r["think"] == PLAIN][-1]
    ax.scatter([r["latency_s"] for r in rows], [r["accuracy"] for r in rows], s=10, color="lightgray",
               label="all configurations")
    for (think, answer), style in (((largest, largest), "o--"), ((smallest, smallest), "s--"), ((smallest, largest), "^-")):
        mine = sorted((r for r in rows if (r["think"], r["answer"]) == (think, answer)), key=lambda r: r["cap"])
        if not mine:
            continue
        ax.plot([r["latency_s"] for r in mine], [r["accuracy"] for r in mine], style, label=label(mine[0]))
        for r in mine:
            ax.annotate(str(r["cap"]), (r["latency_s"], r["accuracy"]), textcoords="offset points", xytext=(3, 3), fontsize=7)
    for r in rows:
        if r["think"] == PLAIN:
            ax.scatter([r["latency_s"]], [r["accuracy"]], marker="*", s=80, label=label(r))
    pts = sorted((rows[i] for i in front), key=lambda r: r["latency_s"])
    ax.plot([r["latency_s"] for r in pts], [r["accuracy"] for r in pts], "o-", color="black", linewidth=3, alpha=0.3,
            markersize=12, markerfacecolor="none", label="Pareto front")
    ax.set_xlabel("latency per request (s, median over rounds)")
    ax.set_ylabel(metric)
    ax.set_title(f"elastic budget control on {task} (numbers: max thinking tokens)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    from elastic_megatron.cli import benchmark_parser, run_benchmark

    ap = benchmark_parser(__doc__)
    ap.add_argument("--checkpoint", required=True, help="an elastic checkpoint (run dir)")
    ap.add_argument("--out", required=True, help="directory for budget_control.json, .md and .png")
    ap.add_argument("--task", default="stdlib_assign", help="a generate_until task (shipped, --include-path, or lm-eval's)")
    ap.add_argument("--include-path", action="append", default=[], help="a directory of task YAMLs (repeatable)")
    ap.add_argument("--think-delimiter", default=None, help="default: the task YAML's metadata.think_delimiter")
    ap.add_argument("--budgets", default="all", help="all, or comma-separated budgets (every ordered pair is run)")
    ap.add_argument("--caps", default="2,4,8,16,32", help="max_think_tokens values (comma-separated)")
    ap.add_argument("--limit", type=int, default=60, help="documents (the task's first N)")
    ap.add_argument("--rounds", type=int, default=6, help="chunks the documents are split into for interleaving")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the server's weights (default fp32)")
    args = ap.parse_args(argv)
    return run_benchmark(args, lambda: run(args))


def run(args) -> None:
    from elastic_megatron.config.errors import ConfigError, require_positive_int
    from elastic_megatron.jobs.evaluate import checkpoint_rows
    from elastic_megatron.jobs.tasks import (
        Served, _serve_argv, evaluate_model_id, main_scores, resolve_tasks, running_server, scores_of, served_models,
    )

    def check():
        require_positive_int("--limit", args.limit)
        require_positive_int("--rounds", args.rounds)
        try:
            caps = sorted({int(c) for c in args.caps.split(",") if c.strip()})
        except ValueError:
            caps = []
        if not caps or caps[0] < 1:
            raise ConfigError("--caps", args.caps, "comma-separated positive integers")
        rows = checkpoint_rows(args.checkpoint, None if args.budgets == "all" else args.budgets.split(","), "--budgets")
        if any(w is None for _, w in rows):
            raise ConfigError("--checkpoint", args.checkpoint, "budget control needs an elastic checkpoint")
        manager = resolve_tasks([args.task], args.include_path)
        task = next(iter(manager.load([args.task])["tasks"].values()))
        if task.get_config("output_type") != "generate_until":
            raise ConfigError("--task", args.task, "must be a generate_until task (budget control writes text)")
        delimiter = args.think_delimiter or (task.get_config("metadata") or {}).get("think_delimiter")
        if not delimiter:
            raise ConfigError("--think-delimiter", None, f"{args.task} names no think_delimiter in its metadata; give one")
        n = min(args.limit, len(task.eval_docs))
        return caps, [name for name, _ in rows], manager, delimiter, n

    caps, budgets, manager, delimiter, n = check()
    configs = [Config(PLAIN, b, None) for b in budgets] + [Config(t, a, c) for t in budgets for a in budgets for c in caps]
    chunks = [list(range(n))[r::args.rounds] for r in range(args.rounds) if r < n]
    name = "bc"
    served = Served("elastic", "bf16", _serve_argv(args.checkpoint, args.dtype), name, budgets, True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    metric = None
    with tempfile.TemporaryDirectory() as tmp, running_server(served, Path(tmp) / "server.log", 1, 600) as url:
        max_len = served_models(url)[f"{name}:{budgets[0]}"]

        def run(cfg: Config, ids: list[int]):
            results, seconds = evaluate_model_id(url, f"{name}:{cfg.answer}", max_len, manager, args.task, None, 1,
                                                 gen_kwargs=cfg.body(delimiter), doc_ids=ids, tokenize=False)
            (score,) = main_scores(scores_of(results, served, cfg.answer, seconds, (0, 0)))
            return score, seconds

        for cfg in configs[: len(budgets)] + configs[len(budgets):: len(caps)]:  # every path once, untimed
            run(cfg, chunks[0][:1])
        for r, ids in enumerate(chunks):
            for k in range(len(configs)):
                cfg = configs[(k + r) % len(configs)]
                score, seconds = run(cfg, ids)
                metric = score.metric
                cfg.correct += score.value * len(ids)
                cfg.documents += len(ids)
                cfg.per_request.append(seconds / len(ids))
            print(f"round {r + 1}/{len(chunks)} done ({time.perf_counter() - begin:.0f} s)", file=sys.stderr, flush=True)
    rows = [c.row() for c in configs]
    front = pareto(rows)
    table = render(rows, front, budgets[0], metric)
    payload = {"checkpoint": args.checkpoint, "task": args.task, "think_delimiter": delimiter, "documents": n, "caps": caps,
               "rounds": len(chunks), "rows": rows, "pareto": sorted(front), "wall_s": time.perf_counter() - begin}
    (out / "budget_control.json").write_text(json.dumps(payload, indent=1))
    (out / "budget_control.md").write_text(table + "\n")
    draw(rows, front, args.task, metric, out / "budget_control.png")
    print(table)
    print(f"wrote {out}/budget_control.json, .md, .png ({payload['wall_s']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
