"""Step-time overhead of elastic training (router + masks) over plain distillation of the
same model, measured in one run on one device.

    python benchmarks/elastic_overhead.py                     # tiny preset, tiny_router spec
    python benchmarks/elastic_overhead.py model=small elastic=<spec for small> seq=4096

Both runs use the training code path (ElasticDistillStep, forward_backward, the
optimizer): the baseline distils the teacher into the full-width student with no budget
routed (masks off, router idle); the elastic run trains the routed `small` budget
(Gumbel-Softmax router, every width axis masked). Teacher weights are random: the
timings do not depend on them.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elastic_megatron.convert.megatron_dist import config_yaml  # noqa: E402
from elastic_megatron.elastic.step import ElasticDistillStep  # noqa: E402
from elastic_megatron.models.hybrid import build_model, resolve_token_dispatcher  # noqa: E402
from elastic_megatron.parallel.pipeline import forward_backward  # noqa: E402
from elastic_megatron.parallel.setup import distributed  # noqa: E402
from elastic_megatron.train import compose_job  # noqa: E402
from elastic_megatron.checkpoint import store  # noqa: E402
from elastic_megatron.training.run import params_dtype  # noqa: E402
from elastic_megatron.training.optim import build_optimizer  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(job, steps: int, warmup: int, seq: int, batch: int) -> float:
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


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    gpu = torch.cuda.is_available()
    model = args.get("model", "tiny")
    if model != "tiny" and "elastic" not in args:
        raise SystemExit(f"model={model}: name an elastic spec of that model (elastic=<recipes/elastic/*.yaml>) "
                         "whose last budget is routed; the shipped tiny_router fits model=tiny only")
    steps, warmup = int(args.get("steps", 20 if gpu else 5)), int(args.get("warmup", 3 if gpu else 1))
    seq, batch = int(args.get("seq", 2048 if gpu else 256)), int(args.get("batch", 4 if gpu else 2))
    elastic = args.get("elastic", "tiny_router")
    with tempfile.TemporaryDirectory() as tmp, distributed():
        base = compose_job("stage1_tiny", [f"model={model}", f"elastic={elastic}", "elastic.teacher_checkpoint=unused"])
        teacher = Path(tmp) / "teacher"
        torch.manual_seed(0)
        store.save_checkpoint(teacher, build_model(base.model, params_dtype("auto")), None, None, 0, 0,
                                      {"config": config_yaml(base.model), "sort_index": {"note": "benchmark"}})
        common = [f"model={model}", f"elastic={elastic}", f"elastic.teacher_checkpoint={teacher}",
                  "elastic.curriculum.budgets_per_batch=1", f"data.seq_length={seq}", "trainer.precision=auto"]
        n = len(base.elastic.budgets)
        plain = compose_job("stage1_tiny", [*common, f"elastic.curriculum.budget_probs=[1{',0' * (n - 1)}]"])
        routed = compose_job("stage1_tiny", [*common, f"elastic.curriculum.budget_probs=[{'0,' * (n - 1)}1]"])
        print(f"model {model} ({'GPU ' + torch.cuda.get_device_name() if gpu else 'CPU'}), dispatcher "
              f"{resolve_token_dispatcher(base.model)}, batch {batch} x {seq} tokens, median of {steps} steps")
        t_plain = time_steps(plain, steps, warmup, seq, batch)
        t_elastic = time_steps(routed, steps, warmup, seq, batch)
        tokens = batch * seq
        print(f"plain distillation (full width, no router)  {t_plain * 1e3:9.1f} ms/step  {tokens / t_plain:12,.0f} tok/s")
        print(f"elastic (router + masks, routed budget)     {t_elastic * 1e3:9.1f} ms/step  {tokens / t_elastic:12,.0f} tok/s")
        print(f"elastic overhead: {100 * (t_elastic / t_plain - 1):+.1f}%")


if __name__ == "__main__":
    main(sys.argv[1:])
