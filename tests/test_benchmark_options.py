"""The benchmarks' command lines (benchmarks/*.py through cli.benchmark_parser): --help
shows the whole docstring and exits 0; a bad option, or a `key=value` setting that is now
an option, is one `error:` line with exit status 2, before anything is built."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("script, bad, named", [
    ("activation_recompute.py", ["model=small"], "--model"),
    ("elastic_overhead.py", ["seq=4096"], "--seq"),
    ("budget_control.py", ["--checkpoint", "x"], "--out"),
    ("fidelity.py", ["--scale"], "--scale"),
    ("model_throughput.py", ["--steps", "many"], "--steps"),
])
def test_help_exits_0_and_a_bad_option_is_one_error_line(script, bad, named):
    helped = run(script, "--help")
    first_line = (REPO / "benchmarks" / script).read_text().split('"""')[1].splitlines()[0]
    assert helped.returncode == 0 and helped.stdout.startswith("usage: ") and first_line in helped.stdout, helped.stderr
    assert "--debug" in helped.stdout
    refused = run(script, *bad)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert lines[0].startswith("error: ") and named in lines[0] and f"{script} --help" in lines[0]
