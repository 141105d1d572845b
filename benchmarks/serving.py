"""The server against the bare generator: aggregate tokens/s, time to first token and
inter-token latency through real HTTP on 127.0.0.1, 1/4/8/16 concurrent clients per budget
and over mixed budgets, next to `ElasticGenerator.generate_ids` at batch 1 and batch 8 in the
same run (random weights: speed does not depend on them).

    python benchmarks/serving.py                                   # small preset, its elastic spec
    python benchmarks/serving.py --model tiny --elastic tiny --prompt 32 --new 16 --repeat 3
    python benchmarks/serving.py --clients 1,8 --budgets full --repeat 5 --json serving.json
    python benchmarks/serving.py --front-end --clients 1 --repeat 5  # the front end over upstreams vs direct

The parent is saved as an elastic checkpoint; the server is tools/serve.py on it in its own
process (--max-batch = the most clients, so every client decodes in one batch), the clients
are asyncio + httpx in this process, each streaming `requests` completions one after the
other (`new` greedy tokens of its own `prompt`-token prompt; `logprobs=0` so every token
arrives as its own chunk, however its bytes split into characters). The bare generator runs
in this process on the same checkpoint with the same prompts. Every round runs every
configuration once, the order rotated between rounds; tokens/s are medians over rounds
(spread = (max - min) / median says how noisy the machine was), latency percentiles are over
all requests and tokens of all rounds.

Per request: TTFT = request sent -> first token received (bare: call -> first token, its
prefill); ITL = between consecutive tokens of one request; e2e = request -> last token.
Targets (issue 28): 8 concurrent clients >= 3x the aggregate tokens/s of one client; server
overhead at one client <= 10% (e2e of one request through the server / the bare generator's
batch-1 e2e for the same prompt and tokens).

--front-end: the front end (tools/serve.py --upstreams) over that server as the upstream of
every budget, against the same upstream called directly, side by side in each round: what
the front end adds per request (e2e, TTFT) and per streamed token (ITL), and budget control
end to end (think at the smallest budget, answer at the largest: the front end's two
upstream calls with the trace as token ids, against the upstream's own budget control).
Target (issue 36): <= 5% added e2e latency per request at one client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import torch  # noqa: E402

from elastic_megatron.elastic.budgets import validate_elastic  # noqa: E402
from elastic_megatron.inference.generator import ElasticGenerator  # noqa: E402
from elastic_megatron.models.hybrid import build_model  # noqa: E402
from elastic_megatron.parallel.setup import distributed  # noqa: E402
from elastic_megatron.train import compose_job  # noqa: E402
from generation import median, save_elastic, spread  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIXED = "mixed"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


CONTROL = "control"


def start_server(checkpoint: Optional[Path], max_batch: int, log: Path, *options: str) -> tuple[subprocess.Popen, str]:
    source = ["--checkpoint", str(checkpoint)] if checkpoint is not None else []
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "serve.py"), *source, "--port", "0",
                             "--model-name", "bench", "--max-batch", str(max_batch), "--max-queue", "256", *options],
                            stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline()
    if not line.startswith("serving bench on "):
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}\n{log.read_text()[-3000:]}")
    return proc, line.split()[-1].removesuffix("/v1")


def cpu_seconds(proc: subprocess.Popen) -> float:
    """User + system CPU time of a process (its threads included) so far."""
    import psutil

    t = psutil.Process(proc.pid).cpu_times()
    return t.user + t.system


def bare(gen: ElasticGenerator, budget: str, prompts: list[list[int]], new: int) -> dict:
    """One generate_ids call: per sequence TTFT (its prefill), ITLs, e2e; tokens; wall seconds."""
    ticks: list[list[float]] = [[] for _ in prompts]
    start = time.perf_counter()
    out, _ = gen.generate_ids(prompts, budget, new, on_token=lambda i, _: ticks[i].append(time.perf_counter()))
    wall = time.perf_counter() - start
    return {"ttft": [t[0] - start for t in ticks if t], "itl": [b - a for t in ticks for a, b in zip(t, t[1:])],
            "e2e": [t[-1] - start for t in ticks if t], "tokens": sum(len(o) for o in out), "seconds": wall,
            "token_ids": out}


async def through_server(url: str, budgets: list[str], prompts: list[str], new: int, requests: int,
                         control: Optional[tuple[str, str]] = None) -> dict:
    """Client i streams `requests` completions of prompts[i] at budgets[i], one after the other;
    `control` (think, answer): budget control instead, `new` tokens in each phase (no log-probs
    with budget control: a chunk with text is a token's arrival)."""
    records = []

    async def client_loop(client: httpx.AsyncClient, budget: str, prompt: str):
        for _ in range(requests):
            times = []
            body = {"model": f"bench:{budget}", "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
                    "logprobs": 0, "return_tokens_as_token_ids": True}
            if control:
                body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True, "think_budget": control[0],
                        "answer_budget": control[1], "max_think_tokens": new}
            start = time.perf_counter()
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:500]!r}")
                ids = []
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        choice = json.loads(line[6:])["choices"][0]
                        logprobs = choice["logprobs"]
                        if logprobs and logprobs["tokens"]:
                            times.append(time.perf_counter())
                            ids += [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
                        elif control and choice["text"]:
                            times.append(time.perf_counter())
                            ids.append(choice["text"])
            records.append({"ttft": times[0] - start, "itl": [b - a for a, b in zip(times, times[1:])],
                            "e2e": times[-1] - start, "tokens": len(times), "budget": budget, "token_ids": ids})

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client, b, p) for b, p in zip(budgets, prompts)))
        wall = time.perf_counter() - start
    return {"ttft": [r["ttft"] for r in records], "itl": [x for r in records for x in r["itl"]],
            "e2e": [r["e2e"] for r in records], "tokens": sum(r["tokens"] for r in records), "seconds": wall,
            "records": records}


