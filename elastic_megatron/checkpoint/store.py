"""The checkpoint store: Megatron dist_checkpointing (torch_dist) with an atomic tracker flip.

Layout under `<run.dir>/checkpoints/`:

    iter_0000100/                    a complete checkpoint (dist-checkpoint shards + common.pt)
    latest_checkpointed_iteration.txt  the step of the latest complete checkpoint

    corrupt/iter_0000090[-k]/        checkpoints that failed verification, kept aside for
                                     inspection: never loaded, never deleted

A save first checks the free space of the filesystem, writes into `iter_XXXXXXX.partial/`,
waits for every rank, writes the integrity manifest (manifest.json: every file with its
size and hash; every rank hashes a share of the files), renames the directory to its final name and only then rewrites the
tracker (write a temp file, `os.replace`). A save killed at any point therefore leaves
the previous checkpoint and the tracker untouched; a save that fails (disk full) removes
its partial directory and says why; stale `.partial` directories of killed saves are
removed by the next save (the run-dir lock guarantees no other writer owns them).

Resume (`resume_step`) takes the newest checkpoint that verifies (checkpoint/verify.py),
not blindly the tracker's: a newer one that is corrupt or incomplete is reported (which
file, what is wrong) and moved aside, a missing or stale tracker is rebuilt from the
directory listing, and a run dir whose checkpoints all fail is refused, never silently
restarted from step 0.

Each checkpoint holds: model (sharded, Megatron key layout), optimizer, scheduler, step,
consumed samples (data position), RNG states of every rank, W&B run id, the resolved
config (YAML text) and free-form `extra` state for later stages (router, temperature...).
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from elastic_megatron.checkpoint.manifest import CheckpointCorrupt, checked_on_rank0, write_manifest
from elastic_megatron.checkpoint.verify import verify_checkpoint
from elastic_megatron.models.compat import write_common_state_file
from elastic_megatron.parallel.collectives import any_rank


TRACKER = "latest_checkpointed_iteration.txt"
CORRUPT = "corrupt"
FORMAT_VERSION = 1
# Free space a save asks for beyond its estimated size (filesystem metadata, manifest).
SAVE_HEADROOM = 1.10


class CheckpointSaveError(RuntimeError):
    """A save could not be completed; its partial directory was removed and the previous
    checkpoint is untouched."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def iteration_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"iter_{step:07d}"


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _tracker_step(run_dir) -> Optional[int]:
    tracker = checkpoint_root(run_dir) / TRACKER
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    return int(text) if text.isdigit() else None


