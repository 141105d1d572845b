"""slurm/*.sh on a real Slurm controller and node on localhost (marker `slurm`).

A tiny CPU pretraining job with 2 tasks (gloo data parallel) runs to completion through
`sbatch slurm/pretrain.sh`, a job requeued mid-run resumes from its checkpoint, and the
elastic chain runs through `sbatch slurm/importance.sh` then `sbatch slurm/stage1.sh`.

The launchers are submitted with their own `#SBATCH --gpus-per-node=8`: the test cluster
advertises 8 (stand-in) GPUs per node, and the tests check that Slurm allocated them
(`scontrol show job -d`: JOB_GRES, and the GPU count common.sh logs from the job's
environment) while torch, CPU-only, trains on the CPU."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from conftest import REPO
from slurm_cluster import GPUS_PER_NODE, SlurmCluster

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0 or not Path("/etc/debian_version").exists():
        pytest.skip("needs root on Debian to install and start slurmctld/slurmd")
    c = SlurmCluster().start()
    yield c
    c.stop()


def submit(cluster, tmp_path, prefix, *overrides, name="em-test", script="pretrain.sh", nodes=1) -> str:
    """Two tasks, on one node or one per node. The GPUs come from the launcher's own
    header (--gpus-per-node=8), as when a user submits it."""
    out = cluster.run(
        "sbatch", "--parsable", f"--job-name={name}", f"--nodes={nodes}", "--ntasks=2", f"--ntasks-per-node={2 // nodes}",
        "--cpus-per-task=1", "--time=00:10:00", f"--output={tmp_path}/%x-%j.out",
        f"--export=ALL,ELASTIC_MEGATRON_ROOT={REPO},RUN_ROOT={tmp_path}/runs,OMP_NUM_THREADS=1",
        str(REPO / "slurm" / script),
        "model=tiny", "logger=none", f"data.prefixes=[{prefix}]", "data.seq_length=64",
        "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.eval_interval=1000",
        "trainer.eval_iters=2", "trainer.log_interval=1", *overrides,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def wait_for(predicate, timeout: float, what: str, cluster, tmp_path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    logs = "\n".join(f"--- {p.name} ---\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.out")))
    logs += "\n".join(f"--- {p.name} ---\n{p.read_text()[-3000:]}" for p in sorted((REPO / "logs").glob("em-test*")))
    pytest.fail(f"timed out waiting for {what}\n{logs}\n{cluster.daemon_logs()}")


def job_gres(cluster, job_id: str) -> str:
    """The GRES Slurm allocated to the job, e.g. "gpu:16" (kept after the job ends)."""
    out = cluster.run("scontrol", "show", "job", "-d", job_id).stdout
    match = re.search(r"JOB_GRES=(\S+)", out)
    return match.group(1) if match else out


def assert_gpus_allocated(cluster, job_id: str, log: str, nodes: int, tasks_per_node: int) -> None:
    """Slurm allocated GPUS_PER_NODE GPUs on each node of the job, and the job saw them."""
    assert job_gres(cluster, job_id) == f"gpu:{GPUS_PER_NODE * nodes}"
    visible = ",".join(str(i) for i in range(GPUS_PER_NODE))
    assert (f"gpus per node: {GPUS_PER_NODE} (CUDA_VISIBLE_DEVICES={visible}), "
            f"tasks per node: {tasks_per_node}") in log


def tracker_step(run_dir: Path) -> int:
    path = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    return int(path.read_text()) if path.exists() else 0


def test_pretrain_job_runs_to_completion(cluster, tmp_path, stdlib_prefix):
    job = submit(cluster, tmp_path, stdlib_prefix, "trainer.max_steps=12", "trainer.save_interval=6")
    run_dir = tmp_path / "runs" / job
    wait_for(lambda: cluster.job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 240, "the job to end", cluster, tmp_path)
    log = (REPO / "logs" / f"em-test-{job}.restart0.log").read_text()
    assert cluster.job_state(job) == "COMPLETED", log[-3000:]
    assert (run_dir / "COMPLETED").exists()
    assert tracker_step(run_dir) == 12
    assert re.search(r"git commit: [0-9a-f]{40}", log)
    assert "(2 tasks)" in log and "world 2 (tp 1, pp 1, ep 1, dp 2)" in log
    assert_gpus_allocated(cluster, job, log, nodes=1, tasks_per_node=2)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))


@pytest.mark.parametrize("how", ["scontrol_requeue", "usr1_to_batch_shell"])
def test_requeued_job_resumes_from_its_checkpoint(cluster, tmp_path, stdlib_prefix, how):
    job = submit(cluster, tmp_path, stdlib_prefix, "trainer.max_steps=30", "trainer.save_interval=5",
                 "trainer.step_sleep_s=0.4")
    run_dir = tmp_path / "runs" / job
    wait_for(lambda: tracker_step(run_dir) >= 5, 180, "a first checkpoint", cluster, tmp_path)
    if how == "scontrol_requeue":
        assert cluster.run("scontrol", "requeue", job).returncode == 0
    else:
        assert cluster.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    restart_log = REPO / "logs" / f"em-test-{job}.restart1.log"
    wait_for(lambda: (run_dir / "COMPLETED").exists(), 300, "the requeued job to finish", cluster, tmp_path)
    wait_for(lambda: cluster.job_state(job) == "COMPLETED", 60, "the job state COMPLETED", cluster, tmp_path)
    first = (REPO / "logs" / f"em-test-{job}.restart0.log").read_text()
    assert "saved checkpoint at step" in first
    if how == "usr1_to_batch_shell":
        # The trainer saw the forwarded signal, saved at the step it was on, and the batch
        # shell requeued the job itself.
        assert "signal SIGUSR1 received: saving and exiting" in first
        assert "requeueing job" in first
    second = restart_log.read_text()
    # The requeued job is allocated its GPUs again.
    assert job_gres(cluster, job) == f"gpu:{GPUS_PER_NODE}"
    assert f"gpus per node: {GPUS_PER_NODE} " in first and f"gpus per node: {GPUS_PER_NODE} " in second
    resumed = int(re.search(r"resumed from step (\d+)", second).group(1))
    assert resumed >= 5
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    # The second run continues after the checkpoint instead of starting again at step 1.
    assert steps.count(1) == 1 and steps[-1] == 30
    assert steps[steps.index(resumed + 1) - 1] >= resumed
    assert tracker_step(run_dir) == 30


def test_importance_then_stage1_jobs(cluster, tmp_path, stdlib_prefix):
    """The elastic chain as a user submits it: importance data parallel over 2 tasks,
    stage 1 tensor parallel over them."""
    from elastic_megatron.train import run
    from elastic_megatron.checkpoint import metadata

    parent = tmp_path / "parent"
    run("pretrain", ["model=tiny", "logger=none", f"run.dir={parent}", f"data.prefixes=[{stdlib_prefix}]",
                     "data.seq_length=64", "trainer.max_steps=4", "trainer.micro_batch_size=2", "trainer.global_batch_size=2"])
    tiny = ("model=tiny", "trainer=elastic_cpu_demo", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
            "trainer.eval_iters=2", "trainer.log_interval=1")
    sort_job = submit(cluster, tmp_path, stdlib_prefix, *tiny, "elastic=tiny", f"elastic.parent_checkpoint={parent}",
                      "elastic.importance.calibration_batches=2", script="importance.sh")
    wait_for(lambda: cluster.job_state(sort_job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 240, "importance", cluster, tmp_path)
    log = (REPO / "logs" / f"em-test-{sort_job}.restart0.log").read_text()
    assert cluster.job_state(sort_job) == "COMPLETED", log[-3000:]
    assert_gpus_allocated(cluster, sort_job, log, nodes=1, tasks_per_node=2)
    sorted_dir = tmp_path / "runs" / sort_job
    assert metadata.read_common_state(sorted_dir)["meta"]["sort_index"]
    assert (sorted_dir / "importance" / "importance_hidden.png").exists()

    # Stage 1 on two nodes (two slurmds), one task each: two tensor-parallel ranks (sequence
    # parallel, expert TP 2) of one model, rendezvous on the first node.
    job = submit(cluster, tmp_path, stdlib_prefix, *tiny, "elastic=tiny_router", f"elastic.teacher_checkpoint={sorted_dir}",
                 "parallel=single", "parallel.tp=2", "parallel.sequence_parallel=true", "trainer.max_steps=4",
                 "trainer.eval_interval=4", "trainer.save_interval=4", script="stage1.sh", nodes=2)
    wait_for(lambda: cluster.job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 240, "stage 1", cluster, tmp_path)
    log = (REPO / "logs" / f"em-test-{job}.restart0.log").read_text()
    assert cluster.job_state(job) == "COMPLETED", log[-3000:]
    assert "world 2 (tp 2, pp 1, ep 1, dp 1)" in log and "on n[1-2] (2 tasks)" in log
    assert_gpus_allocated(cluster, job, log, nodes=2, tasks_per_node=1)
    run_dir = tmp_path / "runs" / job
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*rows)
    assert "temperature" in logged and any(k.endswith("/kd_loss") for k in logged)
    assert any(k.endswith("/router_loss") for k in logged) and any("/width/" in k for k in logged)
    assert {"full/valid_loss", "medium/valid_loss", "small/valid_loss"} <= logged
    meta = metadata.read_common_state(run_dir)["meta"]
    assert [b["name"] for b in meta["elastic"]["budgets"]] == ["full", "medium", "small"]
