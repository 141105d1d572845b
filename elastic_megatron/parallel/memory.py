"""Per-GPU memory estimate of elastic distillation under a parallel layout, so a user can
choose node counts before submitting (tools/describe_model.py memory=true).

What one GPU holds, on the heaviest pipeline stage (bf16 training, Megatron DDP with
fp32 gradient buffers, Adam with fp32 main weights and moments in the distributed
optimizer):

- student weights (bf16, 2 B/param) and gradients (fp32, 4 B/param);
- optimizer state (fp32 main weights + two moments, 12 B/param), sharded over the
  data-parallel ranks holding the same shard (DP for dense, expert-DP for experts);
- the frozen teacher (bf16, 2 B/param, no gradients or optimizer state);
- activations of the micro-batches in flight: this project's pipeline schedule keeps
  every micro-batch of a step until its backward (GPipe), one when PP = 1;
- the KD logits chunk of both models (fp32, vocabulary shard).

Dense weights are split over TP (and stages); routed experts over EP x expert-TP (and
stages). Activation bytes per token and layer follow the usual Megatron accounting
(bf16 tensors saved for backward), divided by TP under sequence parallelism; they are
an estimate, not a measurement: allocator fragmentation and communication buffers come
on top (a margin is reported).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from elastic_megatron.config.model import ATTENTION, MAMBA, MLP, MOE, ModelConfig
from elastic_megatron.config.parallel import expert_tensor_parallel, pipeline_stages
from elastic_megatron.models.counter import model_size

GIB = 2**30


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    teacher: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.teacher + self.activations + self.logits

    def as_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in ("weights", "gradients", "optimizer", "teacher", "activations", "logits")},
                "total": self.total}


def _layer_params(cfg: ModelConfig) -> tuple[dict[str, tuple[float, float]], float, float]:
    """(dense, expert) parameters of one layer of each type, and the embedding's and the
    output layer's parameters."""
    per_type = {}
    for t in (MAMBA, ATTENTION, MLP, MOE):
        n = cfg.count(t)
        if n:
            comp = model_size(dataclasses.replace(cfg, hybrid_pattern=t * n)).params_by_component
            per_type[t] = (sum(v for k, v in comp.items() if k not in ("expert", "embedding", "output")) / n,
                           comp.get("expert", 0) / n)
    full = model_size(cfg).params_by_component
    return per_type, full.get("embedding", 0), full.get("output", 0)


def _activation_bytes_per_token(cfg: ModelConfig, layer_type: str, tp: int, sp: bool) -> float:
    """bf16 bytes saved for backward per token by one layer (an estimate)."""
    h = cfg.hidden_size
    shard = tp if sp else 1  # tensors on the residual stream are split only under SP
    norm_and_residual = 4 * h / shard
    if layer_type == MAMBA:
        d_inner = cfg.mamba_num_heads * cfg.mamba_head_dim
        in_proj = 2 * d_inner + 2 * cfg.mamba_num_groups * cfg.mamba_state_dim + cfg.mamba_num_heads
        return norm_and_residual + 2 * (2 * in_proj + 3 * d_inner) / tp
    if layer_type == ATTENTION:
        q = cfg.num_attention_heads * cfg.head_dim
        kv = 2 * cfg.num_query_groups * cfg.head_dim
        return norm_and_residual + 2 * (2 * (q + kv) + 2 * q) / tp  # flash attention: no s^2 scores
    if layer_type == MLP:
        return norm_and_residual + 2 * 3 * cfg.ffn_hidden_size / tp
    # MoE: routed tokens (top-k copies) through expert fc1/act/fc2, plus the shared expert.
    routed = cfg.moe_router_topk * (2 * h + 3 * cfg.moe_ffn_hidden_size) * 2 / shard
    shared = 2 * 3 * cfg.moe_shared_expert_ffn_hidden_size / tp
    return norm_and_residual + routed + shared + 4 * cfg.moe_num_experts / shard


def estimate_memory(cfg: ModelConfig, parallel, world_size: int, seq_length: int, micro_batch_size: int,
                    global_batch_size: int, budgets_per_batch: int = 1, kd_chunk_tokens: int = 1024,
                    elastic: bool = True) -> MemoryEstimate:
    """Bytes per GPU on the heaviest stage (see the module doc)."""
    tp, pp, ep = parallel.tp, parallel.pp, parallel.ep
    etp = expert_tensor_parallel(parallel)
    dp = world_size // (tp * pp)
    edp = world_size // (etp * ep * pp)
    micro_per_step = global_batch_size // (micro_batch_size * dp)
    in_flight = micro_per_step if pp > 1 else 1
    stages = pipeline_stages(cfg, pp, parallel.pp_layout)
    per_type, embedding, output = _layer_params(cfg)
    worst = None
    for i, stage in enumerate(stages):
        dense = sum(stage.count(t) * d for t, (d, _) in per_type.items())
        expert = sum(stage.count(t) * e for t, (_, e) in per_type.items())
        dense += (embedding if i == 0 else 0) + (output if i == len(stages) - 1 else 0)
        dense_gpu, expert_gpu = dense / tp, expert / (ep * etp)
        tokens = seq_length * micro_batch_size
        act = sum(_activation_bytes_per_token(cfg, t, tp, parallel.sequence_parallel) for t in stage) * tokens
        # One student pass per budget in the micro-batch keeps its activations; the
        # teacher runs without grad (only its current layer's output is alive).
        act *= in_flight * (budgets_per_batch if elastic else 1)
        logits = 2 * 4 * kd_chunk_tokens * cfg.vocab_size / tp if i == len(stages) - 1 else 0
        est = MemoryEstimate(
            weights=2 * (dense_gpu + expert_gpu),
            gradients=4 * (dense_gpu + expert_gpu),
            optimizer=12 * (dense_gpu / dp + expert_gpu / edp),
            teacher=2 * (dense_gpu + expert_gpu) if elastic else 0.0,
            activations=act,
            logits=logits,
        )
        if worst is None or est.total > worst.total:
            worst = est
    return worst


def render_memory(cfg: ModelConfig, parallel, world_size: int, gpus_per_node: int, est: MemoryEstimate,
                  seq_length: int, micro_batch_size: int, global_batch_size: int, gpu_gib: float) -> str:
    tp, pp, ep = parallel.tp, parallel.pp, parallel.ep
    etp = expert_tensor_parallel(parallel)
    dp = world_size // (tp * pp)
    lines = [
        f"model {cfg.name} on {world_size} GPUs ({world_size // gpus_per_node} nodes x {gpus_per_node}): "
        f"tp {tp}{' +sp' if parallel.sequence_parallel else ''}, pp {pp}, ep {ep}, etp {etp}, dp {dp}",
        f"seq {seq_length}, micro batch {micro_batch_size}, global batch {global_batch_size} "
        f"({global_batch_size // (micro_batch_size * dp)} micro-batches per step per DP rank)",
        "",
        "per-GPU memory, heaviest pipeline stage (estimate):",
    ]
    for k, v in est.as_dict().items():
        if k != "total":
            lines.append(f"  {k:<14}{v / GIB:>9.2f} GiB")
    headroom = gpu_gib - est.total / GIB
    lines.append(f"  {'total':<14}{est.total / GIB:>9.2f} GiB   of {gpu_gib:.0f} GiB: "
                 + (f"fits with {headroom:.1f} GiB for allocator and communication buffers" if headroom > 0.1 * gpu_gib
                    else "does NOT fit with a 10% margin: raise tp/ep/pp or the node count, or lower the micro batch"))
    return "\n".join(lines)

