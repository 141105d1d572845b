"""Generation speed against transformers on the same weights, per budget, and elastic budget
control against the largest budget alone: one run on one device, every measurement
interleaved with the one it is compared to and repeated (random weights: speed does not
depend on them).

    python benchmarks/generation.py                              # small preset, its elastic spec
    python benchmarks/generation.py model=tiny elastic=tiny prompt=64 new=16 repeat=3
    python benchmarks/generation.py batches=1,8,16 think=128 answer=32
    python benchmarks/generation.py hf=0 contiguous=0 control=0 # leave parts out
    python benchmarks/generation.py threads=1                    # torch threads (default: torch's)

The parent is saved as an elastic checkpoint and each budget is exported with the
project's exporter (slice_checkpoint(..., fmt="hf")); transformers' NemotronHForCausalLM
loads that export. Ours is `ElasticGenerator.generate_ids` on views of the one parent.
Both are timed the same way, from one call of their generate: prefill = call to the first
new token (setup, prompt forward, first pick); decode = the time between consecutive new
tokens (token callbacks for ours, a streamer for transformers), `new` - 1 steps per call.
Greedy, no early stop, `batch` copies of one `prompt`-token prompt. Printed per budget and batch: tokens/s of
both and ours / theirs (targets: decode >= 1.0, prefill >= 1.0), the budget's decode time
against the full budget's next to its share of active parameters (target: share + 0.15),
and whether our tokens equal theirs.

`contiguous=1` (default) also decodes each smaller budget with its strided weights copied
contiguous (ElasticGenerator.contiguous), interleaved with the views, and prints the memory
that costs. `control=1` (default) times `budget_control` itself (the smallest budget thinks
`think` tokens, forced delimiter, the largest re-prefills prompt + trace and answers
`answer` tokens) against the largest budget writing as many tokens alone (L->L).
Prefill: the median over 2 x `repeat` calls (one more call per run, with one new token);
decode: the median step over all steps of all
calls (robust to the stalls of a shared machine); `spread` is the interquartile range of
the samples over their median, the larger of each compared pair: how noisy the run was.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from elastic_megatron.checkpoint.store import save_checkpoint  # noqa: E402
from elastic_megatron.convert.megatron_dist import config_yaml  # noqa: E402
from elastic_megatron.elastic.budgets import budgets_meta, validate_elastic  # noqa: E402
from elastic_megatron.elastic.reindex import prefix_index  # noqa: E402
from elastic_megatron.elastic.widths import full_widths, model_cost  # noqa: E402
from elastic_megatron.inference.generator import ElasticGenerator  # noqa: E402
from elastic_megatron.models.hybrid import build_model  # noqa: E402
from elastic_megatron.parallel.setup import distributed  # noqa: E402
from elastic_megatron.slicing.zero_shot import slice_checkpoint  # noqa: E402
from elastic_megatron.train import compose_job  # noqa: E402

DELIMITER = "</think>"


class _Vocab:
    """A byte-level stand-in tokenizer over the model's whole vocabulary (no token is masked,
    as in transformers' run) that never ends a sequence."""

    def __init__(self, size: int):
        self.vocab_size, self.eod = size, -1

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def spread(xs: list[float]) -> float:
    """Interquartile range over the median."""
    s = sorted(xs)
    return (s[(3 * len(s)) // 4] - s[len(s) // 4]) / median(xs)


def _steps(start: float, ticks: list[float]) -> tuple[float, list[float]]:
    """(prefill s, each decode step's s) from the call's start and each new token's time."""
    return ticks[0] - start, [b - a for a, b in zip(ticks, ticks[1:])]


def ours(gen: ElasticGenerator, budget: str, prompts: list[list[int]], new: int) -> tuple[float, list[float], list[list[int]]]:
    """(prefill s, decode steps' s, tokens) of one generate_ids call."""
    ticks = []
    _sync()
    start = time.perf_counter()
    out, _ = gen.generate_ids(prompts, budget, new, on_token=lambda i, _: ticks.append(time.perf_counter()) if i == 0 else None)
    return (*_steps(start, ticks), out)


class _Clock:
    """A transformers streamer that only notes when each step's tokens arrive."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def theirs(model, prompts: list[list[int]], new: int) -> tuple[float, list[float], list[list[int]]]:
    clock = _Clock()
    ids = torch.tensor(prompts, device=model.device)
    _sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, streamer=clock)
    # times[0]: the prompt, handed to the streamer before the first forward
    return (*_steps(start, clock.times[1:]), out[:, ids.shape[1]:].tolist())


def save_elastic(parent, cfg, spec, resolved: list, directory: Path, tokenizer: dict | None = None) -> Path:
    """`parent` saved as an elastic checkpoint over the identity sort, with the metadata an
    elastic run writes for the fixed budgets `resolved` (and `tokenizer` as data.tokenizer)."""
    meta = {"config": config_yaml(cfg), "sort_index": prefix_index(cfg, full_widths(cfg)).to_lists(),
            "elastic": budgets_meta(spec, cfg, resolved, {b.name: b.fixed for b in resolved})}
    if tokenizer is not None:
        meta["data"] = {"tokenizer": tokenizer}
    save_checkpoint(directory, parent, None, None, 1, 0, meta)
    return directory


def export_budgets(parent, cfg, spec, resolved: list, directory: Path, dtype: torch.dtype) -> dict:
    """transformers models of every budget (`resolved`: the spec's fixed budgets), each
    loaded from the project's HF export of the budget's slice of `parent` (saved first as
    an elastic checkpoint, `save_elastic`)."""
    from transformers import NemotronHForCausalLM

    save_elastic(parent, cfg, spec, resolved, directory / "elastic")
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    models = {}
    for name in (b.name for b in resolved):
        hf_dir = slice_checkpoint(directory / "elastic", directory / f"hf-{name}", name, precision=precision, fmt="hf")
        model = NemotronHForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval().to(parent.embedding.word_embeddings.weight.device)
        model.generation_config.eos_token_id = None  # no early stop, as ours
        model.generation_config.pad_token_id = 0
        models[name] = model
    return models


def main(argv: list[str]) -> dict:
    args = dict(a.split("=", 1) for a in argv)
    model_name, spec = args.get("model", "small"), args.get("elastic", args.get("model", "small"))
    prompt_len, new, repeat = int(args.get("prompt", 128)), int(args.get("new", 32)), int(args.get("repeat", 5))
    batches = [int(b) for b in args.get("batches", "1,8").split(",")]
    think, answer = int(args.get("think", 64)), int(args.get("answer", 16))
    with_hf, with_contiguous, with_control = (args.get(k, "1") != "0" for k in ("hf", "contiguous", "control"))
    if "threads" in args:
        torch.set_num_threads(int(args["threads"]))
    job = compose_job("stage1", [f"model={model_name}", f"elastic={spec}", "elastic.teacher_checkpoint=unused"])
    cfg = job.model
    resolved = [b for b in validate_elastic(job.elastic, cfg) if not b.routed]
    budgets = {b.name: b.fixed for b in resolved}
    names = list(budgets)
    full, smallest = names[0], names[-1]
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    text = "".join(chr(32 + int(x)) for x in torch.randint(0, 95, (prompt_len,), generator=torch.Generator().manual_seed(1)))
    with distributed(), tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        parent = build_model(cfg, params_dtype=dtype).eval()
        hf = export_budgets(parent, cfg, job.elastic, resolved, Path(tmp), dtype) if with_hf else {}
        gen = ElasticGenerator(parent, cfg, budgets, _Vocab(cfg.vocab_size))
        contiguous = ElasticGenerator(parent, cfg, budgets, _Vocab(cfg.vocab_size), contiguous=True) if with_contiguous else None
        prompt = gen.encode(text)
        for name in names:  # warm-up: decoders and view models built, first calls paid
            ours(gen, name, [prompt[:8]], 3)
            if name in hf:
                theirs(hf[name], [prompt[:8]], 3)
            if contiguous is not None and name != full:
                ours(contiguous, name, [prompt[:8]], 3)
        runs = {}  # (who, budget, batch) -> {"prefill": [...], "decode": [...], "tokens": [...]}
        for r in range(repeat):
            for name in names:
                for b in batches:
                    contenders = [("ours", lambda: ours(gen, name, [prompt] * b, new))]
                    if name in hf:
                        contenders.append(("hf", lambda: theirs(hf[name], [prompt] * b, new)))
                    if contiguous is not None and name != full:
                        contenders.append(("contiguous", lambda: ours(contiguous, name, [prompt] * b, new)))
                    prefill_only = [("ours", lambda: ours(gen, name, [prompt] * b, 1))]
                    if name in hf:
                        prefill_only.append(("hf", lambda: theirs(hf[name], [prompt] * b, 1)))
                    for who, run in contenders[r % len(contenders):] + contenders[:r % len(contenders)]:  # rotate the order
                        p, d, tokens = run()
                        slot = runs.setdefault((who, name, b), {"prefill": [], "decode": [], "tokens": tokens})
                        slot["prefill"].append(p)
                        slot["decode"] += d
                    for who, run in prefill_only[::1 if r % 2 else -1]:  # a second prefill sample per run
                        runs[who, name, b]["prefill"].append(run()[0])
        rows = []
        for name in names:
            active = model_cost(cfg, budgets[name], "active_params") / model_cost(cfg, budgets[full], "active_params")
            for b in batches:
                o = runs["ours", name, b]
                row = {"budget": name, "batch": b, "active_ratio": active,
                       "prefill_tok_s": b * prompt_len / median(o["prefill"]), "decode_tok_s": b / median(o["decode"]),
                       "decode_vs_full": median(o["decode"]) / median(runs["ours", full, b]["decode"]),
                       "spread_ours": spread(o["decode"]), "prefill_spread_ours": spread(o["prefill"])}
                if ("hf", name, b) in runs:
                    t = runs["hf", name, b]
                    row.update(hf_prefill_tok_s=b * prompt_len / median(t["prefill"]), hf_decode_tok_s=b / median(t["decode"]),
                               same_tokens=o["tokens"] == t["tokens"], spread_hf=spread(t["decode"]),
                               prefill_spread_hf=spread(t["prefill"]))
                    row["prefill_vs_hf"] = row["prefill_tok_s"] / row["hf_prefill_tok_s"]
                    row["decode_vs_hf"] = row["decode_tok_s"] / row["hf_decode_tok_s"]
                if ("contiguous", name, b) in runs:
                    c = runs["contiguous", name, b]
                    row.update(contiguous_decode_tok_s=b / median(c["decode"]),
                               contiguous_speedup=median(o["decode"]) / median(c["decode"]),
                               contiguous_mib=contiguous.view_stats[name].copied_bytes / 2**20,
                               spread_contiguous=spread(c["decode"]))
                row["samples"] = {who: {k: runs[who, name, b][k] for k in ("prefill", "decode")}
                                  for who in ("ours", "hf", "contiguous") if (who, name, b) in runs}
                rows.append(row)
        control = budget_control(gen, text, smallest, full, think, answer, repeat) if with_control else None

    result = {"model": cfg.name, "spec": spec, "device": device, "dtype": str(dtype), "prompt": prompt_len, "new": new,
              "repeat": repeat, "rows": rows, "budget_control": control}
    report(result)
    if "json" in args:
        Path(args["json"]).write_text(json.dumps(result, indent=1))
    return result


def budget_control(gen: ElasticGenerator, text: str, small: str, large: str, think: int, answer: int, repeat: int) -> dict:
    """`budget_control` (S thinks `think` tokens, the delimiter forced, L re-prefills and
    answers) against L writing the same number of tokens alone, interleaved."""
    total = think + len(gen.tokenizer.encode(DELIMITER)) + answer
    prompt = gen.encode(text)

    def s_to_l():
        out = gen.budget_control(text, small, large, DELIMITER, max_think_tokens=think, max_answer_tokens=answer)
        assert sum(len(t) for t in out.token_ids) == total, "the trace stopped early: it must run to the cap"
        return out.phases[1].prefill_s

    def l_to_l():
        out, _ = gen.generate_ids([prompt], large, total)
        assert len(out[0]) == total

    s_to_l(), l_to_l()  # warm-up
    times = {"s_to_l": [], "l_to_l": []}
    reprefill = []
    for r in range(repeat):
        for name, fn in (("s_to_l", s_to_l), ("l_to_l", l_to_l))[::1 if r % 2 == 0 else -1]:
            _sync()
            start = time.perf_counter()
            value = fn()
            _sync()
            times[name].append(time.perf_counter() - start)
            if name == "s_to_l":
                reprefill.append(value)
    return {"think_budget": small, "answer_budget": large, "think_tokens": think, "answer_tokens": answer,
            "s_to_l_s": median(times["s_to_l"]), "l_to_l_s": median(times["l_to_l"]), "reprefill_s": median(reprefill),
            "ratio": median(times["s_to_l"]) / median(times["l_to_l"]),
            "spread": max(spread(times["s_to_l"]), spread(times["l_to_l"])),
            "faster_every_run": max(times["s_to_l"]) < min(times["l_to_l"])}


def report(result: dict) -> None:
    rows = result["rows"]
    print(f"generation: model {result['model']}, spec {result['spec']}, {result['dtype']}, {result['device']}; "
          f"prompt {result['prompt']} tokens, {result['new']} new tokens; median of {result['repeat']} interleaved runs")
    hf = "hf_decode_tok_s" in rows[0]
    print(f"{'budget':<8}{'batch':>6}{'active':>8} | {'prefill tok/s':>13}{'HF':>9}{'/ HF':>7}{'spread':>8} | {'decode tok/s':>12}"
          f"{'HF':>9}{'/ HF':>7}{'spread':>8} | {'time/full':>9}  target          | same tokens")
    smallest = rows[-1]["budget"]
    for r in rows:
        target = r["active_ratio"] + 0.15
        if r["active_ratio"] == 1.0:
            budget_verdict = "reference      "
        else:
            budget_verdict = f"<= {target:.3f} {'ok' if r['decode_vs_full'] <= target else 'MISSED':<6}"
        if hf:
            prefill = (f"{r['prefill_tok_s']:>13.1f}{r['hf_prefill_tok_s']:>9.1f}{r['prefill_vs_hf']:>7.2f}"
                       f"{max(r['prefill_spread_ours'], r['prefill_spread_hf']):>8.2f}")
            decode = (f"{r['decode_tok_s']:>12.1f}{r['hf_decode_tok_s']:>9.1f}{r['decode_vs_hf']:>7.2f}"
                      f"{max(r['spread_ours'], r['spread_hf']):>8.2f}")
        else:
            prefill = f"{r['prefill_tok_s']:>13.1f}{'':>16}{r['prefill_spread_ours']:>8.2f}"
            decode = f"{r['decode_tok_s']:>12.1f}{'':>16}{r['spread_ours']:>8.2f}"
        same = ("yes" if r["same_tokens"] else "NO") if hf else "-"
        print(f"{r['budget']:<8}{r['batch']:>6}{r['active_ratio']:>8.3f} | {prefill} | {decode} | "
              f"{r['decode_vs_full']:>9.3f}  {budget_verdict} | {same}")
    if hf:
        worst = {k: min(r[k] for r in rows) for k in ("decode_vs_hf", "prefill_vs_hf")}
        print(f"targets vs transformers (every budget and batch): decode >= 1.0: {'ok' if worst['decode_vs_hf'] >= 1 else 'MISSED'} "
              f"(lowest {worst['decode_vs_hf']:.2f}, goal 1.5), prefill >= 1.0: "
              f"{'ok' if worst['prefill_vs_hf'] >= 1 else 'MISSED'} (lowest {worst['prefill_vs_hf']:.2f})")
    one = [r for r in rows if r["budget"] == smallest and r["batch"] == 1]
    if one and one[0]["active_ratio"] < 1:
        r = one[0]
        print(f"smallest budget ({smallest}) batch-1 decode time / full: {r['decode_vs_full']:.3f} against active share "
              f"{r['active_ratio']:.3f} + 0.15: {'ok' if r['decode_vs_full'] <= r['active_ratio'] + 0.15 else 'MISSED'}")
    contiguous = [r for r in rows if "contiguous_speedup" in r]
    if contiguous:
        print("contiguous copies of the strided weights (opt-in), decode against the views:")
        for r in contiguous:
            print(f"  {r['budget']:<8} batch {r['batch']:<3} views {r['decode_tok_s']:8.1f} tok/s, contiguous "
                  f"{r['contiguous_decode_tok_s']:8.1f} tok/s: {r['contiguous_speedup']:.3f}x for {r['contiguous_mib']:.1f} MiB more "
                  f"(spread {r['spread_contiguous']:.2f})")
    c = result["budget_control"]
    if c:
        verdict = "faster" if c["ratio"] < 1 else "NOT faster"
        print(f"budget control: {c['think_budget']} thinks {c['think_tokens']} tokens, {c['answer_budget']} answers "
              f"{c['answer_tokens']}: budget_control {c['s_to_l_s']:.3f} s (its re-prefill of prompt + trace "
              f"{c['reprefill_s']:.3f} s) vs {c['answer_budget']} alone {c['l_to_l_s']:.3f} s: {c['ratio']:.3f}x ({verdict}"
              f"{', in every run' if c['faster_every_run'] else ''}; spread {c['spread']:.2f})")


if __name__ == "__main__":
    main(sys.argv[1:])