def ratios(runs: dict, a: tuple[str, int], b: tuple[str, int], modes: list[str], what: str) -> dict:
    """Per mode: (median over rounds of the round's a / b, spread of those ratios). `what`:
    aggregate tok/s, or the median e2e or inter-token latency of the round's requests."""
    def value(x):
        return x["tokens"] / x["seconds"] if what == "tok_s" else median(x[what])

    out = {}
    for m in modes:
        if (a[0], m, a[1]) in runs and (b[0], m, b[1]) in runs:
            rs = [value(x) / value(y) for x, y in zip(runs[a[0], m, a[1]], runs[b[0], m, b[1]])]
            out[m] = (median(rs), spread(rs))
    return out


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def counts(text: str) -> list[int]:
    return [positive(c) for c in text.split(",")]


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="model preset (recipes/model/<name>.yaml)")
    ap.add_argument("--elastic", default=None, help="elastic spec (recipes/elastic/<name>.yaml; default: --model's)")
    ap.add_argument("--prompt", type=positive, default=64, help="prompt tokens")
    ap.add_argument("--new", type=positive, default=32, help="new tokens per request (per phase with budget control)")
    ap.add_argument("--repeat", type=positive, default=3, help="rounds")
    ap.add_argument("--clients", type=counts, default=[1, 4, 8, 16], help="concurrent clients, comma-separated")
    ap.add_argument("--requests", type=positive, default=1, help="requests per client, one after the other")
    ap.add_argument("--budgets", default=None, help="budgets, comma-separated (default: every budget of the spec)")
    ap.add_argument("--no-mixed", action="store_true", help="leave out the clients over mixed budgets")
    ap.add_argument("--front-end", action="store_true", help="the front end over upstreams against the upstreams "
                    "called directly (instead of the server against the bare generator)")
    ap.add_argument("--json", default=None, help="also write the results here")
    return ap.parse_args(argv)


