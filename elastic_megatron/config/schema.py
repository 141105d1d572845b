"""The job schema: every recipe composes into a `JobConfig`.

Registered in Hydra's ConfigStore as `job_schema`; each recipe lists it first in its
defaults, so Hydra rejects unknown keys and wrongly typed values at composition time, and
`validate_job` checks the values that depend on each other or on the world size before
anything is allocated. Groups (recipes/<group>/*.yaml): model, data, trainer, parallel,
logger, cluster, elastic, quant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from elastic_megatron.config.elastic import ElasticConfig, validate_elastic_settings
from elastic_megatron.config.errors import ConfigError, require_choice, require_positive_int
from elastic_megatron.config.model import ModelConfig, validate_model_config
from elastic_megatron.config.quant import QuantConfig, validate_quant_settings
from elastic_megatron.config.parallel import (
    ParallelConfig, layout_data_parallel, require_batch_split, require_sequence_split, validate_parallel_layout,
)

PRECISIONS = ("auto", "fp32", "bf16")
DECAY_STYLES = ("constant", "linear", "cosine")
LOGGERS = ("none", "wandb")
TASKS = ("train", "importance")
VERIFY_LEVELS = ("hashes", "sizes")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class RunConfig:
    # One directory per job, chosen once: the Slurm job id survives requeues.
    dir: str = "runs/${oc.env:SLURM_JOB_ID,local}"
    # The job's name (logs, W&B run name).
    name: str = "pretrain"
    # Random seed of initialisation, data order and budget sampling.
    seed: int = 1234
    # train: pretraining, or elastic distillation when elastic.enabled;
    # importance: score and sort elastic.parent_checkpoint into run.dir.
    task: str = "train"
    # Start from these weights (run dir or checkpoint dir; e.g. a zero-shot slice or an
    # HF import), with a fresh step, optimizer and data position, like Megatron's
    # --pretrained-checkpoint. Ignored once run.dir has a checkpoint (resume wins).
    init_checkpoint: Optional[str] = None
    # Checkpoints are verified against their manifest before anything is loaded:
    # hashes (every byte, ~1 extra read) or sizes (presence and sizes only, for huge ones).
    verify_checkpoints: str = "hashes"


@dataclass
class DataConfig:
    # Data prefixes written by tools/preprocess_data.py (path without .bin/.idx).
    prefixes: list[str] = field(default_factory=lambda: [".cache/data/stdlib_text_document"])
    # Blend weights, one per prefix; null = equal weights.
    weights: Optional[list[float]] = None
    # train, valid, test proportions.
    split: str = "98,2,0"
    # Held-out validation data (prefixes read whole, as Megatron-LM's --valid-data-path);
    # null = validate on the split's valid share of `prefixes`. With it, training reads
    # `prefixes` whole and `split` is unused.
    valid_prefixes: Optional[list[str]] = None
    # Tokens per training sequence (<= model.max_sequence_length).
    seq_length: int = 256
    # Where Megatron writes its dataset index caches; null = <run.dir>/data_cache.
    cache_dir: Optional[str] = None
    # The tokenizer of data without our tokenizer record beside them (e.g. tokenized by
    # Megatron-LM's tools/preprocess_data.py): 'byte', a tokenizer.json, an HF tokenizer
    # dir, or a run dir of tools/import_hf.py (its tokenizer/). Data with a record must match it.
    tokenizer: Optional[str] = None
    # How much of such data's .bin is scanned for ids outside that tokenizer's vocabulary
    # before training: sample (a bounded sample, seconds at any size) or full (every token).
    token_scan: str = "sample"


TOKEN_SCANS = ("sample", "full")


def split_blend(prefixes: list, weights: Optional[list]) -> tuple[list[str], Optional[list[float]]]:
    """(prefixes, weights) of `data.prefixes` + `data.weights`, or of Megatron's flattened
    form `data.prefixes=[w1, p1, w2, p2, ...]` (weights null): every other item a number."""
    items = [str(p) for p in prefixes]

    def number(text: str) -> Optional[float]:
        try:
            return float(text)
        except ValueError:
            return None

    numbers = [number(x) for x in items]
    if not items or numbers[0] is None:
        return items, (list(weights) if weights is not None else None)
    flat_ok = len(items) % 2 == 0 and all(n is not None for n in numbers[0::2]) and all(n is None for n in numbers[1::2])
    if not flat_ok:
        raise ConfigError("data.prefixes", items, "starts with a number, so it reads as Megatron's flattened blend "
                          "[weight1, prefix1, weight2, prefix2, ...]: give a weight before every prefix, or "
                          "prefixes only with data.weights")
    if weights is not None:
        raise ConfigError("data.weights", list(weights), "give the weights once: in data.weights or in the flattened "
                          "data.prefixes=[w1, p1, ...], not both")
    return items[1::2], [float(n) for n in numbers[0::2]]


@dataclass
class TrainerConfig:
    # Optimizer steps of the run.
    max_steps: int = 100
    # Sequences per forward/backward on one data-parallel rank.
    micro_batch_size: int = 4
    # Sequences per optimizer step over all data-parallel ranks (gradient accumulation fills the
    # gap).
    global_batch_size: int = 8
    # Peak learning rate (Adam).
    lr: float = 3.0e-4
    # Learning rate at the end of the decay.
    min_lr: float = 3.0e-5
    # Linear warmup steps from 0 to trainer.lr.
    warmup_steps: int = 10
    # constant | linear | cosine decay after warmup.
    lr_decay_style: str = "cosine"
    # null = decay over max_steps.
    lr_decay_steps: Optional[int] = None
    # AdamW weight decay.
    weight_decay: float = 0.1
    # Adam beta1.
    adam_beta1: float = 0.9
    # Adam beta2.
    adam_beta2: float = 0.95
    # Adam epsilon.
    adam_eps: float = 1.0e-8
    # Gradient norm clipping threshold; 0 disables clipping.
    clip_grad: float = 1.0
    # auto: bf16 on GPU, fp32 on CPU.
    precision: str = "auto"
    # Steps between log lines (and W&B points).
    log_interval: int = 10
    # Steps between validation passes.
    eval_interval: int = 100
    # Validation micro-batches per pass.
    eval_iters: int = 4
    # Steps between checkpoints (the last step is always saved).
    save_interval: int = 100
    # Peak dense FLOP/s of one accelerator for MFU (H100 bf16: 989e12).
    peak_flops: float = 989.0e12
    # Artificial delay after each step: lets tests signal a running job. Keep 0.
    step_sleep_s: float = 0.0
    # Stop the run (non-zero exit, no COMPLETED) after this many consecutive steps whose
    # update was skipped for a non-finite loss or gradient.
    max_skipped_steps: int = 5
    # Activation recomputation (models/recompute.py), as Megatron-LM's --recompute-*:
    # none | selective (the parts in recompute_modules) | full (whole hybrid layers).
    recompute: str = "none"
    # full: uniform (every group of recompute_num_layers layers) | block (the first
    # recompute_num_layers layers of each pipeline stage).
    recompute_method: str = "uniform"
    # full recompute: layers per recomputed group (uniform) or recomputed layers per stage
    # (block).
    recompute_num_layers: int = 1
    # selective: any of core_attn, mamba_scan, moe (routed experts), mlp (dense MLP and shared
    # expert). Default: what saves most per recompute cost (benchmarks/activation_recompute.py):
    # the scan's intermediates and the experts' activations; core attention through SDPA or
    # flash attention keeps little beyond its inputs, so recomputing it saves ~nothing.
    recompute_modules: list[str] = field(default_factory=lambda: ["mamba_scan", "moe"])


@dataclass
class LoggerConfig:
    # none | wandb.
    type: str = "none"
    # W&B project.
    project: str = "elastic_megatron"
    # W&B entity (team); null = the default of the API key.
    entity: Optional[str] = None
    # W&B mode: offline (synced later with `wandb sync`) | online | disabled.
    mode: str = "offline"
    # W&B run tags.
    tags: list[str] = field(default_factory=list)


@dataclass
class ClusterConfig:
    # local: a workstation or a test machine; slurm: launched by slurm/*.sh.
    name: str = "local"
    # GPUs per node (set by the Slurm launchers; 0 on CPU).
    gpus_per_node: int = 0


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="job_schema", node=JobConfig)


RECOMPUTE_GRANULARITIES = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
RECOMPUTE_MODULES = ("core_attn", "mamba_scan", "moe", "mlp")


def validate_recompute(t: "TrainerConfig") -> None:
    require_choice("trainer.recompute", t.recompute, RECOMPUTE_GRANULARITIES)
    require_choice("trainer.recompute_method", t.recompute_method, RECOMPUTE_METHODS)
    require_positive_int("trainer.recompute_num_layers", t.recompute_num_layers)
    unknown = [m for m in t.recompute_modules if m not in RECOMPUTE_MODULES]
    if unknown:
        raise ConfigError("trainer.recompute_modules", list(t.recompute_modules), f"unknown {unknown}; allowed: {list(RECOMPUTE_MODULES)}")
    if t.recompute == "selective" and not t.recompute_modules:
        raise ConfigError("trainer.recompute_modules", [], f"selective recompute needs at least one of {list(RECOMPUTE_MODULES)}")


def validate_job(job: JobConfig, world_size: int = 1) -> None:
    """Every check that does not need data on disk; raises ConfigError."""
    validate_model_config(job.model)
    p, t, d = job.parallel, job.trainer, job.data
    validate_parallel_layout(job.model, p)
    dp = layout_data_parallel(p, world_size)
    require_sequence_split(d.seq_length, p)
    for key in ("max_steps", "micro_batch_size", "global_batch_size", "log_interval", "eval_interval", "eval_iters", "save_interval",
                "max_skipped_steps"):
        require_positive_int(f"trainer.{key}", getattr(t, key))
    require_batch_split(t.global_batch_size, t.micro_batch_size, dp)
    if not t.lr > 0:
        raise ConfigError("trainer.lr", t.lr, "must be a positive number")
    if not 0 <= t.min_lr <= t.lr:
        raise ConfigError("trainer.min_lr", t.min_lr, f"must be between 0 and trainer.lr={t.lr}")
    if isinstance(t.warmup_steps, bool) or t.warmup_steps < 0:
        raise ConfigError("trainer.warmup_steps", t.warmup_steps, "must be an integer >= 0")
    if t.lr_decay_steps is not None and not 0 < t.lr_decay_steps:
        raise ConfigError("trainer.lr_decay_steps", t.lr_decay_steps, "must be a positive integer or null")
    if not t.weight_decay >= 0:
        raise ConfigError("trainer.weight_decay", t.weight_decay, "must be >= 0")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, key) < 1:
            raise ConfigError(f"trainer.{key}", getattr(t, key), "must be in [0, 1)")
    if not t.adam_eps > 0:
        raise ConfigError("trainer.adam_eps", t.adam_eps, "must be a positive number")
    if not t.peak_flops > 0:
        raise ConfigError("trainer.peak_flops", t.peak_flops, "must be a positive number (FLOP/s of one accelerator)")
    if t.clip_grad < 0:
        raise ConfigError("trainer.clip_grad", t.clip_grad, "must be >= 0 (0 disables clipping)")
    if t.step_sleep_s < 0:
        raise ConfigError("trainer.step_sleep_s", t.step_sleep_s, "must be >= 0")
    require_choice("trainer.precision", t.precision, PRECISIONS)
    validate_recompute(t)
    require_choice("trainer.lr_decay_style", t.lr_decay_style, DECAY_STYLES)
    require_choice("logger.type", job.logger.type, LOGGERS)
    require_choice("logger.mode", job.logger.mode, WANDB_MODES)
    require_positive_int("data.seq_length", d.seq_length)
    if d.seq_length > job.model.max_sequence_length:
        raise ConfigError("data.seq_length", d.seq_length, f"must be <= model.max_sequence_length={job.model.max_sequence_length}")
    if not d.prefixes:
        raise ConfigError("data.prefixes", list(d.prefixes), "needs at least one data prefix (tools/preprocess_data.py writes them)")
    split_blend(d.prefixes, d.weights)
    require_choice("data.token_scan", d.token_scan, TOKEN_SCANS)
    require_choice("run.task", job.run.task, TASKS)
    require_choice("run.verify_checkpoints", job.run.verify_checkpoints, VERIFY_LEVELS)
    if job.run.task == "importance" and not job.elastic.parent_checkpoint:
        raise ConfigError("elastic.parent_checkpoint", None, "the importance task needs the parent to sort (a run dir or checkpoint dir)")
    if job.run.task == "train" and job.elastic.enabled:
        # The budgets' widths are checked where the elastic step is built
        # (elastic.budgets.resolve_budgets), before anything is allocated.
        validate_elastic_settings(job.elastic, job.model)
        if not job.elastic.teacher_checkpoint:
            raise ConfigError("elastic.teacher_checkpoint", None, "elastic training needs the sorted parent (the importance run dir)")
    validate_quant_settings(job.quant)
    if job.quant.format != "none" and not (job.run.task == "train" and job.elastic.enabled):
        raise ConfigError("quant.format", job.quant.format, "quantization-aware training runs as an elastic stage (recipes/qad.yaml: "
                          "elastic.enabled=true from an elastic checkpoint); allowed here: none")


__all__ = [
    "JobConfig", "RunConfig", "DataConfig", "TrainerConfig", "ParallelConfig", "LoggerConfig",
    "ClusterConfig", "ElasticConfig", "QuantConfig", "register_configs", "validate_job", "MISSING",
]
