"""The training pipeline on CPU: exact resume, a killed save, W&B offline, NaN skipping,
bad inputs rejected before training, and the tiny parent learning the embedded corpus."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from elastic_megatron.config.errors import ConfigError
from elastic_megatron.checkpoint import store
from elastic_megatron.training.steps import LMStep
from elastic_megatron.train import run

from conftest import REPO


def base_overrides(prefix: str, run_dir: Path, **extra) -> list[str]:
    values = {
        "model": "tiny",
        "run.dir": str(run_dir),
        "data.prefixes": f"[{prefix}]",
        "data.seq_length": 64,
        "trainer.max_steps": 8,
        "trainer.micro_batch_size": 2,
        "trainer.global_batch_size": 4,  # two micro-batches accumulated
        "trainer.warmup_steps": 2,
        "trainer.lr_decay_steps": 8,
        "trainer.log_interval": 1,
        "trainer.eval_interval": 100,
        "trainer.eval_iters": 2,
        "trainer.save_interval": 100,
        "logger": "none",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


class RecordingStep(LMStep):
    """LM step that records a hash of every batch and can signal itself at one step."""

    def __init__(self, signal_at: int | None = None):
        self.batches: dict[int, list[str]] = {}
        self.signal_at = signal_at

    def __call__(self, model, batch, step):
        if model.training:
            self.batches.setdefault(step, []).append(hashlib.sha1(batch["tokens"].numpy().tobytes()).hexdigest())
            if step == self.signal_at and len(self.batches[step]) == 1:
                os.kill(os.getpid(), signal.SIGUSR1)  # as Slurm would, mid-step
        return super().__call__(model, batch, step)


def test_resume_is_exact(stdlib_prefix, tmp_path):
    straight_step = RecordingStep()
    straight = run("pretrain", base_overrides(stdlib_prefix, tmp_path / "straight"), step_fn=straight_step)
    assert straight.completed and sorted(straight.losses) == list(range(1, 9))

    first_step = RecordingStep(signal_at=4)
    first = run("pretrain", base_overrides(stdlib_prefix, tmp_path / "split"), step_fn=first_step)
    assert first.stop_signal == "SIGUSR1" and first.last_step == 4 and not first.completed
    assert store.latest_step(tmp_path / "split") == 4
    assert not (tmp_path / "split" / "COMPLETED").exists()

    second_step = RecordingStep()
    second = run("pretrain", base_overrides(stdlib_prefix, tmp_path / "split"), step_fn=second_step)
    assert second.start_step == 4 and second.completed
    assert sorted(second.losses) == [5, 6, 7, 8]
    split_losses = {**first.losses, **second.losses}
    assert split_losses == straight.losses  # identical floats, step by step
    assert {**first_step.batches, **second_step.batches} == straight_step.batches
    assert second.valid_loss == straight.valid_loss


KILL_DURING_SAVE = """
import os, sys
from elastic_megatron.checkpoint import store
from elastic_megatron.train import run
original = store.dist_checkpointing.save
def save_then_die(state, path):
    original(state, path)  # every shard is on disk, the tracker is not yet flipped
    if path.endswith("iter_0000006.partial"):
        os._exit(9)
store.dist_checkpointing.save = save_then_die
if __name__ == "__main__":
    run("pretrain", sys.argv[1:])
