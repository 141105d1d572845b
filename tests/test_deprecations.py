"""No deprecated Megatron-Core call of ours: building the model and running training steps
(pretraining, the elastic distillation step, full and selective recomputation) raises no
deprecation warning, and logs no Megatron warning, whose call site is ours.

A warning is ours when the nearest frame that called into Megatron-Core or torch is in
this repository (the package or these tests): a missing argument in our specs, configs
or calls. Warnings Megatron-Core raises from its own calls whatever we pass are listed in
MEGATRON_OWN with the Megatron frame that makes them; they are allowed only with that
frame on the stack."""

from __future__ import annotations

import logging
import os
import re
import sys
import sysconfig
import warnings
from pathlib import Path

import megatron.core
import pytest
import torch

from elastic_megatron.models import compat
from elastic_megatron.models.hybrid import build_model

from conftest import REPO, preset

SEQ = 32

# (message, Megatron function on the stack that raises it from its own call) in 0.16-0.19.
MEGATRON_OWN = (
    # RowParallelLinear.forward calls its matmul with tp_group=None (tensor_parallel/layers.py).
    ("tp_group is None", "RowParallelLinear.forward"),
    # SharedExpertMLP sets config.ffn_hidden_size and builds its MLP without the argument.
    ("MLP requires ffn_hidden_size", "SharedExpertMLP.__init__"),
)
DEPRECATION = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
THIRD_PARTY = tuple(str(Path(p).resolve()) + os.sep for p in (Path(megatron.core.__file__).parents[1], Path(torch.__file__).parent,
                                                               sysconfig.get_paths()["stdlib"]))
OURS = tuple(str(REPO / d) + os.sep for d in ("elastic_megatron", "tests", "tools"))


def _stack(frame) -> list:
    """(file, qualified function name, line) of `frame` and its callers, innermost first."""
    out = []
    while frame is not None:
        code = frame.f_code
        # Generated code (a dataclass's __init__ is '<string>') belongs to its caller.
        if not code.co_filename.startswith("<"):
            out.append((str(Path(code.co_filename).resolve()), code.co_qualname, frame.f_lineno))
        frame = frame.f_back
    return out


def our_call_site(stack: list):
    """'file:line' of the nearest caller outside Megatron-Core, torch and the standard
    library when it is in this repository, else None."""
    for path, _, line in stack:
        if path.startswith(THIRD_PARTY):
            continue
        return f"{Path(path).relative_to(REPO)}:{line}" if path.startswith(OURS) else None
    return None


def megatron_own(message: str, stack: list) -> bool:
    names = {name for path, name, _ in stack if path.startswith(THIRD_PARTY[0])}
    return any(text in message and frame in names for text, frame in MEGATRON_OWN)


class OurDeprecations:
    """Collects, while active, every deprecation warning (by category, or a message saying
    'deprecated') and every Megatron log record at WARNING or above whose call site is ours.
    Warnings are seen before any filter can hide them."""

    def __init__(self):
        self.found: list[str] = []

    def _check(self, kind: str, message: str, stack: list) -> None:
        site = our_call_site(stack)
        if site is not None and not megatron_own(message, stack):
            chain = " <- ".join(name for path, name, _ in stack[:6] if path.startswith(THIRD_PARTY[0]))
            self.found.append(f"{site}: {kind}: {message.splitlines()[0][:160]} [{chain}]")

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DEPRECATION) or re.search(r"deprecat", str(message), re.I):
            caller = sys._getframe(1)
            while caller is not None and caller.f_code.co_filename == warnings.__file__:
                caller = caller.f_back
            self._check(category.__name__, str(message), _stack(caller))

    def __enter__(self) -> "OurDeprecations":
        outer = self

        class Handler(logging.Handler):
            def emit(self, record):
                caller = sys._getframe(1)
                while caller is not None and caller.f_code.co_filename == logging.__file__:
                    caller = caller.f_back
                outer._check(f"logged {record.levelname}", record.getMessage(), _stack(caller))

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._show
        self._handler, self._logger = Handler(logging.WARNING), logging.getLogger("megatron")
        self._logger.addHandler(self._handler)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self._handler)
        self._warnings.__exit__(*exc)


def lm_batch(vocab: int, seed: int) -> dict:
    tokens = torch.randint(0, vocab, (2, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, SEQ),
            "position_ids": torch.arange(SEQ).expand(2, SEQ)}


def test_our_calls_raise_no_deprecation_in_model_build_and_training_steps(dist, tmp_path):
    from elastic_megatron.checkpoint import store
    from elastic_megatron.convert.megatron_dist import config_yaml
    from elastic_megatron.elastic.step import ElasticDistillStep
    from elastic_megatron.models.recompute import apply_recompute
    from elastic_megatron.parallel.pipeline import forward_backward
    from elastic_megatron.train import compose_job
    from elastic_megatron.training.steps import LMStep

    job = compose_job("stage1_tiny", ["elastic=tiny_router", f"elastic.teacher_checkpoint={tmp_path / 'teacher'}",
                                      f"run.dir={tmp_path / 'run'}"])
    cfg = job.model
    assert cfg.count("-") and cfg.moe_shared_expert_ffn_hidden_size  # a dense MLP and a shared expert are built
    torch.manual_seed(0)
    with OurDeprecations() as pretrain:
        model = build_model(cfg)
        forward_backward(LMStep(), model, [lm_batch(cfg.vocab_size, 1)], step=1)
        apply_recompute(model, "full", "uniform", 2)
        losses, _ = forward_backward(LMStep(), model, [lm_batch(cfg.vocab_size, 2)], step=2)
    assert torch.isfinite(losses[0])

    # The elastic step reads its teacher from a checkpoint (saved and loaded outside the check).
    store.save_checkpoint(tmp_path / "teacher", model, None, None, 0, 0,
                          {"config": config_yaml(cfg), "sort_index": {"note": "test parent, identity order"}})
    student = build_model(cfg)
    step_fn = ElasticDistillStep(job)
    step_fn.setup(student, torch.float32)
    with OurDeprecations() as elastic:
        apply_recompute(student, "selective", modules=("core_attn", "mamba_scan", "moe", "mlp"))
        losses, _ = forward_backward(step_fn, student, [lm_batch(cfg.vocab_size, 3)], step=1)
    assert torch.isfinite(losses[0])

    found = pretrain.found + elastic.found
    assert not found, "deprecated Megatron-Core use from our call sites (Megatron-Core " + \
        ".".join(map(str, compat.MCORE_VERSION)) + "):\n" + "\n".join(found)


def test_the_check_sees_a_deprecated_call_of_ours(dist):
    """The collector is not blind: an MLP built here without its width and process group
    (Megatron's MLP warns that both will be required) is reported at this file's line."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    from elastic_megatron.models.hybrid import to_transformer_config

    tcfg = to_transformer_config(preset("tiny"))
    with OurDeprecations() as caught:
        MLP(tcfg, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear), tp_group=None)
    assert len(caught.found) >= 1 and all(f.startswith("tests/test_deprecations.py:") for f in caught.found), caught.found
    assert any("MLP requires ffn_hidden_size" in f for f in caught.found), caught.found
