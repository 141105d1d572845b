"""Downstream tasks shipped with the project, as lm-evaluation-harness task YAMLs whose data
are JSON-lines files in data/ here (read by loader.py: no hub, no network).

Built by `python -m elastic_megatron.eval_tasks.build` from text the demo chain and the
benchmarks hold out of training (build.py says how). tools/evaluate_tasks.py passes this
directory to lm-eval's TaskManager as an include path, so `--tasks stdlib_cloze` works like
any lm-eval task name.

| task | kind | metric | chance |
|---|---|---|---|
| stdlib_cloze | multiple choice: 4 lines of Python and a line up to an identifier; which identifier of the document comes next (of 4) | acc, acc_norm | 25% |
| stdlib_identifier | generate_until: finish an identifier cut after >= 2 characters | exact_match | ~0 (most frequent answer 2%) |
| stdlib_assign | generate_until with a reasoning delimiter (" = "): finish an assignment's target, then its value's first word | exact_match | ~0 (most frequent answer 13%) |
| shakespeare_cloze | multiple choice: 4 lines of verse and a line up to a word; which nearby word comes next (of 4) | acc, acc_norm | 25% |
"""

from __future__ import annotations

import re
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
# Accuracy of a random choice (multiple choice); the figures draw it.
CHANCE = {"stdlib_cloze": 0.25, "shakespeare_cloze": 0.25}


def shipped_tasks() -> list[str]:
    """Names of the shipped tasks (the `task:` of each YAML here), sorted."""
    names = []
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        found = re.search(r"^task:\s*(\S+)\s*$", path.read_text(encoding="utf-8"), re.M)
        if found:
            names.append(found.group(1))
    return sorted(names)
