"""The floor plan: which package may import which. Dependencies point one way, so a new
stage or tool adds a module without pulling the rest of the house along.

Every `import` and `from ... import` of the package is read from the source (function-
level imports included), so a lazy import cannot hide a loop."""

from __future__ import annotations

import ast

import pytest

from conftest import REPO

PACKAGE = REPO / "elastic_megatron"

# package -> packages of elastic_megatron it must never import (directly or lazily)
FORBIDDEN = {
    "config": {"models", "elastic", "training", "jobs", "checkpoint", "convert", "slicing", "parallel", "data", "distill", "inference", "quant", "serving"},
    "checkpoint": {"elastic", "training", "jobs", "convert", "slicing", "models", "distill", "inference", "quant", "serving"},
    "models": {"elastic", "training", "jobs", "checkpoint", "convert", "slicing", "distill", "inference", "quant", "serving"},
    "parallel": {"elastic", "training", "jobs", "checkpoint", "convert", "slicing", "inference", "quant", "serving"},
    "data": {"models", "elastic", "training", "jobs", "checkpoint", "convert", "slicing", "inference", "quant", "serving"},
    "training": {"elastic", "jobs", "convert", "slicing", "inference", "quant", "serving"},
    "convert": {"elastic", "training", "jobs", "slicing", "inference", "quant", "serving"},
    "slicing": {"training", "jobs", "inference", "serving"},
    "elastic": {"jobs", "slicing", "inference", "quant", "serving"},
    "distill": {"elastic", "training", "jobs", "checkpoint", "convert", "slicing", "inference", "quant", "serving"},
    # inference/loading.py opens Hugging Face directories (ours and released ones) through convert/.
    "inference": {"training", "jobs", "slicing", "distill", "serving"},
    # Quantization is a later stage: it builds on the elastic machinery, never the reverse.
    "quant": {"jobs", "slicing", "inference", "serving"},
    # The server sits on top: it may import inference/, convert/, config/, checkpoint/, data/.
    "serving": {"models", "elastic", "training", "jobs", "slicing", "parallel", "distill", "quant"},
}
# The one import of training/ from elastic/: the elastic step implements the training
# loop's StepFunction contract.
ALLOWED = {("elastic/step.py", "elastic_megatron.training.steps")}
# models/compat.py is the one place that knows the installed Megatron-Core's differences
# (DESIGN: one function per version difference); any layer that calls Megatron-Core where
# versions differ (e.g. checkpoint/ saving) may import it, config/ excepted.
VERSION_COMPAT = "elastic_megatron.models.compat"


def package_imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("elastic_megatron.")}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_one_way(package):
    offenders = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for module in package_imports(path):
            target = module.split(".")[1]
            if module == VERSION_COMPAT and package != "config":
                continue
            if target in FORBIDDEN[package] and (rel, module) not in ALLOWED:
                offenders.append(f"{rel} imports {module}")
    assert not offenders, offenders


def test_scanner_sees_lazy_imports(tmp_path):
    """The check above must be able to fail: a function-level import is found."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from elastic_megatron.training.loop import train\n    import elastic_megatron.elastic.step\n")
    assert package_imports(f) == {"elastic_megatron.training.loop", "elastic_megatron.elastic.step"}
