"""Evaluate every nested budget of an elastic checkpoint against two baselines.

For each budget (architecture resolved in the elastic checkpoint's metadata):
- elastic:  the elastic-trained checkpoint at that size;
- sorted:   the same size sliced from the sorted parent, no elastic training (baseline a);
- unsorted: prefix slicing of the parent before sorting (baseline b).
Every row is the validation loss of the hard-masked full model, which equals the sliced
model's (the mask = slice invariant), on the validation split of the elastic run's data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from elastic_megatron.checkpoint.metadata import checkpoint_model_config, read_common_state, require_same_architecture
from elastic_megatron.checkpoint.store import load_model_weights
from elastic_megatron.config.errors import ConfigError
from elastic_megatron.data.datasets import recorded_batches
from elastic_megatron.elastic.budgets import checkpoint_budgets
from elastic_megatron.elastic.masks import ElasticHooks, hard_masks
from elastic_megatron.elastic.widths import Widths, model_cost
from elastic_megatron.models.hybrid import build_model
from elastic_megatron.training.steps import masked_token_mean

BASELINES = ("elastic", "sorted", "unsorted")


@dataclass
class BudgetRow:
    name: str
    widths: dict
    total_params: int
    active_params: int
    loss: dict  # baseline -> validation loss

    def as_dict(self) -> dict:
        return {"budget": self.name, "widths": self.widths, "total_params": self.total_params,
                "active_params": self.active_params, "valid_loss": self.loss,
                "valid_ppl": {k: math.exp(min(v, 50)) for k, v in self.loss.items()}}


def validation_batches(path, num_batches: int, micro_batch_size: int, split: str = "valid") -> list[dict]:
    """Micro-batches of the data the run that wrote checkpoint `path` was trained on."""
    return recorded_batches(yaml.safe_load(read_common_state(path)["meta"]["config"]), num_batches, micro_batch_size, split)


@torch.no_grad()
def budget_losses(model, cfg, budgets: list[tuple[str, Widths]], batches: list[dict]) -> dict[str, float]:
    hooks = ElasticHooks(model, cfg)
    model.eval()
    out = {}
    try:
        for name, w in budgets:
            hooks.set(hard_masks(cfg, w))
            losses = [masked_token_mean(model(b["tokens"], b["position_ids"], None, labels=b["labels"]).float(), b["loss_mask"])
                      for b in batches]
            out[name] = torch.stack(losses).mean().item()
    finally:
        hooks.remove()
    return out


def evaluate_elastic(elastic_ckpt, sorted_ckpt, unsorted_ckpt, num_batches: int = 16, micro_batch_size: int = 8) -> list[BudgetRow]:
    """Rows of the evaluation table. Needs Megatron's parallel state (world of one)."""
    cfg, _ = checkpoint_model_config(elastic_ckpt)
    for path, key in ((sorted_ckpt, "sorted"), (unsorted_ckpt, "unsorted")):
        require_same_architecture(cfg, path, key)
    budgets = checkpoint_budgets(elastic_ckpt)
    batches = validation_batches(elastic_ckpt, num_batches, micro_batch_size)
    losses = {}
    for label, path in zip(BASELINES, (elastic_ckpt, sorted_ckpt, unsorted_ckpt)):
        model = build_model(cfg)
        load_model_weights(path, model)
        losses[label] = budget_losses(model, cfg, budgets, batches)
        del model
    return [BudgetRow(name, w.as_dict(), int(model_cost(cfg, w, "total_params")), int(model_cost(cfg, w, "active_params")),
                      {label: losses[label][name] for label in BASELINES})
            for name, w in budgets]


def render_table(rows: list[BudgetRow]) -> str:
    head = f"{'budget':<10}{'total params':>14}{'active params':>15}" + "".join(f"{b + ' loss':>16}{'ppl':>8}" for b in BASELINES)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{r.loss[b]:>16.4f}{math.exp(min(r.loss[b], 50)):>8.2f}" for b in BASELINES)
        lines.append(f"{r.name:<10}{r.total_params:>14,}{r.active_params:>15,}{cells}")
    return "\n".join(lines)


