"""Checkpoints written by earlier code keep working: tests/fixtures/legacy_v1 holds a
sorted parent and a stage-1 elastic checkpoint written by the code before the floor-plan
change (see make.sh there). Today's code reads their metadata, slices them, and resumes
the stage-1 run to the same losses the old code got when it resumed it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import REPO, token_batch
from elastic_helpers import logits, masked_logits
from elastic_megatron.checkpoint import metadata, store
from elastic_megatron.elastic.budgets import checkpoint_budgets
from elastic_megatron.models.hybrid import build_model
from elastic_megatron.slicing.zero_shot import slice_checkpoint
from elastic_megatron.train import compose_job, dispatch

FIXTURE = REPO / "tests" / "fixtures" / "legacy_v1"
# make.sh's overrides (relative paths: the test runs where it rebuilt the data).
COMMON = ["data.prefixes=[data/stdlib_text_document]", "data.seq_length=64", "trainer.micro_batch_size=2",
          "trainer.global_batch_size=4", "trainer.eval_iters=1", "trainer.log_interval=1", "logger=none"]


@pytest.fixture
def legacy_runs(tmp_path, monkeypatch):
    """A copy of the fixture and the data it was trained on. The data are shipped with the
    fixture (data/, made by make.sh's preprocessing line under Python 3.11): the embedded
    corpus is the running Python's standard library, which differs between 3.11 and 3.12."""
    for run in ("sorted", "stage1"):
        shutil.copytree(FIXTURE / run, tmp_path / "runs" / run)
    shutil.copytree(FIXTURE / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "runs"


def test_legacy_elastic_checkpoint_metadata_and_slicing(legacy_runs, tmp_path, dist):
    cfg, meta = metadata.checkpoint_model_config(legacy_runs / "stage1")
    assert cfg.name == "tiny" and meta["elastic"]["spec"] == "tiny_router"
    budgets = dict(checkpoint_budgets(legacy_runs / "stage1"))
    assert list(budgets) == ["full", "medium", "small"]
    sliced_dir = slice_checkpoint(legacy_runs / "stage1", tmp_path / "small", "small", precision="fp32")
    sub_cfg, _ = metadata.checkpoint_model_config(sliced_dir)
    sliced, elastic = build_model(sub_cfg), build_model(cfg)
    store.load_model_weights(sliced_dir, sliced)
    store.load_model_weights(legacy_runs / "stage1", elastic)
    ids, pos = token_batch(cfg.vocab_size, seq=40, seed=3)
    diff = (logits(sliced.eval(), ids, pos) - masked_logits(elastic.eval(), cfg, budgets["small"], ids, pos)).abs().max().item()
    assert diff <= 1e-5


def test_legacy_stage1_run_resumes_to_the_old_codes_losses(legacy_runs):
    expected = json.loads((FIXTURE / "resumed_by_old_code.json").read_text())
    job = compose_job("stage1_tiny", ["elastic=tiny_router", "run.dir=runs/stage1", "elastic.teacher_checkpoint=runs/sorted",
                                      *COMMON, "trainer.max_steps=6", "trainer.eval_interval=2", "trainer.save_interval=2",
                                      "trainer.lr=1e-3", "trainer.weight_decay=0.1"])  # the settings the old code ran with
    result = dispatch(job)
    assert result.start_step == 4 and result.completed
    for step, loss in expected["losses"].items():
        torch.testing.assert_close(result.losses[int(step)], loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result.valid_loss, expected["valid"]["valid_loss"], rtol=1e-5, atol=0)
