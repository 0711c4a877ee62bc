"""mxprobe demo --quick end to end: three runs, the report, and a summary computed from them."""

import csv
import json

from mxprobe.app.cli import main


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "summary.csv", newline="") as fh:
        rows = {r["scheme"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"fp32", "mx", "mx_intervention"}
    for name, row in rows.items():
        # the summary is the runs' own numbers, not text written in advance
        assert abs(summary["final_loss"][name] - float(row["final_loss"])) < 1e-12
        assert str(summary["divergence_step"][name]) == row["divergence_step"]
        metrics = next((out / name).rglob("metrics.csv"))
        assert metrics.stat().st_size > 0
    assert rows["fp32"]["final_loss"] != rows["mx"]["final_loss"]  # MX really was emulated
    report = out / "report"
    assert (report / "report.md").exists() and (report / "report.html").exists()
    assert (report / "loss.png").exists()
    assert "mx/grad_bias" in next((out / "mx").rglob("metrics.csv")).read_text()
