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

from elastic_megatron.checkpoint.metadata import require_same_architecture
from elastic_megatron.checkpoint.store import load_model_weights
from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.model import ModelConfig
from elastic_megatron.distill.losses import kd_loss, router_loss
from elastic_megatron.elastic.budgets import ResolvedBudget, budgets_meta, resolve_budgets
from elastic_megatron.elastic.masks import ElasticHooks, hard_masks, mixture_masks
from elastic_megatron.elastic.router import BudgetRouter, gumbel_softmax, temperature_at
from elastic_megatron.elastic.widths import Widths, model_cost
from elastic_megatron.models.forward import output_layer, stage_hidden, unwrap
from elastic_megatron.models.hybrid import build_model
from elastic_megatron.parallel.collectives import all_reduce_mean_, all_reduce_sum_
from elastic_megatron.parallel.context import cp_size, sum_over_cp
from elastic_megatron.parallel.pipeline import forward_only, from_last_stage
from elastic_megatron.training.steps import StepFunction

def _slot(received: Optional[torch.Tensor], j: int) -> Optional[torch.Tensor]:
    """Entry j of the stacked hidden states a pipeline stage received (None on the first stage)."""
    return None if received is None else received[j]


class BudgetSampler:
    """Curriculum: which budgets a micro-batch trains (seeded; identical on every rank)."""

    def __init__(self, probs: Optional[list[float]], num_budgets: int, per_batch: int, generator: torch.Generator):
        self.probs = torch.tensor(probs if probs is not None else [1.0 / num_budgets] * num_budgets, dtype=torch.float64)
        self.per_batch = per_batch
        self.generator = generator

    def sample(self) -> list[int]:
        return torch.multinomial(self.probs, self.per_batch, replacement=False, generator=self.generator).tolist()


