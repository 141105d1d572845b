"""The training loop shared by every stage.

    validate config and data -> init process groups -> build model, optimizer, schedule
    -> resume from the run dir's latest checkpoint -> steps:
         micro-batches (gradient accumulation) -> skip the update on NaN/Inf loss
         -> optimizer + LR schedule -> log -> validate -> save -> stop on SIGTERM/USR1
    -> COMPLETED marker when max_steps is reached

What a micro-batch computes is the pluggable `step_fn`: `LMStep` for pretraining,
`ElasticDistillStep` when `elastic.enabled`. A step function may also define
`setup(model, dtype)` (after the model is built, before resuming), `after_step(step, ok)`
(after the optimizer step), `state_dict()/load_state_dict()` (checkpointed as `extra`),
`checkpoint_meta()` (merged into the checkpoint metadata) and `validate(model, batches)`
(per-budget validation metrics instead of the plain validation loss).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import psutil
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from megatron.core import parallel_state

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.schema import JobConfig, data_parallel_size, validate_job
from elastic_megatron.data.datasets import DataSpec, build_datasets, load_tokenizer_for, make_loader, validate_data_spec
from elastic_megatron.models.counter import model_size
from elastic_megatron.models.hybrid import build_model
from elastic_megatron.parallel.pipeline import forward_backward, forward_only, from_last_stage
from elastic_megatron.parallel.setup import dist_env, distributed
from elastic_megatron.training import checkpointing
from elastic_megatron.training.flops import flops_per_token
from elastic_megatron.training.logging import MetricsLogger, is_rank0, print0
from elastic_megatron.training.optim import build_optimizer, build_scheduler
from elastic_megatron.training.signals import StopSignal
from elastic_megatron.training.steps import LMStep, StepFunction

COMPLETED = "COMPLETED"


@dataclass
class TrainResult:
    run_dir: Path
    start_step: int
    last_step: int
    completed: bool
    losses: dict[int, float] = field(default_factory=dict)
    valid_loss: Optional[float] = None
    skipped_steps: list[int] = field(default_factory=list)
    stop_signal: Optional[str] = None


def params_dtype(precision: str) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if precision == "bf16" and not torch.cuda.is_available():
        raise ConfigError("trainer.precision", precision, "bf16 needs a GPU here; allowed on CPU: fp32, auto")
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def data_spec(job: JobConfig, run_dir: Path) -> DataSpec:
    d = job.data
    return DataSpec(
        prefixes=list(d.prefixes),
        weights=list(d.weights) if d.weights is not None else None,
        split=d.split,
        seq_length=d.seq_length,
        seed=job.run.seed,
        cache_dir=d.cache_dir or str(run_dir / "data_cache"),
    )


def _to_device(batch: dict) -> dict:
    if torch.cuda.is_available():
        return {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch


def _dp_mean(value: torch.Tensor) -> torch.Tensor:
    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) > 1:
        value = value.clone()
        dist.all_reduce(value, group=group)
        value /= dist.get_world_size(group)
    return value


def _validation_batches(valid_ds, job: JobConfig) -> list[dict]:
    loader = make_loader(valid_ds, 0, job.trainer.micro_batch_size,
                         parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())
    return [_to_device(next(loader)) for _ in range(job.trainer.eval_iters)]


@torch.no_grad()
def evaluate(model, step_fn: StepFunction, valid_ds, job: JobConfig, step: int) -> dict[str, float]:
    """Validation metrics over the first `eval_iters` micro-batches of the validation
    split, averaged over data-parallel ranks; `valid_loss` is always among them."""
    batches = _validation_batches(valid_ds, job)
    if hasattr(step_fn, "validate"):
        metrics = step_fn.validate(model, batches)
        keys = sorted(metrics)
        values = _dp_mean(torch.tensor([metrics[k] for k in keys], dtype=torch.float64))
        out = dict(zip(keys, values.tolist()))
        per_budget = [v for k, v in out.items() if k.endswith("/valid_loss")]
        out["valid_loss"] = sum(per_budget) / len(per_budget) if per_budget else float("nan")
        return out
    model.eval()
    losses = [forward_only(lambda received, b=batch: step_fn.stage_forward(model, b, step, received)) for batch in batches]
    model.train()
    losses = from_last_stage([loss[0].float() for loss in losses] if losses[0] is not None else None)
    return {"valid_loss": _dp_mean(torch.stack(losses).mean().reshape(1))[0].item()}


def _mean_metrics(per_micro: list[dict]) -> dict[str, float]:
    """Mean of each numeric metric over the micro-batches that reported it."""
    sums: dict[str, list[float]] = {}
    for m in per_micro:
        for k, v in m.items():
            if isinstance(v, (int, float)):
                sums.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _budget_line(metrics: dict) -> str:
    """Console summary of elastic metrics: per budget KD loss and cost vs target."""
    parts = []
    for key in sorted(k for k in metrics if k.endswith("/kd_loss")):
        name = key[: -len("/kd_loss")]
        cost, target = metrics.get(f"{name}/expected_cost"), metrics.get(f"{name}/target")
        cost_txt = f" cost {cost / target:.3f}x target" if cost is not None and target else ""
        parts.append(f"{name}: kd {metrics[key]:.4f}{cost_txt}")
    return "  ".join(parts)


def _memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


def train(job: JobConfig, step_fn: Optional[StepFunction] = None, model_builder: Callable = build_model) -> TrainResult:
    """Run (or resume) the job described by `job`. Collective over all ranks."""
    env = dist_env()
    validate_job(job, env.world_size)
    if job.run.task != "train":
        raise ConfigError("run.task", job.run.task, "the training loop runs task=train; use elastic_megatron.train, which dispatches")
    if step_fn is None:
        if job.elastic.enabled:
            from elastic_megatron.elastic.step import ElasticDistillStep

            step_fn = ElasticDistillStep(job)
        else:
            step_fn = LMStep()
    run_dir = Path(job.run.dir)
    spec = data_spec(job, run_dir)
    validate_data_spec(spec)
    tokenizer = load_tokenizer_for(spec.prefixes)
    if job.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError("model.vocab_size", job.model.vocab_size, f"must be >= the data's tokenizer vocabulary ({tokenizer.vocab_size})")
    dtype = params_dtype(job.trainer.precision)
    t = job.trainer

    with distributed(job.parallel.tp, job.parallel.pp, job.parallel.ep, seed=job.run.seed,
                     expert_tensor_parallel=job.parallel.etp):
        dp_size = data_parallel_size(job, env.world_size)
        num_micro = t.global_batch_size // (t.micro_batch_size * dp_size)
        if is_rank0():
            run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(OmegaConf.structured(job), run_dir / "config.yaml")
        dist.barrier()

        resumed_from = checkpointing.latest_step(run_dir)
        init = job.run.init_checkpoint if resumed_from is None else None
        if init:  # refuse a mismatching checkpoint before anything is built
            from elastic_megatron.elastic.step import require_same_architecture

            require_same_architecture(job.model, init, "run.init_checkpoint")
        model = model_builder(job.model, params_dtype=dtype, parallel=job.parallel)
        if init:
            checkpointing.load_model_weights(init, model)
            print0(f"initialised the model from {init} (weights only: step, optimizer and data start fresh)")
        train_model, optimizer = build_optimizer(model, t, job.parallel, dtype)
        scheduler = build_scheduler(optimizer, t)
        if hasattr(step_fn, "setup"):
            step_fn.setup(train_model, dtype)
            if hasattr(optimizer, "reload_model_params"):
                # setup may load weights (elastic init); Megatron's optimizer keeps fp32
                # main copies made at construction, which must follow.
                optimizer.reload_model_params()

        start_step, consumed = 0, 0
        if resumed_from is not None:
            state = checkpointing.load_checkpoint(run_dir, model, optimizer, scheduler, resumed_from)
            start_step, consumed = state["step"], state["consumed_samples"]
            if hasattr(step_fn, "load_state_dict") and state["extra"]:
                step_fn.load_state_dict(state["extra"])
            print0(f"resumed from step {start_step} ({consumed} samples consumed) in {checkpointing.iteration_dir(run_dir, start_step)}")

        train_ds, valid_ds = build_datasets(
            spec, tokenizer,
            train_samples=t.max_steps * t.global_batch_size,
            valid_samples=t.eval_iters * t.micro_batch_size * dp_size,
        )
        loader = make_loader(train_ds, consumed, t.micro_batch_size,
                             parallel_state.get_data_parallel_rank(), dp_size)
        structured = OmegaConf.structured(job)
        resolved = OmegaConf.to_container(structured, resolve=True)
        config_yaml = OmegaConf.to_yaml(structured)
        logger = MetricsLogger(run_dir, job.logger, job.run.name, resolved)
        size = model_size(job.model)
        fpt = flops_per_token(job.model, job.data.seq_length)
        print0(f"model {job.model.name}: {size.total_params:,} params ({size.active_params:,} active), {dtype}, "
               f"world {env.world_size} (tp {job.parallel.tp}, pp {job.parallel.pp}, ep {job.parallel.ep}, dp {dp_size}), "
               f"global batch {t.global_batch_size} = {t.micro_batch_size} x {num_micro} micro x {dp_size} dp, seq {job.data.seq_length}")

        result = TrainResult(run_dir=run_dir, start_step=start_step, last_step=start_step, completed=False)
        stop = StopSignal().install()
        tokens_per_step = t.global_batch_size * job.data.seq_length
        # Throughput counts training steps only, not validation or checkpoint saves.
        compute_s, steps_since_log = 0.0, 0
        try:
            for step in range(start_step + 1, t.max_steps + 1):
                step_start = time.perf_counter()
                train_model.train()
                if hasattr(train_model, "zero_grad_buffer"):
                    train_model.zero_grad_buffer()
                optimizer.zero_grad()
                batches = [_to_device(next(loader)) for _ in range(num_micro)]
                micro_losses, micro_metrics = forward_backward(step_fn, train_model, batches, step)
                if hasattr(train_model, "finish_grad_sync"):
                    train_model.finish_grad_sync()
                # Losses and metrics exist on the last pipeline stage; every rank logs/decides.
                micro_losses, micro_metrics = from_last_stage((micro_losses, micro_metrics))
                step_loss = _dp_mean(torch.stack(micro_losses).mean().reshape(1))[0].item()
                if math.isfinite(step_loss):
                    ok, grad_norm, _ = optimizer.step()
                else:
                    ok, grad_norm = False, float("nan")
                    optimizer.zero_grad()
                if hasattr(step_fn, "after_step"):
                    step_fn.after_step(step, ok)
                if ok:
                    scheduler.step(1)
                else:
                    result.skipped_steps.append(step)
                    print0(f"step {step}: non-finite loss or gradients ({step_loss}); update skipped")
                consumed += t.global_batch_size
                result.losses[step] = step_loss
                result.last_step = step
                steps_since_log += 1
                compute_s += time.perf_counter() - step_start

                if step % t.log_interval == 0 or step == t.max_steps:
                    tok_s = steps_since_log * tokens_per_step / compute_s
                    metrics = {
                        "loss": step_loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                        "tokens_per_s": tok_s, "consumed_samples": consumed, "memory_gib": _memory_gib(),
                        "skipped_steps": len(result.skipped_steps),
                        **_mean_metrics(micro_metrics),
                    }
                    if torch.cuda.is_available():
                        metrics["mfu"] = tok_s * fpt / (t.peak_flops * env.world_size)
                    logger.log(step, metrics)
                    mfu = f"  mfu {100 * metrics['mfu']:.1f}%" if "mfu" in metrics else ""
                    print0(f"step {step:>6}/{t.max_steps}  loss {step_loss:.4f}  lr {metrics['lr']:.2e}  "
                           f"grad {grad_norm:.3f}  {tok_s:,.0f} tok/s{mfu}  mem {metrics['memory_gib']:.2f} GiB")
                    budgets = _budget_line(metrics)
                    if budgets:
                        print0(f"{'':>12}{budgets}  temperature {metrics.get('temperature', float('nan')):.3f}")
                    compute_s, steps_since_log = 0.0, 0

                if step % t.eval_interval == 0 or step == t.max_steps:
                    valid = evaluate(train_model, step_fn, valid_ds, job, step)
                    result.valid_loss = valid["valid_loss"]
                    valid["valid_ppl"] = math.exp(min(result.valid_loss, 50))
                    logger.log(step, valid)
                    print0(f"step {step:>6}  validation loss {result.valid_loss:.4f}  perplexity {valid['valid_ppl']:.2f}")
                    for key in sorted(k for k in valid if k.endswith("/valid_loss")):
                        print0(f"{'':>12}{key[: -len('/valid_loss')]}: validation loss {valid[key]:.4f}  kd {valid[key[: -len('valid_loss')] + 'valid_kd']:.4f}")

                if t.step_sleep_s:
                    time.sleep(t.step_sleep_s)
                stopping = stop.should_stop()
                if stopping or step % t.save_interval == 0 or step == t.max_steps:
                    if stopping:
                        result.stop_signal = stop.name
                        print0(f"signal {stop.name} received: saving and exiting")
                    meta = {"config": config_yaml, "wandb_run_id": logger.wandb_id}
                    if hasattr(step_fn, "checkpoint_meta"):
                        meta.update(step_fn.checkpoint_meta())
                    extra = step_fn.state_dict() if hasattr(step_fn, "state_dict") else None
                    path = checkpointing.save_checkpoint(run_dir, model, optimizer, scheduler, step, consumed, meta, extra)
                    print0(f"saved checkpoint at step {step} in {path}")
                if stopping:
                    break
            if result.last_step >= t.max_steps:
                result.completed = True
                if is_rank0():
                    (run_dir / COMPLETED).write_text(f"{t.max_steps}\n")
                print0(f"training finished at step {result.last_step}")
        finally:
            stop.uninstall()
            logger.close()
        return result
