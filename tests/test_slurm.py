"""slurm/*.sh on a real Slurm controller and node on localhost (marker `slurm`).

A tiny CPU pretraining job with 2 tasks (gloo data parallel) runs to completion through
`sbatch slurm/pretrain.sh`, and a job requeued mid-run resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from conftest import REPO
from slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0 or not Path("/etc/debian_version").exists():
        pytest.skip("needs root on Debian to install and start slurmctld/slurmd")
    c = SlurmCluster().start()
    yield c
    c.stop()


def submit(cluster, tmp_path, prefix, *overrides, name="em-test") -> str:
    out = cluster.run(
        "sbatch", "--parsable", f"--job-name={name}", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
        "--cpus-per-task=1", "--time=00:10:00", f"--output={tmp_path}/%x-%j.out",
        f"--export=ALL,ELASTIC_MEGATRON_ROOT={REPO},RUN_ROOT={tmp_path}/runs,OMP_NUM_THREADS=1",
        str(REPO / "slurm" / "pretrain.sh"),
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
    assert "(2 tasks)" in log and "world 2 (tp 1, ep 1, dp 2)" in log
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
    resumed = int(re.search(r"resumed from step (\d+)", second).group(1))
    assert resumed >= 5
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    # The second run continues after the checkpoint instead of starting again at step 1.
    assert steps.count(1) == 1 and steps[-1] == 30
    assert steps[steps.index(resumed + 1) - 1] >= resumed
    assert tracker_step(run_dir) == 30
