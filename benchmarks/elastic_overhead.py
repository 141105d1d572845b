"""Step-time overhead of elastic training (router + masks) over plain distillation of the
same model, measured in one run on one device.

    python benchmarks/elastic_overhead.py                     # tiny preset, tiny_router spec
    python benchmarks/elastic_overhead.py --model small --elastic <spec for small> --seq 4096
    python benchmarks/elastic_overhead.py trainer.micro_batch_size=1   # Hydra overrides of both jobs

Both runs use the training code path (ElasticDistillStep, forward_backward, the
optimizer): the baseline distils the teacher into the full-width student with no budget
routed (masks off, router idle); the elastic run trains the routed `small` budget
(Gumbel-Softmax router, every width axis masked). Teacher weights are random: the
timings do not depend on them. Positional KEY=VALUE arguments are Hydra overrides of both
jobs (recipe stage1_tiny), after the benchmark's own.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elastic_megatron.cli import benchmark_parser, run_benchmark  # noqa: E402
from elastic_megatron.config.compose import compose_recipe  # noqa: E402
from elastic_megatron.config.errors import ConfigError, require_positive_int  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(job, steps: int, warmup: int, seq: int, batch: int) -> float:
    from elastic_megatron.elastic.step import ElasticDistillStep
    from elastic_megatron.models.hybrid import build_model
    from elastic_megatron.parallel.pipeline import forward_backward
    from elastic_megatron.training.optim import build_optimizer
    from elastic_megatron.training.run import params_dtype

    dtype = params_dtype("auto")
    step_fn = ElasticDistillStep(job)
    model = build_model(job.model, dtype, parallel=job.parallel)
    train_model, optimizer = build_optimizer(model, job.trainer, job.parallel, dtype)
    step_fn.setup(train_model, dtype)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, job.model.vocab_size, (batch, seq + 1), generator=gen).to(device)
    micro = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(batch, seq, device=device),
             "position_ids": torch.arange(seq, device=device).expand(batch, seq)}
    times = []
    for i in range(warmup + steps):
        _sync()
        start = time.perf_counter()
        if hasattr(train_model, "zero_grad_buffer"):
            train_model.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(step_fn, train_model, [micro], step=i + 1)
        if hasattr(train_model, "finish_grad_sync"):
            train_model.finish_grad_sync()
        optimizer.step()
        step_fn.after_step(i + 1, True)
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def parse(argv=None):
    parser = benchmark_parser(__doc__, overrides="Hydra overrides of both jobs (recipe stage1_tiny, dotted keys)")
    parser.add_argument("--model", default="tiny", help="model preset (recipes/model/), default tiny")
    parser.add_argument("--elastic", default=None,
                        help="elastic spec (recipes/elastic/) whose last budget is routed; default tiny_router (model tiny only)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048 on GPU, 256 on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 4 on GPU, 2 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 5 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on GPU, 1 on CPU)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures to FILE as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    return run_benchmark(args, lambda: measure(args))


def measure(args) -> None:
    from elastic_megatron.checkpoint import store
    from elastic_megatron.convert.megatron_dist import config_yaml
    from elastic_megatron.models.hybrid import build_model, resolve_token_dispatcher
    from elastic_megatron.parallel.setup import distributed
    from elastic_megatron.training.run import params_dtype

    gpu = torch.cuda.is_available()
    model = args.model
    if model != "tiny" and args.elastic is None:
        raise ConfigError("--elastic", None, f"--model {model} needs an elastic spec of that model (recipes/elastic/*.yaml) "
                                             "whose last budget is routed; the default tiny_router fits --model tiny only")
    steps, warmup, seq, batch = (default if given is None else given for given, default in (
        (args.steps, 20 if gpu else 5), (args.warmup, 3 if gpu else 1), (args.seq, 2048 if gpu else 256),
        (args.batch, 4 if gpu else 2)))
    for key, value in (("--steps", steps), ("--seq", seq), ("--batch", batch)):
        require_positive_int(key, value)
    if warmup < 0:
        raise ConfigError("--warmup", warmup, "must be an integer >= 0")
    elastic = args.elastic or "tiny_router"
    base = compose_recipe("stage1_tiny", [f"model={model}", f"elastic={elastic}", "elastic.teacher_checkpoint=unused",
                                          *args.overrides])
    with tempfile.TemporaryDirectory() as tmp, distributed():
        teacher = Path(tmp) / "teacher"
        torch.manual_seed(0)
        store.save_checkpoint(teacher, build_model(base.model, params_dtype("auto")), None, None, 0, 0,
                                      {"config": config_yaml(base.model), "sort_index": {"note": "benchmark"}})
        common = [f"model={model}", f"elastic={elastic}", f"elastic.teacher_checkpoint={teacher}",
                  "elastic.curriculum.budgets_per_batch=1", f"data.seq_length={seq}", "trainer.precision=auto", *args.overrides]
        n = len(base.elastic.budgets)
        plain = compose_recipe("stage1_tiny", [*common, f"elastic.curriculum.budget_probs=[1{',0' * (n - 1)}]"])
        routed = compose_recipe("stage1_tiny", [*common, f"elastic.curriculum.budget_probs=[{'0,' * (n - 1)}1]"])
        print(f"model {model} ({'GPU ' + torch.cuda.get_device_name() if gpu else 'CPU'}), dispatcher "
              f"{resolve_token_dispatcher(base.model)}, batch {batch} x {seq} tokens, median of {steps} steps")
        t_plain = time_steps(plain, steps, warmup, seq, batch)
        t_elastic = time_steps(routed, steps, warmup, seq, batch)
        tokens = batch * seq
        print(f"plain distillation (full width, no router)  {t_plain * 1e3:9.1f} ms/step  {tokens / t_plain:12,.0f} tok/s")
        print(f"elastic (router + masks, routed budget)     {t_elastic * 1e3:9.1f} ms/step  {tokens / t_elastic:12,.0f} tok/s")
        print(f"elastic overhead: {100 * (t_elastic / t_plain - 1):+.1f}%")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "model": model, "elastic": elastic, "device": torch.cuda.get_device_name() if gpu else "cpu",
                "batch": batch, "seq": seq, "steps": steps, "plain_step_s": t_plain, "elastic_step_s": t_elastic,
                "elastic_over_plain": t_elastic / t_plain}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