class ElasticDistillStep(StepFunction):
    def __init__(self, job):
        self.job = job
        self.cfg: ModelConfig = job.model
        self.spec = job.elastic
        # The budgets' widths are checked here, once (validate_job checked the other settings).
        self.budgets: list[ResolvedBudget] = resolve_budgets(job.elastic, job.model, job.parallel)
        self.generator = torch.Generator().manual_seed(job.run.seed + 7919)
        curriculum = self.spec.curriculum
        if self.spec.student_budget is not None:
            # Separate distillation: one pinned budget (validate_job refused a routed one)
            # trained alone, every micro-batch; the rest of the step is unchanged.
            self.budgets = [b for b in self.budgets if b.name == self.spec.student_budget]
            curriculum = type(curriculum)(budget_probs=None, budgets_per_batch=1)
        self.sampler = BudgetSampler(curriculum.budget_probs, len(self.budgets), curriculum.budgets_per_batch, self.generator)
        # Training tokens each budget was trained on in this run (all ranks together): the
        # cost the fidelity benchmark gives each separately distilled baseline.
        self.budget_tokens = {b.name: 0 for b in self.budgets}
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
        load_model_weights(spec.teacher_checkpoint, self.teacher)
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        common = load_model_weights(init, unwrap(model))
        router_state = (common.get("extra") or {}).get("router")
        if router_state is not None:  # stage 2 continues stage 1's router
            self.router.load_state_dict(router_state["params"])
        self.hooks = ElasticHooks(unwrap(model), self.cfg)
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

    def stage_forward(self, model, batch: dict, step: int, received: Optional[torch.Tensor]):
        """This pipeline stage's part of one micro-batch (see parallel/pipeline.py).

        Every stage samples the same budgets and Gumbel noise (same generator state) and
        runs the teacher once and the student once per budget; stages before the last
        send on [teacher, student per budget] stacked, the last computes the loss."""
        d = self.spec.distill
        indices = self.sampler.sample()
        if model.training:
            tokens = batch["tokens"].numel() * parallel_state.get_data_parallel_world_size() * cp_size()
            for index in indices:
                self.budget_tokens[self.budgets[index].name] += tokens
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
        shares: dict[str, torch.Tensor] = {}  # per-token losses: this CP rank's share of the sequences'
        for hidden, (budget, r_loss, info) in zip(hiddens, sampled):
            kd, lm = kd_loss(hidden, teacher_hidden, output_layer(model), output_layer(self.teacher),
                             batch["loss_mask"], d.temperature, d.chunk_tokens, d.top_k,
                             labels=batch["labels"] if d.lm_loss_weight > 0 else None)
            loss = kd
            if lm is not None:
                loss = loss + d.lm_loss_weight * lm
                shares[f"{budget.name}/lm_loss"] = lm.detach()
            if r_loss is not None:  # once per sequence: on the last stage, split over the CP ranks
                loss = loss + self.spec.router.loss_weight * r_loss / cp_size()
                metrics[f"{budget.name}/router_loss"] = r_loss.item()
            shares[f"{budget.name}/kd_loss"] = kd.detach()
            metrics[f"{budget.name}/expected_cost"] = info["expected_cost"]
            metrics[f"{budget.name}/target"] = budget.target
            for a, v in info["widths"].items():
                if a in budget.candidates:
                    metrics[f"{budget.name}/width/{a}"] = v
            total = total + loss
        metrics.update(zip(shares, sum_over_cp(torch.stack(list(shares.values()))).tolist()))
        return total / len(indices), metrics

    def reduce_router_gradients(self) -> None:
        """The router's gradient of the global loss on every rank: TP shards are already
        whole (masks/ShardedMasks), pipeline stages each hold their layers' part (summed),
        data- and context-parallel ranks their batches' and sequence chunks' (averaged;
        a CP rank's share was scaled by cp for backward)."""
        grads = []
        for p in self.router.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        all_reduce_sum_(grads, parallel_state.get_pipeline_model_parallel_group())
        # Context-parallel ranks hold shares of the sequences' loss, scaled by cp for
        # backward (parallel/pipeline.py): averaged together with the DP ranks.
        all_reduce_mean_(grads, parallel_state.get_data_parallel_group(with_context_parallel=True))

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
    def validate(self, model, batches: list[dict], step: int = 0) -> dict[str, float]:
        """Validation LM and KD loss of every budget's resolved architecture (hard masks),
        and `valid_loss`, their mean over budgets; computed on the last pipeline stage,
        returned on every rank."""
        out = {}
        model.eval()
        last = parallel_state.is_pipeline_last_stage()

        def pair(batch, received):  # this stage's [teacher, student] hidden states
            teacher = stage_hidden(self.teacher, batch["tokens"], batch["position_ids"], _slot(received, 0))
            return torch.stack([teacher, stage_hidden(model, batch["tokens"], batch["position_ids"], _slot(received, 1))])

        try:
            for name, w in self.resolved_widths().items():
                self.hooks.set(hard_masks(self.cfg, w))
                shares = []  # [lm, kd] of each batch: this CP rank's shares (last stage)
                for batch in batches:
                    hidden = forward_only(lambda received, b=batch: pair(b, received))
                    if last:
                        kd, lm = kd_loss(hidden[1], hidden[0], output_layer(model), output_layer(self.teacher),
                                         batch["loss_mask"], self.spec.distill.temperature, self.spec.distill.chunk_tokens,
                                         labels=batch["labels"])
                        shares.append(torch.stack([lm, kd]).double())
                # One reduction over the CP ranks per budget (the other stages get the result below).
                lm_sum, kd_sum = sum_over_cp(torch.stack(shares).sum(0)).tolist() if last else (0.0, 0.0)
                out[f"{name}/valid_loss"] = lm_sum / len(batches)
                out[f"{name}/valid_kd"] = kd_sum / len(batches)
        finally:
            self.hooks.set(None)
            model.train()
        per_budget = [out[k] for k in sorted(out) if k.endswith("/valid_loss")]
        out["valid_loss"] = sum(per_budget) / len(per_budget)
        return from_last_stage(out)

    def progress_lines(self, metrics: dict) -> list[str]:
        """Per budget: KD loss and expected cost vs target; the router temperature."""
        parts = []
        for key in sorted(k for k in metrics if k.endswith("/kd_loss")):
            name = key[: -len("/kd_loss")]
            cost, target = metrics.get(f"{name}/expected_cost"), metrics.get(f"{name}/target")
            cost_txt = f" cost {cost / target:.3f}x target" if cost is not None and target else ""
            parts.append(f"{name}: kd {metrics[key]:.4f}{cost_txt}")
        if not parts:
            return []
        routed = any(b.routed for b in self.budgets)
        return ["  ".join(parts) + (f"  temperature {metrics.get('temperature', float('nan')):.3f}" if routed else "")]

    def validation_lines(self, metrics: dict) -> list[str]:
        return [f"{key[: -len('/valid_loss')]}: validation loss {metrics[key]:.4f}  kd {metrics[key[: -len('valid_loss')] + 'valid_kd']:.4f}"
                for key in sorted(k for k in metrics if k.endswith("/valid_loss"))]

    def checkpoint_meta(self) -> dict:
        """What slicing and later stages read: the sort applied, the budgets and their
        resolved architectures and costs."""
        elastic = budgets_meta(self.spec, self.cfg, self.budgets, self.resolved_widths())
        if self.spec.student_budget is not None:
            elastic["student_budget"] = self.spec.student_budget
        elastic["budget_tokens"] = dict(self.budget_tokens)
        return {"sort_index": self.teacher_meta.get("sort_index"), "elastic": elastic}

    def state_dict(self) -> dict:
        return {"router": {"params": self.router.state_dict(), "optimizer": self.router_optimizer.state_dict()},
                "generator": self.generator.get_state(), "budget_tokens": dict(self.budget_tokens)}

    def load_state_dict(self, state: dict) -> None:
        self.router.load_state_dict(state["router"]["params"])
        self.router_optimizer.load_state_dict(state["router"]["optimizer"])
        self.generator.set_state(state["generator"])
        self.budget_tokens.update(state.get("budget_tokens") or {})  # absent in checkpoints before it was counted
