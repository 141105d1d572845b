"""Runs and checkpoints that cannot be silently lost or corrupted. Every test injects a
real fault into a real run: a second trainer on the run dir, a deleted tracker, flipped
bytes, missing or truncated files, NaN weights, a changed config on resume, a full
filesystem, a trainer killed with SIGKILL in the middle of a save."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO, preprocess
from elastic_megatron.checkpoint import store
from elastic_megatron.checkpoint.manifest import CheckpointCorrupt
from elastic_megatron.checkpoint.verify import verify_checkpoint
from elastic_megatron.config.errors import ConfigError
from elastic_megatron.models.compat import mcore_at_least
from elastic_megatron.train import run
from test_training import base_overrides

CLI = [sys.executable, "-m", "elastic_megatron.train", "--config-name=pretrain"]


@pytest.fixture(scope="module")
def good_run(stdlib_prefix, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("safety") / "good"
    result = run("pretrain", base_overrides(stdlib_prefix, run_dir, **{"trainer.max_steps": 4, "trainer.save_interval": 2}))
    assert result.completed and store.checkpoint_steps(run_dir) == [4, 2]
    return run_dir


@pytest.fixture
def copy_of(good_run, tmp_path):
    def make(name: str = "run") -> Path:
        target = tmp_path / name
        shutil.copytree(good_run, target)
        (target / "COMPLETED").unlink()
        return target
    return make


def overrides(prefix, run_dir, **extra):
    return base_overrides(prefix, run_dir, **{"trainer.max_steps": 6, "trainer.save_interval": 2, **extra})


def flip_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


def largest_shard(directory: Path) -> Path:
    return max(directory.glob("*.distcp"), key=lambda p: p.stat().st_size)


def cli(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, **kw)


# ---- one writer per run dir --------------------------------------------------------------

def test_second_trainer_on_a_run_dir_is_refused_naming_the_holder(stdlib_prefix, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(CLI + base_overrides(stdlib_prefix, run_dir, **{"trainer.max_steps": 200, "trainer.step_sleep_s": 0.2}),
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
            assert first.poll() is None and time.time() < deadline, "the first trainer did not start training"
            time.sleep(0.5)
        config_before = (run_dir / "config.yaml").read_bytes()
        second = cli(CLI + base_overrides(stdlib_prefix, run_dir, **{"trainer.lr": 1e-3}))
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"in use by pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert (run_dir / "config.yaml").read_bytes() == config_before  # the second trainer wrote nothing
        assert first.poll() is None  # and the first one trains on
    finally:
        first.kill()
        first.wait()
    # The holder died with SIGKILL: its lock went with it, the run dir is free again.
    resumed = run("pretrain", base_overrides(stdlib_prefix, run_dir, **{"trainer.max_steps": 2}))
    assert resumed.completed


# ---- verified resume with fallback --------------------------------------------------------

def test_deleted_tracker_resumes_from_the_newest_checkpoint_not_from_zero(stdlib_prefix, copy_of, capsys):
    run_dir = copy_of()
    (run_dir / "checkpoints" / store.TRACKER).unlink()
    result = run("pretrain", overrides(stdlib_prefix, run_dir))
    assert result.start_step == 4 and result.completed
    assert "the tracker was missing" in capsys.readouterr().out
    assert store.checkpoint_steps(run_dir) == [6, 4, 2]


def test_flipped_bytes_fall_back_to_the_previous_checkpoint_and_keep_the_bad_one(stdlib_prefix, copy_of, capsys):
    run_dir = copy_of()
    shard = largest_shard(store.iteration_dir(run_dir, 4))
    flip_byte(shard)
    result = run("pretrain", overrides(stdlib_prefix, run_dir))
    out = capsys.readouterr().out
    assert result.start_step == 2 and result.completed
    assert f"checkpoint iter_0000004 failed verification ({shard.name}: hash mismatch)" in out
    aside = run_dir / "checkpoints" / store.CORRUPT / "iter_0000004"
    assert (aside / shard.name).exists()  # kept for inspection, never deleted
    with pytest.raises(CheckpointCorrupt):
        verify_checkpoint(aside)
    verify_checkpoint(store.iteration_dir(run_dir, 4))  # written anew by the resumed run


@pytest.mark.parametrize("fault", ["missing shard", "truncated common.pt", "truncated .metadata", "missing manifest"])
def test_incomplete_checkpoint_falls_back(stdlib_prefix, copy_of, fault, capsys):
    run_dir = copy_of()
    directory = store.iteration_dir(run_dir, 4)
    if fault == "missing shard":
        largest_shard(directory).unlink()
    elif fault == "missing manifest":
        (directory / "manifest.json").unlink()
        (directory / "common.pt").write_bytes((directory / "common.pt").read_bytes()[:100])
    else:
        path = directory / fault.split()[-1]
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = run("pretrain", overrides(stdlib_prefix, run_dir))
    assert result.start_step == 2 and result.completed
    assert "checkpoint iter_0000004 failed verification" in capsys.readouterr().out


def test_all_checkpoints_corrupt_is_refused_not_restarted(stdlib_prefix, copy_of):
    run_dir = copy_of()
    for step in (2, 4):
        flip_byte(largest_shard(store.iteration_dir(run_dir, step)))
    proc = cli(CLI + overrides(stdlib_prefix, run_dir))
    assert proc.returncode == 2 and "refusing to start the run over from step 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert store.checkpoint_steps(run_dir) == []  # nothing written over them ...
    assert sorted(p.name for p in (run_dir / "checkpoints" / store.CORRUPT).iterdir()) == ["iter_0000002", "iter_0000004"]


# ---- non-finite guard ----------------------------------------------------------------------

def test_nan_weights_stop_the_run_with_an_error_and_no_completed_marker(stdlib_prefix, copy_of, dist):
    from elastic_megatron.models.hybrid import build_model
    from elastic_megatron.train import compose_job
    from elastic_megatron.training.optim import build_optimizer, build_scheduler

    run_dir = copy_of()
    job = compose_job("pretrain", overrides(stdlib_prefix, run_dir))
    model = build_model(job.model)
    _, optimizer = build_optimizer(model, job.trainer, job.parallel, torch.float32)
    scheduler = build_scheduler(optimizer, job.trainer)
    state = store.load_checkpoint(run_dir, model, optimizer, scheduler, 4)
    with torch.no_grad():
        model.decoder.layers[0].mixer.in_proj.weight.fill_(float("nan"))
    store.save_checkpoint(run_dir, model, optimizer, scheduler, 4, state["consumed_samples"], state["meta"], state["extra"])

    proc = cli(CLI + overrides(stdlib_prefix, run_dir, **{"trainer.max_steps": 20, "trainer.max_skipped_steps": 3,
                                                          "trainer.save_interval": 100}))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "3 consecutive steps (up to 7) had a non-finite loss" in proc.stderr
    assert not (run_dir / "COMPLETED").exists()
    assert store.checkpoint_steps(run_dir) == [4, 2]  # nothing saved after the NaNs


# ---- the config of a resumed run ------------------------------------------------------------

def test_resume_refuses_a_changed_architecture_before_writing_anything(stdlib_prefix, copy_of):
    run_dir = copy_of()
    config_before = (run_dir / "config.yaml").read_bytes()
    for key, value in (("model.moe_router_topk", 1), ("trainer.lr", 1e-2), ("model.hidden_size", 96)):
        with pytest.raises(ConfigError) as err:
            run("pretrain", overrides(stdlib_prefix, run_dir, **{key: value}))
        assert err.value.key == key and "differs from the resumed checkpoint's" in str(err.value)
        assert (run_dir / "config.yaml").read_bytes() == config_before


def test_resume_allows_and_reports_steering_changes(stdlib_prefix, copy_of, capsys):
    run_dir = copy_of()
    result = run("pretrain", overrides(stdlib_prefix, run_dir, **{"trainer.log_interval": 2, "trainer.eval_iters": 1}))
    assert result.start_step == 4 and result.completed
    out = capsys.readouterr().out
    assert "resume: trainer.max_steps: 4 -> 6" in out and "resume: trainer.log_interval: 1 -> 2" in out
    # metrics.jsonl holds each step once, even though steps 5..6 were logged by a resumed run
    import json

    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 6]  # log_interval 2 after the resume


def test_resume_follows_moved_data_and_refuses_data_remade_in_place(stdlib_prefix, copy_of, tmp_path, capsys):
    run_dir = copy_of()
    moved = tmp_path / "moved" / "stdlib_text_document"
    moved.parent.mkdir()
    source = Path(stdlib_prefix)
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{source}{suffix}", f"{moved}{suffix}")
    meta = source.parent / "stdlib.tokenizer.meta.json"
    shutil.copy(meta, moved.parent / meta.name)
    result = run("pretrain", overrides(str(moved), run_dir))
    assert result.start_step == 4 and result.completed
    assert "(the same files: identical fingerprints)" in capsys.readouterr().out

    # The same path, other contents (re-made from less text): refused, nothing written.
    proc = cli([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", "python-stdlib", "--max-bytes", "150000",
                "--output-prefix", str(moved.parent / "stdlib"), "--tokenizer", "byte", "--overwrite"])
    assert proc.returncode == 0, proc.stderr
    config_before = (run_dir / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match="their .idx fingerprints differ"):
        run("pretrain", overrides(str(moved), run_dir, **{"trainer.max_steps": 8}))
    assert (run_dir / "config.yaml").read_bytes() == config_before


@pytest.mark.slow
def test_resume_follows_moved_validation_data_and_refuses_it_remade_in_place(stdlib_prefix, tmp_path, capsys):
    """data.valid_prefixes is part of the run's data identity: the held-out files may move,
    not change, or the validation curve would go on over other data."""
    first = tmp_path / "valid"
    valid = preprocess(first / "heldout", "--input", "python-stdlib", "--max-bytes", "60000", "--tokenizer", "byte")
    run_dir = tmp_path / "run"
    held_out = {"trainer.save_interval": 2, "trainer.eval_interval": 2}
    result = run("pretrain", base_overrides(stdlib_prefix, run_dir, **held_out, **{
        "trainer.max_steps": 2, "data.valid_prefixes": f"[{valid}]"}))
    assert result.completed
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    capsys.readouterr()
    result = run("pretrain", base_overrides(stdlib_prefix, run_dir, **held_out, **{
        "trainer.max_steps": 4, "data.valid_prefixes": f"[{moved / Path(valid).name}]"}))
    assert result.start_step == 2 and result.completed
    assert "resume: data.valid_prefixes:" in capsys.readouterr().out

    # The moved files re-made from less text: refused by name, nothing written.
    preprocess(moved / "heldout", "--input", "python-stdlib", "--max-bytes", "30000", "--tokenizer", "byte", "--overwrite")
    config_before = (run_dir / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match="validation data files are not the ones") as err:
        run("pretrain", base_overrides(stdlib_prefix, run_dir, **held_out, **{
            "trainer.max_steps": 6, "data.valid_prefixes": f"[{moved / Path(valid).name}]"}))
    assert err.value.key == "data.valid_prefixes"
    assert (run_dir / "config.yaml").read_bytes() == config_before and store.checkpoint_steps(run_dir)[0] == 4


def test_metrics_rows_of_redone_steps_are_dropped_on_resume(stdlib_prefix, copy_of):
    import json

    run_dir = copy_of()
    shutil.rmtree(store.iteration_dir(run_dir, 4))  # steps 3..4 are redone from iter 2
    run("pretrain", overrides(stdlib_prefix, run_dir, **{"trainer.max_steps": 4}))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2, 3, 4]


# ---- saves that cannot complete ----------------------------------------------------------------

@contextlib.contextmanager
def small_filesystem(path: Path, size: str):
    path.mkdir(parents=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode:
        pytest.skip("needs root to mount a small tmpfs (the disk-full test fills a real filesystem)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


def test_full_disk_before_a_save_is_refused_cleanly(stdlib_prefix, tmp_path):
    # One checkpoint of the tiny model (weights + Adam moments) is ~3.4 MB: a second one does not fit.
    with small_filesystem(tmp_path / "fs", "5m") as fs:
        run_dir = fs / "run"
        args = base_overrides(stdlib_prefix, run_dir, **{"trainer.max_steps": 4, "trainer.save_interval": 2,
                                                         "data.cache_dir": str(tmp_path / "cache")})
        with pytest.raises(store.CheckpointSaveError, match="not enough free space .* nothing was written"):
            run("pretrain", args)
        assert store.checkpoint_steps(run_dir) == [2] and not list((run_dir / "checkpoints").glob("*.partial"))
        verify_checkpoint(store.iteration_dir(run_dir, 2))
        assert not (run_dir / "COMPLETED").exists()


def test_disk_filling_up_during_a_save_leaves_the_last_good_checkpoint(stdlib_prefix, tmp_path, monkeypatch):
    with small_filesystem(tmp_path / "fs", "5500k") as fs:
        run_dir = fs / "run"
        # Let the free-space estimate pass, so the writer itself runs into ENOSPC mid-save.
        monkeypatch.setattr(store, "SAVE_HEADROOM", 0.2)
        args = base_overrides(stdlib_prefix, run_dir, **{"trainer.max_steps": 4, "trainer.save_interval": 2,
                                                         "data.cache_dir": str(tmp_path / "cache")})
        with pytest.raises(store.CheckpointSaveError) as err:
            run("pretrain", args)
        assert "saving step 4" in str(err.value) and "the previous checkpoint (step 2) is intact" in str(err.value)
        assert store.checkpoint_steps(run_dir) == [2] and not list((run_dir / "checkpoints").glob("*.partial"))
        verify_checkpoint(store.iteration_dir(run_dir, 2))
        assert shutil.disk_usage(fs).free > 1_000_000  # the partial save's bytes were given back
        assert store.latest_step(run_dir) == 2


# ---- a trainer killed in the middle of a save ---------------------------------------------------

KILLED_IN_SAVE = """
import os, sys, time
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from elastic_megatron.train import run

