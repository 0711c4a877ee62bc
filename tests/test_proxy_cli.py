"""``mxprobe proxy``: compare's outputs, the divergence rule, and every shipped proxy YAML."""

import contextlib
import csv
import io
import math
from pathlib import Path

import pytest
import yaml

from mxprobe.app.cli import proxy
from mxprobe.app.cli.sweep import Spec
from mxprobe.app.results import SUMMARY_COLUMNS
from mxprobe.app.training import proxy_cli
from mxprobe.outcome import divergence_summary, read_diverged
from tests.proxy_tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
PROXY_CONFIGS = sorted((ROOT / "examples" / "configs").glob("proxy_*.yaml"))

TINY = tiny_config(max_steps=3, batch_size=16)


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_compare_writes_run_dirs_and_summary(tmp_path, tiny_config):
    out = tmp_path / "cmp"
    code = proxy.run(
        [
            "compare",
            "--config",
            str(tiny_config),
            "--schemes",
            "fp32,mxfp8_e4m3",
            "--seeds",
            "0",
            "--out",
            str(out),
        ],
        "mxprobe proxy",
    )
    assert code == 0
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == SUMMARY_COLUMNS
    assert [(r["scheme"], r["seed"]) for r in rows] == [("fp32", "0"), ("mxfp8_e4m3", "0")]
    assert all(r["diverged"] == "false" and int(r["steps"]) == 3 for r in rows)
    assert all(r["divergence_step"] == "" for r in rows)
    with open(out / "rates.csv") as f:
        rates = list(csv.DictReader(f))
    assert [(r["arm"], r["n"]) for r in rates] == [("fp32", "1"), ("mxfp8_e4m3", "1")]
    with open(out / "tests.csv") as f:
        (pair,) = list(csv.DictReader(f))
    assert pair["test"].startswith("exact McNemar") and (pair["arm_a"], pair["arm_b"]) == (
        "fp32",
        "mxfp8_e4m3",
    )
    for run_dir in ("fp32-seed0", "mxfp8_e4m3-seed0"):
        with open(out / run_dir / "metrics.csv") as f:
            losses = [r["train/loss"] for r in csv.DictReader(f) if r["train/loss"]]
        assert len(losses) == 3
    # Same initial weights and batches: the first loss is computed before any update, and MX
    # changes it only by quantization error.
    first = [
        float(next(csv.DictReader(open(out / d / "metrics.csv")))["train/loss"])
        for d in ("fp32-seed0", "mxfp8_e4m3-seed0")
    ]
    assert first[0] == pytest.approx(first[1], rel=0.05)


def test_divergence_rule():
    stable = [1.0, 0.5, 0.2, 0.1] + [0.1] * 20
    assert divergence_summary(stable, factor=10, patience=5)["diverged"] is False
    spike = [1.0, 0.1, 0.1, 2.0, 3.0, 0.1, 0.1]
    summary = divergence_summary(spike, factor=10, patience=5)
    assert summary["diverged"] is False and summary["recovered_spikes"] == 1
    blowup = [1.0, 0.1, 0.1] + [5.0] * 5 + [0.1]
    summary = divergence_summary(blowup, factor=10, patience=5)
    assert summary["diverged"] is True and summary["divergence_step"] == 3
    nan = divergence_summary([1.0, 0.5, math.nan, 0.4], factor=10, patience=5)
    assert nan["diverged"] is True and nan["divergence_step"] == 2
    assert nan["min_loss"] == 0.4


def test_tables_read_back_the_flags_they_wrote():
    """A table's diverged field reads back as the bool written, whether it came from a CSV
    (text, any case), a result file written before summaries held bools, or JSON; an empty
    field is an unfinished run."""
    for value, flag in ((True, True), ("true", True), ("False", False), (False, False)):
        assert read_diverged(value) is flag
    for value in ("", None, "maybe", 1):
        assert read_diverged(value) is None


@pytest.mark.parametrize("config", PROXY_CONFIGS, ids=lambda p: p.name)
def test_shipped_proxy_configs_parse(config):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        proxy_cli(["fit", f"--config={config}", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(out.getvalue())
    assert "width" not in printed["data"]  # linked from model.width


def test_shipped_sweep_spec_parses():
    spec = Spec.load(ROOT / "examples" / "proxy_ablation.yaml")
    assert len(spec.runs) == 4 * 2 * 2 * 3
    assert spec.config is not None and spec.config.exists()
    args = spec.cli_args(spec.runs[0])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        proxy_cli(["fit", f"--config={spec.config}", *args, "--print_config"])
    printed = yaml.safe_load(out.getvalue())
    assert printed["model"]["activation"] == "gelu" and printed["data"]["seed"] == 0


def test_unknown_subcommand():
    assert proxy.run(["train"], "mxprobe proxy") == 2
