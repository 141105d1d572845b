"""The GPU acceptance run (tools/gpu_check.py): its CPU rehearsal runs every stage of the real
sequence at tiny sizes and writes a report where each stage passed with its figures; a failed
stage is recorded and the run goes on (stages that need its output are skipped, not run on
missing inputs); bad input is one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
@pytest.mark.gpu_rehearsal
def test_rehearsal_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "gpu-check"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--rehearse", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500, cwd=REPO)
    report = json.loads((out / "report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    failed = {n: (s["status"], s["detail"]) for n, s in stages.items() if s["status"] != "passed"}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-2000:], proc.stderr[-2000:])
    from elastic_megatron.jobs.gpu_check import Run

    assert list(stages) == [s.name for s in Run(out, rehearse=True).stages()]  # every stage ran, in order
    assert report["mode"].startswith("rehearsal")
    assert stages["resume"]["figures"]["ran_to_step"] > stages["resume"]["figures"]["resumed_from_step"]
    assert stages["train-4k"]["figures"]["tokens_per_s"] > 0 and stages["train-4k"]["figures"]["estimate_gib"] > 0
    assert {"budget_control_phases", "gpucheck:full", "gpucheck:small"} <= stages["serve"]["figures"].keys()
    for name in ("scan-kernels", "elastic-step", "decode"):
        assert stages[name]["figures"], name
    md = (out / "report.md").read_text()
    assert "| qad | passed |" in md and "## Figures" in md
    for stage in stages.values():
        if stage["log"]:
            assert (out / stage["log"]).exists(), stage["name"]


def test_a_failed_stage_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    from elastic_megatron.jobs import gpu_check

    stages = [
        gpu_check.Stage("breaks", 5, argv=[sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]),
        gpu_check.Stage("after-it", 5, needs=("breaks",), argv=[sys.executable, "-c", "print('never')"]),
        gpu_check.Stage("hangs", 0.1, argv=[sys.executable, "-c", "import time; time.sleep(30)"]),
        gpu_check.Stage("works", 5, argv=[sys.executable, "-c", "print('fine')"],
                        figures=lambda run: {"answer": 42}),
        gpu_check.Stage("raises", 5, call=lambda run: 1 / 0),
    ]
    monkeypatch.setattr(gpu_check.Run, "stages", lambda self: stages)
    run = gpu_check.check(tmp_path / "out", rehearse=False, only=None)
    run.execute()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    status = {s["name"]: (s["status"], s["detail"]) for s in report["stages"]}
    assert status["breaks"][0] == "failed" and "exit 3" in status["breaks"][1] and "boom" in status["breaks"][1]
    assert status["after-it"] == ("skipped", "needs breaks")
    assert status["hangs"][0] == "timeout"
    assert status["works"] == ("passed", "") and report["stages"][3]["figures"] == {"answer": 42}
    assert status["raises"][0] == "failed" and "ZeroDivisionError" in status["raises"][1]
    assert report["summary"] == {"passed": 1, "failed": 2, "timeout": 1, "skipped": 1}
    assert "| breaks | failed |" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("args, says", [
    (["--stages", "pretrain,nonsense"], "--stages"),
])
def test_bad_input_is_one_line(tmp_path, args, says):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--rehearse", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], proc.stderr


def test_an_unrelated_folder_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--rehearse", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "--out" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
