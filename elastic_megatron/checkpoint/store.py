"""The checkpoint store: Megatron dist_checkpointing (torch_dist) with an atomic tracker flip.

Layout under `<run.dir>/checkpoints/`:

    iter_0000100/                    a complete checkpoint (dist-checkpoint shards + common.pt)
    latest_checkpointed_iteration.txt  the step of the latest complete checkpoint

A save writes into `iter_XXXXXXX.partial/`, waits for every rank, renames it to its final
name and only then rewrites the tracker (write a temp file, `os.replace`). A save killed
at any point therefore leaves the previous checkpoint and the tracker untouched; stale
`.partial` directories are removed by the next save.

Each checkpoint holds: model (sharded, Megatron key layout), optimizer, scheduler, step,
consumed samples (data position), RNG states of every rank, W&B run id, the resolved
config (YAML text) and free-form `extra` state for later stages (router, temperature...).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject


TRACKER = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def iteration_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"iter_{step:07d}"


def latest_step(run_dir: str | Path) -> Optional[int]:
    """Step of the latest complete checkpoint, or None."""
    tracker = checkpoint_root(run_dir) / TRACKER
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise RuntimeError(f"checkpoint tracker {tracker} is corrupt: {text!r}")
    step = int(text)
    if not (iteration_dir(run_dir, step) / "metadata.json").exists():
        raise RuntimeError(f"checkpoint tracker {tracker} points at step {step}, but {iteration_dir(run_dir, step)} is incomplete")
    return step


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["cuda_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["cuda_tracker"])


def _sharded_state(model, optimizer, scheduler, step: int, consumed_samples: int, meta: dict, extra: dict,
                   is_loading: bool = False) -> dict:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    model_sd = model.sharded_state_dict()
    state: dict[str, Any] = {
        "model": model_sd,
        # Per-rank RNG states, stored as one object per rank.
        "rng": ShardedObject("rng_state", rng_state(), (world,), (rank,), replica_id=0),
        "step": step,
        "consumed_samples": consumed_samples,
        "format_version": FORMAT_VERSION,
        "meta": meta,
        "extra": extra,
        "layout": current_layout(),
    }
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if optimizer is not None:
        # Both optimizers (Megatron's, the CPU one) shard their state like the model, so
        # a checkpoint loads under another TP/PP/EP/DP layout.
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    return state


def current_layout() -> dict:
    """The parallel layout of this process group (stored with every checkpoint)."""
    from megatron.core import parallel_state

    world = dist.get_world_size() if dist.is_initialized() else 1
    if not parallel_state.model_parallel_is_initialized():
        return {"world": world, "tp": 1, "pp": 1, "ep": 1}
    return {"world": world, "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "ep": parallel_state.get_expert_model_parallel_world_size()}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(run_dir, model, optimizer, scheduler, step: int, consumed_samples: int, meta: dict, extra: Optional[dict] = None) -> Path:
    """Save step `step`; returns the final directory. Collective: call on every rank."""
    root = checkpoint_root(run_dir)
    final = iteration_dir(run_dir, step)
    partial = final.with_name(final.name + ".partial")
    is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if is_rank0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir()
    _barrier()
    state = _sharded_state(model, optimizer, scheduler, step, consumed_samples, meta, extra or {})
    dist_checkpointing.save(state, str(partial))
    _barrier()
    if is_rank0:
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(partial, final)
        tmp = root / (TRACKER + ".tmp")
        tmp.write_text(f"{step}\n")
        os.replace(tmp, root / TRACKER)
    _barrier()
    return final


def load_checkpoint(run_dir, model, optimizer, scheduler, step: Optional[int] = None) -> dict:
    """Load `step` (default: latest) into model/optimizer/scheduler and restore RNG.

    Returns the common state: step, consumed_samples, meta, extra."""
    step = latest_step(run_dir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoint_root(run_dir)}")
    path = iteration_dir(run_dir, step)
    template = _sharded_state(model, optimizer, scheduler, 0, 0, {}, {}, is_loading=True)
    saved_layout = dist_checkpointing.load_common_state_dict(str(path)).get("layout")
    same_layout = saved_layout in (None, template["layout"])
    if not same_layout:
        # Model and optimizer reshard; per-rank RNG streams do not map onto another layout
        # (Megatron-LM's --no-load-rng), so they restart from the run seed.
        del template["rng"]
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"checkpoint {path.name} was saved with layout {saved_layout}, resuming with {template['layout']}: "
                  "model and optimizer resharded, RNG states not restored", flush=True)
    state = dist_checkpointing.load(template, str(path))
    model.load_state_dict(state["model"])
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if same_layout:
        set_rng_state(state["rng"])
    return {k: state[k] for k in ("step", "consumed_samples", "meta", "extra")}


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A run dir (its latest complete checkpoint) or an iter_* checkpoint dir."""
    path = Path(path)
    if (path / "metadata.json").exists():
        return path
    if (checkpoint_root(path) / TRACKER).exists():
        return iteration_dir(path, latest_step(path))
    raise FileNotFoundError(f"{path} is neither a checkpoint directory (metadata.json) nor a run dir with {checkpoint_root(path) / TRACKER}")


def load_model_weights(path: str | Path, model) -> dict:
    """Load only the model weights of a checkpoint (run dir or checkpoint dir) into
    `model`; returns its common state (step, meta, extra). Collective."""
    directory = resolve_checkpoint_dir(path)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(directory))
    model.load_state_dict(state["model"])
    return {k: state.get(k) for k in ("step", "consumed_samples", "meta", "extra")}
