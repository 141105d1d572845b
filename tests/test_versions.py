"""Versions change nothing (DESIGN invariant 14): a run started under one supported
Megatron-Core resumes under another with the losses of an uninterrupted run, in both
directions, and slicing and HF export of one checkpoint write the same bytes under both.

Each test does half of its work in this interpreter and half in the other test leg's:
`make test-312` (Python 3.12, Megatron-Core 0.19.x) sets ELASTIC_MEGATRON_OTHER_PYTHON to the
default leg's interpreter (.venv: Python 3.11, Megatron-Core 0.16.1). Run by hand with
ELASTIC_MEGATRON_OTHER_PYTHON=<the other venv's python> from either leg."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from elastic_helpers import train_overrides
from elastic_megatron.models.compat import MCORE_VERSION
from elastic_megatron.train import run

OTHER = os.environ.get("ELASTIC_MEGATRON_OTHER_PYTHON", "")
pytestmark = [pytest.mark.skipif(
    not OTHER, reason="needs the other leg's interpreter in ELASTIC_MEGATRON_OTHER_PYTHON (make test-312 sets it)"),
    pytest.mark.slow]  # minutes: each test runs half its work in the other interpreter

STEPS = 6
HALF = STEPS // 2


def other(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    """Run `args` under the other interpreter (its own Megatron-Core) and require success."""
    proc = subprocess.run([OTHER, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def other_version() -> tuple[int, int, int]:
    code = "from elastic_megatron.models.compat import MCORE_VERSION as v; print(*v)"
    return tuple(int(x) for x in other("-c", code).stdout.split())


def stage1(sorted_parent, run_dir: Path, max_steps: int) -> list[str]:
    root, prefix = sorted_parent
    return train_overrides(prefix, run_dir, **{
        "elastic.teacher_checkpoint": str(root / "sorted"), "trainer.max_steps": max_steps,
        "trainer.lr_decay_steps": STEPS, "trainer.save_interval": 100, "logger": "none"})


def logged_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def other_trains(overrides: list[str]) -> None:
    other("-m", "elastic_megatron.train", "--config-name=stage1_tiny", *overrides)


@pytest.fixture(scope="module")
def straight(sorted_parent, tmp_path_factory):
    """The uninterrupted elastic stage-1 run, in this interpreter."""
    assert other_version() != MCORE_VERSION, "both interpreters have the same Megatron-Core"
    run_dir = tmp_path_factory.mktemp("versions") / "straight"
    result = run("stage1_tiny", stage1(sorted_parent, run_dir, STEPS))
    assert result.completed and sorted(result.losses) == list(range(1, STEPS + 1))
    return run_dir, result.losses


def test_a_run_started_under_the_other_version_resumes_here_exactly(sorted_parent, straight, tmp_path):
    _, expected = straight
    run_dir = tmp_path / "there_then_here"
    other_trains(stage1(sorted_parent, run_dir, HALF))
    first = logged_losses(run_dir)
    resumed = run("stage1_tiny", stage1(sorted_parent, run_dir, STEPS))
    assert resumed.start_step == HALF and resumed.completed
    # Identical floats, step by step: the same logits under both versions (first half) and
    # model, optimizer, router, Gumbel RNG and data position carried across (second half).
    assert {**first, **resumed.losses} == expected


def test_a_run_started_here_resumes_under_the_other_version_exactly(sorted_parent, straight, tmp_path):
    _, expected = straight
    run_dir = tmp_path / "here_then_there"
    first = run("stage1_tiny", stage1(sorted_parent, run_dir, HALF))
    assert first.last_step == HALF
    other_trains(stage1(sorted_parent, run_dir, STEPS))
    assert logged_losses(run_dir) == expected
    assert (run_dir / "COMPLETED").exists()


def tree_digest(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_slicing_and_export_write_the_same_bytes_under_both(straight, tmp_path):
    run_dir, _ = straight
    outputs = {}
    for who in ("here", "there"):
        out = tmp_path / who
        commands = [
            ["tools/zero_shot_slicing.py", "--source-checkpoint", str(run_dir), "--target-checkpoint", str(out / "small"),
             "--size", "small", "--precision", "bf16", "--format", "both"],
            ["tools/export_hf.py", "--source-checkpoint", str(run_dir), "--target-checkpoint", str(out / "hf")],
        ]
        for command in commands:
            if who == "there":
                other(*command)
            else:
                proc = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=600)
                assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[who] = {name: tree_digest(out / name) for name in ("small", "hf")}
    here, there = outputs["here"], outputs["there"]
    assert any(name.endswith(".safetensors") for name in here["hf"]) and any(name.endswith(".distcp") for name in here["small"])
    for name in ("small", "hf"):
        differing = sorted(k for k in set(here[name]) | set(there[name]) if here[name].get(k) != there[name].get(k))
        assert not differing, (name, differing)
