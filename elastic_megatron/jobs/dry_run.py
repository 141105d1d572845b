"""Dry run of a training job on its real layout, on one CPU machine, before it queues.

`dry_run(job, nodes, gpus_per_node)` builds what the job's ranks would build, on the meta
device (no weight is allocated), and checks it:

- **Ranks.** One process stands in for the ranks, one after another: for each it
  initialises Megatron's parallel state as that rank of the whole world over torch's fake
  process group (parallel/simulate.py) and builds its student and, for elastic stages,
  its teacher. By default one rank per distinct (pp, tp, cp, ep, etp) coordinate, the
  lowest: ranks that share these build the same modules and shards and differ only in
  their data-parallel replica ids, and the lowest of each holds replica 0, so together
  these ranks write every shard of a checkpoint (the tiling check below fails if not).
  `ranks="all"` builds every rank (replica ids are then checked for distinctness too),
  a list builds those ranks. A gloo process per rank would cost a Megatron import and a
  rendezvous each, 64 of them for the shipped layouts on 2 cores; nothing built here
  needs a collective's result, so the fake backend serves.
- **Memory per rank** (in the trainer's GPU precision): parameters and bytes held by the
  student and the teacher, gradients (Megatron DDP's fp32 buffers), optimizer state
  (Adam's two fp32 moments, plus fp32 main weights for bf16 models, sharded over each
  weight's data-parallel ranks when the distributed optimizer is on and DP > 1: what
  training/optim.py builds on GPU, counted rather than built because Megatron's
  optimizer needs CUDA), activations and KD logits (the memory estimate's, which it
  reports for the heaviest pipeline stage), against the GPU's memory and against the
  analytic estimate for the job's own settings (parallel/memory.py, as `describe_model
  memory=true` prints it, there with its default KD chunk): the parameters
  exactly, the other terms by its formula (bf16 jobs, which it assumes).
- **Checkpoint.** The sharded state a save would write, model and optimizer (the CPU
  trainer's Adam, whose moments are sharded like the parameters, built on meta as the
  load template): per rank no entry twice; per key one global shape and dtype; the main
  replicas tile every global tensor exactly once; every other replica copies a main one.
  The keys and global shapes are those any run of the model writes (the converter's
  layout table, convert/megatron_dist.py, with the counter's shapes), and the keys those
  of a real checkpoint a one-rank run writes at a small width (written and read back).
  Megatron's distributed optimizer (GPU) writes its state as flattened data-parallel
  slices of the same model keys (`fp32_param`, `exp_avg`, `exp_avg_sq`): not simulated.
- **Elastic spec at scale.** The budgets resolved against model and layout, the router
  built, every budget's masks built and split for every simulated rank as the mask
  hooks split them, and held against the module each hook masks (length, per-layer rows,
  the channels each shard keeps); every pinned budget's parameter count by the closed
  form the router and targets use (`model_cost`) equal to the counter's (`model_size` of
  the sliced config); the main replicas of the full model sum to the counter's total.
- **Inputs** (unless `check_inputs=False`): the data prefixes exist and check, one
  tokenizer, which the model's vocabulary covers and the teacher was trained with, and
  enough samples in the training split for trainer.max_steps without repeating data;
  the teacher and initial checkpoints verify (the tools' --verify level), match the
  architecture, are what the stage needs (sorted; recorded budgets for QAD) and hold
  every key the layout loads, with its global shape.

Bad input (a config that does not validate, a layout that does not tile the world) is
refused before anything is built, as the job itself would refuse it; every failure of
the checks above is one line naming the rank, the module and the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import resource
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from elastic_megatron.cli import debug_requested
from elastic_megatron.config.errors import ConfigError, require_positive_int
from elastic_megatron.config.model import ModelConfig
from elastic_megatron.config.parallel import expert_tensor_parallel, layout_data_parallel, pipeline_stages
from elastic_megatron.config.schema import JobConfig, validate_job
from elastic_megatron.parallel.memory import GIB, MemoryEstimate, estimate_memory
from elastic_megatron.parallel.simulate import (
    RankCoords, Shard, check_tiling, layout_coords, representative_ranks, shards, simulated_rank,
)

GPU_MARGIN = 0.10  # the memory estimate's margin for allocator and communication buffers
DTYPES = {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp32": torch.float32}
RankSelection = Union[str, list[int]]
# Sharded entries a save writes besides model and optimizer: the per-rank RNG states
# (checkpoint/store.py) and, from Megatron-Core 0.19, the common state's own entry.
SAVE_EXTRAS = ("rng_state", "common_state")


@dataclass
class BudgetCount:
    name: str
    closed_form: int  # model_cost (what the router and the targets use)
    counter: Optional[int]  # model_size of the sliced config (None: per-layer widths)
    active: int


@dataclass
class RankResult:
    coords: RankCoords
    stands_for: list[int]  # the ranks this one's build stands for (itself included)
    stage: str  # the pattern of the layers this rank built
    params: int
    expert_params: int
    cpu_params: int  # parameters the meta build left on the CPU (small tensors placed explicitly)
    memory: MemoryEstimate
    teacher_params: Optional[int] = None

    def as_dict(self) -> dict:
        return {"coords": self.coords.as_dict(), "stands_for": self.stands_for, "stage": self.stage,
                "params": self.params, "expert_params": self.expert_params, "cpu_params": self.cpu_params,
                "teacher_params": self.teacher_params, "memory": self.memory.as_dict()}


@dataclass
class DryRunReport:
    recipe: str
    model: str
    nodes: int
    gpus_per_node: int
    layout: str
    selection: str
    gpu_gib: float
    estimate: MemoryEstimate
    ranks: list[RankResult] = field(default_factory=list)
    budgets: list[BudgetCount] = field(default_factory=list)
    layout_params: int = 0  # the full model's main-replica parameters summed over the simulated ranks
    checkpoint_keys: int = 0
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shards: dict[int, list[Shard]] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_gib: float = 0.0

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def as_dict(self) -> dict:
        return {
            "recipe": self.recipe, "model": self.model, "nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
            "world": self.world, "layout": self.layout, "selection": self.selection, "gpu_gib": self.gpu_gib,
            "estimate": self.estimate.as_dict(), "ranks": [r.as_dict() for r in self.ranks],
            "budgets": [dataclasses.asdict(b) for b in self.budgets], "layout_params": self.layout_params, "checkpoint_keys": self.checkpoint_keys,
            "failures": self.failures, "notes": self.notes, "seconds": self.seconds, "peak_rss_gib": self.peak_rss_gib,
            "shards": {str(r): [s.as_dict() for s in entries] for r, entries in self.shards.items()},
        }


# ---- the job's numbers ---------------------------------------------------------------

def _gpu_dtype(job: JobConfig) -> torch.dtype:
    """The precision the trainer uses on a GPU (precision=auto: bf16)."""
    return DTYPES[job.trainer.precision]


def _elastic(job: JobConfig) -> bool:
    return job.run.task == "train" and job.elastic.enabled


def _estimate_args(job: JobConfig, world: int) -> dict:
    t, e = job.trainer, job.elastic
    return dict(cfg=job.model, parallel=job.parallel, world_size=world, seq_length=job.data.seq_length,
                micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
                budgets_per_batch=e.curriculum.budgets_per_batch if _elastic(job) else 1,
                kd_chunk_tokens=e.distill.chunk_tokens, elastic=_elastic(job), recompute=t.recompute,
                recompute_method=t.recompute_method, recompute_num_layers=t.recompute_num_layers,
                recompute_modules=tuple(t.recompute_modules), activation_bytes=_gpu_dtype(job).itemsize)


def _rank_memory(job: JobConfig, est: MemoryEstimate, coords: RankCoords, dense: int, expert: int) -> MemoryEstimate:
    """What this rank holds on its GPU: weights, gradients, optimizer state and teacher
    from the parameters it built (module doc); activations and KD logits are the memory
    estimate's, which counts them for the heaviest pipeline stage."""
    b = _gpu_dtype(job).itemsize
    # Megatron's Adam: two fp32 moments, plus fp32 main weights when the model is not fp32.
    per_param = 8 + (4 if b != 4 else 0)
    sharded = job.parallel.distributed_optimizer and coords.dp_size > 1  # training/optim.py's condition
    optimizer = per_param * ((dense / coords.dp_cp_size + expert / coords.edp_size) if sharded else dense + expert)
    return MemoryEstimate(weights=b * (dense + expert), gradients=4 * (dense + expert), optimizer=optimizer,
                          teacher=b * (dense + expert) if _elastic(job) else 0.0, activations=est.activations,
                          logits=est.logits)


