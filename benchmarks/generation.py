"""Generation speed per budget, and elastic budget control against the full model alone,
measured in one run on one device (random weights: speed does not depend on them).

    python benchmarks/generation.py                              # small preset, its elastic spec
    python benchmarks/generation.py model=tiny elastic=tiny prompt=256 new=64
    python benchmarks/generation.py think=128 answer=32          # budget control: trace 4x the answer
    python benchmarks/generation.py batch=16                     # decode throughput of 16 sequences

Per budget (views of one parent, inference/budgets.py): prefill tokens/s of a `prompt`-token
prompt and decode tokens/s over `new` tokens, each the median of `repeat` runs, and the
ratio of the budget's decode (prefill) time to the full model's next to its ratio of active
parameters; decode also for `batch` sequences at once (default 8), where weight traffic
rather than per-call dispatch sets the pace. Budget control: the smallest budget thinks `think` tokens and the largest
answers `answer` tokens after re-prefilling prompt + trace (S->L), against the largest
budget doing both (L->L), on the same prompt; the re-prefill is shown on its own.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from elastic_megatron.elastic.budgets import validate_elastic  # noqa: E402
from elastic_megatron.elastic.widths import model_cost  # noqa: E402
from elastic_megatron.inference.generator import ElasticGenerator  # noqa: E402
from elastic_megatron.models.hybrid import build_model  # noqa: E402
from elastic_megatron.parallel.setup import distributed  # noqa: E402
from elastic_megatron.train import compose_job  # noqa: E402


class _Vocab:
    """Stands in for a tokenizer: ids only, no end-of-document stop."""

    def __init__(self, size: int):
        self.vocab_size, self.eod = size, -1


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def prefill_s(dec, prompt, repeat, batch: int = 1) -> float:
    return timed(lambda: dec.prefill([prompt] * batch, 0), repeat)


def decode_s(dec, prompt, new: int, batch: int = 1) -> float:
    """Seconds for `new` greedy decode steps of `batch` sequences after the prompt."""
    logits, state = dec.prefill([prompt] * batch, new)
    _sync()
    start = time.perf_counter()
    for _ in range(new):
        logits = dec.step(logits.argmax(-1), state)
    _sync()
    return time.perf_counter() - start


def main(argv: list[str]) -> dict:
    args = dict(a.split("=", 1) for a in argv)
    model_name, spec = args.get("model", "small"), args.get("elastic", args.get("model", "small"))
    prompt_len, new, repeat = int(args.get("prompt", 128)), int(args.get("new", 32)), int(args.get("repeat", 5))
    think, answer = int(args.get("think", 4 * 16)), int(args.get("answer", 16))
    batch = int(args.get("batch", 8))
    job = compose_job("stage1", [f"model={model_name}", f"elastic={spec}", "elastic.teacher_checkpoint=unused"])
    cfg = job.model
    budgets = {b.name: b.fixed for b in validate_elastic(job.elastic, cfg) if not b.routed}
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    with distributed():
        torch.manual_seed(0)
        gen = ElasticGenerator(build_model(cfg, params_dtype=dtype), cfg, budgets, _Vocab(cfg.vocab_size))
        prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
        decoders = {name: gen.decoder(name) for name in budgets}
        for dec in decoders.values():
            decode_s(dec, prompt[:8], 2, batch)  # warm-up
        samples = {name: {"prefill_s": [], "decode_s": [], "batch_decode_s": []} for name in budgets}
        for _ in range(repeat):  # budgets interleaved: drift of a shared machine hits them alike
            for name, dec in decoders.items():
                samples[name]["prefill_s"].append(prefill_s(dec, prompt, 1))
                samples[name]["decode_s"].append(decode_s(dec, prompt, new))
                samples[name]["batch_decode_s"].append(decode_s(dec, prompt, new, batch))
        rows = {name: {"active_params": int(model_cost(cfg, budgets[name], "active_params")),
                       **{k: sorted(v)[len(v) // 2] for k, v in samples[name].items()}} for name in budgets}
        full, small = next(iter(budgets)), list(budgets)[-1]
        for r in rows.values():
            r["active_ratio"] = r["active_params"] / rows[full]["active_params"]
            r["decode_ratio"] = r["decode_s"] / rows[full]["decode_s"]
            r["batch_decode_ratio"] = r["batch_decode_s"] / rows[full]["batch_decode_s"]
            r["prefill_ratio"] = r["prefill_s"] / rows[full]["prefill_s"]

        # Budget control on one prompt: S thinks, L re-prefills prompt + trace and answers.
        trace = prompt[:think] if len(prompt) >= think else (prompt * (think // len(prompt) + 1))[:think]
        s_think = decode_s(gen.decoder(small), prompt, think) + prefill_s(gen.decoder(small), prompt, 1)
        reprefill = prefill_s(gen.decoder(full), prompt + trace, repeat)
        l_answer = decode_s(gen.decoder(full), prompt + trace, answer)
        l_l = prefill_s(gen.decoder(full), prompt, 1) + decode_s(gen.decoder(full), prompt, think + answer)
        control = {"think_budget": small, "answer_budget": full, "think_tokens": think, "answer_tokens": answer,
                   "s_to_l_s": s_think + reprefill + l_answer, "reprefill_s": reprefill, "l_to_l_s": l_l}
        control["ratio"] = control["s_to_l_s"] / control["l_to_l_s"]

    print(f"generation: model {cfg.name}, spec {spec}, {dtype}, {device}; prompt {prompt_len} tokens, {new} new tokens, "
          f"median of {repeat}")
    print(f"{'budget':<8}{'active params':>14}{'active/full':>12}{'prefill tok/s':>14}{'/ full':>8}"
          f"{'decode tok/s':>13}{'/ full':>8}{f'batch {batch} tok/s':>15}{'/ full':>8}   target (active + 0.15)")
    for name, r in rows.items():
        target = r["active_ratio"] + 0.15
        verdict = ", ".join(f"{what} {'ok' if r[key] <= target else 'missed'}" for what, key in
                            (("decode", "decode_ratio"), (f"batch {batch}", "batch_decode_ratio"), ("prefill", "prefill_ratio")))
        print(f"{name:<8}{r['active_params']:>14,}{r['active_ratio']:>12.3f}{prompt_len / r['prefill_s']:>14,.0f}"
              f"{r['prefill_ratio']:>8.3f}{new / r['decode_s']:>13,.1f}{r['decode_ratio']:>8.3f}"
              f"{batch * new / r['batch_decode_s']:>15,.1f}{r['batch_decode_ratio']:>8.3f}   <= {target:.3f}: {verdict}")
    c = control
    print(f"budget control: {c['think_budget']} thinks {c['think_tokens']} tokens, {c['answer_budget']} answers {c['answer_tokens']}: "
          f"S->L {c['s_to_l_s']:.3f} s (re-prefill of prompt + trace {c['reprefill_s']:.3f} s) vs L->L {c['l_to_l_s']:.3f} s: "
          f"{c['ratio']:.3f}x {'(faster)' if c['ratio'] < 1 else '(NOT faster)'}")
    result = {"model": cfg.name, "spec": spec, "device": device, "dtype": str(dtype), "prompt": prompt_len, "new": new,
              "budgets": rows, "budget_control": control}
    if "json" in args:
        Path(args["json"]).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
