"""Optimizer and learning-rate schedule.

GPU runs use Megatron-Core's own stack: the model wrapped in Megatron's
DistributedDataParallel (contiguous grad buffers, reduce-scatter) and
`get_megatron_optimizer` (mixed-precision Adam; the distributed optimizer when DP > 1).
Megatron's DDP and optimizers require CUDA tensors, so CPU runs (tests, demos) use
`CpuDataParallelAdam`: the same Adam hyper-parameters and no-weight-decay groups, the
same gradient reductions as Megatron's DDP (sequence-parallel parameters summed over TP;
dense gradients averaged over DP; expert gradients summed over expert-DP and divided by
DP), the global gradient norm over every model-parallel shard counted once, clipping,
a sharded (layout-independent) checkpoint of its state, and the same
`step() -> (ok, grad_norm, num_zeros)` interface. Both are driven by Megatron's
`OptimizerParamScheduler` (warmup, then linear or cosine decay to min_lr).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from elastic_megatron.parallel.collectives import all_reduce_mean_, all_reduce_sum_


def _no_decay(name: str, param: torch.Tensor) -> bool:
    """Megatron's rule: no weight decay on biases and 1-D parameters (norms, A_log, D, dt_bias)."""
    return name.endswith(".bias") or param.dim() == 1


class CpuDataParallelAdam:
    """AdamW over a model replicated on every data-parallel rank (CPU, gloo)."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, betas, eps: float, clip_grad: float):
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if _no_decay(name, p) else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0, "lr_mult": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0, "lr_mult": 1.0},
        ]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)
        self.params = decay + no_decay
        self.clip_grad = clip_grad

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def reload_model_params(self) -> None:
        """Megatron's optimizers copy the model's weights into fp32 main params here;
        this one updates the (fp32) parameters themselves, so there is nothing to copy."""

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Megatron DDP's reductions, in place (collective over the whole world)."""
        for p in self.params:  # every rank must contribute the same tensor lists
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        tp = parallel_state.get_tensor_model_parallel_group()
        sp = [p.grad for p in self.params if getattr(p, "sequence_parallel", False)]
        if sp and dist.get_world_size(tp) > 1:  # norms and routers see a TP share of the tokens
            all_reduce_sum_(sp, tp)
        dense = [p.grad for p in self.params if not is_expert_param(p)]
        experts = [p.grad for p in self.params if is_expert_param(p)]
        # Context-parallel ranks are data-parallel for the weights (the loss was scaled by cp).
        dp_cp = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        all_reduce_mean_(dense, parallel_state.get_data_parallel_group(with_context_parallel=True))
        all_reduce_sum_(experts, parallel_state.get_expert_data_parallel_group(), 1.0 / dp_cp)

    def grad_norm(self) -> float:
        """L2 norm of the whole model's gradient: each shard counted once (replicas on
        other TP ranks skipped), summed over the model-parallel groups."""
        dense = torch.zeros((), dtype=torch.float64)
        experts = torch.zeros((), dtype=torch.float64)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        etp_rank = parallel_state.get_expert_tensor_parallel_rank()
        for p in self.params:
            if p.grad is None:
                continue
            sq = p.grad.double().pow(2).sum().cpu()
            if is_expert_param(p):
                if getattr(p, "tensor_model_parallel", False) or etp_rank == 0:
                    experts += sq
            elif getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                dense += sq
        if dist.get_world_size(parallel_state.get_model_parallel_group()) > 1:
            dist.all_reduce(dense, group=parallel_state.get_model_parallel_group())
        if dist.get_world_size(parallel_state.get_expert_tensor_model_pipeline_parallel_group()) > 1:
            dist.all_reduce(experts, group=parallel_state.get_expert_tensor_model_pipeline_parallel_group())
        return math.sqrt(float(dense + experts))

    @torch.no_grad()
    def step(self):
        """Reduce gradients, clip, update. Returns (ok, grad_norm, num_zeros)."""
        self.reduce_gradients()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = self.grad_norm()
        if not math.isfinite(norm):
            self.zero_grad()
            return False, norm, None
        if self.clip_grad > 0 and norm > self.clip_grad:
            for g in grads:
                g.mul_(self.clip_grad / (norm + 1e-6))
        self.optimizer.step()
        return True, norm, None

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        common_step = state["state"].pop("common_step", None)
        if common_step is not None:
            for param_state in state["state"].values():
                param_state["step"] = torch.as_tensor(common_step, dtype=torch.float32).clone()
        self.optimizer.load_state_dict(state)

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
        """Adam moments as sharded tensors keyed like the parameters they belong to, so a
        checkpoint reshards to another TP/PP/EP layout like the model does."""
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            optim_state_to_sharding_state,
        )

        if is_loading:  # a template with every moment present (Adam creates them lazily)
            for p in self.params:
                if p not in self.optimizer.state or not self.optimizer.state[p]:
                    self.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                               "exp_avg_sq": torch.zeros_like(p)}
        state = self.optimizer.state_dict()
        steps = {float(s["step"]) for s in state["state"].values() if "step" in s}
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, [p for g in self.optimizer.param_groups for p in g["params"]])
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        if steps:
            state["state"]["common_step"] = max(steps)
        return state


def is_expert_param(p: torch.nn.Parameter) -> bool:
    """Megatron marks routed-expert weights `allreduce=False` (reduced over expert-DP)."""
    return not getattr(p, "allreduce", True)


def build_optimizer(model, trainer_cfg, parallel_cfg, params_dtype: torch.dtype):
    """(model_for_forward, optimizer): Megatron DDP + optimizer on GPU, CpuDataParallelAdam on CPU."""
    t = trainer_cfg
    if not torch.cuda.is_available():
        return model, CpuDataParallelAdam(model, t.lr, t.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_eps, t.clip_grad)

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    use_dist_opt = parallel_cfg.distributed_optimizer and parallel_state.get_data_parallel_world_size() > 1
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_dist_opt
        ),
        module=model,
    )
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        use_distributed_optimizer=use_dist_opt,
    )
    return ddp, get_megatron_optimizer(opt_cfg, [ddp])


def start_step(model, optimizer) -> None:
    """Clear gradients before a step's micro-batches (Megatron DDP keeps them in a
    contiguous buffer of its own; on CPU the model is not wrapped)."""
    if hasattr(model, "zero_grad_buffer"):
        model.zero_grad_buffer()
    optimizer.zero_grad()


def finish_backward(model) -> None:
    """Wait for Megatron DDP's gradient reductions after the last micro-batch (CPU: the
    optimizer reduces in `step`)."""
    if hasattr(model, "finish_grad_sync"):
        model.finish_grad_sync()


def build_scheduler(optimizer, trainer_cfg) -> OptimizerParamScheduler:
    """Megatron's scheduler, counted in optimizer steps (increment 1 per step)."""
    t = trainer_cfg
    decay_steps = t.lr_decay_steps or t.max_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=max(decay_steps, t.warmup_steps + 1),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(decay_steps, 1),
        wd_incr_style="constant",
    )
