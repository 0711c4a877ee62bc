"""benchmarks/proxy_search.py (the plain-loop search tool of docs/proxy_cpu.md) runs and reports."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> dict:
    cmd = [sys.executable, "benchmarks/proxy_search.py", "--depth", "1", "--width", "32"]
    cmd += ["--batch-size", "16", "--eager", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_search_loop_reports_the_compare_summary_and_applies_a_switch(tmp_path):
    plain, switched = tmp_path / "plain.pt", tmp_path / "switched.pt"
    row = _run("--scheme", "mxfp8_e4m3", "--steps", "6", "--save-losses", str(plain))
    assert row["diverged"] == "false" and row["steps_run"] == 6
    _run(
        "--scheme",
        "mxfp8_e4m3",
        "--steps",
        "6",
        "--switch-at",
        "3",
        "--switch-to",
        "norm=bf16",
        "--save-losses",
        str(switched),
    )
    a, b = torch.load(plain), torch.load(switched)
    assert len(a) == len(b) == 6
    assert a[:3] == b[:3]  # same weights and batches until the switch
    assert a[3] != b[3]  # the step after it runs with bf16 LayerNorm affine weights


def test_snapping_switch_leaves_the_loss_at_the_switch_unchanged(tmp_path):
    runs = {}
    for name, extra in (("plain", ()), ("switched", ()), ("snapped", ("--snap",))):
        path = tmp_path / f"{name}.pt"
        switch = () if name == "plain" else ("--switch-at", "3", "--switch-to", "norm=bf16")
        cmd = ("--scheme", "mxfp8_e4m3", "--steps", "6", "--save-losses", str(path))
        _run(*cmd, *switch, *extra)
        runs[name] = torch.load(path)
    # Step 3 computes with the same weights; with --snap its forward is the MX one exactly.
    assert runs["snapped"][:4] == runs["plain"][:4]
    assert runs["switched"][3] != runs["plain"][3]
    assert runs["snapped"][4:] != runs["plain"][4:]  # later steps see bf16 gamma updates
