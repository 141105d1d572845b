"""The training loop shared by every stage, read top to bottom in `Trainer.train`:

    for each step:  train_step (micro-batches, gradient accumulation, optimizer; the
                    update is skipped on a non-finite loss or gradient)
                    -> log -> validate -> save (periodic, final, or on SIGTERM/USR1)
    -> COMPLETED marker when trainer.max_steps is reached

`prepare_run` (training/run.py) has validated the job and built the model before the
trainer exists; the trainer adds the optimizer, schedule, resume, data and logger.
What a micro-batch computes is the step function (training/steps.py): `LMStep` for
pretraining, `elastic.step.ElasticDistillStep` for elastic distillation, chosen by the
caller (train.py dispatches on the job).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import psutil
import torch
from omegaconf import OmegaConf

from megatron.core import parallel_state

from elastic_megatron.checkpoint import store
from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.schema import JobConfig
from elastic_megatron.models.counter import model_size
from elastic_megatron.models.hybrid import build_model
from elastic_megatron.models.recompute import apply_recompute
from elastic_megatron.parallel.collectives import all_reduce_mean_
from elastic_megatron.parallel.pipeline import forward_backward, from_last_stage
from elastic_megatron.training.flops import flops_per_token
from elastic_megatron.training.logging import MetricsLogger, is_rank0, print0
from elastic_megatron.training.optim import build_optimizer, build_scheduler, finish_backward, start_step
from elastic_megatron.training.run import Run, prepare_run
from elastic_megatron.training.signals import StopSignal
from elastic_megatron.training.steps import LMStep, StepFunction

COMPLETED = "COMPLETED"


class TrainingDiverged(RuntimeError):
    """trainer.max_skipped_steps consecutive updates were skipped (non-finite loss or
    gradients): the run stops without COMPLETED, so nothing downstream takes it as done."""
INDENT = " " * 12  # step-function lines sit under the step column of the progress line


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


def dp_mean(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the data-parallel ranks (in float64, in key order; on the
    GPU when there is one, since NCCL reduces device tensors only)."""
    keys = sorted(values)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    all_reduce_mean_([tensor], parallel_state.get_data_parallel_group())
    return dict(zip(keys, tensor.tolist()))


def _mean_metrics(per_micro: list[dict]) -> dict[str, float]:
    """Mean of each numeric metric over the micro-batches that reported it."""
    sums: dict[str, list[float]] = {}
    for m in per_micro:
        for k, v in m.items():
            if isinstance(v, (int, float)):
                sums.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


