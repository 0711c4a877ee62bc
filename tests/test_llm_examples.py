"""examples/attach_to_existing_run.py: a plain user LightningModule trains under MX with the
mxprobe callbacks attached."""

import importlib.util
import sys
from pathlib import Path

import torch
from mxprobe.callbacks import read_events

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "attach_to_existing_run.py"


def test_attach_to_existing_run_trains_with_monitors_and_intervention(
    tmp_path, monkeypatch, capsys
):
    spec = importlib.util.spec_from_file_location("attach_to_existing_run", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--out", str(tmp_path), "--steps", "45"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: a second thread only spin-waits on a busy machine
    try:
        example.main()
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "mx/grad_bias/total/cosine" in out and "event at step 40: set_scheme" in out
    events = read_events(tmp_path / "version_0")
    assert [(e["step"], e["rule"]) for e in events] == [(40, "norms-to-bf16")]
    header = (tmp_path / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "mx/norm_affine/" in header and "mx/activations/" in header and "val/loss" in header
