"""The parallel layout (the `parallel` recipe group) and every check that depends on it.

One place for what a layout must satisfy: model widths vs TP, experts vs EP/ETP, the
pipeline split of the hybrid pattern, how the layout tiles the world (the data-parallel
size), the batch split over DP ranks and the sequence split under sequence parallelism.
All raise ConfigError before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from elastic_megatron.config.errors import ConfigError, require_positive_int
from elastic_megatron.config.model import ATTENTION, MAMBA, MLP, MOE, ModelConfig


@dataclass
class ParallelConfig:
    # Tensor parallel size.
    tp: int = 1
    # Pipeline parallel size (stages).
    pp: int = 1
    # Expert parallel size (MoE experts spread over ep ranks).
    ep: int = 1
    # Expert tensor parallel size; null = tp (Megatron-LM's default).
    etp: Optional[int] = None
    # Megatron's sequence parallelism: norms and dropout split over the TP ranks (needs tp > 1).
    sequence_parallel: bool = False
    # Pipeline stages as the hybrid pattern cut by '|' (e.g. "M*EM|EM-E"); null = an even
    # split of the layers. Megatron-Core 0.16 needs the middle stages equally long.
    pp_layout: Optional[str] = None
    # Megatron's distributed optimizer when DP > 1 (GPU runs).
    distributed_optimizer: bool = True
    # Context parallel size: every sequence is cut into 2 * cp chunks and CP rank r holds
    # chunks r and 2 * cp - 1 - r (Megatron's load-balanced causal split). Mamba layers
    # switch to head parallelism inside the mixer (all-to-all), attention gathers K/V.
    cp: int = 1


def pipeline_stages(cfg: ModelConfig, pipeline_parallel: int = 1, layout: Optional[str] = None) -> list[str]:
    """The hybrid pattern of each pipeline stage; ConfigError if it cannot be split so."""
    pattern = cfg.hybrid_pattern
    if layout is None:
        if len(pattern) % pipeline_parallel:
            raise ConfigError("parallel.pp", pipeline_parallel,
                              f"must divide the {len(pattern)} layers of {pattern!r} for an even split; "
                              "otherwise give the stages as parallel.pp_layout (the pattern cut by '|')")
        n = len(pattern) // pipeline_parallel
        return [pattern[i * n:(i + 1) * n] for i in range(pipeline_parallel)]
    stages = layout.split("|")
    if "".join(stages) != pattern:
        raise ConfigError("parallel.pp_layout", layout, f"must be model.hybrid_pattern {pattern!r} cut by '|'")
    if len(stages) != pipeline_parallel or not all(stages):
        raise ConfigError("parallel.pp_layout", layout, f"must have parallel.pp={pipeline_parallel} non-empty stages")
    if len({len(s) for s in stages[1:-1]}) > 1:
        raise ConfigError("parallel.pp_layout", layout,
                          "middle stages must have equal layer counts (Megatron-Core 0.16 splits the first and last stage freely)")
    return stages


def expert_tensor_parallel(parallel) -> int:
    """The expert tensor parallel size of a layout: `etp`, or tp when unset (Megatron's default)."""
    return parallel.etp if parallel.etp is not None else parallel.tp


def validate_parallel_layout(cfg: ModelConfig, parallel) -> list[str]:
    """Checks that depend on the parallel layout (`parallel`: tp, pp, ep, etp,
    sequence_parallel, pp_layout); returns each pipeline stage's pattern."""
    tp, pp, ep = parallel.tp, parallel.pp, parallel.ep
    for key in ("tp", "pp", "ep", "cp"):
        require_positive_int(f"parallel.{key}", getattr(parallel, key))
    validate_context_parallel(cfg, parallel)
    etp = expert_tensor_parallel(parallel)
    require_positive_int("parallel.etp", etp)
    has_moe = cfg.count(MOE) > 0
    if tp > 1:
        divisible = [("vocab_size", cfg.vocab_size)]
        if cfg.count(ATTENTION):
            divisible += [("num_attention_heads", cfg.num_attention_heads), ("num_query_groups", cfg.num_query_groups)]
        if cfg.count(MAMBA):
            divisible += [("mamba_num_heads", cfg.mamba_num_heads), ("mamba_num_groups", cfg.mamba_num_groups)]
        if cfg.count(MLP):
            divisible += [("ffn_hidden_size", cfg.ffn_hidden_size)]
        if has_moe and cfg.moe_shared_expert_ffn_hidden_size:
            divisible += [("moe_shared_expert_ffn_hidden_size", cfg.moe_shared_expert_ffn_hidden_size)]
        for name, value in divisible:
            if value % tp:
                raise ConfigError(f"model.{name}", value, f"must be divisible by parallel.tp={tp}")
        if has_moe and not parallel.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel", False, "MoE models with parallel.tp > 1 need sequence parallelism (as in Megatron-LM); set true")
    elif parallel.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel", True, "needs parallel.tp > 1")
    if has_moe:
        if cfg.moe_num_experts % ep:
            raise ConfigError("model.moe_num_experts", cfg.moe_num_experts, f"must be divisible by parallel.ep={ep}")
        if etp not in (1, tp):
            raise ConfigError("parallel.etp", etp, f"allowed: 1 or parallel.tp={tp}")
        if cfg.moe_ffn_hidden_size % etp:
            raise ConfigError("model.moe_ffn_hidden_size", cfg.moe_ffn_hidden_size, f"must be divisible by parallel.etp={etp}")
    elif ep > 1:
        raise ConfigError("parallel.ep", ep, "the model has no MoE layers; allowed: 1")
    return pipeline_stages(cfg, pp, parallel.pp_layout)


def validate_context_parallel(cfg: ModelConfig, parallel) -> None:
    """What context parallelism needs of the model: the Mamba mixer hands each CP rank
    whole heads (and whole groups, or one group's heads split evenly) of its TP shard, as
    Megatron-Core's MambaContextParallel does."""
    cp, tp = parallel.cp, parallel.tp
    if cp == 1 or not cfg.count(MAMBA):
        return
    heads, groups = cfg.mamba_num_heads // tp, cfg.mamba_num_groups // tp
    if heads % cp:
        raise ConfigError("parallel.cp", cp, f"must divide the Mamba heads per tensor-parallel rank "
                          f"(model.mamba_num_heads / parallel.tp = {heads}): each CP rank scans whole heads")
    if groups % cp and cp % groups:
        raise ConfigError("parallel.cp", cp, f"must divide, or be a multiple of, the Mamba groups per tensor-parallel rank "
                          f"(model.mamba_num_groups / parallel.tp = {groups})")


def layout_data_parallel(p: ParallelConfig, world_size: int) -> int:
    """The data-parallel size of layout `p` on `world_size` ranks; ConfigError when the
    layout does not tile the world (model parallel ranks, experts over a stage's ranks).
    Context-parallel ranks share a batch: DP = world / (tp x cp x pp)."""
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ConfigError("parallel.tp", p.tp, f"tp * cp * pp = {model_parallel} must divide the world size {world_size}")
    dp = world_size // model_parallel
    experts = p.ep * expert_tensor_parallel(p)
    if p.ep > 1 and (dp * p.cp * p.tp) % experts:
        raise ConfigError("parallel.ep", p.ep, f"ep x etp = {experts} must divide dp x cp x tp = {dp * p.cp * p.tp} "
                          "(experts are spread over the data-, context- and tensor-parallel ranks of a stage)")
    return dp


def require_batch_split(global_batch_size: int, micro_batch_size: int, dp: int, prefix: str = "trainer.") -> None:
    """The global batch must be whole micro-batches on every data-parallel rank."""
    if global_batch_size % (micro_batch_size * dp):
        raise ConfigError(
            f"{prefix}global_batch_size", global_batch_size,
            f"must be divisible by {prefix}micro_batch_size ({micro_batch_size}) x data-parallel size ({dp}) = {micro_batch_size * dp}",
        )


def require_sequence_split(seq_length: int, p: ParallelConfig, key: str = "data.seq_length") -> None:
    """Context parallelism cuts every sequence into 2 * cp equal chunks; sequence
    parallelism then cuts each CP rank's part into tp equal parts."""
    cp = p.cp
    if cp > 1 and seq_length % (2 * cp):
        raise ConfigError(key, seq_length, f"must be divisible by 2 x parallel.cp = {2 * cp} (each CP rank holds two "
                          "chunks of every sequence, balancing causal attention)")
    if p.sequence_parallel and (seq_length // cp) % p.tp:
        raise ConfigError(key, seq_length, f"must be divisible by parallel.tp={p.tp}" + (f" x parallel.cp={cp}" if cp > 1 else "")
                          + " under sequence parallelism")
