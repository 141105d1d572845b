"""Per-GPU memory estimate of elastic distillation under a parallel layout, so a user can
choose node counts before submitting (tools/describe_model.py memory=true).

What one GPU holds, on the heaviest pipeline stage (bf16 training, Megatron DDP with
fp32 gradient buffers, Adam with fp32 main weights and moments in the distributed
optimizer):

- student weights (bf16, 2 B/param) and gradients (fp32, 4 B/param);
- optimizer state (fp32 main weights + two moments, 12 B/param), sharded over the
  data-parallel ranks holding the same shard (DP x CP for dense, as Megatron's
  distributed optimizer does, expert-DP for experts);
- the frozen teacher (bf16, 2 B/param, no gradients or optimizer state);
- activations of the micro-batches in flight: this project's pipeline schedule keeps
  every micro-batch of a step until its backward (GPipe), one when PP = 1; each holds
  this CP rank's 1/cp of the sequence, and with activation recomputation
  (trainer.recompute) only what the checkpoints keep, plus one recomputed group;
- the KD logits chunk of both models (fp32, vocabulary shard).

Dense weights are split over TP (and stages); routed experts over EP x expert-TP (and
stages). Activation elements per token and layer (`layer_activation_elements`) count
what this project's layers keep for backward in the activation dtype (fp32 norm
statistics and working copies counted at fp32 size), divided by TP under sequence
parallelism; tests/test_memory.py measures them on CPU (autograd's saved tensors, fp32
and bf16, the Mamba scan as mamba_ssm's Triton kernel keeps it) against this count.
They are an estimate, not a measurement of a GPU: allocator fragmentation and
communication buffers come on top (a margin is reported).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from elastic_megatron.config.model import ATTENTION, MAMBA, MLP, MOE, ModelConfig
from elastic_megatron.config.parallel import expert_tensor_parallel, layout_data_parallel, pipeline_stages
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


def _layer_params(cfg: ModelConfig) -> tuple[dict[str, tuple[float, float, float]], float, float, float]:
    """Per layer of each type: (parameters split over TP, parameters every TP rank holds
    whole, routed-expert parameters); then the embedding's and the output layer's (both
    split over TP) and the final norm's (whole on every TP rank of the last stage). What
    TP replicates: the RMSNorm weights and the MoE router (Megatron keeps both unsplit)."""
    per_type = {}
    final_norm = cfg.hidden_size
    for t in (MAMBA, ATTENTION, MLP, MOE):
        n = cfg.count(t)
        if n:
            comp = model_size(dataclasses.replace(cfg, hybrid_pattern=t * n)).params_by_component
            replicated = comp.get("norm", 0) + comp.get("router", 0) - final_norm
            split = sum(v for k, v in comp.items() if k not in ("expert", "embedding", "output", "norm", "router"))
            per_type[t] = (split / n, replicated / n, comp.get("expert", 0) / n)
    full = model_size(cfg).params_by_component
    return per_type, full.get("embedding", 0), full.get("output", 0), final_norm


def layer_activation_elements(cfg: ModelConfig, layer_type: str, tp: int = 1, sp: bool = False, cp: int = 1,
                              recompute: str = "none", modules=(), activation_bytes: int = 2) -> float:
    """Activation elements one layer keeps for backward per token of this rank's
    sequence part, in units of the activation dtype (`activation_bytes`: 2 for bf16
    training, 4 for fp32): multiply by `activation_bytes` for bytes. Tensors this
    project's layers keep in fp32 whatever the activation dtype (norm statistics and
    the norms' fp32 working copies, router scores, the scan's cumulative decay, the
    attention log-sum-exp) count 4 / activation_bytes units each, integer indices 8 /
    activation_bytes.

    `recompute='full'`: the layer's input only. `selective`: the parts in `modules` keep
    only their inputs (already counted with the layer). Without recompute the Mamba scan
    is counted as mamba_ssm's Triton kernel keeps it (`MambaChunkScanCombinedFn` saves
    its output, x, dt, B, C and the fp32 cumulative decay dA_cumsum) and core attention
    as flash attention does (q, k, v, output and the per-head log-sum-exp; no s x s
    scores); under context parallelism attention also keeps the gathered keys and values
    of the whole sequence. Each item is measured on CPU, in fp32 and in bf16, by
    tests/test_memory.py (autograd's saved tensors).
    """
    h = cfg.hidden_size
    shard = tp if sp else 1  # tensors on the residual stream are split only under SP
    if recompute == "full":
        return h / shard
    f32 = 4 / activation_bytes  # units of one fp32 element
    upcast = 1 if activation_bytes != 4 else 0  # x.float() copies a bf16 tensor, returns an fp32 one itself
    selective = set(modules) if recompute == "selective" else set()
    # The pre-norm (RMSNorm in fp32): its fp32 input, 1/rms and normalised input, and its
    # output in the activation dtype (the next linear's input).
    out = (f32 * (2 * h + 1) + h) / shard
    if layer_type == MAMBA:
        d = cfg.mamba_num_heads * cfg.mamba_head_dim
        gs = cfg.mamba_num_groups * cfg.mamba_state_dim
        nh = cfg.mamba_num_heads
        in_proj = 2 * d + 2 * gs + nh
        out += (in_proj + d) / tp  # in_proj output (z, x, B, C, dt: the mixer's input), out_proj input
        if "mamba_scan" not in selective:
            out += (d + 2 * gs) / tp  # the causal conv's output (SiLU's input)
            out += (d + 2 * gs + nh + f32 * nh + d) / tp  # the scan: contiguous x, B, C, dt; dA_cumsum; its output y
            # The gated norm in fp32: y and z upcast, silu(z), y * silu(z), 1/rms per group, the normalised values.
            out += f32 * (upcast * 2 * d + 3 * d + cfg.mamba_num_groups) / tp
    elif layer_type == ATTENTION:
        q = cfg.num_attention_heads * cfg.head_dim
        kv = 2 * cfg.num_query_groups * cfg.head_dim
        out += (q + kv + 2 * q) / tp  # q, k, v (linear_qkv output), core attention output, linear_proj input
        if "core_attn" not in selective:
            out += f32 * cfg.num_attention_heads / tp  # the softmax's log-sum-exp per head (flash attention, SDPA)
            out += (cp - 1) * kv / tp  # keys and values gathered from the other CP ranks
    elif layer_type == MLP:
        if "mlp" not in selective:
            out += 2 * cfg.ffn_hidden_size / tp  # activation input and output (fc1 output, fc2 input)
    else:
        e, k = cfg.moe_num_experts, cfg.moe_router_topk
        # The router: scores and routing probabilities (fp32, per expert), the top-k
        # probabilities, their sum and the probability each routed copy is scaled by
        # (fp32), the top-k and permutation indices (int64), the routing map (bool).
        out += (4 * (2 * e + 2 * k + 1) + 8 * 2 * k + e) / activation_bytes / shard
        out += k * h / shard  # the permuted tokens (the experts' input)
        if "moe" not in selective:  # fc1 output, activation output, times the routing probability
            out += k * 3 * cfg.moe_ffn_hidden_size / shard
        if cfg.moe_shared_expert_ffn_hidden_size and "mlp" not in selective:
            out += 2 * cfg.moe_shared_expert_ffn_hidden_size / tp
    return out


def stage_activation_elements(cfg: ModelConfig, stage: str, tp: int = 1, sp: bool = False, cp: int = 1,
                              recompute: str = "none", method: str = "uniform", num_layers: int = 1,
                              modules=(), activation_bytes: int = 2) -> tuple[float, float]:
    """(elements per token kept until backward by a pipeline stage's layers, elements
    per token alive on top while one recomputed group is rebuilt in backward), in units
    of the activation dtype (`layer_activation_elements`)."""
    def full(t):
        return layer_activation_elements(cfg, t, tp, sp, cp, activation_bytes=activation_bytes)

    if recompute != "full":
        return sum(layer_activation_elements(cfg, t, tp, sp, cp, recompute, modules, activation_bytes) for t in stage), 0.0
    h = layer_activation_elements(cfg, stage[0], tp, sp, cp, "full")  # a recomputed layer keeps its input
    if method == "block":
        first, rest = stage[:num_layers], stage[num_layers:]
        return len(first) * h + sum(full(t) for t in rest), max((full(t) for t in first), default=0.0)
    groups = [stage[i:i + num_layers] for i in range(0, len(stage), num_layers)]
    return len(groups) * h, max(sum(full(t) for t in g) for g in groups)


def estimate_memory(cfg: ModelConfig, parallel, world_size: int, seq_length: int, micro_batch_size: int,
                    global_batch_size: int, budgets_per_batch: int = 1, kd_chunk_tokens: int = 1024,
                    elastic: bool = True, recompute: str = "none", recompute_method: str = "uniform",
                    recompute_num_layers: int = 1, recompute_modules=("mamba_scan", "moe"),
                    activation_bytes: int = 2) -> MemoryEstimate:
    """Bytes per GPU on the heaviest stage (see the module doc)."""
    tp, pp, ep = parallel.tp, parallel.pp, parallel.ep
    cp = parallel.cp
    etp = expert_tensor_parallel(parallel)
    dp = layout_data_parallel(parallel, world_size)
    edp = world_size // (etp * ep * pp)
    micro_per_step = global_batch_size // (micro_batch_size * dp)
    in_flight = micro_per_step if pp > 1 else 1
    stages = pipeline_stages(cfg, pp, parallel.pp_layout)
    per_type, embedding, output, final_norm = _layer_params(cfg)
    worst = None
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1
        split = sum(stage.count(t) * d for t, (d, _, _) in per_type.items())
        whole = sum(stage.count(t) * r for t, (_, r, _) in per_type.items()) + (final_norm if last else 0)
        expert = sum(stage.count(t) * e for t, (_, _, e) in per_type.items())
        split += (embedding if i == 0 else 0) + (output if last else 0)
        dense_gpu, expert_gpu = split / tp + whole, expert / (ep * etp)
        tokens = seq_length // cp * micro_batch_size  # this CP rank's part of each sequence
        kept, rebuilt = stage_activation_elements(cfg, stage, tp, parallel.sequence_parallel, cp, recompute,
                                                  recompute_method, recompute_num_layers, recompute_modules,
                                                  activation_bytes)
        # One student pass per budget in the micro-batch keeps its activations; the
        # teacher runs without grad (only its current layer's output is alive). A
        # recomputed group is rebuilt one at a time.
        act = kept * tokens * activation_bytes * in_flight * (budgets_per_batch if elastic else 1)
        act += rebuilt * tokens * activation_bytes
        logits = 2 * 4 * kd_chunk_tokens * cfg.vocab_size / tp if i == len(stages) - 1 else 0
        est = MemoryEstimate(
            weights=2 * (dense_gpu + expert_gpu),
            gradients=4 * (dense_gpu + expert_gpu),
            optimizer=12 * (dense_gpu / (dp * cp) + expert_gpu / edp),
            teacher=2 * (dense_gpu + expert_gpu) if elastic else 0.0,
            activations=act,
            logits=logits,
        )
        if worst is None or est.total > worst.total:
            worst = est
    return worst


def render_memory(cfg: ModelConfig, parallel, world_size: int, gpus_per_node: int, est: MemoryEstimate,
                  seq_length: int, micro_batch_size: int, global_batch_size: int, gpu_gib: float,
                  recompute: str = "none") -> str:
    tp, pp, ep, cp = parallel.tp, parallel.pp, parallel.ep, parallel.cp
    etp = expert_tensor_parallel(parallel)
    dp = layout_data_parallel(parallel, world_size)
    lines = [
        f"model {cfg.name} on {world_size} GPUs ({world_size // gpus_per_node} nodes x {gpus_per_node}): "
        f"tp {tp}{' +sp' if parallel.sequence_parallel else ''}, cp {cp}, pp {pp}, ep {ep}, etp {etp}, dp {dp}",
        f"seq {seq_length}, micro batch {micro_batch_size}, global batch {global_batch_size} "
        f"({global_batch_size // (micro_batch_size * dp)} micro-batches per step per DP rank), "
        f"{seq_length // cp} tokens per sequence per CP rank, activation recompute: {recompute}",
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