class Trainer:
    """Optimizer, schedule, resume, data and logging around a prepared run."""

    def __init__(self, run: Run, step_fn: StepFunction):
        job, t = run.job, run.job.trainer
        self.run, self.job, self.t, self.step_fn = run, job, t, step_fn
        if run.initial_state is not None:
            print0(f"initialised the model from {job.run.init_checkpoint} (weights only: step, optimizer and data start fresh)")
        apply_recompute(run.model, t.recompute, t.recompute_method, t.recompute_num_layers, t.recompute_modules)
        self.model, self.optimizer = build_optimizer(run.model, t, job.parallel, run.dtype)
        self.scheduler = build_scheduler(self.optimizer, t)
        step_fn.setup(self.model, run.dtype)
        # setup may load weights (elastic init); Megatron's optimizer keeps fp32 main
        # copies made at construction, which must follow.
        self.optimizer.reload_model_params()

        self.start_step, self.consumed = 0, 0
        if run.resume_step is not None:
            state = store.load_checkpoint(run.dir, run.model, self.optimizer, self.scheduler, run.resume_step)
            self.start_step, self.consumed = state["step"], state["consumed_samples"]
            if state["extra"]:
                step_fn.load_state_dict(state["extra"])
            print0(f"resumed from step {self.start_step} ({self.consumed} samples consumed) in {store.iteration_dir(run.dir, self.start_step)}")

        train_ds, self.valid_ds = run.datasets(train_samples=t.max_steps * t.global_batch_size,
                                               valid_samples=t.eval_iters * t.micro_batch_size * run.dp_size)
        self.loader = run.loader(train_ds, self.consumed)
        n = step_fn.calibration_batches()
        if run.resume_step is None and n:  # e.g. QAD's quantization scales; a resume restores them
            calibration = run.loader(train_ds)
            step_fn.calibrate(self.model, [next(calibration) for _ in range(n)])
            print0(f"calibrated on {n} training micro-batches")
        structured = OmegaConf.structured(job)
        self.config_yaml = OmegaConf.to_yaml(structured)
        self.logger = MetricsLogger(run.dir, job.logger, job.run.name, OmegaConf.to_container(structured, resolve=True),
                                    resumed_at=self.start_step)
        self.flops_per_token = flops_per_token(job.model, job.data.seq_length)
        self.tokens_per_step = t.global_batch_size * job.data.seq_length
        self.result = TrainResult(run_dir=run.dir, start_step=self.start_step, last_step=self.start_step, completed=False)
        self.consecutive_skips = 0
        # Throughput counts training steps only, not validation or checkpoint saves.
        self.compute_s, self.steps_since_log = 0.0, 0
        size, p = model_size(job.model), job.parallel
        print0(f"model {job.model.name}: {size.total_params:,} params ({size.active_params:,} active), {run.dtype}, "
               f"world {run.env.world_size} (tp {p.tp}, pp {p.pp}, ep {p.ep}, dp {run.dp_size}), "
               f"global batch {t.global_batch_size} = {t.micro_batch_size} x {run.num_micro_batches} micro x {run.dp_size} dp, "
               f"seq {job.data.seq_length}")

    def train(self) -> TrainResult:
        stop = StopSignal().install()
        try:
            for step in range(self.start_step + 1, self.t.max_steps + 1):
                loss, grad_norm, metrics = self.train_step(step)
                last = step == self.t.max_steps
                if step % self.t.log_interval == 0 or last:
                    self.log(step, loss, grad_norm, metrics)
                if step % self.t.eval_interval == 0 or last:
                    self.validate(step)
                if self.t.step_sleep_s:
                    time.sleep(self.t.step_sleep_s)
                stopping = stop.should_stop()
                if stopping:
                    self.result.stop_signal = stop.name
                    print0(f"signal {stop.name} received: saving and exiting")
                if stopping or step % self.t.save_interval == 0 or last:
                    self.save(step)
                if stopping:
                    break
            if self.result.last_step >= self.t.max_steps:
                self.result.completed = True
                if is_rank0():
                    (self.run.dir / COMPLETED).write_text(f"{self.t.max_steps}\n")
                print0(f"training finished at step {self.result.last_step}")
        finally:
            stop.uninstall()
            self.logger.close()
        return self.result

    def train_step(self, step: int) -> tuple[float, float, list[dict]]:
        """One optimizer step over the global batch: (loss, grad norm, per-micro-batch metrics)."""
        begin = time.perf_counter()
        self.model.train()
        start_step(self.model, self.optimizer)
        batches = [next(self.loader) for _ in range(self.run.num_micro_batches)]
        micro_losses, micro_metrics = forward_backward(self.step_fn, self.model, batches, step)
        finish_backward(self.model)
        # Losses and metrics exist on the last pipeline stage; every rank logs/decides.
        micro_losses, micro_metrics = from_last_stage((micro_losses, micro_metrics))
        loss = dp_mean({"loss": torch.stack(micro_losses).mean().item()})["loss"]
        if math.isfinite(loss):
            ok, grad_norm, _ = self.optimizer.step()
        else:
            ok, grad_norm = False, float("nan")
            self.optimizer.zero_grad()
        self.step_fn.after_step(step, ok)
        if ok:
            self.scheduler.step(1)
            self.consecutive_skips = 0
        else:
            self.result.skipped_steps.append(step)
            self.consecutive_skips += 1
            print0(f"step {step}: non-finite loss or gradients ({loss}); update skipped "
                   f"({self.consecutive_skips} in a row, the run stops at {self.t.max_skipped_steps})")
            if self.consecutive_skips >= self.t.max_skipped_steps:
                raise TrainingDiverged(
                    f"{self.consecutive_skips} consecutive steps (up to {step}) had a non-finite loss or gradients; "
                    f"stopping without saving (the last checkpoint, step {store.latest_step(self.run.dir)}, is the last good "
                    "state). Check the data, the learning rate and the checkpoint's weights; raise trainer.max_skipped_steps "
                    "to tolerate longer runs of skipped steps")
        self.consumed += self.t.global_batch_size
        self.result.losses[step] = loss
        self.result.last_step = step
        self.steps_since_log += 1
        self.compute_s += time.perf_counter() - begin
        return loss, grad_norm, micro_metrics

    def log(self, step: int, loss: float, grad_norm: float, micro_metrics: list[dict]) -> None:
        tok_s = self.steps_since_log * self.tokens_per_step / self.compute_s
        metrics = {
            "loss": loss, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
            "tokens_per_s": tok_s, "consumed_samples": self.consumed, "memory_gib": _memory_gib(),
            "skipped_steps": len(self.result.skipped_steps),
            **_mean_metrics(micro_metrics),
        }
        if torch.cuda.is_available():
            metrics["mfu"] = tok_s * self.flops_per_token / (self.t.peak_flops * self.run.env.world_size)
        self.logger.log(step, metrics)
        mfu = f"  mfu {100 * metrics['mfu']:.1f}%" if "mfu" in metrics else ""
        print0(f"step {step:>6}/{self.t.max_steps}  loss {loss:.4f}  lr {metrics['lr']:.2e}  "
               f"grad {grad_norm:.3f}  {tok_s:,.0f} tok/s{mfu}  mem {metrics['memory_gib']:.2f} GiB")
        for line in self.step_fn.progress_lines(metrics):
            print0(INDENT + line)
        self.compute_s, self.steps_since_log = 0.0, 0

    def validate(self, step: int) -> dict[str, float]:
        """Validation metrics over the first `eval_iters` micro-batches of the validation
        split, averaged over data-parallel ranks."""
        loader = self.run.loader(self.valid_ds)
        batches = [next(loader) for _ in range(self.t.eval_iters)]
        valid = dp_mean(self.step_fn.validate(self.model, batches, step))
        self.result.valid_loss = valid["valid_loss"]
        valid["valid_ppl"] = math.exp(min(self.result.valid_loss, 50))
        self.logger.log(step, valid)
        print0(f"step {step:>6}  validation loss {self.result.valid_loss:.4f}  perplexity {valid['valid_ppl']:.2f}")
        for line in self.step_fn.validation_lines(valid):
            print0(INDENT + line)
        return valid

    def save(self, step: int) -> Path:
        meta = {"config": self.config_yaml, "wandb_run_id": self.logger.wandb_id, "data": self.run.data_identity,
                **self.step_fn.checkpoint_meta()}
        path = store.save_checkpoint(self.run.dir, self.run.model, self.optimizer, self.scheduler, step, self.consumed,
                                     meta, self.step_fn.state_dict())
        print0(f"saved checkpoint at step {step} in {path}")
        return path


def train(job: JobConfig, step_fn: Optional[StepFunction] = None, model_builder: Callable = build_model) -> TrainResult:
    """Run (or resume) the training job `job` with `step_fn` (default: pretraining).
    Collective over all ranks. `elastic_megatron.train.dispatch` picks the step function
    a job asks for."""
    if job.run.task != "train":
        raise ConfigError("run.task", job.run.task, "the training loop runs task=train; use elastic_megatron.train, which dispatches")
    if step_fn is None and job.elastic.enabled:
        raise ConfigError("elastic.enabled", True, "needs the elastic step function: run the job through "
                          "elastic_megatron.train.dispatch (or pass step_fn=ElasticDistillStep(job))")
    with prepare_run(job, job.run.init_checkpoint, "run.init_checkpoint", model_builder) as run:
        return Trainer(run, step_fn if step_fn is not None else LMStep()).train()
