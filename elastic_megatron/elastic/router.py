"""The budget router: one-hot target budget -> per-axis logits over candidate widths.

Input: a one-hot over the trained budgets (a budget between two trained ones gets the
linear interpolation of their one-hots). A two-layer MLP emits, for every routed axis,
logits over the union of all budgets' candidates; candidates a budget does not allow
are masked to -inf. Training samples widths with Gumbel-Softmax at a temperature that
anneals over the run; with `hard` the forward value is one candidate (straight-through)
and the gradient is the soft sample's.

Cost: the analytic counter is multilinear in the widths and the axes are sampled
independently, so the expected cost of the sampled architecture equals the cost of the
expected widths, E[w_axis] = sum_i softmax(logits)_i * candidate_i (the distribution of
a Gumbel-Softmax argmax is softmax(logits), whatever the temperature).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from elastic_megatron.elastic.budgets import ResolvedBudget
from elastic_megatron.config.model import ModelConfig
from elastic_megatron.elastic.widths import AXES, Widths, axis_layers, model_cost


def temperature_at(step: int, max_steps: int, start: float, end: float, schedule: str) -> float:
    frac = min(max(step / max(max_steps, 1), 0.0), 1.0)
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * frac
    return start * math.exp(math.log(end / start) * frac)


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator, hard: bool) -> torch.Tensor:
    """One Gumbel-Softmax sample over the last dim (noise from `generator`, on CPU, so
    every rank that shares the generator's state draws the same sample)."""
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    gumbel = (-torch.log(-torch.log(u))).to(logits.device, logits.dtype)
    soft = torch.softmax((logits + gumbel) / tau, dim=-1)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft


class BudgetRouter(nn.Module):
    """With `per_layer`, every axis but hidden gets its own logits for each layer carrying
    it (logits [layers, candidates]), so budgets resolve to heterogeneous widths."""

    def __init__(self, budgets: Sequence[ResolvedBudget], cfg: ModelConfig, hidden_size: int = 64, per_layer: bool = False):
        super().__init__()
        self.cfg = cfg
        self.budgets = list(budgets)
        self.axes = [a for a in AXES if any(a in b.candidates for b in budgets)]
        self.choices = {a: sorted({c for b in budgets for c in b.candidates.get(a, [])}) for a in self.axes}
        # None: one choice for the whole model; n: one per layer carrying the axis.
        self.rows = {a: (axis_layers(cfg, a) if per_layer and a != "hidden" else None) for a in self.axes}
        outputs = sum(len(self.choices[a]) * (self.rows[a] or 1) for a in self.axes)
        self.net = nn.Sequential(nn.Linear(len(budgets), hidden_size), nn.Tanh(), nn.Linear(hidden_size, max(outputs, 1)))
        # Start from a uniform choice: the budget signal comes in through training only.
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)
        for a in self.axes:
            allowed = torch.tensor([[c in b.candidates.get(a, []) for c in self.choices[a]] for b in budgets])
            self.register_buffer(f"allowed_{a}", allowed, persistent=False)

    def budget_input(self, index: Optional[int] = None, target: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(router input, interpolation weights over budgets) for a trained budget `index`,
        or for any `target` between the smallest and the largest trained target."""
        n = len(self.budgets)
        weights = torch.zeros(n)
        if index is not None:
            weights[index] = 1.0
        else:
            targets = [b.target for b in self.budgets]  # descending
            if not targets[-1] <= target <= targets[0]:
                raise ValueError(f"target {target:,} is outside the trained budgets [{targets[-1]:,}, {targets[0]:,}]")
            for i in range(n - 1):
                hi, lo = targets[i], targets[i + 1]
                if lo <= target <= hi:
                    frac = (target - lo) / (hi - lo)
                    weights[i], weights[i + 1] = frac, 1 - frac
                    break
            else:
                weights[0] = 1.0
        return weights.to(self.net[0].weight.device), weights

    def logits(self, inp: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-axis logits, -inf for candidates none of the weighted budgets allows."""
        flat = self.net(inp)
        out, start = {}, 0
        for a in self.axes:
            n, rows = len(self.choices[a]), self.rows[a]
            allowed = (getattr(self, f"allowed_{a}").float().T.to(weights.device) @ (weights > 0).float()) > 0
            block = flat[start:start + n * (rows or 1)]
            block = block.view(rows, n) if rows else block
            out[a] = block.masked_fill(~allowed.to(flat.device), float("-inf"))
            start += n * (rows or 1)
        return out

    def routed_axes(self, budget: ResolvedBudget) -> list[str]:
        return [a for a in self.axes if a in budget.candidates]

    def expected_widths(self, budget: ResolvedBudget, logits: dict[str, torch.Tensor]) -> dict:
        """Widths as numbers, expected ones (tensors) on the routed axes."""
        widths: dict = budget.fixed.as_dict()
        for a in self.routed_axes(budget):
            p = torch.softmax(logits[a], dim=-1)
            widths[a] = p @ torch.tensor(self.choices[a], dtype=p.dtype, device=p.device)
        return widths

    def expected_cost(self, budget: ResolvedBudget, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        return model_cost(self.cfg, self.expected_widths(budget, logits), budget.target_kind)

    def resolve(self, budget: ResolvedBudget, logits: dict[str, torch.Tensor]) -> Widths:
        """The architecture of a budget after training: the most likely candidate per axis."""
        def pick(a):
            best = logits[a].argmax(-1)
            if best.dim():
                return tuple(self.choices[a][int(i)] for i in best)
            return self.choices[a][int(best)]

        return budget.fixed.replace(**{a: pick(a) for a in self.routed_axes(budget)})

    def resolve_budget(self, index: int) -> Widths:
        with torch.no_grad():
            inp, w = self.budget_input(index)
            return self.resolve(self.budgets[index], self.logits(inp, w))
