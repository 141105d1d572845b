"""Training entry point, one per job:

    python -m elastic_megatron.train --config-name=pretrain model=tiny trainer.max_steps=100
    python -m elastic_megatron.train --config-name=importance_tiny elastic.parent_checkpoint=runs/demo-pretrain
    python -m elastic_megatron.train --config-name=stage1_tiny elastic.teacher_checkpoint=runs/demo-importance
    torchrun --nproc-per-node=8 -m elastic_megatron.train --config-name=pretrain model=small
    sbatch slurm/pretrain.sh model=small          (see slurm/common.sh)

Hydra composes the recipe (recipes/<name>.yaml) onto the `JobConfig` schema; `dispatch`
picks the job: `run.task=importance` (jobs/importance.py: score and sort a parent) or
`run.task=train`, the training loop with the step function the job asks for (pretraining,
or elastic distillation when `elastic.enabled`). Exit status: 0 finished, 75 stopped by
SIGTERM/SIGUSR1 after saving (resumable), 2 bad input / failed checks with one `error:`
line (`--debug` shows the traceback; see cli.py), 1 a bug.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import hydra
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from elastic_megatron.cli import EXIT_STOPPED, pop_debug_flag, report_errors
from elastic_megatron.config.schema import JobConfig, register_configs, validate_job
from elastic_megatron.parallel.setup import dist_env
from elastic_megatron.training.loop import TrainResult, train
from elastic_megatron.training.steps import StepFunction

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


def run(config_name: str = "pretrain", overrides: Sequence[str] = (), step_fn: Optional[StepFunction] = None):
    """Run a recipe: TrainResult for task=train, the sorted checkpoint's path for task=importance."""
    return dispatch(compose_job(config_name, overrides), step_fn=step_fn)


def dispatch(job: JobConfig, step_fn: Optional[StepFunction] = None):
    """Run the job `job` asks for. The job is validated first, so the step function is
    built from a valid config (the elastic step then checks its budgets and checkpoints)."""
    if job.run.task == "importance":
        from elastic_megatron.jobs.importance import run_importance

        return run_importance(job)
    if step_fn is None and job.elastic.enabled:
        validate_job(job, dist_env().world_size)
        if job.quant.format != "none":  # nested QAD: the elastic step with quantized linears
            from elastic_megatron.quant.qad import QuantizedDistillStep

            step_fn = QuantizedDistillStep(job)
        else:
            from elastic_megatron.elastic.step import ElasticDistillStep

            step_fn = ElasticDistillStep(job)
    return train(job, step_fn=step_fn)


@hydra.main(config_path=str(RECIPES), config_name="pretrain", version_base=None)
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    code, result = report_errors(lambda: dispatch(to_job(cfg)))
    if code:
        sys.exit(code)  # SystemExit passes through Hydra's handler, which would print a traceback
    if isinstance(result, TrainResult) and result.stop_signal:
        sys.exit(EXIT_STOPPED)  # saved and stopped early: not a finished run
    return result.valid_loss if isinstance(result, TrainResult) else None


def main() -> None:
    pop_debug_flag()
    _hydra_main()


if __name__ == "__main__":
    main()
