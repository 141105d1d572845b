"""Shared fixtures: one gloo process group per test session (world size 1) and
small model configs that isolate each layer type."""

from __future__ import annotations

import os

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # The Triton-interpreter leg (make test-kernels): the kernels' shims go in before anything
    # imports a kernel module (tests/triton_interpreter.py says what each shim is for).
    import triton_interpreter

    triton_interpreter.install()

import dataclasses
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from elastic_megatron.config.model import ModelConfig, model_config_from_dict

REPO = Path(__file__).resolve().parents[1]


def preset(name: str, **overrides) -> ModelConfig:
    values = yaml.safe_load((REPO / "recipes" / "model" / f"{name}.yaml").read_text())
    values.update(overrides)
    return model_config_from_dict(values)


def small_config(pattern: str, **overrides) -> ModelConfig:
    """A small config of the tiny preset's widths with another layer pattern."""
    return dataclasses.replace(preset("tiny"), hybrid_pattern=pattern, name=f"tiny[{pattern}]", **overrides)


@pytest.fixture(scope="session")
def dist():
    from elastic_megatron.parallel.setup import destroy_distributed, initialize_distributed

    initialize_distributed(seed=1234)
    yield
    destroy_distributed()


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


def token_batch(vocab: int, batch: int = 2, seq: int = 24, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    pos = torch.arange(seq).expand(batch, seq)
    return ids, pos


def pytest_collection_modifyitems(config, items):
    """gpu tests need CUDA: on a CPU machine they are reported as skipped with the reason.
    kernels tests need Triton's interpreter switched on before Python starts: without it they
    are skipped with the command that runs them (make test runs that leg too)."""
    interpreter = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on a GPU machine: pytest -m gpu)")
    skip_kernels = pytest.mark.skip(reason="runs under Triton's interpreter: make test-kernels")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "kernels" in item.keywords and not interpreter:
            item.add_marker(skip_kernels)


@pytest.fixture(scope="session")
def stdlib_prefix(tmp_path_factory) -> str:
    """A small byte-level indexed dataset of the embedded corpus, made once per session
    with the real preprocessing tool."""
    return preprocess(tmp_path_factory.mktemp("data") / "stdlib", "--input", "python-stdlib", "--max-bytes", "400000",
                      "--tokenizer", "byte")


def preprocess(out, *args: str) -> str:
    """Run tools/preprocess_data.py (the real tool) with `args` into prefix `out`; the data prefix."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), *args, "--output-prefix", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return f"{out}_text_document"


@pytest.fixture(scope="session")
def sorted_parent(stdlib_prefix, tmp_path_factory):
    """(root, prefix): a tiny parent pretrained for 12 steps (root/parent) and its sorted
    version (root/sorted, the importance recipe), made once per session."""
    from elastic_helpers import train_overrides

    from elastic_megatron.checkpoint import metadata
    from elastic_megatron.train import run

    root = tmp_path_factory.mktemp("elastic")
    run("pretrain", train_overrides(stdlib_prefix, root / "parent", **{"trainer.max_steps": 12, "trainer.lr": 3e-3}))
    path = run("importance_tiny", train_overrides(stdlib_prefix, root / "sorted", **{
        "elastic.parent_checkpoint": str(root / "parent"), "elastic.importance.calibration_batches": 3,
        "elastic.importance.plots": "false"}))
    meta = metadata.read_common_state(path)["meta"]
    assert meta["sort_index"] and meta["importance"]["max_logit_diff_after_sort"] <= 1e-4
    return root, stdlib_prefix


@contextmanager
def serving_in_thread(server):
    """An in-process server (serving.app.Server or the front end) on a free 127.0.0.1 port, run by
    uvicorn in a thread; yields its base URL once it accepts requests, stops it afterwards."""
    import threading
    import time

    from elastic_megatron.serving.options import bind

    sock = bind("127.0.0.1", 0)
    uv = server.uvicorn(log_level="warning")
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not uv.started:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(30)