original = FileSystemWriterAsync.write_preloaded_data

def slow_writer(*args, **kwargs):  # runs in the writers: processes Megatron forks (0.16), threads (0.17+)
    open(os.path.join(sys.argv[1], f"writer-{os.getpid()}-{time.monotonic_ns()}"), "w").close()
    time.sleep(120)
    return original(*args, **kwargs)

FileSystemWriterAsync.write_preloaded_data = staticmethod(slow_writer)
if __name__ == "__main__":
    run("pretrain", sys.argv[2:])
"""


def test_sigkill_during_a_save_leaves_no_process_behind(stdlib_prefix, tmp_path):
    script = tmp_path / "killed_in_save.py"
    script.write_text(KILLED_IN_SAVE)
    markers = tmp_path / "markers"
    markers.mkdir()
    args = base_overrides(stdlib_prefix, tmp_path / "run", **{"trainer.max_steps": 2, "trainer.save_interval": 2})
    trainer = subprocess.Popen([sys.executable, str(script), str(markers), *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 180
        while not list(markers.iterdir()):
            assert trainer.poll() is None and time.time() < deadline, "no checkpoint writer started"
            time.sleep(0.2)
        family = psutil.Process(trainer.pid).children(recursive=True)
        if mcore_at_least(0, 17):
            # The writers are threads of the trainer; no process at all (not even the
            # results queue's Manager server, see models/compat.py) may be started.
            assert not family, [(p.pid, p.cmdline()[:3]) for p in family]
        else:
            assert family, "the save runs in child processes"
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait()
        gone, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, [(p.pid, p.cmdline()[:3]) for p in alive]
    finally:
        with contextlib.suppress(ProcessLookupError):
            trainer.kill()
