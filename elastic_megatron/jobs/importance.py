"""The `importance` task: score the parent's width axes on calibration data and write
the sorted parent (same function, every axis in importance order).

    python -m elastic_megatron.train --config-name=importance_tiny elastic.parent_checkpoint=runs/demo-pretrain

Writes into run.dir:
    checkpoints/iter_0000000/   the sorted parent; its metadata holds `sort_index` (the
                                permutations applied) and the resolved config
    importance/scores.json      the scores of every axis and layer
    importance/importance_<axis>.png   plots of the scores (original and sorted order)

Before saving, the sorted model's logits on the first calibration batch are compared with
the parent's: a mismatch stops the job (sorting must not change the function).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from megatron.core import parallel_state

from elastic_megatron.checkpoint import store
from elastic_megatron.config.errors import ConfigError
from elastic_megatron.config.schema import JobConfig
from elastic_megatron.elastic.importance import ImportanceCollector, ImportanceScores, plot_scores, sorting_index
from elastic_megatron.elastic.reindex import reindex_state_dict
from elastic_megatron.parallel.collectives import all_reduce_mean_
from elastic_megatron.training.logging import is_rank0, print0
from elastic_megatron.training.run import prepare_run


def _dp_average(scores: ImportanceScores) -> None:
    """Average every score tensor over data-parallel ranks (each saw different batches)."""
    tensors = [scores.hidden] + [t for s in scores.layers for t in vars(s).values() if t is not None]
    all_reduce_mean_(tensors, parallel_state.get_data_parallel_group())


def run_importance(job: JobConfig) -> Path:
    """Run the importance task; returns the sorted checkpoint's directory."""
    for key in ("tp", "pp", "ep", "cp"):
        if getattr(job.parallel, key) > 1:
            raise ConfigError(f"parallel.{key}", getattr(job.parallel, key),
                              "importance sorting runs with tp=pp=ep=cp=1 (any data-parallel size); the sorted parent then loads under any layout")
    run_dir = Path(job.run.dir)
    if store.latest_step(run_dir) is not None:
        raise ConfigError("run.dir", str(run_dir), "already holds a checkpoint; choose a new run.dir for the sorted parent")
    parent = job.elastic.parent_checkpoint
    n_batches = job.elastic.importance.calibration_batches

    with prepare_run(job, parent, "elastic.parent_checkpoint") as run:
        model = run.model
        if (run.initial_state.get("meta") or {}).get("sort_index"):
            print0(f"note: {parent} is already sorted; sorting again composes the permutations")
        model.eval()
        mbs = job.trainer.micro_batch_size
        train_ds, _ = run.datasets(train_samples=n_batches * mbs * run.dp_size, valid_samples=mbs * run.dp_size)
        loader = run.loader(train_ds)
        collector = ImportanceCollector(model, job.model)
        first = None
        with torch.no_grad():
            for i in tqdm(range(n_batches), desc="importance: calibration batches", disable=not is_rank0()):
                batch = next(loader)
                logits = model(batch["tokens"], batch["position_ids"], None)
                if first is None:
                    first, reference = batch, logits.float()
        collector.remove()
        scores = collector.scores()
        _dp_average(scores)
        index = sorting_index(job.model, scores)
        model.load_state_dict(reindex_state_dict(job.model, index, model.state_dict()))
        with torch.no_grad():
            diff = (model(first["tokens"], first["position_ids"], None).float() - reference).abs().max().item()
        tolerance = 1e-4 if run.dtype == torch.float32 else 5e-2
        if diff > tolerance:
            raise RuntimeError(f"sorting changed the model's function: max |logit diff| {diff:.3e} > {tolerance:.0e}")
        print0(f"sorted every width axis; max |logit diff| after sorting {diff:.2e} (limit {tolerance:.0e})")

        meta = {
            "config": OmegaConf.to_yaml(OmegaConf.structured(job)),
            "sort_index": index.to_lists(),
            "parent_checkpoint": str(parent),
            "importance": {"calibration_batches": n_batches, "tokens": n_batches * mbs * run.dp_size * job.data.seq_length,
                           "max_logit_diff_after_sort": diff},
        }
        path = store.save_checkpoint(run_dir, model, None, None, 0, 0, meta)
        if is_rank0():
            out = run_dir / "importance"
            out.mkdir(parents=True, exist_ok=True)
            (out / "scores.json").write_text(json.dumps(scores.as_dict()))
            if job.elastic.importance.plots:
                plots = plot_scores(scores, job.model, out)
                print0(f"wrote {len(plots)} importance plots to {out}")
        print0(f"sorted parent saved in {path}")
        return path
