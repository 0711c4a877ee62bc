"""`mxprobe llm`: sizes, fit through LightningCLI with the shipped tiny config (monitors,
intervention, run record), and the same config on two CPU processes under DDP."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mxprobe.app.cli import main
from mxprobe.record import read_events
from tests.helpers_lightning import subprocess_env

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "configs" / "llm_tiny_cpu.yaml"


def _tiny_config(tmp_path: Path, step_rule_at: int) -> Path:
    """The shipped tiny config with its scheduled intervention moved to ``step_rule_at`` and
    every output under ``tmp_path``."""
    config = yaml.safe_load(TINY.read_text())
    for callback in config["trainer"]["callbacks"]:
        for rule in callback.get("init_args", {}).get("rules", []):
            if rule["trigger"]["kind"] == "step":
                rule["trigger"]["at"] = step_rule_at
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["trainer"]["default_root_dir"] = str(tmp_path / "runs")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


SHORT_RUN = [
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=2",
    "--trainer.log_every_n_steps=1",
    "--data.batch_size=4",
    "--data.val_windows=8",
    "--data.max_bytes=200000",
    "--data.val_fraction=0.05",
]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_sizes_and_usage(capsys):
    assert main(["llm", "sizes", "tiny", "L12", "--flops", "1e18"]) == 0
    out = capsys.readouterr().out
    assert "85,365,504" in out and "7,464" in out
    assert main(["llm", "train"]) == 2
    assert "expected a subcommand (fit, validate, sizes), got 'train'" in capsys.readouterr().err
    assert main(["llm", "--help"]) == 0


def test_fit_with_the_tiny_config_logs_monitors_and_writes_events(tmp_path):
    threads = torch.get_num_threads()
    config = _tiny_config(tmp_path, step_rule_at=2)
    try:
        code = main(
            ["llm", "fit", "--config", str(config), f"--data.cache_dir={tmp_path}", *SHORT_RUN]
        )
    finally:
        assert torch.get_num_threads() == 1  # the config's num_threads
        torch.set_num_threads(threads)
    assert code == 0
    run_dir = tmp_path / "runs" / "llm_tiny_cpu" / "version_0"
    rows = _rows(run_dir)
    columns = set(rows[0])
    assert {"train/loss", "val/loss", "val/bpb", "lr-AdamW/pg1"} <= columns
    for prefix in ("mx/grad_bias/", "mx/norm_affine/", "mx/activations/", "mx/spikes/"):
        assert any(c.startswith(prefix) for c in columns), prefix
    assert [r["step"] for r in rows if r["val/loss"]] == ["1", "3"]
    events = read_events(run_dir)
    assert [(e["step"], e["kind"], e["rule"]) for e in events] == [
        (2, "set_scheme", "norms-to-bf16-at-150")
    ]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["scheme"] == "mxfp8_e4m3" and saved["num_threads"] == 1


def test_validate_subcommand_runs(tmp_path, capsys):
    config = _tiny_config(tmp_path, step_rule_at=2)
    threads = torch.get_num_threads()
    try:
        code = main(
            ["llm", "validate", "--config", str(config), f"--data.cache_dir={tmp_path}", *SHORT_RUN]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    assert "val/bpb" in capsys.readouterr().out


@pytest.mark.slow  # two processes (gloo DDP)
def test_the_same_config_trains_on_two_cpu_processes_with_ddp(tmp_path):
    # Lightning's DDP launcher starts the other rank by re-running this very command line. The
    # two ranks share a rendezvous port picked free for this run (no MASTER_PORT passed on: see
    # helpers_lightning.LAUNCHER_VARS), the run directory, where rank 0 alone writes, and the
    # data cache, built by rank 0's prepare_data under a temporary name and renamed into place.
    config = _tiny_config(tmp_path, step_rule_at=2)
    env = subprocess_env(PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [
        sys.executable,
        "-m",
        "mxprobe.app.cli",
        "llm",
        "fit",
        "--config",
        str(config),
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        f"--data.cache_dir={tmp_path}",
        *SHORT_RUN,
    ]
    try:
        done = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"DDP run did not finish in {err.timeout} s:\n{err.stderr}")
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = tmp_path / "runs" / "llm_tiny_cpu" / "version_0"
    rows = _rows(run_dir)
    assert [r["step"] for r in rows if r["val/loss"]] == ["1", "3"]
    assert any(r.get("mx/grad_bias/total/cosine") for r in rows)
    events = read_events(run_dir)
    assert len(events) == 1  # written by rank 0 only
