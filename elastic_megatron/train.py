"""Training entry point, one per job:

    python -m elastic_megatron.train --config-name=pretrain model=tiny trainer.max_steps=100
    python -m elastic_megatron.train --config-name=importance_tiny elastic.parent_checkpoint=runs/demo-pretrain
    python -m elastic_megatron.train --config-name=stage1_tiny elastic.teacher_checkpoint=runs/demo-importance
    torchrun --nproc-per-node=8 -m elastic_megatron.train --config-name=pretrain model=small
    sbatch slurm/pretrain.sh model=small          (see slurm/common.sh)

Hydra composes the recipe (recipes/<name>.yaml) onto the `JobConfig` schema, the job is
validated, then `run.task` picks the work: `train` (training.loop: pretraining, or
elastic distillation when elastic.enabled) or `importance` (score and sort a parent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import hydra
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from elastic_megatron.config.schema import JobConfig, register_configs
from elastic_megatron.training.loop import TrainResult, train

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

register_configs()


def compose_job(config_name: str = "pretrain", overrides: Sequence[str] = ()) -> JobConfig:
    """The JobConfig a command line would give (for tests, notebooks and tools)."""
    with initialize_config_dir(config_dir=str(RECIPES), version_base=None):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    return to_job(cfg)


def to_job(cfg: DictConfig) -> JobConfig:
    job = OmegaConf.to_object(cfg)
    assert isinstance(job, JobConfig), type(job)
    return job


def run(config_name: str = "pretrain", overrides: Sequence[str] = (), step_fn=None):
    """Run a recipe: TrainResult for task=train, the sorted checkpoint's path for task=importance."""
    return dispatch(compose_job(config_name, overrides), step_fn=step_fn)


def dispatch(job: JobConfig, step_fn=None):
    if job.run.task == "importance":
        from elastic_megatron.elastic.importance_job import run_importance

        return run_importance(job)
    return train(job, step_fn=step_fn)


@hydra.main(config_path=str(RECIPES), config_name="pretrain", version_base=None)
def main(cfg: DictConfig) -> Optional[float]:
    result = dispatch(to_job(cfg))
    return result.valid_loss if isinstance(result, TrainResult) else None


if __name__ == "__main__":
    main()
