"""Every entry point reports bad input the same way: exit status 2, one `error:` line that
names what was wrong and what is allowed, no traceback, no warnings noise, nothing
written; `--debug` brings the traceback back."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

TRAIN = [sys.executable, "-m", "elastic_megatron.train"]


def tool(name: str) -> list[str]:
    return [sys.executable, str(REPO / "tools" / name)]


# name -> (command line for a scratch directory t, what the error line must say)
CASES = {
    "trainer before preprocessing": (lambda t: TRAIN + ["--config-name=pretrain", f"data.prefixes=[{t}/none_text_document]",
                                                         f"run.dir={t}/run"], "data.prefixes"),
    "trainer optimizer value": (lambda t: TRAIN + ["--config-name=pretrain", "trainer.adam_beta1=1.5", f"run.dir={t}/run"],
                                "trainer.adam_beta1=1.5: must be in [0, 1)"),
    "describe: missing checkpoint": (lambda t: tool("describe_model.py") + ["storage=true", f"checkpoint={t}/nowhere"], "nowhere"),
    "describe: negative size": (lambda t: tool("describe_model.py") + ["memory=true", "nodes=-1"], "nodes=-1"),
    "evaluate: no batches": (lambda t: tool("evaluate_elastic.py") + ["--elastic", "e", "--sorted", "s", "--unsorted", "u",
                                                                       "--out", f"{t}/out", "--batches", "0"], "--batches=0"),
    "evaluate: out is a file": (lambda t: tool("evaluate_elastic.py") + ["--elastic", "e", "--sorted", "s", "--unsorted", "u",
                                                                          "--out", f"{t}/a_file"], "is a file"),
    "export: tokenizer dir": (lambda t: tool("export_hf.py") + ["--source-checkpoint", "s", "--target-checkpoint", f"{t}/out",
                                                                 "--tokenizer-dir", f"{t}/nowhere"], "--tokenizer-dir"),
    "import: malformed config.json": (lambda t: tool("import_hf.py") + ["--hf-dir", f"{t}/hf", "--target-checkpoint", f"{t}/out"],
                                      "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "nemotron_h", ')
    args, says = CASES[case]
    proc = subprocess.run(args(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run(TRAIN + ["--config-name=pretrain", "trainer.adam_beta1=1.5", f"run.dir={tmp_path}/run", "--debug"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "trainer.adam_beta1" in proc.stderr
