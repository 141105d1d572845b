"""Storage report: one elastic checkpoint against separate checkpoints of every size.

Analytic (any preset, from the counter): the elastic checkpoint is the parent's bytes;
separate checkpoints are the sum over budgets of each nested model's bytes, per
precision (bf16, fp8, nvfp4; see models/counter.py for what each precision quantises).
Measured (a real elastic checkpoint, tiny models): the full model and every budget are
written as bf16 HF safetensors directories and their files are summed. The counter
counts parameters; files also hold the router's fp32 correction bias (a buffer), the
safetensors headers and config.json.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from elastic_megatron.config.model import ModelConfig
from elastic_megatron.elastic.widths import Widths, full_widths, sub_model_config
from elastic_megatron.models.counter import PRECISIONS, model_size

GIB = 2**30


@dataclass
class StorageReport:
    model: str
    budgets: list[str]
    elastic_bytes: dict[str, int]  # precision -> bytes of the one elastic checkpoint
    separate_bytes: dict[str, int]  # precision -> bytes of one checkpoint per budget
    per_budget_bytes: dict[str, dict[str, int]]  # budget -> precision -> bytes
    measured: Optional[dict] = None  # bf16 files: {"elastic": bytes, "separate": bytes, "files": {path: bytes}}
    skipped: list[str] = field(default_factory=list)  # router-chosen budgets without resolved widths

    def as_dict(self) -> dict:
        return {"model": self.model, "budgets": self.budgets, "elastic_bytes": self.elastic_bytes,
                "separate_bytes": self.separate_bytes, "per_budget_bytes": self.per_budget_bytes,
                "measured": self.measured, "skipped": self.skipped}


def analytic_storage(cfg: ModelConfig, budgets: list[tuple[str, Widths]]) -> StorageReport:
    per = {name: model_size(sub_model_config(cfg, w)).total_bytes for name, w in budgets}
    return StorageReport(
        model=cfg.name, budgets=[n for n, _ in budgets],
        elastic_bytes=dict(model_size(cfg).total_bytes),
        separate_bytes={p: sum(per[n][p] for n in per) for p in PRECISIONS},
        per_budget_bytes=per,
    )


def _dir_bytes(directory: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def measured_storage(checkpoint: str | Path, workdir: Optional[str | Path] = None) -> StorageReport:
    """Write the elastic checkpoint's full model and each budget as bf16 HF directories
    and sum their files: into `workdir` (kept, for inspection) or a temporary directory."""
    if workdir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return measured_storage(checkpoint, tmp)
    from elastic_megatron.convert.hf_checkpoint import export_hf
    from elastic_megatron.convert.megatron_dist import DistCheckpointSource
    from elastic_megatron.elastic.budgets import recorded_budget, recorded_budgets
    from elastic_megatron.slicing.zero_shot import slice_checkpoint

    src = DistCheckpointSource(checkpoint)
    budgets = [(name, recorded_budget(src.meta, name, checkpoint)) for name, _ in recorded_budgets(src.meta, checkpoint)]
    report = analytic_storage(src.cfg, budgets)
    root = Path(workdir)
    export_hf(src.dir, root / "elastic", "bf16")
    files = _dir_bytes(root / "elastic")
    elastic = sum(files.values())
    separate = {}
    for name, w in budgets:
        # The full budget's standalone checkpoint is the parent's export itself.
        out = root / "elastic" if w == full_widths(src.cfg) else slice_checkpoint(src.dir, root / f"budget-{name}", name, "bf16", "hf")
        sizes = _dir_bytes(out)
        files.update(sizes)
        separate[name] = sum(sizes.values())
    report.measured = {"precision": "bf16", "elastic": elastic, "separate": sum(separate.values()),
                       "per_budget": separate, "files": {os.path.relpath(k, root): v for k, v in files.items()}}
    return report


def render_storage(r: StorageReport) -> str:
    def fmt(n: int) -> str:
        return f"{n / 1e9:9.2f} GB {n / GIB:8.2f} GiB" if n >= 1e8 else f"{n / 1e6:9.3f} MB {n / 2**20:8.3f} MiB"

    lines = [f"storage of {r.model}: one elastic checkpoint vs separate checkpoints of {', '.join(r.budgets)}", "",
             f"{'precision':<10}{'elastic (one file set)':>28}{'separate (all sizes)':>28}{'saved':>8}"]
    for p in PRECISIONS:
        e, s = r.elastic_bytes[p], r.separate_bytes[p]
        lines.append(f"{p:<10}{fmt(e):>28}{fmt(s):>28}{1 - e / s:>8.1%}")
    lines += ["", f"{'budget':<10}" + "".join(f"{p:>28}" for p in PRECISIONS)]
    for name in r.budgets:
        lines.append(f"{name:<10}" + "".join(f"{fmt(r.per_budget_bytes[name][p]):>28}" for p in PRECISIONS))
    if r.skipped:
        lines.append(f"(router-chosen budgets {r.skipped} have widths only after training: pass checkpoint=<elastic run>)")
    if r.measured:
        m = r.measured
        lines += ["", f"measured on files (bf16 HF safetensors + config.json): elastic {m['elastic']:,} B, "
                  f"separate {m['separate']:,} B ({', '.join(f'{k} {v:,}' for k, v in m['per_budget'].items())})"]
    return "\n".join(lines)
