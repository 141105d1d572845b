"""One elastic training micro-step under a parallel layout, for tests/test_parallel.py.

Run with torchrun (any world size, gloo on CPU):

    torchrun --nproc_per_node N tests/parallel_worker.py OUT key=value ...

The key=value arguments are recipe overrides of `stage1_tiny` (parallel.tp=2 ...). The
worker builds the student, teacher and router exactly as training does, runs the
training code path on a fixed global batch (`forward_backward`, the optimizer's and the
router's gradient reductions), and writes to OUT:

- grads/: the model gradients as a dist checkpoint (so any layout reads back flat);
- result.json: global loss, router gradient, and whether router logits, gradients and
  parameters after an update are identical on every rank; the most activation bytes a
  rank kept for backward.

With PARALLEL_WORKER_STEP=lm it runs pretraining's step (LMStep) instead, on the
teacher checkpoint's weights (no router fields then); with PARALLEL_WORKER_STEP=fresh,
LMStep on the fresh model's own weights, which it first saves to weights/ (a dist
checkpoint, read back flat like grads/).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from elastic_megatron.convert.megatron_dist import config_yaml
from elastic_megatron.elastic.step import ElasticDistillStep
from elastic_megatron.models.hybrid import build_model
from elastic_megatron.models.recompute import SavedActivations, apply_recompute
from elastic_megatron.parallel.context import split_batch
from elastic_megatron.parallel.pipeline import forward_backward, from_last_stage
from elastic_megatron.parallel.setup import distributed
from elastic_megatron.train import compose_job
from elastic_megatron.checkpoint import store
from elastic_megatron.training.optim import build_optimizer
from elastic_megatron.training.steps import LMStep

GLOBAL_BATCH = 4
# Sequence length of the fixed batch; the context-parallel layouts use one that is not a
# multiple of the Mamba chunk on any rank.
SEQ = int(os.environ.get("PARALLEL_WORKER_SEQ", "32"))


def global_batch(vocab: int, start: int, count: int) -> dict:
    """Samples [start, start + count) of a fixed global batch, as one micro-batch. Every
    sample masks the same number of positions, so the mean over DP ranks of their
    micro-batch means is the global token mean."""
    gen = torch.Generator().manual_seed(17)
    tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    loss_mask = torch.ones(GLOBAL_BATCH, SEQ)
    for i in range(GLOBAL_BATCH):
        loss_mask[i, torch.randperm(SEQ, generator=gen)[:3]] = 0.0
    rows = slice(start, start + count)
    return {"tokens": tokens[rows, :-1], "labels": tokens[rows, 1:], "loss_mask": loss_mask[rows],
            "position_ids": torch.arange(SEQ).expand(count, SEQ)}


def identical_on_all_ranks(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    return all(torch.equal(gathered[0], g) for g in gathered)


def main(out: Path, overrides: list[str]) -> None:
    job = compose_job("stage1_tiny", overrides)
    p = job.parallel
    # PARALLEL_WORKER_STEP=lm: pretraining's step (LMStep) on the teacher's weights instead.
    mode = os.environ.get("PARALLEL_WORKER_STEP", "elastic")
    lm = mode in ("lm", "fresh")
    with distributed(p.tp, p.pp, p.ep, seed=job.run.seed, expert_tensor_parallel=p.etp, context_parallel=p.cp):
        step_fn = LMStep() if lm else ElasticDistillStep(job)
        model = build_model(job.model, torch.float32, parallel=p)
        t = job.trainer
        apply_recompute(model, t.recompute, t.recompute_method, t.recompute_num_layers, t.recompute_modules)
        _, optimizer = build_optimizer(model, job.trainer, p, torch.float32)
        if mode == "fresh":
            store.save_checkpoint(out / "weights", model, None, None, 0, 0, {"config": config_yaml(job.model)})
        elif lm:
            store.load_model_weights(job.elastic.teacher_checkpoint, model)
        else:
            step_fn.setup(model, torch.float32)
        dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        # One micro-batch per DP rank: each rank draws the step's budget and Gumbel noise
        # once, as the single process does for the whole batch.
        share = GLOBAL_BATCH // dp
        # Context-parallel ranks of a DP rank take their chunks of the same sequences.
        batches = [split_batch(global_batch(job.model.vocab_size, dp_rank * share, share))]

        if not lm:  # the router's output for the budget, before any update
            inp, weights = step_fn.router.budget_input(len(step_fn.budgets) - 1)
            logits = torch.cat([v.reshape(-1) for v in step_fn.router.logits(inp, weights).values()]).detach()

        # What autograd keeps for backward on this rank (the memory estimate's activations).
        with SavedActivations(model, *([] if lm else [step_fn.teacher])) as saved:
            losses, _ = forward_backward(step_fn, model, batches, step=1)
        saved_bytes = torch.tensor([float(saved.bytes)])
        dist.all_reduce(saved_bytes, op=dist.ReduceOp.MAX)
        losses = from_last_stage(losses)
        loss = torch.stack(losses).mean().reshape(1)
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        loss /= dp
        optimizer.reduce_gradients()
        grad_norm = optimizer.grad_norm()

        # Gradients in the parameters' place, saved like a checkpoint: the test reads
        # them back in the flat layout whatever layout wrote them.
        params = [q for q in model.parameters() if q.requires_grad]
        saved = [q.data for q in params]
        for q in params:
            q.data = q.grad.clone()
        store.save_checkpoint(out / "grads", model, None, None, 0, 0, {"config": config_yaml(job.model)})
        for q, data in zip(params, saved):
            q.data = data

        result = {"loss": loss.item(), "grad_norm": grad_norm, "world": dist.get_world_size(), "dp": dp,
                  "saved_bytes": saved_bytes.item()}
        if not lm:
            step_fn.reduce_router_gradients()
            router_grad = torch.cat([q.grad.reshape(-1) for q in step_fn.router.parameters()])
            step_fn.router_optimizer.step()
            router_after = torch.cat([q.detach().reshape(-1) for q in step_fn.router.parameters()])
            result.update({
                "router_grad": router_grad.tolist(),
                "router_logits_identical": identical_on_all_ranks(logits),
                "router_grad_identical": identical_on_all_ranks(router_grad),
                "router_params_identical_after_step": identical_on_all_ranks(router_after),
            })
        if dist.get_rank() == 0:
            (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
