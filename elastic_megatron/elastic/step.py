"""Elastic distillation: the step function of stages 1 and 2.

Per micro-batch:
    sample budget(s) (curriculum; same generator state on every rank, so every DP rank
    trains the same budget on the same micro-batch)
    -> teacher forward once (frozen sorted parent, eval, no grad)
    -> per budget: router logits -> Gumbel-Softmax widths -> masks -> student forward
       -> KD (+ LM) + lambda * router loss
The training loop backpropagates the returned loss and steps the model's optimizer;
`after_step` then steps the router's own Adam (router gradients reduced over the layout).
Router parameters, its optimizer, the sampler/Gumbel generator and the resolved
architectures go into every checkpoint.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core import parallel_state

from elastic_megatron.config.elastic import ResolvedBudget, validate_elastic
from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.model import ModelConfig
from elastic_megatron.distill.losses import kd_loss, router_loss
from elastic_megatron.elastic.masks import ElasticHooks, hard_masks, mixture_masks
from elastic_megatron.elastic.router import BudgetRouter, gumbel_softmax, temperature_at
from elastic_megatron.elastic.widths import Widths, model_cost
from elastic_megatron.models.hybrid import build_model
from elastic_megatron.parallel.collectives import all_reduce_mean_, all_reduce_sum_
from elastic_megatron.parallel.pipeline import forward_only, from_last_stage
from elastic_megatron.training import checkpointing

# Fields that must agree between a checkpoint and the model it is loaded into.
ARCHITECTURE_FIELDS = (
    "hybrid_pattern", "hidden_size", "vocab_size", "num_attention_heads", "num_query_groups", "head_dim",
    "mamba_num_heads", "mamba_head_dim", "mamba_state_dim", "mamba_num_groups", "mamba_conv_kernel",
    "ffn_hidden_size", "moe_num_experts", "moe_router_topk", "moe_ffn_hidden_size",
    "moe_shared_expert_ffn_hidden_size", "moe_router_score_function", "activation",
)


def recorded_budgets(meta: dict, where) -> list[tuple[str, Widths]]:
    """(name, resolved widths) of every budget an elastic checkpoint's meta records
    (written by `ElasticDistillStep.checkpoint_meta`); ConfigError if it is not elastic."""
    elastic = meta.get("elastic") or {}
    if not meta.get("sort_index") or not elastic.get("budgets"):
        raise ConfigError("elastic checkpoint", str(where),
                          "is not elastic: its metadata has no sort_index and resolved budget architectures "
                          "(use the output of an elastic stage1/stage2 run)")
    return [(b["name"], Widths(**{k: tuple(v) if isinstance(v, list) else v for k, v in b["widths"].items()}))
            for b in elastic["budgets"]]


def require_same_architecture(expected: ModelConfig, path, key: str) -> dict:
    """Raise ConfigError naming every field where checkpoint `path` differs from `expected`."""
    try:
        found, meta = checkpointing.checkpoint_model_config(path)
    except FileNotFoundError as err:
        raise ConfigError(key, str(path), f"no checkpoint there ({err})") from None
    diffs = [f"{f}: checkpoint {getattr(found, f)!r} vs model {getattr(expected, f)!r}"
             for f in ARCHITECTURE_FIELDS if getattr(found, f) != getattr(expected, f)]
    if diffs:
        raise ConfigError(key, str(path), "architecture does not match the model config: " + "; ".join(diffs))
    return meta


def stage_hidden(model, tokens: torch.Tensor, position_ids: torch.Tensor, received: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This pipeline stage's decoder output, [s, b, h] ([s / tp, b, h] under sequence
    parallelism): MambaModel.forward up to the output layer, so KD can run the output
    layer chunk by chunk. The first stage embeds `tokens`; later ones start from `received`;
    the last stage's output is after the final norm."""
    m = getattr(model, "module", model)
    if m.pre_process:
        return m.decoder(hidden_states=m.embedding(input_ids=tokens, position_ids=position_ids), attention_mask=None)
    m.decoder.set_input_tensor(received)
    return m.decoder(hidden_states=None, attention_mask=None)


def _slot(received: Optional[torch.Tensor], j: int) -> Optional[torch.Tensor]:
    """Entry j of the stacked hidden states a pipeline stage received (None on the first stage)."""
    return None if received is None else received[j]


