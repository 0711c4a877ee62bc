"""Running a script in a fresh interpreter *without* Triton's interpreter mode (which
tests/conftest.py turns on for the test process): what a GPU machine would run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_outside_the_interpreter(script: str, cache_dir=None) -> subprocess.CompletedProcess:
    """``python -c script`` from the repository root with ``TRITON_INTERPRET`` unset (and
    Triton's kernel cache in ``cache_dir`` when given)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = str(cache_dir)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
