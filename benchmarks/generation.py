"""Generation speed against transformers (and llama.cpp, when a build is given) on the same
weights, per budget, and elastic budget control against the largest budget alone: one run
on one device, every measurement interleaved with the one it is compared to and repeated
(random weights: speed does not depend on them).

    python benchmarks/generation.py                                   # small preset, its elastic spec
    python benchmarks/generation.py --model tiny --elastic tiny --prompt 64 --new 16 --repeat 3
    python benchmarks/generation.py --batches 1,8,16 --think 128 --answer 32
    python benchmarks/generation.py --no-hf --no-contiguous --no-control   # leave parts out
    python benchmarks/generation.py --threads 1                       # torch threads (default: torch's)
    python benchmarks/generation.py --compile                         # also the compiled decode step
    python benchmarks/generation.py --llama-cpp ~/llama.cpp           # also llama.cpp on a GGUF of each export
    python benchmarks/generation.py --full-only --compile model.hidden_size=512 model.hybrid_pattern=MEM*EMEM*EME
                                                                      # any model: Hydra overrides of model.*

The parent is saved as an elastic checkpoint and each budget is exported with the
project's exporter (slice_checkpoint(..., fmt="hf")); transformers' NemotronHForCausalLM
loads that export. Ours is `ElasticGenerator.generate_ids` on views of the one parent
(`--compile`: a second generator whose decoders run the compiled step, interleaved).
Both are timed the same way, from one call of their generate: prefill = call to the first
new token (setup, prompt forward, first pick); decode = the time between consecutive new
tokens (token callbacks for ours, a streamer for transformers), `new` - 1 steps per call.
Greedy, no early stop, `batch` copies of one `prompt`-token prompt. Printed per budget and batch: tokens/s of
both and ours / theirs (targets: decode >= 1.0, prefill >= 1.0), the budget's decode time
against the full budget's next to its share of active parameters (target: share + 0.15),
and whether our tokens equal theirs.

`--llama-cpp DIR` (a llama.cpp checkout with its build: DIR/convert_hf_to_gguf.py and
llama-batched-bench in DIR/build/bin, DIR/bin or DIR) converts each budget's HF export to
a GGUF of the same precision (`convert_hf_to_gguf.py --outtype f32|bf16`; its Python
requirements must be installed) and times `llama-batched-bench` on it in every round,
next to the others: prompt `prompt` tokens, `new` tokens, every batch size, the same
threads. Its decode tokens/s is total generated tokens over generation time; its tokens
are not compared (it decodes dummy prompts).

`--contiguous` (default) also decodes each smaller budget with its strided weights copied
contiguous (ElasticGenerator.contiguous), interleaved with the views, and prints the memory
that costs. `--control` (default) times `budget_control` itself (the smallest budget thinks
`think` tokens, forced delimiter, the largest re-prefills prompt + trace and answers
`answer` tokens) against the largest budget writing as many tokens alone (L->L).
Prefill: the median over 2 x `repeat` calls (one more call per run, with one new token);
decode: the median step over all steps of all
calls (robust to the stalls of a shared machine); `spread` is the interquartile range of
the samples over their median, the larger of each compared pair: how noisy the run was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from elastic_megatron.checkpoint.store import save_checkpoint  # noqa: E402
from elastic_megatron.cli import run_tool, tool_parser  # noqa: E402
from elastic_megatron.config.errors import ConfigError  # noqa: E402
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


def export_budgets(parent, cfg, spec, resolved: list, directory: Path, dtype: torch.dtype) -> dict[str, Path]:
    """The project's HF export of every budget's slice of `parent` (`resolved`: the spec's
    fixed budgets), saved first as an elastic checkpoint (`save_elastic`) with the byte
    tokenizer, so that each export carries a tokenizer.json (llama.cpp's converter needs one)."""
    save_elastic(parent, cfg, spec, resolved, directory / "elastic", tokenizer={"type": "byte"})
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    return {b.name: slice_checkpoint(directory / "elastic", directory / f"hf-{b.name}", b.name, precision=precision, fmt="hf")
            for b in resolved}


def hf_models(exports: dict[str, Path], dtype: torch.dtype, device) -> dict:
    """transformers' NemotronHForCausalLM of each export, never stopping early (as ours)."""
    from transformers import NemotronHForCausalLM

    models = {}
    for name, hf_dir in exports.items():
        model = NemotronHForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval().to(device)
        model.generation_config.eos_token_id = None  # no early stop, as ours
        model.generation_config.pad_token_id = 0
        models[name] = model
    return models


class LlamaCpp:
    """A llama.cpp checkout with its build: GGUF conversion and llama-batched-bench."""

    def __init__(self, directory: str):
        root = Path(directory).expanduser()
        self.convert = root / "convert_hf_to_gguf.py"
        if not self.convert.is_file():
            raise ConfigError("--llama-cpp", directory, "must be a llama.cpp checkout (holding convert_hf_to_gguf.py)")
        found = [d / "llama-batched-bench" for d in (root / "build" / "bin", root / "bin", root)
                 if (d / "llama-batched-bench").is_file()]
        if not found:
            raise ConfigError("--llama-cpp", directory, "has no llama-batched-bench in build/bin, bin or itself: build it "
                              "first (cmake -B build && cmake --build build --target llama-batched-bench)")
        self.bench = found[0]

    def gguf(self, hf_dir: Path, dtype: torch.dtype) -> Path:
        out = hf_dir.with_suffix(".gguf")
        outtype = "bf16" if dtype == torch.bfloat16 else "f32"
        proc = subprocess.run([sys.executable, str(self.convert), str(hf_dir), "--outtype", outtype, "--outfile", str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"llama.cpp's convert_hf_to_gguf.py failed on {hf_dir.name}:\n{proc.stderr[-3000:]}")
        return out

    def time(self, gguf: Path, prompt: int, new: int, batches: list[int], threads: int) -> dict[int, tuple[float, float]]:
        """{batch: (prefill tok/s, decode tok/s)} of one llama-batched-bench run (every
        batch size; prompts not shared, as ours prefill every copy)."""
        cmd = [str(self.bench), "-m", str(gguf), "-c", str(max(batches) * (prompt + new) + 16), "-b", "2048", "-ub", "512",
               "-npp", str(prompt), "-ntg", str(new), "-npl", ",".join(map(str, batches)), "-t", str(threads),
               "-tb", str(threads), "--output-format", "jsonl"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"llama-batched-bench failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        speeds = {}
        for line in (proc.stdout + "\n" + proc.stderr).splitlines():  # its log may go to either stream
            if '"speed_tg"' in line:
                row = json.loads(line[line.index("{"):])
                speeds[int(row["pl"])] = (float(row["speed_pp"]), float(row["speed_tg"]))
        missing = [b for b in batches if b not in speeds]
        if missing:
            raise RuntimeError(f"llama-batched-bench printed no result for batch {missing} ({' '.join(cmd)})")
        return speeds


def parse(argv: list[str] | None = None):
    parser = tool_parser(__doc__, whole_doc=True)
    parser.add_argument("--model", default="small", help="model preset (recipes/model/), default small")
    parser.add_argument("--elastic", default=None, help="elastic spec (recipes/elastic/) of the budgets; default: the "
                        "model's name")
    parser.add_argument("--full-only", action="store_true", help="the full model alone, no smaller budget (any model, "
                        "e.g. one changed by overrides)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--new", type=int, default=32, help="new tokens per call (default 32)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--batches", default="1,8", help="batch sizes, comma-separated (default 1,8)")
    parser.add_argument("--think", type=int, default=64, help="budget control: thinking tokens (default 64)")
    parser.add_argument("--answer", type=int, default=16, help="budget control: answer tokens (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch (and llama.cpp) threads (default: torch's)")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="leave transformers out")
    parser.add_argument("--no-contiguous", dest="contiguous", action="store_false", help="leave contiguous budgets out")
    parser.add_argument("--no-control", dest="control", action="store_false", help="leave budget control out")
    parser.add_argument("--compile", action="store_true", help="also decode with the compiled step (HybridDecoder "
                        "compiled=True), interleaved; its compile is paid in the warm-up")
    parser.add_argument("--llama-cpp", default=None, metavar="DIR", help="also llama.cpp on a GGUF of each budget's "
                        "export: a checkout with convert_hf_to_gguf.py and a built llama-batched-bench")
    parser.add_argument("--json", default=None, help="write the results (raw samples too) to this file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides of the job (model.hidden_size=512 ...)")
    args = parser.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise ConfigError("--batches", args.batches, "comma-separated positive integers") from None
    for key in ("prompt", "new", "repeat", "threads", "think", "answer"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ConfigError(f"--{key}", value, "must be a positive integer")
    if min(args.batches) < 1:
        raise ConfigError("--batches", args.batches, "comma-separated positive integers")
    if args.new < 2:
        raise ConfigError("--new", args.new, "at least 2 (decode steps are the times between new tokens)")
    return args


def main(argv: list[str] | None = None) -> int:
    parser_args = sys.argv[1:] if argv is None else argv
    try:
        args = parse(parser_args)
    except ConfigError as err:  # bad input before anything is built: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_tool(args, lambda: measure(args), lambda result: "")


def measure(args) -> dict:
    model_name, spec = args.model, args.elastic or args.model
    prompt_len, new, repeat, batches = args.prompt, args.new, args.repeat, args.batches
    think, answer = args.think, args.answer
    llama = LlamaCpp(args.llama_cpp) if args.llama_cpp else None  # checked before anything is built
    if args.threads:
        torch.set_num_threads(args.threads)
    only_full = [f"elastic.budgets=[{{name:full,target_kind:total_params,target:null,widths:{{}}}}]"] if args.full_only else []
    job = compose_job("stage1", [f"model={model_name}", f"elastic={spec}", "elastic.teacher_checkpoint=unused", *args.overrides,
                                 *only_full])
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
        exports = export_budgets(parent, cfg, job.elastic, resolved, Path(tmp), dtype) if args.hf or llama else {}
        hf = hf_models(exports, dtype, parent.embedding.word_embeddings.weight.device) if args.hf else {}
        ggufs = {name: llama.gguf(path, dtype) for name, path in exports.items()} if llama else {}
        gen = ElasticGenerator(parent, cfg, budgets, _Vocab(cfg.vocab_size))
        compiled = ElasticGenerator(parent, cfg, budgets, _Vocab(cfg.vocab_size), compiled=True) if args.compile else None
        contiguous = (ElasticGenerator(parent, cfg, budgets, _Vocab(cfg.vocab_size), contiguous=True)
                      if args.contiguous and len(names) > 1 else None)
        prompt = gen.encode(text)
        compile_s = {}
        for name in names:  # warm-up: decoders and view models built, first calls paid (compiles too)
            ours(gen, name, [prompt[:8]], 3)
            if name in hf:
                theirs(hf[name], [prompt[:8]], 3)
            if contiguous is not None and name != full:
                ours(contiguous, name, [prompt[:8]], 3)
            for b in batches if compiled is not None else ():
                begin = time.perf_counter()
                ours(compiled, name, [prompt[:8]] * b, 3)
                compile_s[name, b] = time.perf_counter() - begin
        threads = args.threads or torch.get_num_threads()
        runs = {}  # (who, budget, batch) -> {"prefill": [...], "decode": [...], "tokens": [...]}
        llama_runs = {}  # (budget, batch) -> {"prefill_tok_s": [...], "decode_tok_s": [...]}
        for r in range(repeat):
            for name in names:
                for b in batches:
                    contenders = [("ours", lambda: ours(gen, name, [prompt] * b, new))]
                    if compiled is not None:
                        contenders.append(("compiled", lambda: ours(compiled, name, [prompt] * b, new)))
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
                if name in ggufs:  # every batch size in one llama.cpp run, in the same round
                    for b, (pp, tg) in llama.time(ggufs[name], prompt_len, new, batches, threads).items():
                        slot = llama_runs.setdefault((name, b), {"prefill_tok_s": [], "decode_tok_s": []})
                        slot["prefill_tok_s"].append(pp)
                        slot["decode_tok_s"].append(tg)
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
                if ("compiled", name, b) in runs:
                    c = runs["compiled", name, b]
                    row.update(compiled_decode_tok_s=b / median(c["decode"]), spread_compiled=spread(c["decode"]),
                               compiled_same_tokens=c["tokens"] == o["tokens"], compile_s=compile_s[name, b])
                if (name, b) in llama_runs:
                    ll = llama_runs[name, b]
                    row.update(llama_prefill_tok_s=median(ll["prefill_tok_s"]), llama_decode_tok_s=median(ll["decode_tok_s"]),
                               spread_llama=spread(ll["decode_tok_s"]))
                if ("contiguous", name, b) in runs:
                    c = runs["contiguous", name, b]
                    row.update(contiguous_decode_tok_s=b / median(c["decode"]),
                               contiguous_speedup=median(o["decode"]) / median(c["decode"]),
                               contiguous_mib=contiguous.view_stats[name].copied_bytes / 2**20,
                               spread_contiguous=spread(c["decode"]))
                row["samples"] = {who: {k: runs[who, name, b][k] for k in ("prefill", "decode")}
                                  for who in ("ours", "compiled", "hf", "contiguous") if (who, name, b) in runs}
                if (name, b) in llama_runs:
                    row["samples"]["llama_cpp"] = llama_runs[name, b]
                rows.append(row)
        control = budget_control(gen, text, smallest, full, think, answer, repeat) if args.control and len(names) > 1 else None

    result = {"model": cfg.name, "spec": spec, "overrides": list(args.overrides), "device": device, "dtype": str(dtype),
              "prompt": prompt_len, "new": new, "repeat": repeat, "load": os.getloadavg() if hasattr(os, "getloadavg") else None,
              "rows": rows, "budget_control": control}
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
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
    changed = f" ({' '.join(result['overrides'])})" if result.get("overrides") else ""
    print(f"generation: model {result['model']}{changed}, spec {result['spec']}, {result['dtype']}, {result['device']}; "
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
    if "compiled_decode_tok_s" in rows[0] or "llama_decode_tok_s" in rows[0]:
        print("decode tok/s side by side (ratios: compiled over the others):")
        print(f"{'budget':<8}{'batch':>6} | {'eager':>8}{'compiled':>9}{'HF':>9}{'llama.cpp':>10} | {'/ eager':>8}{'/ HF':>7}"
              f"{'/ llama':>8} | compile s | same tokens")
        for r in rows:
            best = r.get("compiled_decode_tok_s", r["decode_tok_s"])
            cell = lambda key, width: f"{r[key]:>{width}.1f}" if key in r else f"{'-':>{width}}"  # noqa: E731
            ratio = lambda key, width: f"{best / r[key]:>{width}.2f}" if key in r else f"{'-':>{width}}"  # noqa: E731
            same = ("yes" if r["compiled_same_tokens"] else "NO") if "compiled_same_tokens" in r else "-"
            compile_s = f"{r['compile_s']:>9.1f}" if "compile_s" in r else f"{'-':>9}"
            print(f"{r['budget']:<8}{r['batch']:>6} | {r['decode_tok_s']:>8.1f}{cell('compiled_decode_tok_s', 9)}"
                  f"{cell('hf_decode_tok_s', 9)}{cell('llama_decode_tok_s', 10)} | {ratio('decode_tok_s', 8)}"
                  f"{ratio('hf_decode_tok_s', 7)}{ratio('llama_decode_tok_s', 8)} | {compile_s} | {same}")
    if result.get("load"):
        print(f"load average during the run (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in result['load'])}")
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
    sys.exit(main())
