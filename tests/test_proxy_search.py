"""benchmarks/proxy_search.py (the plain-loop search tool of docs/proxy_cpu.md) runs and reports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> dict:
    cmd = [sys.executable, "benchmarks/proxy_search.py", "--depth", "1", "--width", "32"]
    cmd += ["--batch-size", "16", "--eager", *args]
    # A bounded wait: a hung child fails this test instead of stalling the whole suite.
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)
    out = done.stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow  # trains several proxy runs
def test_search_loop_reports_the_compare_summary_and_applies_a_switch(tmp_path):
    plain, switched = tmp_path / "plain.pt", tmp_path / "switched.pt"
    row = _run("--scheme", "mxfp8_e4m3", "--steps", "6", "--save-losses", str(plain))
    assert row["diverged"] is False and row["steps_run"] == 6
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


@pytest.mark.slow  # trains several proxy runs
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


def test_a_probe_window_adds_dense_readings_with_binade_crossings():
    row = _run("--scheme", "mxfp8_e4m3", "--steps", "8", "--probe-every", "4",
               "--probe-window", "5:7:1", "--lr", "0.05")  # fmt: skip
    assert [p["step"] for p in row["probes"]] == [0, 4, 5, 6]
    assert row["probes"][0]["crossed"] == 0  # nothing to compare the first reading with
    assert all(isinstance(p["crossed"], int) and p["crossed"] >= 0 for p in row["probes"])


def test_crossings_count_blocks_whose_max_changed_binade():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "proxy_search", ROOT / "benchmarks/proxy_search.py"
    )
    search = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(search)
    net = torch.nn.Sequential(torch.nn.LayerNorm(96))  # three 32-blocks of gamma
    last = {}
    first = search._gamma_probes(net, last)
    assert first["crossed"] == 0 and first["zone"] == 0.0  # all ones: max 1, binade [1, 2)
    with torch.no_grad():
        net[0].weight[:32] = 0.9  # block 0 drops into [0.5, 1), E4M3's saturating zone
        net[0].weight[40] = 1.5  # block 1 keeps its binade
    second = search._gamma_probes(net, last)
    assert second["crossed"] == 1
    assert second["zone"] == round(1 / 3, 3) and second["below_1"] == round(1 / 3, 3)
    assert search._gamma_probes(net, last)["crossed"] == 0


@pytest.mark.slow  # trains proxy runs twice
def test_save_state_then_resume_equals_the_uninterrupted_run_bit_for_bit(tmp_path):
    common = ("--scheme", "mxfp8_e4m3", "--lr", "0.02", "--switch-at", "3",
              "--switch-to", "norm=bf16", "--snap")  # fmt: skip
    full, resumed = tmp_path / "full.pt", tmp_path / "resumed.pt"
    end_full, end_resumed, middle = (tmp_path / n for n in ("end_a.pt", "end_b.pt", "mid.pt"))
    row = _run(*common, "--steps", "10", "--save-losses", str(full),
               "--save-state", "10", "--state-file", str(end_full))  # fmt: skip
    _run(*common, "--steps", "6", "--save-state", "6", "--state-file", str(middle))
    # The resumed run names neither the scheme nor the switch: both come from the state file.
    again = _run("--resume", str(middle), "--steps", "10", "--save-losses", str(resumed),
                 "--save-state", "10", "--state-file", str(end_resumed))  # fmt: skip
    assert torch.load(full) == torch.load(resumed)  # every loss, steps 0-9
    assert {k: row[k] for k in ("final_loss", "min_loss", "diverged", "steps_run")} == {
        k: again[k] for k in ("final_loss", "min_loss", "diverged", "steps_run")
    }
    a, b = (torch.load(p, weights_only=False) for p in (end_full, end_resumed))
    assert a["step"] == b["step"] == 10
    assert a["schemes"] == b["schemes"]
    assert a["schemes"]["blocks.0.ln"].norm_affine == "bf16"  # the switch before the save held
    for name, tensor in a["student"].items():
        assert torch.equal(tensor, b["student"][name]), name
    for key, moments in a["optimizer"]["state"].items():
        for m, value in moments.items():
            assert torch.equal(value, b["optimizer"]["state"][key][m]), (key, m)


@pytest.mark.slow  # trains proxy runs twice
def test_a_resumed_run_starts_at_the_saved_step(tmp_path):
    state = tmp_path / "s.pt"
    _run("--steps", "4", "--save-state", "4", "--state-file", str(state))
    losses = tmp_path / "l.pt"
    _run("--resume", str(state), "--steps", "5", "--save-losses", str(losses))
    assert len(torch.load(losses)) == 5  # 4 restored + 1 trained