def latest_step(run_dir: str | Path) -> Optional[int]:
    """Step of the run dir's latest checkpoint by its tracker (readers: tools, the
    teacher), or None without a tracker. Resuming uses `resume_step`, which verifies."""
    tracker = checkpoint_root(run_dir) / TRACKER
    if not tracker.exists():
        return None
    step = _tracker_step(run_dir)
    if step is None:
        raise CheckpointCorrupt(tracker, f"not a step number: {tracker.read_text().strip()!r}")
    if not (iteration_dir(run_dir, step) / "metadata.json").exists():
        raise CheckpointCorrupt(iteration_dir(run_dir, step), f"incomplete, but the tracker {tracker} points at it")
    return step


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """Steps of the complete-looking checkpoint directories (iter_NNNNNNN), newest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((int(d.name[5:]) for d in root.iterdir()
                   if d.is_dir() and d.name.startswith("iter_") and d.name[5:].isdigit()), reverse=True)


def _set_tracker(run_dir, step: int) -> None:
    root = checkpoint_root(run_dir)
    tmp = root / (TRACKER + ".tmp")
    tmp.write_text(f"{step}\n")
    os.replace(tmp, root / TRACKER)


def _move_aside(path: Path) -> Path:
    """Keep a failed checkpoint for inspection where nothing loads or overwrites it."""
    aside_root = path.parent / CORRUPT
    aside_root.mkdir(exist_ok=True)
    target, k = aside_root / path.name, 1
    while target.exists():
        target, k = aside_root / f"{path.name}-{k}", k + 1
    os.replace(path, target)
    return target


def resume_step(run_dir: str | Path) -> Optional[int]:
    """The step to resume from: the newest checkpoint of the run dir that verifies (None:
    a fresh run). Collective: every rank verifies its share of each candidate and gets the
    same answer; rank 0 moves the corrupt ones aside, rebuilds the tracker and says so."""
    steps, tracked = checked_on_rank0(lambda: (checkpoint_steps(run_dir), _tracker_step(run_dir)))
    for step in steps:
        directory = iteration_dir(run_dir, step)
        try:
            verified = verify_checkpoint(directory)
        except CheckpointCorrupt as err:
            if _rank0():
                aside = _move_aside(directory)
                _note(f"checkpoint {directory.name} failed verification ({err.path.name}: {err.problem}); "
                      f"kept aside as {aside} and skipped")
            _barrier()  # the next candidate's files are listed once this one is out of the way
            continue
        if not verified:
            _note(f"checkpoint {directory.name} has no manifest (written before integrity manifests): "
                  "structure checked, contents not hashed")
        if tracked != step and _rank0():
            was = "missing" if tracked is None else f"at step {tracked}"
            _note(f"the tracker was {was}; resuming from the newest checkpoint that verifies, step {step}")
            _set_tracker(run_dir, step)
        _barrier()
        return step
    if steps:
        raise CheckpointCorrupt(checkpoint_root(run_dir), f"none of its {len(steps)} checkpoints verifies (all kept "
                                f"aside under {CORRUPT}/): refusing to start the run over from step 0; choose a new "
                                "run.dir, or move the run's checkpoints away to restart it")
    return None


def _note(text: str) -> None:
    if _rank0():
        print(f"note: {text}", flush=True)


def verify_for_loading(directory: Path) -> None:
    """Verify a checkpoint before reading it. Collective under a process group: every rank
    hashes a share of its files (they are shared) and gets the same verdict."""
    verify_checkpoint(directory)


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


PR_SET_PDEATHSIG = 1  # linux/prctl.h
_fork_guard = {"registered": False, "parent": None}


def _writers_die_with_us() -> None:
    """Megatron's torch_dist writer forks worker processes for every save. A worker
    inherits the trainer's SIGTERM/SIGUSR1 handler (which only sets a flag, so `kill`
    would not end it), and a trainer killed with SIGKILL mid-save would leave it waiting
    forever. So every child forked from here on gets the default handlers back and is
    killed when its parent dies (Linux PR_SET_PDEATHSIG)."""
    if _fork_guard["registered"]:
        return

    def before():
        _fork_guard["parent"] = os.getpid()

    def in_child():
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != _fork_guard["parent"]:  # the parent died before prctl took effect
                os._exit(1)

    os.register_at_fork(before=before, after_in_child=in_child)
    _fork_guard["registered"] = True


def estimate_checkpoint_bytes(run_dir, model, optimizer) -> int:
    """Bytes a save of this run will write: the newest complete checkpoint's size when
    there is one, else the model's parameters plus the optimizer's two fp32 moments (and
    fp32 main weights under Megatron's mixed precision), summed over the model-parallel
    ranks of one data-parallel replica."""
    steps = checkpoint_steps(run_dir)
    if steps:
        directory = iteration_dir(run_dir, steps[0])
        return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    per_param = 8 + (4 if any(p.dtype != torch.float32 for p in model.parameters()) else 0)
    local = sum(p.numel() * (p.element_size() + (per_param if optimizer is not None else 0)) for p in model.parameters())
    total = torch.tensor([float(local)], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        from megatron.core import parallel_state

        if torch.cuda.is_available():
            total = total.cuda()
        dist.all_reduce(total)
        total /= parallel_state.get_data_parallel_world_size()
    return int(total.item())


def save_checkpoint(run_dir, model, optimizer, scheduler, step: int, consumed_samples: int, meta: dict, extra: Optional[dict] = None) -> Path:
    """Save step `step`; returns the final directory. Collective: call on every rank.
    Raises CheckpointSaveError (on every rank) when the save cannot be completed."""
    _writers_die_with_us()
    root = checkpoint_root(run_dir)
    final = iteration_dir(run_dir, step)
    partial = final.with_name(final.name + ".partial")
    need = estimate_checkpoint_bytes(run_dir, model, optimizer)
    problem = None
    if _rank0():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        free = shutil.disk_usage(root).free
        if need * SAVE_HEADROOM > free:
            problem = (f"not enough free space on the filesystem of {root}: {free / 2**20:,.1f} MiB free, the checkpoint "
                       f"needs about {need / 2**20:,.1f} MiB (+{SAVE_HEADROOM - 1:.0%} headroom); nothing was written")
        else:
            partial.mkdir()
    if any_rank(problem is not None):
        raise CheckpointSaveError(f"cannot save step {step}: {problem or 'rank 0 refused the save'}")
    state = _sharded_state(model, optimizer, scheduler, step, consumed_samples, meta, extra or {})
    try:
        dist_checkpointing.save(state, str(partial))
        write_common_state_file(state, partial)  # every supported Megatron-Core reads it
        problem = None
    except BaseException as err:  # a full disk, a lost filesystem (torch DCP raises a BaseException)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        problem = " ".join(f"{type(err).__name__}: {err}".split())[-400:]
    if not any_rank(problem is not None):
        try:
            write_manifest(partial, collective=True)  # every rank hashes a share, rank 0 writes it
            if _rank0():
                if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
                    shutil.rmtree(final)
                os.replace(partial, final)
                _set_tracker(run_dir, step)
        except OSError as err:
            problem = f"{type(err).__name__}: {err}"
    if any_rank(problem is not None):
        if _rank0():
            shutil.rmtree(partial, ignore_errors=True)
            free = shutil.disk_usage(root).free / 2**20
        previous = _tracker_step(run_dir)
        kept = f"the previous checkpoint (step {previous}) is intact" if previous is not None else "no earlier checkpoint exists"
        raise CheckpointSaveError(f"saving step {step} into {partial} failed ({problem or 'on another rank'}); the partial "
                                  f"checkpoint was removed and {kept}" + (f"; {free:,.1f} MiB free on {root}" if _rank0() else ""))
    _barrier()
    return final


def load_checkpoint(run_dir, model, optimizer, scheduler, step: Optional[int] = None) -> dict:
    """Load `step` (default: latest) into model/optimizer/scheduler and restore RNG.

    Returns the common state: step, consumed_samples, meta, extra."""
    step = latest_step(run_dir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoint_root(run_dir)}")
    path = iteration_dir(run_dir, step)
    verify_for_loading(path)
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
    if (path / "metadata.json").exists() or (path / "manifest.json").exists():
        return path
    if (checkpoint_root(path) / TRACKER).exists():
        return iteration_dir(path, latest_step(path))
    raise FileNotFoundError(f"{path} is neither a checkpoint directory (metadata.json) nor a run dir with {checkpoint_root(path) / TRACKER}")


def open_checkpoint(path: str | Path) -> Path:
    """The verified checkpoint directory of `path` (run dir or iter_* dir): what every
    reader calls before reading anything from it."""
    directory = resolve_checkpoint_dir(path)
    verify_for_loading(directory)
    return directory


def load_model_weights(path: str | Path, model) -> dict:
    """Load only the model weights of a checkpoint (run dir or checkpoint dir) into
    `model`; returns its common state (step, meta, extra). Collective."""
    directory = open_checkpoint(path)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(directory))
    model.load_state_dict(state["model"])
    return {k: state.get(k) for k in ("step", "consumed_samples", "meta", "extra")}
