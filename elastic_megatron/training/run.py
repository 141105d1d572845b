"""`prepare_run`: everything a job needs before its first step, shared by pretraining,
elastic distillation and importance sorting (and every later stage):

    validate the job -> data files and tokenizer -> dtype -> process groups
    -> lock the run dir -> resume step (the newest checkpoint that verifies)
    -> the job's config against that checkpoint's -> config.yaml
    -> build this rank's model -> initial weights

Every check that can fail on user input runs before any tensor is allocated and before
anything is written into the run dir; the initial weights' architecture is checked from
their metadata before the model is built. The run dir has one writer: rank 0 holds its
lock (checkpoint/lock.py) until the job ends, and a second job on the same run dir is
refused with the holder's identity.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from megatron.core import parallel_state

from elastic_megatron.checkpoint import store, verify
from elastic_megatron.checkpoint.lock import RunDirLocked, RunLock
from elastic_megatron.checkpoint.metadata import read_common_state, require_same_architecture
from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.parallel import layout_data_parallel
from elastic_megatron.config.schema import JobConfig, validate_job
from elastic_megatron.data.datasets import (
    DataSpec, build_datasets, data_fingerprints, make_loader, spec_tokenizer, validate_data_spec,
)
from elastic_megatron.models.hybrid import build_model
from elastic_megatron.parallel.context import split_batch
from elastic_megatron.parallel.setup import DistEnv, dist_env, distributed
from elastic_megatron.training.logging import is_rank0, print0
from elastic_megatron.training.resume import check_resume_config, data_identity


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
        valid_prefixes=list(d.valid_prefixes) if d.valid_prefixes is not None else None,
        tokenizer=d.tokenizer,
        token_scan=d.token_scan,
    )


def to_device(batch: dict) -> dict:
    if torch.cuda.is_available():
        return {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch


@dataclass
class Run:
    """A prepared job: validated config, data, process groups and this rank's model."""

    job: JobConfig
    env: DistEnv
    dir: Path
    dtype: torch.dtype
    data: DataSpec
    tokenizer: object
    dp_size: int
    model: torch.nn.Module  # this rank's pipeline stage, initial weights loaded
    resume_step: Optional[int]  # the run dir's latest checkpoint (None: a fresh run)
    data_identity: dict  # tokenizer + .idx fingerprints: recorded in checkpoints, checked on resume
    initial_state: Optional[dict] = None  # common state (step, meta, extra) of the initial weights loaded

    @property
    def num_micro_batches(self) -> int:
        t = self.job.trainer
        return t.global_batch_size // (t.micro_batch_size * self.dp_size)

    def datasets(self, train_samples: int, valid_samples: int):
        """(train, valid) datasets with at least this many samples (all DP ranks together)."""
        return build_datasets(self.data, self.tokenizer, train_samples=train_samples, valid_samples=valid_samples)

    def loader(self, dataset, consumed_samples: int = 0) -> Iterator[dict]:
        """This DP rank's micro-batches, starting after `consumed_samples` global samples,
        on the training device."""
        source = make_loader(dataset, consumed_samples, self.job.trainer.micro_batch_size,
                             parallel_state.get_data_parallel_rank(), self.dp_size)
        # Context-parallel ranks of a DP rank read the same samples and keep their chunks.
        return (to_device(split_batch(batch)) for batch in source)


@contextlib.contextmanager
def prepare_run(job: JobConfig, initial_weights: Optional[str] = None, initial_key: str = "run.init_checkpoint",
                model_builder: Callable = build_model) -> Iterator[Run]:
    """Prepare `job` (collective over all ranks) and tear the process groups down after.

    `initial_weights` (key `initial_key` in errors) is loaded into the fresh model unless
    the run dir already holds a checkpoint: then the caller resumes and `resume_step` says
    from which step."""
    env = dist_env()
    validate_job(job, env.world_size)
    run_dir = Path(job.run.dir)
    spec = data_spec(job, run_dir)
    validate_data_spec(spec)
    tokenizer = spec_tokenizer(spec)  # one tokenizer for training and validation data
    if job.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError("model.vocab_size", job.model.vocab_size, f"must be >= the data's tokenizer vocabulary ({tokenizer.vocab_size})")
    identity = data_identity(tokenizer, data_fingerprints(spec.prefixes), data_fingerprints(spec.valid_prefixes or []))
    dtype = params_dtype(job.trainer.precision)
    dp_size = layout_data_parallel(job.parallel, env.world_size)
    p = job.parallel
    verify.set_level(job.run.verify_checkpoints)
    with distributed(p.tp, p.pp, p.ep, seed=job.run.seed, expert_tensor_parallel=p.etp, context_parallel=p.cp), _run_dir_lock(run_dir):
        resume_step = store.resume_step(run_dir)
        if resume_step is not None:  # before config.yaml is rewritten
            where = str(store.iteration_dir(run_dir, resume_step))
            for change in check_resume_config(job, read_common_state(where).get("meta") or {}, where, identity):
                print0(f"resume: {change}")
        if is_rank0():
            OmegaConf.save(OmegaConf.structured(job), run_dir / "config.yaml")
        dist.barrier()
        init = initial_weights if resume_step is None else None
        if init:  # refuse a mismatching checkpoint before anything is built
            require_same_architecture(job.model, init, initial_key)
        model = model_builder(job.model, params_dtype=dtype, parallel=job.parallel)
        initial_state = store.load_model_weights(init, model) if init else None
        yield Run(job=job, env=env, dir=run_dir, dtype=dtype, data=spec, tokenizer=tokenizer, dp_size=dp_size,
                  model=model, resume_step=resume_step, data_identity=identity, initial_state=initial_state)


@contextlib.contextmanager
def _run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Rank 0 holds the run dir's lock for the job's life; every rank learns whether it
    got it (a refused lock ends the job on every rank with the holder's identity)."""
    lock, error, refused = None, None, [False, None]
    if is_rank0():
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except RunDirLocked as err:
            error, refused = err, [True, err.holder]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(refused, src=0)
    if refused[0]:
        raise error or RunDirLocked(run_dir, refused[1])
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
