"""Storage report: one elastic checkpoint against separate checkpoints of every size.

Analytic (any preset, from the counter): the elastic checkpoint is the parent's bytes;
separate checkpoints are the sum over budgets of each nested model's bytes, per
precision (bf16, fp8, nvfp4; see models/counter.py for what each precision quantises:
ModelOpt's default `aggressive` recipe).

Measured (a real elastic checkpoint, tiny models): per precision, the full model and
every budget are written as HF directories (bf16 safetensors, or ModelOpt's unified
quantized format for fp8 / nvfp4) and their files are summed; the full budget's
standalone checkpoint is the full export itself. A quantized precision uses ONE set of
scales for all its exports, as a nested quantized checkpoint does: the checkpoint's
own (QAD) scales of that format, else post-training calibration on a few batches of the
run's training data. A checkpoint that records no training data (an import, a slice),
whose budgets cannot nest NVFP4 blocks, or one of whose budgets would give a quantized GEMM
dimension the serving kernels do not take (quant/recipes.KERNEL_ALIGNMENT) is measured in
the other precisions, and the report says why. The analytic report lists, per budget,
whether its FP8 and NVFP4 exports qualify for those kernels. Files hold more than the counter's parameters: the router's fp32
correction bias (a buffer), the safetensors headers, config.json, hf_quant_config.json
and manifest.json.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.model import ModelConfig
from elastic_megatron.elastic.widths import Widths, full_widths, sub_model_config
from elastic_megatron.models.counter import PRECISIONS, model_size

GIB = 2**30
DEFAULT_RECIPE = "aggressive"  # the recipe the analytic counter follows


@dataclass
class StorageReport:
    model: str
    budgets: list[str]
    elastic_bytes: dict[str, int]  # precision -> bytes of the one elastic checkpoint
    separate_bytes: dict[str, int]  # precision -> bytes of one checkpoint per budget
    per_budget_bytes: dict[str, dict[str, int]]  # budget -> precision -> bytes
    # precision -> {"elastic": bytes, "separate": bytes, "per_budget": {budget: bytes},
    #               "scales": where a quantized export's scales came from (None for bf16),
    #               "files": {path relative to the work directory: bytes}}
    measured: Optional[dict] = None
    unmeasured: dict[str, str] = field(default_factory=dict)  # precision -> why it was not measured
    skipped: list[str] = field(default_factory=list)  # router-chosen budgets without resolved widths
    # budget -> fp8/nvfp4 -> "ok" or why its export breaks the serving kernels' alignment
    # (quant/recipes.kernel_report), under `recipe`
    kernels: dict = field(default_factory=dict)
    recipe: str = DEFAULT_RECIPE

    def as_dict(self) -> dict:
        return {"model": self.model, "budgets": self.budgets, "elastic_bytes": self.elastic_bytes,
                "separate_bytes": self.separate_bytes, "per_budget_bytes": self.per_budget_bytes,
                "measured": self.measured, "unmeasured": self.unmeasured, "skipped": self.skipped,
                "kernels": self.kernels, "recipe": self.recipe}


def analytic_storage(cfg: ModelConfig, budgets: list[tuple[str, Widths]], recipe: str = DEFAULT_RECIPE) -> StorageReport:
    from elastic_megatron.quant.recipes import kernel_report

    per = {name: model_size(sub_model_config(cfg, w)).total_bytes for name, w in budgets}
    return StorageReport(
        model=cfg.name, budgets=[n for n, _ in budgets],
        elastic_bytes=dict(model_size(cfg).total_bytes),
        separate_bytes={p: sum(per[n][p] for n in per) for p in PRECISIONS},
        per_budget_bytes=per, kernels=kernel_report(cfg, budgets, recipe), recipe=recipe,
    )


def _dir_bytes(directory: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def measured_storage(checkpoint: str | Path, workdir: Optional[str | Path] = None,
                     precisions: tuple[str, ...] = PRECISIONS, calibration_batches: int = 4) -> StorageReport:
    """Write the elastic checkpoint's full model and each budget as HF directories in
    every one of `precisions` and sum their files: into `workdir` (kept, for inspection;
    `<workdir>/<precision>/elastic`, `<workdir>/<precision>/budget-<name>`) or a temporary
    directory. fp8 / nvfp4 scales: computed once per precision (`calibration_batches`
    batches of post-training calibration unless the checkpoint carries its own)."""
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise ConfigError("precisions", list(precisions), f"allowed: a non-empty subset of {list(PRECISIONS)}")
    if workdir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return measured_storage(checkpoint, tmp, precisions, calibration_batches)
    from elastic_megatron.convert.megatron_dist import DistCheckpointSource
    from elastic_megatron.elastic.budgets import recorded_budget, recorded_budgets

    src = DistCheckpointSource(checkpoint)
    budgets = [(name, recorded_budget(src.meta, name, checkpoint)) for name, _ in recorded_budgets(src.meta, checkpoint)]
    report = analytic_storage(src.cfg, budgets)
    full = next((name for name, w in budgets if w == full_widths(src.cfg)), None)
    root = Path(workdir)
    report.measured = {}
    # bf16 first: it needs no scales, and a damaged checkpoint stops here before any calibration.
    for precision in sorted(precisions, key=PRECISIONS.index):
        scales, origin = None, None
        if precision != "bf16":
            if full is None:
                report.unmeasured[precision] = ("no recorded budget is the full model, and a quantized export of the "
                                                "full model is written as that budget's slice")
                continue
            try:
                _check_kernels(src, budgets, precision)
                scales, origin = _scales(src, precision, calibration_batches)
            except ConfigError as err:
                report.unmeasured[precision] = str(err)
                continue
        report.measured[precision] = _measure(src, budgets, full, root, precision, scales)
        report.measured[precision]["scales"] = origin
    return report


def _check_kernels(src, budgets: list[tuple[str, Widths]], precision: str) -> None:
    """Every budget's export in `precision` passes the serving kernels' alignment (as
    slicing checks it), before any scale is computed."""
    from elastic_megatron.quant.recipes import check_kernel_alignment

    own = src.meta.get("quantization") or {}
    recipe = own.get("recipe") if own.get("format") == precision else DEFAULT_RECIPE
    for name, w in budgets:
        check_kernel_alignment(src.cfg, sub_model_config(src.cfg, w), precision, recipe, name, key="budget")


def _scales(src, precision: str, calibration_batches: int) -> tuple[dict, str]:
    """One quant record for every export of `precision`, and where it came from."""
    from elastic_megatron.slicing.zero_shot import source_scales

    own = src.meta.get("quantization") or {}
    if own.get("format") == precision:  # quantization-aware distillation (or an earlier PTQ) recorded them
        return own, f"the checkpoint's own ({own.get('recipe')} recipe)"
    record = source_scales(src, precision, DEFAULT_RECIPE, calibration_batches)
    return record, f"post-training calibration on {calibration_batches} batches of the run's training data ({DEFAULT_RECIPE} recipe)"


def _measure(src, budgets: list[tuple[str, Widths]], full: Optional[str], root: Path, precision: str,
             scales: Optional[dict]) -> dict:
    from elastic_megatron.convert.hf_checkpoint import export_hf
    from elastic_megatron.slicing.zero_shot import slice_checkpoint

    out = root / precision
    if precision == "bf16":
        export_hf(src.dir, out / "elastic", "bf16")
    else:
        # The full model is a recorded budget: its slice is the parent, quantized with `scales`.
        slice_checkpoint(src.dir, out / "elastic", full, precision, "hf", name=src.cfg.name, scales=scales)
    files = _dir_bytes(out / "elastic")
    elastic = sum(files.values())
    per_budget = {}
    for name, w in budgets:
        if w == full_widths(src.cfg):
            per_budget[name] = elastic  # the full budget's standalone checkpoint is the full export itself
            continue
        sizes = _dir_bytes(slice_checkpoint(src.dir, out / f"budget-{name}", name, precision, "hf", scales=scales))
        files.update(sizes)
        per_budget[name] = sum(sizes.values())
    return {"elastic": elastic, "separate": sum(per_budget.values()), "per_budget": per_budget,
            "files": {Path(os.path.relpath(k, root)).as_posix(): v for k, v in files.items()}}


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB ({n / GIB:.2f} GiB)" if n >= 1e8 else f"{n / 1e6:.3f} MB ({n / 2**20:.3f} MiB)"


def render_storage(r: StorageReport) -> str:
    measured = r.measured is not None
    w = 24
    lines = [f"storage of {r.model}: one elastic checkpoint vs separate checkpoints of {', '.join(r.budgets)}", ""]
    if measured:
        lines.append(f"{'':<10}{'analytic (counter)':^{2 * w + 7}}   {'measured (files written)':^{2 * w + 7}}".rstrip())
    head = f"{'elastic':>{w}}{'separate':>{w}}{'saved':>7}"
    lines.append(f"{'precision':<10}{head}" + (f"   {head}" if measured else ""))
    for p in PRECISIONS:
        e, s = r.elastic_bytes[p], r.separate_bytes[p]
        row = f"{p:<10}{_size(e):>{w}}{_size(s):>{w}}{1 - e / s:>7.1%}"
        if measured:
            m = r.measured.get(p)
            row += (f"   {_size(m['elastic']):>{w}}{_size(m['separate']):>{w}}{1 - m['elastic'] / m['separate']:>7.1%}"
                    if m else f"   {'not measured':>{w}}")
        lines.append(row)
    lines += ["", f"{'budget':<10}" + "".join(f"{p:>{w}}" for p in PRECISIONS) + ("   (analytic)" if measured else "")]
    for name in r.budgets:
        lines.append(f"{name:<10}" + "".join(f"{_size(r.per_budget_bytes[name][p]):>{w}}" for p in PRECISIONS))
    if measured:
        lines += ["", f"{'budget':<10}" + "".join(f"{p:>{w}}" for p in PRECISIONS) + "   (measured)"]
        for name in r.budgets:
            lines.append(f"{name:<10}" + "".join(
                f"{_size(r.measured[p]['per_budget'][name]) if p in r.measured else '-':>{w}}" for p in PRECISIONS))
        lines += ["", "measured: HF directories (safetensors, config.json, manifest.json; quantized ones in ModelOpt's "
                  "unified format with hf_quant_config.json); the full budget's standalone checkpoint is the full export"]
        for p, m in r.measured.items():
            lines.append(f"  {p}: elastic {m['elastic']:,} B, separate {m['separate']:,} B"
                         + (f"; scales: {m['scales']}" if m.get("scales") else ""))
        for p, why in r.unmeasured.items():
            lines.append(f"  {p}: not measured: {why}")
    if r.kernels:
        from elastic_megatron.quant.recipes import KERNEL_ALIGNMENT

        rules = ", ".join(f"{fmt} N and K multiples of {align}" for fmt, (align, _) in KERNEL_ALIGNMENT.items())
        lines += ["", f"serving kernels ({r.recipe} recipe; quantized GEMMs need {rules}):"]
        for name, row in r.kernels.items():
            lines.append(f"{name:<10}" + "   ".join(f"{fmt} {status}" for fmt, status in row.items()))
    if r.skipped:
        lines.append(f"(router-chosen budgets {r.skipped} have widths only after training: pass checkpoint=<elastic run>)")
    return "\n".join(lines)
