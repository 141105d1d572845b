"""Distillation and router losses.

`kd_loss` is KL(teacher || student) on temperature-scaled logits, computed from the two
models' final hidden states chunk by chunk of tokens: each chunk goes through both
output layers, a vocab-parallel log-softmax (max and sum all-reduced over the tensor-
parallel group, so each rank only ever holds its vocabulary shard), and the KL; the
chunk is checkpointed, so backward recomputes its logits instead of keeping them. Peak
memory is one chunk of logits per model, never the whole [tokens, vocab] matrix.

`router_loss` is the squared relative distance between the expected cost of the
router's width distribution and the budget's target.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch.utils.checkpoint import checkpoint

from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from elastic_megatron.parallel.context import token_count


def _tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def vocab_parallel_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over a vocabulary split across tensor-parallel ranks (last dim local)."""
    group = _tp_group()
    with torch.no_grad():
        peak = logits.max(dim=-1, keepdim=True).values
        if dist.get_world_size(group) > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - peak
    sum_exp = shifted.exp().sum(dim=-1, keepdim=True)
    if dist.get_world_size(group) > 1:
        # Every rank's log-probabilities depend on the whole sum, so its gradient is the
        # sum of every rank's: all-reduce forward and backward (not Megatron's
        # reduce_from region, whose backward is the identity).
        sum_exp = dist_nn.all_reduce(sum_exp, group=group)
    return shifted - sum_exp.log()


def _tp_sum(x: torch.Tensor) -> torch.Tensor:
    group = _tp_group()
    if dist.get_world_size(group) > 1:
        return reduce_from_tensor_model_parallel_region(x, group=group)
    return x


def kl_from_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float, top_k: int = 0) -> torch.Tensor:
    """Per-token KL(teacher || student) * T^2 from (local shards of) raw logits [n, v]."""
    s = student.float() / temperature
    t = teacher.float() / temperature
    log_ps = vocab_parallel_log_softmax(s)
    if top_k:
        if dist.get_world_size(_tp_group()) > 1:
            raise NotImplementedError("top-k logit distillation under tensor parallelism")
        top = t.topk(top_k, dim=-1)
        log_pt = torch.log_softmax(top.values, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps.gather(-1, top.indices))).sum(-1)
    else:
        log_pt = vocab_parallel_log_softmax(t)
        kl = _tp_sum((log_pt.exp() * (log_pt - log_ps)).sum(-1))
    return kl * temperature**2


def kd_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_output_layer,
    teacher_output_layer,
    loss_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    top_k: int = 0,
    labels: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Masked-mean KD loss over tokens (and the student's LM loss when `labels` is given).
Under context parallelism the mean divides by the whole sequences' token count: each CP
rank returns its share, and the shares add up to the loss.

    hidden: [s, b, h] final hidden states (after the final norm), or this rank's
    [s / tp, b, h] sequence shard under sequence parallelism (the output layers then
    gather the chunk's rows from every TP rank); loss_mask, labels: [b, s] (whole sequence).
    """
    s_local, b = student_hidden.shape[:2]
    shards = 1
    if getattr(student_output_layer, "sequence_parallel", False):
        shards = dist.get_world_size(_tp_group())
    rows = max(1, chunk_tokens // (b * shards))  # local sequence rows per chunk
    teacher_hidden = teacher_hidden.detach()

    def chunk(hs_c, ht_c, labels_c):
        logits_s = student_output_layer(hs_c)[0]
        logits_s = logits_s.reshape(-1, logits_s.shape[-1])
        with torch.no_grad():
            logits_t = teacher_output_layer(ht_c)[0]
            logits_t = logits_t.reshape(-1, logits_t.shape[-1])
        kl = kl_from_logits(logits_s, logits_t, temperature, top_k)
        if labels_c is None:
            return kl, None
        ce = vocab_parallel_cross_entropy(logits_s.float().unsqueeze(0), labels_c.unsqueeze(0))[0]
        return kl, ce

    kl_parts, ce_parts, mask_parts = [], [], []
    for start in range(0, s_local, rows):
        stop = min(start + rows, s_local)
        # Whole-sequence positions of the gathered chunk, in the output layer's row order
        # (TP rank-major); logits rows are (position, batch).
        positions = torch.cat([r * s_local + torch.arange(start, stop) for r in range(shards)]).to(loss_mask.device)
        mask_parts.append(loss_mask[:, positions].transpose(0, 1).reshape(-1).to(torch.float32))
        lab = labels[:, positions].transpose(0, 1).reshape(-1) if labels is not None else None
        hs_c, ht_c = student_hidden[start:stop], teacher_hidden[start:stop]
        if torch.is_grad_enabled() and hs_c.requires_grad:
            kl, ce = checkpoint(chunk, hs_c, ht_c, lab, use_reentrant=False)
        else:
            kl, ce = chunk(hs_c, ht_c, lab)
        kl_parts.append(kl)
        if ce is not None:
            ce_parts.append(ce)
    mask = torch.cat(mask_parts)
    denom = token_count(mask)
    kd = (torch.cat(kl_parts) * mask).sum() / denom
    lm = (torch.cat(ce_parts) * mask).sum() / denom if ce_parts else None
    return kd, lm


def router_loss(expected_cost: torch.Tensor, target: float) -> torch.Tensor:
    """((E[cost] - target) / target)^2."""
    return ((expected_cost - target) / target) ** 2