def _write_json_and_png(out_dir, stem: str, payload: dict, draw, figsize=(6, 4)) -> tuple[Path, Path]:
    """<out_dir>/<stem>.json with `payload` and <stem>.png drawn by `draw(ax)` (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(payload, indent=2))
    fig, ax = plt.subplots(figsize=figsize)
    draw(ax)
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = out_dir / f"{stem}.png"
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return json_path, png_path


def write_outputs(rows: list[BudgetRow], out_dir) -> tuple[Path, Path]:
    """evaluation.json and evaluation.png (validation loss vs total parameters)."""
    labels = {"elastic": "elastic (stage 1 + 2)", "sorted": "(a) sliced from sorted parent", "unsorted": "(b) prefix of unsorted parent"}

    def draw(ax):
        for b in BASELINES:
            ax.plot([r.total_params for r in rows], [r.loss[b] for r in rows], marker="o", label=labels[b])
        for r in rows:
            ax.annotate(r.name, (r.total_params, r.loss["elastic"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.set_xlabel("total parameters")
        ax.set_title("nested budgets: validation loss vs size")

    return _write_json_and_png(out_dir, "evaluation", {"rows": [r.as_dict() for r in rows]}, draw)


# ---- budget x precision -----------------------------------------------------------------

PRECISION_COLUMNS = ("bf16", "fp8 PTQ", "nvfp4 PTQ", "nvfp4 QAD")


def evaluate_precisions(elastic_ckpt, qad_ckpt=None, num_batches: int = 16, micro_batch_size: int = 8,
                        calibration_batches: int = 16) -> dict[str, dict[str, float]]:
    """budget -> column -> validation loss: the BF16 elastic checkpoint, FP8 and NVFP4
    post-training quantization of it (one set of scales calibrated at every budget on its
    training data), and the NVFP4 QAD checkpoint `qad_ckpt` with its own scales."""
    from elastic_megatron.quant.calibrate import calibrate_budgets
    from elastic_megatron.quant.hooks import QuantHooks, attach

    cfg, _ = checkpoint_model_config(elastic_ckpt)
    budgets = checkpoint_budgets(elastic_ckpt)
    batches = validation_batches(elastic_ckpt, num_batches, micro_batch_size)
    calibration = validation_batches(elastic_ckpt, calibration_batches, micro_batch_size, split="train")
    model = build_model(cfg)
    load_model_weights(elastic_ckpt, model)
    columns = {"bf16": budget_losses(model, cfg, budgets, batches)}
    for fmt in ("fp8", "nvfp4"):
        quant = QuantHooks(model, fmt, "aggressive")
        calibrate_budgets(model, cfg, quant, budgets, calibration)
        columns[f"{fmt} PTQ"] = budget_losses(model, cfg, budgets, batches)
        quant.remove()
    if qad_ckpt is not None:
        meta = require_same_architecture(cfg, qad_ckpt, "--qad")
        record = meta.get("quantization")
        if not record:
            raise ConfigError("--qad", str(qad_ckpt), "has no quantization scales: give the run dir of a QAD run (recipes/qad.yaml)")
        qad = build_model(cfg)
        load_model_weights(qad_ckpt, qad)
        attach(qad, record, record["format"], record["recipe"])
        columns[f"{record['format']} QAD"] = budget_losses(qad, cfg, budgets, batches)
    return {name: {c: columns[c][name] for c in columns} for name, _ in budgets}


def render_precision_table(table: dict[str, dict[str, float]]) -> str:
    cols = list(next(iter(table.values())))
    gaps = [c for c in ("nvfp4 PTQ", "nvfp4 QAD") if c in cols]
    head = f"{'budget':<10}" + "".join(f"{c + ' loss':>16}" for c in cols) + "".join(f"{c + ' - bf16':>18}" for c in gaps)
    lines = ["validation loss per budget and precision (one set of scales for every budget)", head, "-" * len(head)]
    for name, row in table.items():
        lines.append(f"{name:<10}" + "".join(f"{row[c]:>16.4f}" for c in cols) + "".join(f"{row[c] - row['bf16']:>+18.4f}" for c in gaps))
    return "\n".join(lines)


def write_precision_outputs(table: dict[str, dict[str, float]], out_dir) -> tuple[Path, Path]:
    """precision.json and precision.png (validation loss per budget, one bar per precision)."""
    cols = list(next(iter(table.values())))

    def draw(ax):
        width = 0.8 / len(cols)
        for j, c in enumerate(cols):
            ax.bar([i + j * width for i in range(len(table))], [row[c] for row in table.values()], width, label=c)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(table))], list(table))
        ax.set_ylim(bottom=min(v for row in table.values() for v in row.values()) * 0.95)
        ax.set_title("nested budgets x precision")

    return _write_json_and_png(out_dir, "precision", {"valid_loss": table}, draw, figsize=(7, 4))
