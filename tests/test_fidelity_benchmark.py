"""benchmarks/fidelity.py's own arithmetic, without training: how a text becomes documents
(blank lines that hold spaces, as WikiText-2's do), the one-line refusals before the first
stage (a text too short to hold out 10%, one too short for the importance pass's split, a
bad --override), and the tokens a baseline needs, from a curve with a step-0 point."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO
from elastic_megatron.data.text import shipped_text


def fidelity():
    spec = importlib.util.spec_from_file_location("fidelity", REPO / "benchmarks" / "fidelity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_blank_lines_holding_spaces_separate_paragraphs():
    f = fidelity()
    text = " = Title = \n \n First paragraph . \n \n\t\n Second one . \n\n\nThird\n"
    docs = f.documents(text, size=1)  # every paragraph its own document
    assert docs == [" = Title = ", " First paragraph . ", " Second one . ", "Third\n"]


def test_wikitext2_gives_documents_to_hold_out():
    docs = fidelity().documents(shipped_text("wikitext2_valid").read_text(encoding="utf-8"))
    assert len(docs) > 100 and max(len(d.encode()) for d in docs) < 20_000


def test_a_text_of_too_few_documents_is_refused_in_one_line(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("one paragraph\n \ntwo\n")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fidelity.py"), "--text", str(text),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid config --text=") and "need at least 10" in lines[0], proc.stderr


@pytest.mark.parametrize("extra, refusal", [
    # 20 documents: enough to hold out 10%, but the importance pass validates on 2% of the
    # 18 training ones (it used to pretrain, then fail there with a traceback)
    ([], "18 training documents are too few for the importance stage"),
    (["--override", "stage1:trainer.lr=-1"], "trainer.lr=-1.0: must be a positive number (the stage1 stage)"),
])
def test_input_no_stage_could_use_is_refused_before_the_first_stage(tmp_path, extra, refusal):
    text = tmp_path / "short.txt"
    text.write_text("\n\n".join(f"paragraph {i} " + "some words of it " * 250 for i in range(20)) + "\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fidelity.py"), "--text", str(text), "--scale", "0.01",
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and refusal in lines[0], proc.stderr
    assert not out.exists()  # no data, no run dir, no checkpoint


def test_tokens_to_reach_interpolates_from_the_step_0_point():
    reach = fidelity().tokens_to_reach
    # Already below the target at the first check (100 tokens): reached between 0 and 100.
    assert reach([[(0, 3.0), (100, 2.0), (200, 1.5)]], 2.5) == (50.0, True)
    # At the target from the start: nothing to train.
    assert reach([[(0, 2.0), (100, 1.9)]], 2.5) == (0, True)
    # The fewer tokens of two curves; a target no curve reaches.
    assert reach([[(0, 3.0), (100, 2.6), (200, 2.4)], [(0, 3.0), (100, 2.5)]], 2.5) == (100, True)
    assert reach([[(0, 3.0), (100, 2.9)]], 2.5) == (None, False)
