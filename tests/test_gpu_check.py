"""benchmarks/gpu_check.sh at toy size on the CPU: every step runs, so the script works the
first time a GPU is at hand."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs every step of benchmarks/gpu_check.sh

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_runs_every_step(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "PY": sys.executable}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    summary = (tmp_path / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stderr[-2000:]
    assert "FAILED" not in summary
    for step in ("1. Triton", "2. bf16", "3. training", "4. paper-scale", "0 failed step(s)"):
        assert step in summary, step
    table = (tmp_path / "paper_proxy" / "summary.md").read_text()
    assert all(f"| {run} |" in table for run in ("fp32", "mx", "mx_norm_fp32", "norm_only_mx"))
    assert (tmp_path / "paper_proxy" / "summary.csv").read_text().count("\n") == 1 + 4