def main(argv: list[str]) -> dict:
    args = parse(argv)
    spec = args.elastic or args.model
    prompt_len, new, repeat, client_counts, requests = args.prompt, args.new, args.repeat, args.clients, args.requests
    job = compose_job("stage1", [f"model={args.model}", f"elastic={spec}", "elastic.teacher_checkpoint=unused"])
    cfg = job.model
    resolved = [b for b in validate_elastic(job.elastic, cfg) if not b.routed]
    names = args.budgets.split(",") if args.budgets else [b.name for b in resolved]
    unknown = [n for n in names if n not in [b.name for b in resolved]]
    if unknown:
        sys.exit(f"error: --budgets {','.join(unknown)}: allowed: {[b.name for b in resolved]}")
    modes = names + ([MIXED] if len(names) > 1 and not args.no_mixed else [])
    if args.front_end and len(names) > 1:
        modes = names + [CONTROL]
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    g = torch.Generator().manual_seed(1)
    texts = ["".join(chr(32 + int(x)) for x in torch.randint(0, 95, (prompt_len,), generator=g)) for _ in range(max(client_counts))]
    control = (names[-1], names[0])  # think at the smallest budget, answer at the largest
    with distributed(), tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)  # a random parent: the speed of its budgets does not depend on training
        parent = build_model(cfg, params_dtype=dtype).eval()
        checkpoint = save_elastic(parent, cfg, job.elastic, resolved, Path(tmp) / "elastic", tokenizer={"type": "byte"})
        gen = ElasticGenerator.from_checkpoint(checkpoint, dtype=dtype)
        prompts = [gen.encode(t) for t in texts]
        server, url = start_server(checkpoint, max(client_counts), Path(tmp) / "server.log")
        front = None
        try:
            if args.front_end:  # the front end: every budget an upstream budget of that server, by its model id
                fleet = Path(tmp) / "fleet.yaml"
                fleet.write_text(json.dumps({"tokenizer": str(checkpoint), "upstreams": {
                    b: {"url": url + "/v1", "model": f"bench:{b}"} for b in names}}))
                front, front_url = start_server(None, max(client_counts), Path(tmp) / "front.log", "--upstreams", str(fleet))

            def run(who, mode, n):
                if who == "bare":
                    return bare(gen, mode, [prompts[i % len(prompts)] for i in range(n)], new)
                per_client = [names[i % len(names)] if mode == MIXED else mode for i in range(n)]
                return asyncio.run(through_server(front_url if who == "front" else url, per_client, texts[:n], new, requests,
                                                  control if mode == CONTROL else None))

            # Everything compared sits side by side in time (one budget's group), so the ratios
            # of one round share the machine's load.
            if args.front_end:
                groups = [[(who, m, c) for c in client_counts for who in ("server", "front")] for m in modes]
            else:
                groups = [[("bare", m, 1), ("bare", m, 8)] * (m != MIXED) + [("server", m, c) for c in client_counts]
                          for m in modes]
            warm = {(who, m) for group in groups for who, m, _ in group}
            for who, mode in sorted(warm):  # warm-up: first calls
                run(who, mode, 1)
            cpu_before = {name: cpu_seconds(p) for name, p in (("front", front), ("server", server)) if p is not None}
            runs: dict = {}
            for r in range(repeat):
                for group in groups[r % len(groups):] + groups[:r % len(groups)]:
                    for who, mode, n in group[r % len(group):] + group[:r % len(group)]:
                        result = run(who, mode, n)
                        runs.setdefault((who, mode, n), []).append(result)
                        print(f"  round {r + 1}/{repeat}: {who:<6} {mode:<7} {n:>2}  {result['tokens'] / result['seconds']:8.1f} tok/s",
                              file=sys.stderr, flush=True)
            cpu = {name: cpu_seconds(p) - cpu_before[name] for name, p in (("front", front), ("server", server))
                   if p is not None}
        finally:
            for proc in (front, server):
                if proc is not None:
                    proc.terminate()
                    proc.wait(120)

    rows = []
    for (who, mode, n), results in runs.items():
        rates = [x["tokens"] / x["seconds"] for x in results]
        rows.append({"who": who, "mode": mode, "n": n, "tok_s": median(rates), "spread": spread(rates),
                     "ttft_p50": percentile([t for x in results for t in x["ttft"]], 50),
                     "ttft_p99": percentile([t for x in results for t in x["ttft"]], 99),
                     "itl_p50": percentile([t for x in results for t in x["itl"]], 50),
                     "itl_p99": percentile([t for x in results for t in x["itl"]], 99),
                     "e2e_p50": percentile([t for x in results for t in x["e2e"]], 50)})
    result = {"model": cfg.name, "spec": spec, "device": device, "dtype": str(dtype), "prompt": prompt_len, "new": new,
              "repeat": repeat, "requests": requests, "rows": rows, "front_end": args.front_end}
    if args.front_end:
        through_front = sum(x["tokens"] for (who, _, _), results in runs.items() if who == "front" for x in results)
        every = sum(x["tokens"] for (who, _, _), results in runs.items() for x in results)
        # CPU time per streamed token: what the front end costs whatever the machine's load
        result["cpu_ms_per_token"] = {"front": 1000 * cpu["front"] / through_front, "upstream": 1000 * cpu["server"] / every}
        reference = {m: runs["server", m, client_counts[0]][0]["records"][0]["token_ids"] for m in modes}
        result.update({
            "same_tokens_at_one_client": all(rec["token_ids"] == reference[mode] for (who, mode, n), results in runs.items()
                                             if n == client_counts[0] for x in results for rec in x["records"]),
            "overhead": {c: ratios(runs, ("front", c), ("server", c), modes, "e2e") for c in client_counts},
            "itl_overhead": {c: ratios(runs, ("front", c), ("server", c), modes, "itl") for c in client_counts},
            "ttft_added": {c: {m: median([median(f["ttft"]) - median(d["ttft"]) for f, d in
                                          zip(runs["front", m, c], runs["server", m, c])]) for m in modes}
                           for c in client_counts}})
    else:
        result.update({
            "same_tokens_at_one_client": all(
                rec["token_ids"] == runs["bare", rec["budget"], 1][0]["token_ids"][0]
                for (who, mode, n), results in runs.items() if who == "server" and n == 1 and mode != MIXED
                for x in results for rec in x["records"]),
            "scaling_8": ratios(runs, ("server", 8), ("server", 1), modes, "tok_s"),
            "bare_scaling_8": ratios(runs, ("bare", 8), ("bare", 1), names, "tok_s"),
            "vs_bare_8": ratios(runs, ("server", 8), ("bare", 8), names, "tok_s"),
            "overhead_1": ratios(runs, ("server", 1), ("bare", 1), names, "e2e"),
            "itl_overhead_1": ratios(runs, ("server", 1), ("bare", 1), names, "itl")})
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def report(result: dict) -> None:
    print(f"serving: model {result['model']}, spec {result['spec']}, {result['dtype']}, {result['device']}; prompt "
          f"{result['prompt']} tokens, {result['new']} new tokens, {result['requests']} request(s) per client; median of "
          f"{result['repeat']} interleaved rounds (percentiles over all rounds)")
    print(f"{'':<7}{'budget':<8}{'batch':>6} | {'tok/s':>8}{'x one':>7}{'spread':>8} | {'TTFT p50':>9}{'p99':>8} | "
          f"{'ITL p50':>8}{'p99':>8} | {'e2e p50':>8}  (seconds)")
    rows = sorted(result["rows"], key=lambda r: (r["who"], r["mode"] == MIXED, r["mode"], r["n"]))
    one = {(r["who"], r["mode"]): r["tok_s"] for r in rows if r["n"] == 1}
    for r in rows:
        print(f"{r['who']:<7}{r['mode']:<8}{r['n']:>6} | {r['tok_s']:>8.1f}{r['tok_s'] / one[r['who'], r['mode']]:>7.2f}"
              f"{r['spread']:>8.2f} | {r['ttft_p50']:>9.3f}{r['ttft_p99']:>8.3f} | {r['itl_p50']:>8.4f}{r['itl_p99']:>8.4f} | "
              f"{r['e2e_p50']:>8.3f}")
    def show(key, target, fmt, where=None):
        values = (where or result)[key]
        return ", ".join(f"{m} {fmt(x)} ({'ok' if target(x) else 'MISSED'}, spread {sp:.2f})" for m, (x, sp) in values.items())

    if result["front_end"]:
        print("per-round ratios of runs side by side in time, median over rounds (front end / the upstream called directly):")
        for c in result["overhead"]:
            print(f"  {c} client(s): added e2e per request (target <= +5% at one client): "
                  + show(c, lambda x: x <= 1.05, lambda x: f"{(x - 1) * 100:+.1f}%", result["overhead"]))
            print(f"  {c} client(s): added latency per streamed token (ITL): " + ", ".join(
                f"{m} {(x - 1) * 100:+.1f}%" for m, (x, _) in result["itl_overhead"][c].items())
                  + "; added TTFT: " + ", ".join(f"{m} {x * 1000:+.1f} ms" for m, x in result["ttft_added"][c].items()))
        c = result["cpu_ms_per_token"]
        print(f"CPU time per streamed token (all rounds): front end {c['front']:.2f} ms, the upstream {c['upstream']:.2f} ms "
              f"(front end / upstream: {c['front'] / c['upstream'] * 100:.1f}%)")
        print(f"tokens through the front end == the upstream's own: {'yes' if result['same_tokens_at_one_client'] else 'NO'}")
        return
    print("per-round ratios of runs side by side in time, median over rounds:")
    print("  server, 8 clients / 1 client, aggregate tok/s (target >= 3x): " + show("scaling_8", lambda x: x >= 3, "{:.2f}x".format))
    print("  bare generator, batch 8 / batch 1: " + ", ".join(f"{m} {x:.2f}x" for m, (x, _) in result["bare_scaling_8"].items())
          + "; server at 8 clients / bare at batch 8: " + ", ".join(f"{m} {x:.2f}" for m, (x, _) in result["vs_bare_8"].items()))
    print("  server overhead at one client, e2e / the bare generator's at batch 1 (target <= +10%): "
          + show("overhead_1", lambda x: x <= 1.10, lambda x: f"{(x - 1) * 100:+.1f}%"))
    print("  the same for the inter-token latency: "
          + show("itl_overhead_1", lambda x: x <= 1.10, lambda x: f"{(x - 1) * 100:+.1f}%"))
    print(f"greedy tokens through the server == the bare generator's: {'yes' if result['same_tokens_at_one_client'] else 'NO'}")


if __name__ == "__main__":
    main(sys.argv[1:])