# ---- per-rank builds -----------------------------------------------------------------

def _module_of(name: str) -> str:
    """A parameter's name with layer and expert numbers folded (for grouping in messages)."""
    return re.sub(r"\.\d+\.", ".*.", name)


def _param_counts(model) -> tuple[int, int, int, dict[str, int]]:
    """(parameters, of which routed experts, of which left on the CPU, {module pattern:
    parameters replicated over TP}) of a built rank."""
    from elastic_megatron.training.optim import is_expert_param

    total = expert = cpu = 0
    replicated: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        total += p.numel()
        if is_expert_param(p):
            expert += p.numel()
        elif not getattr(p, "tensor_model_parallel", False):
            replicated[_module_of(name)] += p.numel()
        if p.device.type != "meta":
            cpu += p.numel()
    return total, expert, cpu, dict(replicated)


def _built_stage(model, cfg: ModelConfig) -> tuple[int, str]:
    """(first layer, pattern) of the decoder layers this rank built."""
    from elastic_megatron.elastic.sites import layer_sites

    layers = model.decoder.layers
    offset = layers[0].layer_number - 1 if len(layers) else 0
    return offset, "".join(s.symbol for s in layer_sites(model, cfg))


def _main_params(entries: list[Shard], param_names: set[str]) -> int:
    return sum(s.numel for s in entries if s.main and s.dtype != "object" and s.name in param_names)


def _optimizer_template(model, trainer, model_sd: dict) -> dict:
    """The CPU trainer's Adam over this rank's meta parameters, as the load template a
    checkpoint is read into (every moment present, on meta)."""
    from elastic_megatron.training.optim import CpuDataParallelAdam

    opt = CpuDataParallelAdam(model, trainer.lr, trainer.weight_decay, (trainer.adam_beta1, trainer.adam_beta2),
                              trainer.adam_eps, trainer.clip_grad)
    return opt.sharded_state_dict(model_sd, is_loading=True)


def _rank_state(model, trainer) -> list[Shard]:
    """The model and optimizer entries a checkpoint save of this rank writes."""
    model_sd = model.sharded_state_dict()
    return shards({"model": model_sd, "optimizer": _optimizer_template(model, trainer, model_sd)})


