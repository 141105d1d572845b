"""The shipped tasks' dataset loader: lm-evaluation-harness calls it (`custom_dataset:
!function loader.load` in each task YAML, with the YAML's `dataset_kwargs`) instead of
`datasets.load_dataset`, so a shipped task reads its JSON-lines file from this package and
nothing else: no Hugging Face hub, no datasets cache, no network.

A task YAML outside this package may use it too (`custom_dataset: !function
elastic_megatron.eval_tasks.loader.load` and `dataset_kwargs: {data_file: /abs/path.jsonl}`).
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


class TaskDataMissing(FileNotFoundError):
    """A task's data file is not there (jobs/tasks.py names the task in its refusal)."""


def read_rows(data_file: str | Path) -> list[dict]:
    """The documents of a JSON-lines file: `data_file` absolute, or relative to data/ here."""
    path = Path(data_file)
    if not path.is_absolute():
        path = DATA_DIR / path
    if not path.is_file():
        raise TaskDataMissing(f"its data file {path} does not exist (shipped tasks: rebuild with "
                              "python -m elastic_megatron.eval_tasks.build)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise TaskDataMissing(f"its data file {path} line {n} is not JSON ({err.msg})") from None
    if not rows:
        raise TaskDataMissing(f"its data file {path} holds no documents")
    return rows


def load(data_file: str, split: str = "test", **_ignored):
    """A `datasets.DatasetDict` with one split (`split`) holding the rows of `data_file`.
    lm-eval also passes the task manager's metadata as keyword arguments: ignored."""
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(read_rows(data_file))})