def final_hidden(model, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The whole model's final hidden states (one pipeline stage)."""
    return stage_hidden(model, tokens, position_ids)


def _output_layer(model):
    return getattr(model, "module", model).output_layer


class BudgetSampler:
    """Curriculum: which budgets a micro-batch trains (seeded; identical on every rank)."""

    def __init__(self, probs: Optional[list[float]], num_budgets: int, per_batch: int, generator: torch.Generator):
        self.probs = torch.tensor(probs if probs is not None else [1.0 / num_budgets] * num_budgets, dtype=torch.float64)
        self.per_batch = per_batch
        self.generator = generator

    def sample(self) -> list[int]:
        return torch.multinomial(self.probs, self.per_batch, replacement=False, generator=self.generator).tolist()


class ElasticDistillStep:
    def __init__(self, job):
        self.job = job
        self.cfg: ModelConfig = job.model
        self.spec = job.elastic
        self.budgets: list[ResolvedBudget] = validate_elastic(job.elastic, job.model, job.parallel)
        self.generator = torch.Generator().manual_seed(job.run.seed + 7919)
        self.sampler = BudgetSampler(self.spec.curriculum.budget_probs, len(self.budgets),
                                     self.spec.curriculum.budgets_per_batch, self.generator)
        with torch.random.fork_rng(devices=[]):  # the router's init depends on the run seed only
            torch.manual_seed(job.run.seed)
            self.router = BudgetRouter(self.budgets, self.cfg, self.spec.router.hidden_size, self.spec.router.per_layer)
        self.router_optimizer = torch.optim.Adam(self.router.parameters(), lr=job.trainer.lr * self.spec.router.lr_mult)
        self.teacher = None
        self.hooks: Optional[ElasticHooks] = None
        # Checkpoint checks read metadata only, before anything is allocated.
        self.teacher_meta = require_same_architecture(self.cfg, self.spec.teacher_checkpoint, "elastic.teacher_checkpoint")
        if not self.teacher_meta.get("sort_index"):
            raise ConfigError("elastic.teacher_checkpoint", self.spec.teacher_checkpoint,
                              "is not a sorted parent (no sort_index in its metadata); run the importance recipe first")
        if self.spec.init_checkpoint:
            require_same_architecture(self.cfg, self.spec.init_checkpoint, "elastic.init_checkpoint")

    # ---- set-up ---------------------------------------------------------------------

    def setup(self, model, params_dtype: torch.dtype) -> None:
        """Build the frozen teacher, attach the masks, initialise the student (before any
        resume, which then overrides weights and router state)."""
        job, spec = self.job, self.spec
        init = spec.init_checkpoint or spec.teacher_checkpoint
        self.teacher = build_model(self.cfg, params_dtype=params_dtype, parallel=job.parallel)
        checkpointing.load_model_weights(spec.teacher_checkpoint, self.teacher)
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        common = checkpointing.load_model_weights(init, getattr(model, "module", model))
        router_state = (common.get("extra") or {}).get("router")
        if router_state is not None:  # stage 2 continues stage 1's router
            self.router.load_state_dict(router_state["params"])
        self.hooks = ElasticHooks(getattr(model, "module", model), self.cfg)
        device = next(model.parameters()).device
        self.router.to(device)

    # ---- one micro-batch --------------------------------------------------------------

    def temperature(self, step: int) -> float:
        r = self.spec.router
        return temperature_at(step, self.job.trainer.max_steps, r.temperature_start, r.temperature_end, r.temperature_schedule)

    def budget_masks(self, index: int, step: int):
        """(masks, router loss or None, metrics) for budget `index` at `step`."""
        budget = self.budgets[index]
        if not budget.routed:
            masks = hard_masks(self.cfg, budget.fixed)
            cost = model_cost(self.cfg, budget.fixed, budget.target_kind)
            return masks, None, {"expected_cost": float(cost), "widths": budget.fixed.as_dict()}
        inp, weights = self.router.budget_input(index)
        logits = self.router.logits(inp, weights)
        tau = self.temperature(step)
        samples = {a: gumbel_softmax(logits[a], tau, self.generator, self.spec.router.hard) for a in self.router.routed_axes(budget)}
        candidates = {a: self.router.choices[a] for a in samples}
        masks = mixture_masks(self.cfg, candidates, samples)
        # Pinned and unrouted axes of this budget keep their fixed hard masks.
        fixed = hard_masks(self.cfg, budget.fixed)
        for a, m in vars(fixed).items():
            if a not in samples and m is not None:
                setattr(masks, a, m)
        expected = self.router.expected_cost(budget, logits)
        loss = router_loss(expected, budget.target)
        chosen = budget.fixed.as_dict()
        for a, y in samples.items():
            # The sampled width (mean over layers for per-layer choices).
            chosen[a] = float((y.detach() @ torch.tensor(candidates[a], dtype=y.dtype, device=y.device)).mean())
        return masks, loss, {"expected_cost": expected.item(), "widths": chosen}

    def __call__(self, model, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        return self.stage_forward(model, batch, step, None)

    def stage_forward(self, model, batch: dict, step: int, received: Optional[torch.Tensor]):
        """This pipeline stage's part of one micro-batch (see parallel/pipeline.py).

        Every stage samples the same budgets and Gumbel noise (same generator state) and
        runs the teacher once and the student once per budget; stages before the last
        send on [teacher, student per budget] stacked, the last computes the loss."""
        d = self.spec.distill
        indices = self.sampler.sample()
        with torch.no_grad():
            teacher_hidden = stage_hidden(self.teacher, batch["tokens"], batch["position_ids"], _slot(received, 0))
        hiddens, sampled = [], []
        try:
            for j, index in enumerate(indices):
                masks, r_loss, info = self.budget_masks(index, step)
                self.hooks.set(masks)
                hiddens.append(stage_hidden(model, batch["tokens"], batch["position_ids"], _slot(received, 1 + j)))
                sampled.append((self.budgets[index], r_loss, info))
        finally:
            self.hooks.set(None)
        if not parallel_state.is_pipeline_last_stage():
            return torch.stack([teacher_hidden, *hiddens])
        total = 0.0
        metrics: dict = {"temperature": self.temperature(step)}
        for hidden, (budget, r_loss, info) in zip(hiddens, sampled):
            kd, lm = kd_loss(hidden, teacher_hidden, _output_layer(model), _output_layer(self.teacher),
                             batch["loss_mask"], d.temperature, d.chunk_tokens, d.top_k,
                             labels=batch["labels"] if d.lm_loss_weight > 0 else None)
            loss = kd
            if lm is not None:
                loss = loss + d.lm_loss_weight * lm
                metrics[f"{budget.name}/lm_loss"] = lm.item()
            if r_loss is not None:  # once, on the last stage
                loss = loss + self.spec.router.loss_weight * r_loss
                metrics[f"{budget.name}/router_loss"] = r_loss.item()
            metrics[f"{budget.name}/kd_loss"] = kd.item()
            metrics[f"{budget.name}/expected_cost"] = info["expected_cost"]
            metrics[f"{budget.name}/target"] = budget.target
            for a, v in info["widths"].items():
                if a in budget.candidates:
                    metrics[f"{budget.name}/width/{a}"] = v
            total = total + loss
        return total / len(indices), metrics

    def reduce_router_gradients(self) -> None:
        """The router's gradient of the global loss on every rank: TP shards are already
        whole (masks/ShardedMasks), pipeline stages each hold their layers' part (summed),
        data-parallel ranks their batches' (averaged)."""
        grads = []
        for p in self.router.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        all_reduce_sum_(grads, parallel_state.get_pipeline_model_parallel_group())
        all_reduce_mean_(grads, parallel_state.get_data_parallel_group())

    def after_step(self, step: int, ok: bool) -> None:
        """Reduce the router's gradients over the layout and update it (identically on
        every rank)."""
        if ok and any(b.routed for b in self.budgets):
            self.reduce_router_gradients()
            self.router_optimizer.step()
        self.router_optimizer.zero_grad(set_to_none=True)

    # ---- evaluation and checkpoints ----------------------------------------------------

    def resolved_widths(self) -> dict[str, Widths]:
        return {b.name: (self.router.resolve_budget(i) if b.routed else b.fixed) for i, b in enumerate(self.budgets)}

    @torch.no_grad()
    def validate(self, model, batches: list[dict]) -> dict[str, float]:
        """Validation LM and KD loss of every budget's resolved architecture (hard masks);
        computed on the last pipeline stage, returned on every rank."""
        out = {}
        model.eval()
        last = parallel_state.is_pipeline_last_stage()

        def pair(batch, received):  # this stage's [teacher, student] hidden states
            teacher = stage_hidden(self.teacher, batch["tokens"], batch["position_ids"], _slot(received, 0))
            return torch.stack([teacher, stage_hidden(model, batch["tokens"], batch["position_ids"], _slot(received, 1))])

        try:
            for name, w in self.resolved_widths().items():
                self.hooks.set(hard_masks(self.cfg, w))
                lm_sum, kd_sum = 0.0, 0.0
                for batch in batches:
                    hidden = forward_only(lambda received, b=batch: pair(b, received))
                    if last:
                        kd, lm = kd_loss(hidden[1], hidden[0], _output_layer(model), _output_layer(self.teacher),
                                         batch["loss_mask"], self.spec.distill.temperature, self.spec.distill.chunk_tokens,
                                         labels=batch["labels"])
                        lm_sum += lm.item()
                        kd_sum += kd.item()
                out[f"{name}/valid_loss"] = lm_sum / len(batches)
                out[f"{name}/valid_kd"] = kd_sum / len(batches)
        finally:
            self.hooks.set(None)
            model.train()
        return from_last_stage(out)

    def checkpoint_meta(self) -> dict:
        """What slicing and later stages read: the sort applied, the budgets and their
        resolved architectures and costs."""
        archs = self.resolved_widths()
        return {
            "sort_index": self.teacher_meta.get("sort_index"),
            "elastic": {
                "spec": self.spec.name,
                "teacher_checkpoint": str(self.spec.teacher_checkpoint),
                "budgets": [
                    {"name": b.name, "target_kind": b.target_kind, "target": b.target,
                     "widths": archs[b.name].as_dict(),
                     "total_params": int(model_cost(self.cfg, archs[b.name], "total_params")),
                     "active_params": int(model_cost(self.cfg, archs[b.name], "active_params"))}
                    for b in self.budgets
                ],
            },
        }

    def state_dict(self) -> dict:
        return {"router": {"params": self.router.state_dict(), "optimizer": self.router_optimizer.state_dict()},
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.router.load_state_dict(state["router"]["params"])
        self.router_optimizer.load_state_dict(state["router"]["optimizer"])
        self.generator.set_state(state["generator"])
