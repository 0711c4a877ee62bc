"""mxprobe demo --quick end to end: three runs, the report, and a summary that agrees with the
losses each run logged itself (its CSVLogger metrics.csv), not with another file the demo wrote."""

import csv
import json

from mxprobe.app.cli import main
from mxprobe.outcome import divergence_summary

RUNS = ("fp32", "mx", "mx_intervention")


def logged_losses(run_dir) -> tuple[list[int], list[float]]:
    """(step, training loss) of every training batch, in the order the run logged them (after
    a rewind, steps repeat), from the run's own metrics.csv."""
    with open(next(run_dir.rglob("metrics.csv")), newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/loss")]
    return [int(r["step"]) for r in rows], [float(r["train/loss"]) for r in rows]


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    logged = {name: logged_losses(out / name) for name in RUNS}
    losses = {name: values for name, (_, values) in logged.items()}
    for name in RUNS:
        outcome = divergence_summary(losses[name])
        assert summary["final_loss"][name] == losses[name][-1]
        assert summary["divergence_step"][name] == outcome["divergence_step"]
        if outcome["diverged"] == "false":
            assert summary[name].startswith("stable")
        else:
            assert summary[name] == f"diverged at step {outcome['divergence_step']}"
    assert losses["fp32"] != losses["mx"]  # MX really was emulated
    for name in ("fp32", "mx"):  # no intervention: one loss per step from step 0
        steps = logged[name][0]
        assert steps == list(range(len(steps)))
        if summary["divergence_step"][name] == "":
            assert len(steps) == summary["steps"]  # a stable run trains every step
    if not summary["intervention_events"]:
        # No rule fired: the same scheme from the same weights on the same batches.
        assert losses["mx_intervention"] == losses["mx"]

    report = (out / "report" / "report.md").read_text()
    for name in RUNS:
        line = next(x for x in report.splitlines() if f"`{out.name}/{name}`" in x)
        assert f"{losses[name][-1]:.4g}" in line
    assert (out / "report" / "report.html").exists()
    assert (out / "report" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = next((out / "mx").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "mx/grad_bias/total/zeta" in header.split(",")
