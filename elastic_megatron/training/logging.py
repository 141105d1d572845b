"""Metrics from one rank: console progress line, `metrics.jsonl` in the run dir, W&B.

The W&B run id is created once and stored in `<run.dir>/wandb_run_id.txt`, so a requeued
Slurm job (same run dir) continues the same W&B run. Offline mode needs no network; the
offline run directory lands under `<run.dir>/wandb/`.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
from pathlib import Path
from typing import Optional

import torch.distributed as dist


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def wandb_run_id(run_dir: Path) -> str:
    """The run's W&B id: read from the run dir, or created and stored there (rank 0)."""
    path = Path(run_dir) / "wandb_run_id.txt"
    if path.exists():
        return path.read_text().strip()
    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))  # W&B's id format
    path.write_text(run_id + "\n")
    return run_id


def drop_rows_after(path: Path, step: int) -> None:
    """A resumed run redoes the steps after its checkpoint: drop their old rows, so the file
    holds one series (rewritten atomically; a half-written last line is dropped too)."""
    if not path.exists():
        return
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if row_step > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


class MetricsLogger:
    def __init__(self, run_dir: Path, logger_cfg, job_name: str, resolved_config: dict, resumed_at: int = 0):
        self.enabled = is_rank0()
        self.run_dir = Path(run_dir)
        self.wandb_run = None
        self.jsonl = None
        if not self.enabled:
            return
        drop_rows_after(self.run_dir / "metrics.jsonl", resumed_at)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        if logger_cfg.type == "wandb":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=logger_cfg.project,
                entity=logger_cfg.entity,
                name=job_name,
                id=wandb_run_id(self.run_dir),
                resume="allow",
                dir=str(self.run_dir),
                mode=logger_cfg.mode,
                config=resolved_config,
                tags=list(logger_cfg.tags) or None,
            )

    @property
    def wandb_id(self) -> Optional[str]:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in clean.items() if isinstance(v, float) and math.isfinite(v)}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