@dataclass
class BudgetMasks:
    name: str
    widths: Optional[object]  # Widths of a pinned budget (kept channels are checked), None when routed
    masks: object  # ElasticMasks in the flat layout


def budget_masks(job: JobConfig, budgets) -> list[BudgetMasks]:
    """Every budget's masks as the elastic step builds them: hard masks of the pinned
    widths; for routed budgets the router's mixture over its candidates (its initial,
    uniform choice), pinned axes hard."""
    from elastic_megatron.elastic.masks import hard_masks, mixture_masks
    from elastic_megatron.elastic.router import BudgetRouter

    cfg, spec = job.model, job.elastic
    router = BudgetRouter(budgets, cfg, spec.router.hidden_size, spec.router.per_layer)
    out = []
    for i, b in enumerate(budgets):
        masks = hard_masks(cfg, b.fixed)
        if b.routed:
            inp, weights = router.budget_input(i)
            logits = router.logits(inp, weights)
            probs = {a: torch.softmax(logits[a].detach(), dim=-1) for a in router.routed_axes(b)}
            for axis, m in vars(mixture_masks(cfg, {a: router.choices[a] for a in probs}, probs)).items():
                if m is not None:
                    setattr(masks, axis, m)
        out.append(BudgetMasks(b.name, None if b.routed else b.fixed, masks))
    return out


def _kept_here(axis: str, width: int, local: int, coords: RankCoords, tp: int) -> int:
    """Channels of a budget's `width` on `axis` that this rank's shard keeps. Heads are
    kept per group and TP splits whole groups, so every TP rank keeps width / tp; the
    FFN axes keep a prefix of the flat axis, which TP (expert TP for routed experts)
    splits into contiguous shards; the other axes are whole on every rank."""
    if axis in ("attn_heads", "mamba_heads"):
        return width // tp
    shard = {"ffn": coords.tp, "shared_ffn": coords.tp, "moe_ffn": coords.etp}.get(axis)
    if shard is None:
        return width
    return min(max(width - shard * local, 0), local)