"""


def test_killed_save_leaves_previous_checkpoint_loadable(stdlib_prefix, tmp_path):
    run_dir = tmp_path / "run"
    overrides = base_overrides(stdlib_prefix, run_dir, **{"trainer.save_interval": 3})
    script = tmp_path / "kill_during_save.py"
    script.write_text(KILL_DURING_SAVE)
    log = tmp_path / "killed.log"
    # Output to a file, not a pipe: the checkpoint writer's helper processes outlive the
    # killed trainer and would keep a pipe open.
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, str(script), *overrides], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 9, log.read_text()[-3000:]
    assert store.latest_step(run_dir) == 3
    assert (run_dir / "checkpoints" / "iter_0000006.partial").exists()
    assert not (run_dir / "checkpoints" / "iter_0000006").exists()

    resumed = run("pretrain", overrides)
    assert resumed.start_step == 3 and resumed.completed
    assert not list((run_dir / "checkpoints").glob("*.partial"))
    assert store.latest_step(run_dir) == 8


def test_wandb_offline_run_has_metrics_and_config_and_keeps_its_id(stdlib_prefix, tmp_path, monkeypatch):
    from wandb_records import config_keys, history

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    run("pretrain", base_overrides(stdlib_prefix, run_dir, logger="wandb", **{"trainer.max_steps": 3, "trainer.save_interval": 3}))
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    (first,) = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    rows = history(first)
    assert [r["_step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 and "lr" in r and "grad_norm" in r for r in rows if "loss" in r)
    assert any("valid_loss" in r for r in rows)
    assert {"model", "trainer", "data", "parallel"} <= config_keys(first)

    # A requeued job (same run dir) continues the same W&B run id.
    run("pretrain", base_overrides(stdlib_prefix, run_dir, logger="wandb", **{"trainer.max_steps": 5, "trainer.save_interval": 5}))
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == run_id
    files = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"))
    assert len(files) == 2
    assert [r["_step"] for f in files for r in history(f) if "loss" in r] == [1, 2, 3, 4, 5]


def test_nan_loss_skips_the_update_and_is_reported(stdlib_prefix, tmp_path):
    snapshots = {}

    class NaNAtStep3(LMStep):
        def __call__(self, model, batch, step):
            if model.training and step not in snapshots:
                snapshots[step] = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
            loss, metrics = super().__call__(model, batch, step)
            return (loss * float("nan") if step == 3 else loss), metrics

    result = run("pretrain", base_overrides(stdlib_prefix, tmp_path / "run", **{"trainer.max_steps": 5}), step_fn=NaNAtStep3())
    assert result.skipped_steps == [3]
    for name, before in snapshots[3].items():
        assert torch.equal(before, snapshots[4][name]), f"{name} changed during the skipped step"
    assert any(not torch.equal(snapshots[2][n], snapshots[3][n]) for n in snapshots[2])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_steps"] for m in logged if "skipped_steps" in m] == [0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    "override,key",
    [
        ("data.prefixes=[does/not/exist_text_document]", "data.prefixes"),
        ("trainer.global_batch_size=5", "trainer.global_batch_size"),
        ("model.vocab_size=200", "model.vocab_size"),
        ("data.seq_length=4096", "data.seq_length"),
        ("trainer.precision=fp16", "trainer.precision"),
    ],
)
def test_bad_inputs_fail_before_training(stdlib_prefix, tmp_path, override, key):
    run_dir = tmp_path / "run"
    overrides = base_overrides(stdlib_prefix, run_dir) + [override]
    with pytest.raises(ConfigError) as err:
        run("pretrain", overrides)
    assert err.value.key == key
    assert not run_dir.exists()  # nothing was written


def test_unknown_recipe_key_is_rejected(stdlib_prefix, tmp_path):
    with pytest.raises(ConfigCompositionException, match="trainer.max_stepz"):
        run("pretrain", base_overrides(stdlib_prefix, tmp_path / "run") + ["trainer.max_stepz=3"])


def test_tiny_parent_learns_the_corpus(stdlib_prefix, tmp_path):
    from elastic_megatron.data.stdlib_corpus import unigram_entropy_nats
    from elastic_megatron.data.datasets import read_tokens

    overrides = base_overrides(stdlib_prefix, tmp_path / "run", **{
        "trainer.max_steps": 60, "trainer.lr": 3e-3, "trainer.warmup_steps": 5, "trainer.lr_decay_steps": 60,
        "trainer.eval_interval": 60, "trainer.eval_iters": 4, "trainer.log_interval": 20, "trainer.global_batch_size": 8,
        "trainer.micro_batch_size": 8,
    })
    result = run("pretrain", overrides)
    assert result.completed
    assert result.valid_loss < unigram_entropy_nats(torch.from_numpy(read_tokens(stdlib_prefix).astype('int64')), 257)
