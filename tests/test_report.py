"""mxprobe report on complete, truncated and empty run directories."""

import csv
import json

import pytest

from mxprobe.app.cli import main
from mxprobe.app.report import NoRunsError, build_report
from mxprobe.app.runs import find_runs


def _write_run(root, steps=200, truncate=False, events=True):
    run = root / "lightning_logs" / "version_0"
    run.mkdir(parents=True)
    cols = [
        "epoch",
        "step",
        "train/loss",
        "mx/grad_bias/total/zeta",
        "mx/grad_bias/blocks.0.fc1/zeta",
        "mx/norm_affine/blocks.0.ln/weight_saturation",
        "mx/norm_affine/blocks.0.ln/weight_rel_bias",
    ]
    with open(run / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for s in range(steps):
            mon = s % 50 == 0
            w.writerow([0, s, 1.0 / (s + 1)] + ([0.1, 0.2, 0.05, -0.01] if mon else [""] * 4))
        if truncate:
            fh.write("0,")
    if events:
        with open(run / "events.jsonl", "w") as fh:
            fh.write(json.dumps({"step": 120, "kind": "spike", "rule": None}) + "\n")
            fh.write(
                json.dumps({"step": 150, "kind": "set_scheme", "rule": "norms-to-bf16"}) + "\n"
            )
            if truncate:
                fh.write('{"step": 19')
    return run


def test_full_run_report(tmp_path):
    _write_run(tmp_path / "a")
    report = build_report([tmp_path / "a"], tmp_path / "out")
    drawn = {s.title for s in report.sections if s.image is not None}
    assert {"Loss", "Total gradient bias", "Layer-norm affine weights"} <= drawn
    md = (tmp_path / "out" / "report.md").read_text()
    assert "![Loss](loss.png)" in md
    html = (tmp_path / "out" / "report.html").read_text()
    assert "data:image/png;base64," in html and "src='loss.png'" not in html
    runs = find_runs([tmp_path / "a"])
    assert runs[0].mx_metrics("grad_bias", "zeta").keys() == {"total", "blocks.0.fc1"}
    assert [e["kind"] for e in runs[0].events] == ["spike", "set_scheme"]


def test_truncated_run_still_reports(tmp_path):
    _write_run(tmp_path / "killed", steps=30, truncate=True)
    report = build_report([tmp_path / "killed"], tmp_path / "out")
    assert any("incomplete line" in n for n in report.notes)
    assert any("unreadable event" in n for n in report.notes)
    assert (tmp_path / "out" / "loss.png").exists()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "ActivationMonitor logged nothing" in md  # never logged: said in one line, not faked


def test_empty_directory_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoRunsError, match="metrics.csv"):
        build_report([tmp_path / "empty"], tmp_path / "out")
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 1
    assert "no runs found" in capsys.readouterr().err


def test_stability_map_from_summary(tmp_path):
    _write_run(tmp_path / "sweep" / "r0")
    (tmp_path / "sweep" / "summary.csv").write_text(
        "scheme,seed,final_loss,min_loss,diverged,divergence_step,recovered_spikes\n"
        "fp32,0,0.1,0.1,false,,0\nmxfp8_e4m3,0,nan,0.1,true,80,0\n"
    )
    report = build_report([tmp_path / "sweep"], tmp_path / "out")
    section = next(s for s in report.sections if s.title == "Stability map")
    assert section.image is not None and section.image.exists()
    assert report.rates == ["scheme=fp32: 0/1 (0.0–97.5 %)", "scheme=mxfp8_e4m3: 1/1 (2.5–100.0 %)"]
    assert "scheme=mxfp8\\_e4m3: 1/1 (2.5–100.0 %)" in (tmp_path / "out" / "report.md").read_text()


def test_single_run_headline_and_lead_time(tmp_path):
    """One user run that diverges: its headline says where (mxprobe.outcome on its own losses),
    the detector's lead time is counted from its first alarm, and the mechanism panels read
    that run."""
    run = tmp_path / "user" / "version_0"
    run.mkdir(parents=True)
    cols = ["step", "train/loss", "mx/norm_affine/ln/weight_saturation", "mx/grad_bias/fc/zeta"]
    with open(run / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for s in range(800):
            loss = 0.01 if s < 300 else 5.0  # diverges at 300 and never recovers
            mon = [0.01 * (s // 10), 0.2] if s % 10 == 0 else ["", ""]
            w.writerow([s, loss, *mon])
    (run / "events.jsonl").write_text(
        json.dumps({"step": 290, "kind": "spike", "rule": None, "values": {"loss": 0.05}}) + "\n"
    )
    report = build_report([tmp_path / "user"], tmp_path / "out")
    name = report.runs[0].name
    assert report.headlines == {name: "diverged at step 300"}
    assert report.lead_times == [
        f"{name}: detector 10 step(s) ahead of the divergence — first alarm (spike) at step 290, "
        "divergence at step 300"
    ]
    assert report.mechanism.run == name and report.mechanism.window == (200, 300)
    assert [(m, round(v, 9)) for m, v in report.mechanism.top_zeta()] == [("fc", 0.2)]
    drawn = [s for s in report.sections if s.image is not None and not s.details]
    assert [s.title.split(" —")[0] for s in drawn] == [
        "Loss",
        "γ block saturation per norm",
        "Gradient bias ζ per layer before the divergence",
    ]
    assert all(s.points > 0 for s in drawn)
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.index("diverged at step 300") < md.index("![Loss]")