def check_masks(model, cfg: ModelConfig, hooks, budget: BudgetMasks, coords: RankCoords, tp: int) -> list[str]:
    """Set `budget`'s masks on this rank (split as ElasticHooks splits them) and hold each
    against the module its hook masks: length, per-layer rows, kept channels per shard."""
    from elastic_megatron.elastic.sites import hidden_norms, layer_sites

    hooks.set(budget.masks)
    local = hooks.state.masks
    names = {id(m): n for n, m in model.named_modules()}
    out = []

    def check(module, axis: str, k: Optional[int], size: int, what: str):
        mask = getattr(local, axis) if local is not None else None
        if mask is None:
            return
        where = f"rank {coords.rank} ({coords.describe()}): {names.get(id(module), '?')}: budget {budget.name}"
        if mask.dim() == 2:
            if k is None or k >= mask.shape[0]:
                out.append(f"{where}: the per-layer {axis} mask has {mask.shape[0]} rows, this is layer {k} of the axis")
                return
            mask = mask[k]
        if mask.shape[-1] != size:
            out.append(f"{where}: the {axis} mask has {mask.shape[-1]} entries, the module has {size} {what}")
            return
        if budget.widths is not None:
            width = getattr(budget.widths, axis)
            width = width[k] if isinstance(width, tuple) else width
            expected = _kept_here(axis, width, size, coords, tp)
            kept = int(mask.detach().sum().round())
            if kept != expected:
                out.append(f"{where}: the {axis} mask keeps {kept} of its {size} {what}; the budget's {axis}={width} "
                           f"keeps {expected} of them on this shard")

    for norm in hidden_norms(model):
        check(norm, "hidden", None, norm.weight.shape[0], "channels")
    for site in layer_sites(model, cfg):
        if site.mamba is not None:
            check(site.mamba, "mamba_heads", site.index, site.mamba.nheads_local_tp, "heads")
            check(site.mamba, "mamba_head_dim", site.index, site.mamba.headdim, "channels per head")
        elif site.core_attention is not None:
            proj = model.get_submodule(names[id(site.core_attention)].rsplit(".", 1)[0] + ".linear_proj")
            check(site.core_attention, "attn_heads", site.index, proj.weight.shape[1] // cfg.head_dim, "heads")
        elif site.mlp_fc2 is not None:
            check(site.mlp_fc2, "ffn", site.index, site.mlp_fc2.weight.shape[1], "channels")
        elif site.moe is not None:
            check(site.moe.router, "moe_experts", site.index, site.moe.router.weight.shape[0], "experts")
            for expert in site.moe.experts:
                check(expert.linear_fc2, "moe_ffn", site.index, expert.linear_fc2.weight.shape[1], "channels")
            if site.moe.shared_fc2 is not None:
                check(site.moe.shared_fc2, "shared_ffn", site.index, site.moe.shared_fc2.weight.shape[1], "channels")
    hooks.set(None)
    return out


def _replicated_explanation(replicated: dict[str, int], tp: int, diff: int) -> str:
    """Why a rank holds `diff` more parameters than the estimate: the parameters every TP
    rank holds whole, which the estimate divides by tp."""
    if tp == 1 or not replicated:
        return ""
    extra = {m: n - n // tp for m, n in replicated.items()}
    if sum(extra.values()) != diff:
        return ""
    top = sorted(extra.items(), key=lambda kv: -kv[1])
    listed = ", ".join(f"{m} {n:,}" for m, n in top[:4]) + (f" and {len(top) - 4} more" if len(top) > 4 else "")
    return (f": parameters every TP rank holds whole (replicated over tp={tp}), which the estimate divides by tp: "
            f"{listed} (parallel/memory.py)")


def _compare_memory(report: DryRunReport, r: RankResult, est: MemoryEstimate, bf16: bool, replicated: dict,
                    tp: int) -> None:
    """This rank against the memory estimate: parameters exactly (the estimate counts
    bf16 weights, 2 B each); the other terms by its formula, for bf16 jobs (the estimate
    assumes bf16 training)."""
    where = f"rank {r.coords.rank} ({r.coords.describe()})"
    estimated = int(round(est.weights / 2))
    if r.params != estimated:
        report.failures.append(f"{where}: the built shards hold {r.params:,} parameters, the memory estimate counts "
                               f"{estimated:,} ({r.params - estimated:+,})"
                               + _replicated_explanation(replicated, tp, r.params - estimated))
        return  # every other term is derived from the parameters
    for term in ("weights", "gradients", "optimizer", "teacher") if bf16 else ():
        got, want = getattr(r.memory, term), getattr(est, term)
        if abs(got - want) > 1e-6 * max(abs(want), 1.0):
            report.failures.append(f"{where}: {term} {got / GIB:.3f} GiB here, the memory estimate says {want / GIB:.3f} GiB")


# ---- what a one-rank run writes ---------------------------------------------------------

def small_config(cfg: ModelConfig) -> ModelConfig:
    """The same architecture at a small width: the same pattern, query and Mamba groups
    and shared expert, so the same checkpoint keys (stacked experts are one key whatever
    their number: top-k experts suffice)."""
    return dataclasses.replace(
        cfg, name=f"{cfg.name}[small]", hidden_size=16, vocab_size=64, kv_channels=8,
        num_attention_heads=cfg.num_query_groups, mamba_num_heads=cfg.mamba_num_groups, mamba_head_dim=4,
        mamba_state_dim=4, ffn_hidden_size=16, moe_ffn_hidden_size=16, moe_num_experts=cfg.moe_router_topk,
        moe_shared_expert_ffn_hidden_size=16 if cfg.moe_shared_expert_ffn_hidden_size else 0,
        max_sequence_length=64, mamba_chunk_size=16,
    )


def checkpoint_entries(path) -> dict[str, tuple]:
    """{key: global shape, or ("object",)} of a dist checkpoint, from its metadata only."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    out = {}
    for key, sh in load_sharded_metadata(str(path)).items():
        if isinstance(sh, ShardedObject):  # one entry per shard, keyed "<key>/shard_<offset>_<shape>"
            out[key.split("/shard_")[0]] = ("object",)
        else:
            out[key] = tuple(sh.global_shape)
    return out


_written: dict[str, dict[str, tuple]] = {}  # small checkpoints already written in this process, by config


def small_checkpoint_keys(cfg: ModelConfig, trainer) -> dict[str, tuple]:
    """Save a real checkpoint (model, and the optimizer with its moments) of `cfg`'s
    architecture at a small width from a one-rank run (gloo, this process), and read back
    what it holds."""
    import torch.distributed as dist

    from elastic_megatron.checkpoint import store
    from elastic_megatron.models.hybrid import build_model
    from elastic_megatron.parallel.setup import destroy_distributed
    from elastic_megatron.training.optim import CpuDataParallelAdam
    from megatron.core import parallel_state

    small = small_config(cfg)
    if repr(small) in _written:
        return _written[repr(small)]
    t = trainer
    hook = sys.excepthook
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel()
        with torch.random.fork_rng(devices=[]):
            model = build_model(small, torch.float32)
        opt = CpuDataParallelAdam(model, t.lr, t.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_eps, t.clip_grad)
        for p in model.parameters():  # one update on zero gradients creates every moment
            p.grad = torch.zeros_like(p)
        opt.optimizer.step()
        with tempfile.TemporaryDirectory(prefix="dry-run-") as tmp:
            store.save_checkpoint(tmp, model, opt, None, 0, 0, {})
            _written[repr(small)] = checkpoint_entries(store.iteration_dir(tmp, 0))
    finally:
        destroy_distributed()
        sys.excepthook = hook
    return _written[repr(small)]


def expected_model_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """{checkpoint key: global shape, or ("object",)} of a model of `cfg`, from the
    converter's table of the dist-checkpoint layout (convert/megatron_dist.py) and the
    counter's parameter shapes (models/counter.py): what any run of this model writes."""
    from elastic_megatron.convert.megatron_dist import layout
    from elastic_megatron.models.counter import parameter_inventory

    flat = {e.name: e.shape for e in parameter_inventory(cfg)}
    parts, objects = layout(cfg)
    out = {}
    for part in parts:
        if part.experts:
            out[part.key] = (len(part.experts), *flat[part.experts[0]])
        elif part.flat.endswith("expert_bias"):  # a buffer, not in the parameter inventory
            out[part.key] = (cfg.moe_num_experts,)
        else:
            shape = flat[part.flat]
            out[part.key] = shape if part.lo is None else (part.hi - part.lo, *shape[1:])
    out.update({o.split("/shard_")[0]: ("object",) for o in objects})
    return out


# ---- inputs ------------------------------------------------------------------------------

def check_data(job: JobConfig) -> tuple[list[str], list[str], Optional[dict]]:
    """(failures, notes, the tokenizer's description) of the job's data: the prefixes
    check, one tokenizer the model's vocabulary covers, enough training samples."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from elastic_megatron.data.datasets import spec_tokenizer, validate_data_spec
    from elastic_megatron.training.run import data_spec

    spec = data_spec(job, Path(job.run.dir))
    try:
        validate_data_spec(spec)
        tokenizer = spec_tokenizer(spec)
    except ConfigError as err:
        return [f"data: {err}"], [], None
    failures, notes = [], []
    if job.model.vocab_size < tokenizer.vocab_size:
        failures.append(f"data: model.vocab_size={job.model.vocab_size} is below the data's tokenizer vocabulary "
                        f"({tokenizer.vocab_size})")
    t = job.trainer
    needed = t.max_steps * t.global_batch_size
    weights = list(spec.weights) if spec.weights else [1.0] * len(spec.prefixes)
    parts = [float(x) for x in spec.split.split(",")]
    for i, prefix in enumerate(spec.prefixes):
        ds = IndexedDataset(prefix)  # memory-maps the .idx: read the arrays while it lives
        lengths = np.array(ds.sequence_lengths, dtype=np.int64)
        documents = np.array(ds.document_indices, dtype=np.int64)
        del ds
        # The training split's documents, as Megatron cuts them (whole prefixes with valid_prefixes).
        n = len(documents) - 1
        end = n if spec.valid_prefixes else round(parts[0] / sum(parts) * n)
        samples = max(int(lengths[:documents[end]].sum()) - 1, 0) // spec.seq_length  # GPTDataset's samples per pass
        share = math.ceil(needed * weights[i] / sum(weights))
        line = (f"data.prefixes[{i}] {prefix}: its training split holds {samples:,} samples of {spec.seq_length} "
                f"tokens; trainer.max_steps x global_batch_size = {needed:,}"
                + (f" ({share:,} at its blend weight)" if len(weights) > 1 else ""))
        if share > samples:
            failures.append(f"data: {line}: training would repeat it {share / max(samples, 1):,.1f} times; add data "
                            "or lower trainer.max_steps")
        else:
            notes.append(line)
    return failures, notes, tokenizer.describe()


def check_checkpoint_keys(path: str, key: str, layout: dict[str, tuple[tuple, str, int]]) -> list[str]:
    """Every model key the layout loads (key -> (global shape, module, a rank that loads
    it)) is in the checkpoint at `path` with that global shape."""
    from elastic_megatron.checkpoint.store import resolve_checkpoint_dir

    held = checkpoint_entries(resolve_checkpoint_dir(path))
    out = []
    for k, (shape, name, rank) in sorted(layout.items()):
        if k not in held:
            out.append(f"{key}: rank {rank}: {name}: key {k} is not in the checkpoint {path} (the load would fail)")
        elif held[k] != shape:
            out.append(f"{key}: rank {rank}: {name}: key {k} has global shape {held[k]} in {path}, the layout loads {shape}")
    return out


def _qad_start_check(job: JobConfig, meta: dict, key: str, path: str) -> list[str]:
    """QAD trains the budgets its starting checkpoint resolved, with NVFP4 block alignment."""
    from elastic_megatron.elastic.budgets import recorded_budgets
    from elastic_megatron.quant.calibrate import budget_axis_widths
    from elastic_megatron.quant.recipes import check_block_alignment

    try:
        recorded = recorded_budgets(meta, path)
    except ConfigError:
        return [f"{key}: {path}: nested QAD starts from an elastic checkpoint (a stage 1 or 2 run dir), which records "
                "its budgets' architectures; this one has none"]
    names = [b.name for b in job.elastic.budgets]
    if [n for n, _ in recorded] != names:
        return [f"elastic.budgets: {names}: QAD trains the budgets {path} resolved: {[n for n, _ in recorded]}"]
    try:
        check_block_alignment(job.model, job.quant.format, job.quant.recipe, budget_axis_widths(recorded), "quant.format")
    except ConfigError as err:
        return [f"{key}: {path}: {err}"]
    return []


# ---- the dry run ---------------------------------------------------------------------------

def _select(coords: list[RankCoords], ranks: RankSelection) -> tuple[dict[int, list[int]], str]:
    world = len(coords)
    if ranks == "classes":
        chosen = representative_ranks(coords)
        return chosen, (f"{len(chosen)} of {world} ranks, one per distinct (pp, tp, cp, ep, etp): every module and "
                        "checkpoint shard of the layout (the others are their data-parallel replicas)")
    if ranks == "all":
        return {r: [r] for r in range(world)}, f"all {world} ranks"
    if isinstance(ranks, str) or not ranks or any(not 0 <= r < world for r in ranks):
        raise ConfigError("--ranks", ranks, f"classes, all, or ranks between 0 and {world - 1}")
    chosen = list(dict.fromkeys(ranks))
    return {r: [r] for r in chosen}, f"ranks {', '.join(map(str, chosen))} of {world}"


def validate_dry_run(job: JobConfig, nodes: int, gpus_per_node: int, gpu_gib: float) -> list:
    """Every check of the job that needs nothing built (as the job's own start runs
    them); the resolved elastic budgets the job trains."""
    for key, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        require_positive_int(key, value)
    if not gpu_gib > 0:
        raise ConfigError("--gpu-memory-gib", gpu_gib, "must be a positive number")
    if job.run.task != "train":
        raise ConfigError("run.task", job.run.task, "the dry run covers training jobs (pretrain, stage1, stage2, qad, "
                          "distill); allowed: train")
    validate_job(job, nodes * gpus_per_node)
    if not _elastic(job):
        return []
    from elastic_megatron.elastic.budgets import validate_elastic

    budgets = validate_elastic(job.elastic, job.model, job.parallel)
    if job.elastic.student_budget is not None:
        budgets = [b for b in budgets if b.name == job.elastic.student_budget]
    if job.quant.format != "none":  # as QuantizedDistillStep checks them
        from elastic_megatron.quant.calibrate import budget_axis_widths
        from elastic_megatron.quant.recipes import check_block_alignment

        if job.parallel.pp > 1:
            raise ConfigError("parallel.pp", job.parallel.pp, "nested QAD calibrates on one pipeline stage; allowed: 1")
        pinned = [(b.name, b.fixed) for b in budgets if not b.routed]
        check_block_alignment(job.model, job.quant.format, job.quant.recipe, budget_axis_widths(pinned), "quant.format")
    return budgets


def dry_run(job: JobConfig, nodes: int, gpus_per_node: int, gpu_gib: float = 80.0, ranks: RankSelection = "classes",
            check_inputs: bool = True, recipe: str = "") -> DryRunReport:
    """Build and check the (selected) ranks of `job` on `nodes` x `gpus_per_node` GPUs
    (module doc). Raises ConfigError for bad input before anything is built."""
    return _DryRun(job, nodes, gpus_per_node, gpu_gib, ranks, check_inputs, recipe).run()


class _DryRun:
    def __init__(self, job: JobConfig, nodes: int, gpus_per_node: int, gpu_gib: float, ranks: RankSelection,
                 check_inputs: bool, recipe: str):
        self.start = time.perf_counter()
        self.budgets = validate_dry_run(job, nodes, gpus_per_node, gpu_gib)
        self.job, self.cfg, self.parallel = job, job.model, job.parallel
        self.world = nodes * gpus_per_node
        self.dtype = _gpu_dtype(job)
        self.check_inputs, self.ranks = check_inputs, ranks
        p = self.parallel
        self.stages = pipeline_stages(self.cfg, p.pp, p.pp_layout)
        layout = (f"tp {p.tp}{' +sp' if p.sequence_parallel else ''}, cp {p.cp}, pp {p.pp}, ep {p.ep}, "
                  f"etp {expert_tensor_parallel(p)}, dp {layout_data_parallel(p, self.world)}")
        self.coords = layout_coords(p, self.world)
        self.chosen, selection = _select(self.coords, ranks)
        self.report = DryRunReport(recipe or job.run.name, self.cfg.name, nodes, gpus_per_node, layout, selection,
                                   gpu_gib, estimate_memory(**_estimate_args(job, self.world)))
        self.masks = budget_masks(job, self.budgets) if self.budgets else []
        self.loads: dict[str, tuple[tuple, str, int]] = {}  # model key -> (global shape, module, a rank that loads it)

    def fail(self, line: str) -> None:
        self.report.failures.append(line)

    def run(self) -> DryRunReport:
        report = self.report
        tokenizer = None
        if self.check_inputs:
            failures, notes, tokenizer = check_data(self.job)
            report.failures += failures
            report.notes += notes
        else:
            report.notes.append("inputs not checked (data, teacher and initial checkpoints): --skip-inputs")
        if self.parallel.pp > 1:
            report.notes.append("pp > 1: activations and KD logits per rank are the estimate's heaviest stage, and "
                                "parameters are not held against it (parallel/memory.py estimates that stage only)")
        for rank, stands_for in self.chosen.items():
            self.simulate(self.coords[rank], stands_for)
        complete = len(report.shards) == self.world
        report.failures += check_tiling(report.shards, complete=complete)
        if not complete and self.ranks != "classes":
            report.notes.append("not every rank was simulated: a gap above may be a shard of a rank left out")
        report.checkpoint_keys = len({s.key for entries in report.shards.values() for s in entries})
        self.check_keys()
        self.check_budgets(all_main_replicas=complete or self.ranks == "classes")
        if self.check_inputs:
            self.check_input_checkpoints(tokenizer)
        report.seconds = time.perf_counter() - self.start
        report.peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return report

    # ---- one rank ------------------------------------------------------------------------

    def simulate(self, coords: RankCoords, stands_for: list[int]) -> None:
        from elastic_megatron.models.hybrid import build_model

        job, cfg, p = self.job, self.cfg, self.parallel
        where = f"rank {coords.rank} ({coords.describe()})"
        with simulated_rank(p, self.world, coords.rank):
            try:
                model = build_model(cfg, self.dtype, parallel=p, meta=True)
            except Exception as err:  # a layout Megatron cannot build: this rank's line, the others go on
                if debug_requested():
                    raise
                self.fail(f"{where}: building its model failed: {type(err).__name__}: {err}")
                return
            built = self.check_stage(model, coords, where)
            total, expert, cpu, replicated = _param_counts(model)
            entries = _rank_state(model, job.trainer)
            self.report.shards[coords.rank] = entries
            model_entries = [s for s in entries if s.name.startswith("model.")]
            for s in model_entries:
                if s.dtype != "object":
                    self.loads.setdefault(s.key, (s.global_shape, s.name.removeprefix("model."), coords.rank))
            self.report.layout_params += _main_params(model_entries, {f"model.{n}" for n, _ in model.named_parameters()})
            result = RankResult(coords, stands_for, built, total, expert, cpu,
                                _rank_memory(job, self.report.estimate, coords, total - expert, expert))
            if _elastic(job):
                result.teacher_params = self.check_teacher(model, where)
                self.check_masks(model, coords)
        self.report.ranks.append(result)
        if p.pp == 1:
            _compare_memory(self.report, result, self.report.estimate, self.dtype == torch.bfloat16, replicated, p.tp)
        total_gib = result.memory.total / GIB
        if total_gib > (1 - GPU_MARGIN) * self.report.gpu_gib:
            self.fail(f"{where}: needs {total_gib:.1f} GiB of the GPU's {self.report.gpu_gib:.0f} GiB, more than the "
                      f"{1 - GPU_MARGIN:.0%} that leave room for allocator and communication buffers")

    def check_stage(self, model, coords: RankCoords, where: str) -> str:
        """The rank built the layers of its pipeline stage, in the pattern's order."""
        stage = self.stages[coords.pp]
        first = sum(len(s) for s in self.stages[:coords.pp])
        try:
            offset, built = _built_stage(model, self.cfg)
        except ValueError as err:
            self.fail(f"{where}: decoder.layers: {err}")
            return ""
        if (offset, built) != (first, stage):
            self.fail(f"{where}: decoder.layers: built layers {offset}..{offset + len(built) - 1} ({built!r}); pipeline "
                      f"stage {coords.pp} of the layout is layers {first}..{first + len(stage) - 1} ({stage!r})")
        return built

    def check_teacher(self, model, where: str) -> int:
        """Build the frozen teacher as the rank would: the student's twin."""
        from elastic_megatron.models.hybrid import build_model

        teacher = build_model(self.cfg, self.dtype, parallel=self.parallel, meta=True)

        def shapes(m):
            return {k: tuple(v.shape) for k, v in [*m.named_parameters(), *m.named_buffers()]}

        student, mine = shapes(model), shapes(teacher)
        for k in sorted(set(student) | set(mine)):
            if student.get(k) != mine.get(k):
                self.fail(f"{where}: {k}: the student has {student.get(k)}, the teacher {mine.get(k)}")
        return sum(t.numel() for t in teacher.parameters())

    def check_masks(self, model, coords: RankCoords) -> None:
        from elastic_megatron.elastic.masks import ElasticHooks

        hooks = ElasticHooks(model, self.cfg)
        try:
            for b in self.masks:
                self.report.failures += check_masks(model, self.cfg, hooks, b, coords, self.parallel.tp)
        finally:
            hooks.remove()

    # ---- across ranks ----------------------------------------------------------------------

    def check_keys(self) -> None:
        """The layout's keys and global shapes against what a one-rank run writes: the
        converter's layout table with the counter's shapes (full size), and a real
        checkpoint written and read back at a small width (keys, tensor or object, rank)."""
        layout: dict[str, tuple] = {}  # key -> (global shape or ("object",), name, rank)
        for rank, entries in self.report.shards.items():
            for s in entries:
                layout.setdefault(s.key, (s.global_shape if s.dtype != "object" else ("object",), s.name, rank))
        expected = expected_model_shapes(self.cfg)
        for k, (shape, name, rank) in sorted(layout.items()):
            model_key = k.split(".", 3)[3] if k.startswith("optimizer.state.") else k
            if model_key not in expected:
                self.fail(f"rank {rank}: {name}: key {k} is not a key of this model's checkpoints "
                          "(convert/megatron_dist.py layout)")
            elif expected[model_key] != shape:
                self.fail(f"rank {rank}: {name}: key {k} has global shape {shape}; a one-rank model writes "
                          f"{expected[model_key]}")
        for k in sorted(set(expected) - set(layout)):
            self.fail(f"key {k} of this model's checkpoints is written by no simulated rank")
        small = small_config(self.cfg)
        written = small_checkpoint_keys(self.cfg, self.job.trainer)
        written = {k: v for k, v in written.items() if k not in SAVE_EXTRAS}
        for k in sorted(set(layout) - set(written)):
            self.fail(f"rank {layout[k][2]}: {layout[k][1]}: key {k} is not in a checkpoint a one-rank run of "
                      f"{small.name} writes")
        for k in sorted(set(written) - set(layout)):
            self.fail(f"key {k} of a checkpoint a one-rank run of {small.name} writes is written by no simulated rank")
        for k in sorted(set(written) & set(layout)):
            if len(written[k]) != len(layout[k][0]) or (written[k] == ("object",)) != (layout[k][0] == ("object",)):
                self.fail(f"rank {layout[k][2]}: {layout[k][1]}: key {k} is {layout[k][0]} here, {written[k]} in a "
                          f"one-rank checkpoint of {small.name}")

    def check_budgets(self, all_main_replicas: bool) -> None:
        """The full model's parameters over the layout, and every pinned budget's: the
        closed form (elastic/widths.py model_cost) = the counter of its sliced config."""
        from elastic_megatron.elastic.widths import full_widths, model_cost, sub_model_config
        from elastic_megatron.models.counter import model_size

        cfg = self.cfg
        total = model_size(cfg).total_params
        if all_main_replicas and self.report.layout_params != total:
            self.fail(f"the simulated ranks hold {self.report.layout_params:,} parameters as main replicas, the model "
                      f"has {total:,} (models/counter.py)")
        for b in self.budgets:
            if b.routed:
                self.report.notes.append(f"budget {b.name}: router-chosen widths (known after training): masks "
                                         "checked for shape only, no parameter count")
                continue
            closed = int(model_cost(cfg, b.fixed, "total_params"))
            if b.fixed.heterogeneous:  # per-layer widths have no sliced config
                counter = None
            else:
                counter = total if b.fixed == full_widths(cfg) else model_size(sub_model_config(cfg, b.fixed)).total_params
            self.report.budgets.append(BudgetCount(b.name, closed, counter, int(model_cost(cfg, b.fixed, "active_params"))))
            if counter is not None and counter != closed:
                self.fail(f"budget {b.name}: {counter:,} parameters by the counter (models/counter.py, sliced config), "
                          f"{closed:,} by the closed form the router and the targets use (elastic/widths.py model_cost)")

    def check_input_checkpoints(self, tokenizer: Optional[dict]) -> None:
        """The checkpoints the job reads before its first step: verified (the tools'
        --verify level), same architecture, what the stage needs, every key it loads."""
        from elastic_megatron.checkpoint.manifest import CheckpointCorrupt
        from elastic_megatron.checkpoint.metadata import require_same_architecture
        from elastic_megatron.data.tokenizer import same_tokenizer

        job, spec = self.job, self.job.elastic
        reads = []
        if _elastic(job):
            reads.append(("elastic.teacher_checkpoint", spec.teacher_checkpoint))
            if spec.init_checkpoint:
                reads.append(("elastic.init_checkpoint", spec.init_checkpoint))
        elif job.run.init_checkpoint:
            reads.append(("run.init_checkpoint", job.run.init_checkpoint))
        quant_start = "elastic.init_checkpoint" if spec.init_checkpoint else "elastic.teacher_checkpoint"
        for key, path in reads:
            try:
                meta = require_same_architecture(self.cfg, path, key)
            except (ConfigError, CheckpointCorrupt, FileNotFoundError) as err:
                self.fail(f"{key}: {err}")
                continue
            if key == "elastic.teacher_checkpoint":
                if not meta.get("sort_index"):
                    self.fail(f"{key}: {path} is not a sorted parent (no sort_index in its metadata); run the "
                              "importance recipe first")
                recorded = (meta.get("data") or {}).get("tokenizer")
                if tokenizer is not None and recorded and not same_tokenizer(recorded, tokenizer):
                    self.fail(f"data: the data's tokenizer {tokenizer} is not the one {path} was trained with ({recorded})")
            if job.quant.format != "none" and key == quant_start:
                self.report.failures += _qad_start_check(job, meta, key, path)
            self.report.failures += check_checkpoint_keys(path, key, self.loads)
            self.report.notes.append(f"{key} {path}: verified, same architecture, every key the layout loads present")


# ---- the printed report -------------------------------------------------------------------

TERMS = ("weights", "gradients", "optimizer", "teacher", "activations", "logits")


def _gib(m: MemoryEstimate) -> str:
    return " ".join(f"{getattr(m, k) / GIB:>8.2f}" for k in TERMS) + f" {m.total / GIB:>8.2f}"


def render(report: DryRunReport) -> str:
    """The printed report: one row per simulated rank (GiB), the estimate, the budgets,
    notes, and one FAIL line per failure."""
    lines = [
        f"dry run of {report.recipe}: model {report.model} on {report.world} GPUs ({report.nodes} nodes x "
        f"{report.gpus_per_node}), {report.layout}",
        f"simulated {report.selection}; meta device, fake process group, one process",
        "",
        f"{'rank':>5} {'pp':>3} {'tp':>3} {'cp':>3} {'ep':>3} {'etp':>3} {'ranks':>6} {'params':>15} "
        f"{'weights':>8} {'grads':>8} {'optim':>8} {'teacher':>8} {'activ':>8} {'logits':>8} {'total':>8}   GiB",
    ]
    for r in sorted(report.ranks, key=lambda r: r.coords.rank):
        c = r.coords
        lines.append(f"{c.rank:>5} {c.pp:>3} {c.tp:>3} {c.cp:>3} {c.ep:>3} {c.etp:>3} {len(r.stands_for):>6} "
                     f"{r.params:>15,} {_gib(r.memory)}   of {report.gpu_gib:.0f}")
    lines.append(f"{'estimate (memory.py, heaviest stage)':<48} {_gib(report.estimate)}")
    cpu = max((r.cpu_params for r in report.ranks), default=0)
    lines += [f"meta build: no weight allocated; at most {cpu:,} small parameters per rank left on the CPU "
              "(norms, Mamba's per-head tensors and conv1d)",
              f"layout: the simulated ranks hold {report.layout_params:,} parameters as main replicas"]
    if report.budgets:
        lines += ["", f"{'budget':<8}{'closed form':>18}{'counter':>18}{'active':>18}"]
        lines += [f"{b.name:<8}{b.closed_form:>18,}{_n(b.counter):>18}{b.active:>18,}" for b in report.budgets]
    lines += ["", f"checkpoint: {report.checkpoint_keys:,} keys (model and optimizer) tiled over the simulated ranks, "
                  "held against the model's checkpoint layout and a one-rank checkpoint at small width"]
    lines += [f"note: {n}" for n in report.notes]
    lines.append(f"{report.seconds:.1f} s, peak RSS {report.peak_rss_gib:.2f} GiB")
    if report.failures:
        lines += [""] + [f"FAIL {f}" for f in report.failures]
    return "\n".join(lines)


def _n(v: Optional[int]) -> str:
    return "-" if v is None else f"{v:,}"
