"""Both sides of tests/test_dry_run.py's comparison, as separate processes (a dry run
needs a process without a torch.distributed group; pytest's may hold one).

    torchrun --nproc_per_node 4 tests/dry_run_worker.py instantiate OUT LAYOUTS_JSON
        every layout of {name: [overrides of stage1_tiny]} on a real gloo world: each
        rank builds the student as training does (fp32, on the CPU, weights initialised),
        the CPU optimizer with its moments (one update on zero gradients), and writes
        OUT/<name>.<rank>.json: its parallel-state ranks, parameters and what a
        checkpoint save of model and optimizer would write (Shard records).
    python tests/dry_run_worker.py simulate OUT JOBS_JSON
        runs `dry_run` for every job of {name: {recipe, overrides, nodes, gpus_per_node,
        ranks, check_inputs}} in this one process and writes OUT/<name>.json (the report).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def instantiate(out: Path, layouts: dict) -> None:
    from megatron.core import parallel_state as ps

    from elastic_megatron.models.hybrid import build_model
    from elastic_megatron.parallel.setup import initialize_distributed
    from elastic_megatron.parallel.simulate import shards
    from elastic_megatron.train import compose_job
    from elastic_megatron.training.optim import CpuDataParallelAdam, is_expert_param

    initialize_distributed()  # the gloo world of torchrun; each layout re-initialises Megatron's groups below
    for name, overrides in layouts.items():
        job = compose_job("stage1_tiny", overrides)
        p, t = job.parallel, job.trainer
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
                                     expert_model_parallel_size=p.ep, expert_tensor_parallel_size=p.etp,
                                     context_parallel_size=p.cp)
        model = build_model(job.model, torch.float32, parallel=p)
        opt = CpuDataParallelAdam(model, t.lr, t.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_eps, t.clip_grad)
        for q in model.parameters():
            q.grad = torch.zeros_like(q)
        opt.optimizer.step()
        model_sd = model.sharded_state_dict()
        entries = shards({"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd)})
        record = {
            "coords": {"pp": ps.get_pipeline_model_parallel_rank(), "tp": ps.get_tensor_model_parallel_rank(),
                       "cp": ps.get_context_parallel_rank(), "ep": ps.get_expert_model_parallel_rank(),
                       "etp": ps.get_expert_tensor_parallel_rank(), "dp": ps.get_data_parallel_rank()},
            "params": sum(q.numel() for q in model.parameters()),
            "expert_params": sum(q.numel() for q in model.parameters() if is_expert_param(q)),
            "shards": [s.as_dict() for s in entries],
        }
        (out / f"{name}.{dist.get_rank()}.json").write_text(json.dumps(record))
        dist.barrier()


def simulate(out: Path, jobs: dict) -> None:
    from elastic_megatron.jobs.dry_run import dry_run
    from elastic_megatron.train import compose_job

    for name, spec in jobs.items():
        report = dry_run(compose_job(spec["recipe"], spec["overrides"]), spec["nodes"], spec["gpus_per_node"],
                         ranks=spec.get("ranks", "classes"), check_inputs=spec.get("check_inputs", False))
        (out / f"{name}.json").write_text(json.dumps(report.as_dict()))


if __name__ == "__main__":
    mode, out, spec = sys.argv[1], Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
    {"instantiate": instantiate, "simulate": simulate}[mode](out, spec)
