"""Training throughput and peak memory of a model preset, Triton vs pure-PyTorch Mamba scan.

    python benchmarks/model_throughput.py --model small --seq-length 4096 --micro-batch 4
    python benchmarks/model_throughput.py --model tiny --steps 5   # CPU smoke run

On GPU it measures the same model twice in one run: with mamba_ssm's Triton SSD kernel
(the production path) and with the pure-PyTorch chunked SSD (the CPU path, as the
baseline), and prints tokens/s, an MFU estimate and peak memory for both. On CPU only the
PyTorch path exists and it prints that alone.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elastic_megatron.cli import benchmark_parser, run_benchmark  # noqa: E402
from elastic_megatron.config.errors import ConfigError, require_positive_int  # noqa: E402
from elastic_megatron.config.model import model_config_from_dict  # noqa: E402
from elastic_megatron.models.counter import model_size  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "model"
H100_BF16_PEAK_FLOPS = 989e12


def measure(model, cfg, kernel: str, batch: int, seq: int, steps: int, warmup: int, device) -> dict:
    from elastic_megatron.models.mamba_mixer import HybridMambaMixer

    for m in model.modules():
        if isinstance(m, HybridMambaMixer):
            m.kernel = kernel
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    pos = torch.arange(seq, device=device).expand(batch, seq)

    def step():
        loss = model(ids, pos, None, labels=ids).float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens_per_s = steps * batch * seq / elapsed
    # 6 * active params per token (forward + backward) plus causal attention.
    active = model_size(cfg).active_params
    attn = 6 * cfg.count("*") * cfg.num_attention_heads * cfg.head_dim * seq  # 12*L*h*d*s/2 (causal)
    flops_per_token = 6 * active + attn
    out = {"kernel": kernel, "tokens_per_s": tokens_per_s, "step_s": elapsed / steps,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")}
    if device.type == "cuda":
        out["mfu_vs_h100_bf16"] = tokens_per_s * flops_per_token / H100_BF16_PEAK_FLOPS
    return out


def main(argv=None) -> int:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--model", default="small", help="preset name in recipes/model/ (default small)")
    ap.add_argument("--seq-length", type=int, default=2048, help="tokens per sequence (default 2048)")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per step (default 4)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the figures to FILE as JSON")
    args = ap.parse_args(argv)
    return run_benchmark(args, lambda: run(args))


def run(args) -> None:
    # Megatron's modules only now: --help and a bad option answer at once.
    from elastic_megatron.models.hybrid import build_model
    from elastic_megatron.models.mamba_mixer import HAVE_MAMBA_SSM_KERNELS
    from elastic_megatron.parallel.setup import distributed

    presets = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    if args.model not in presets:
        raise ConfigError("--model", args.model, f"a preset of recipes/model/: {presets}")
    for key in ("seq_length", "micro_batch", "steps"):
        require_positive_int(f"--{key.replace('_', '-')}", getattr(args, key))
    if args.warmup < 0:
        raise ConfigError("--warmup", args.warmup, "must be an integer >= 0")
    cfg = model_config_from_dict({**yaml.safe_load((RECIPES / f"{args.model}.yaml").read_text()),
                                  "max_sequence_length": max(args.seq_length, 1)})
    cuda = torch.cuda.is_available()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    device = torch.device("cuda" if cuda else "cpu")
    with distributed(seed=0):
        model = build_model(cfg, params_dtype=dtype)
        size = model_size(cfg)
        print(f"{cfg.name}: {size.total_params/1e6:.1f}M params ({size.active_params/1e6:.1f}M active), "
              f"{dtype}, micro batch {args.micro_batch} x {args.seq_length} tokens, device {torch.cuda.get_device_name() if cuda else 'cpu'}")
        kernels = ["triton", "torch"] if cuda and HAVE_MAMBA_SSM_KERNELS else ["torch"]
        results = [measure(model, cfg, k, args.micro_batch, args.seq_length, args.steps, args.warmup, device) for k in kernels]
        print(f"{'mamba scan':<12}{'tokens/s':>12}{'step s':>10}{'peak GiB':>10}{'MFU':>8}")
        for r in results:
            mfu = f"{100 * r['mfu_vs_h100_bf16']:.1f}%" if "mfu_vs_h100_bf16" in r else "-"
            print(f"{r['kernel']:<12}{r['tokens_per_s']:>12,.0f}{r['step_s']:>10.3f}{r['peak_mem_gib']:>10.2f}{mfu:>8}")
        if len(results) == 2:
            print(f"triton / torch speed-up: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x")
        if args.json:
            figures = {"model": cfg.name, "dtype": str(dtype), "micro_batch": args.micro_batch, "seq_length": args.seq_length,
                       "device": torch.cuda.get_device_name() if cuda else "cpu", "kernels": results}
            if len(results) == 2:
                figures["triton_over_torch"] = results[0]["tokens_per_s"] / results[1]["tokens_per_s"]
            Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    sys.exit(main())
