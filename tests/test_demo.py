"""mxprobe demo --quick end to end: four runs, a summary that agrees with the losses each run
logged itself (its CSVLogger metrics.csv, recomputed with mxprobe.outcome), and a report whose
first screen has a headline per run and only panels with data."""

import csv
import html
import json
import re
from pathlib import Path

import pytest

from mxprobe import configs
from mxprobe.app import demo_case, study
from mxprobe.app.cli import main
from mxprobe.app.cli.demo import RUNS, demo_config
from mxprobe.outcome import divergence_summary


def logged_losses(run_dir) -> tuple[list[int], list[float]]:
    """(step, training loss) of every training batch, in the order the run logged them (after
    a rewind, steps repeat), from the run's own metrics.csv."""
    with open(next(run_dir.rglob("metrics.csv")), newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/loss")]
    return [int(r["step"]) for r in rows], [float(r["train/loss"]) for r in rows]


@pytest.mark.slow  # trains four runs; make smoke also runs it installed
def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    logged = {name: logged_losses(out / name) for name in RUNS}
    losses = {name: values for name, (_, values) in logged.items()}
    for name in RUNS:
        outcome = divergence_summary(losses[name])
        assert summary["final_loss"][name] == losses[name][-1]
        assert summary["divergence_step"][name] == outcome["divergence_step"]
        if not outcome["diverged"]:
            assert summary[name].startswith(("stable", "rescued"))
        else:
            assert summary[name].startswith(f"diverged at step {outcome['divergence_step']}")
    assert losses["fp32"] != losses["mx"]  # MX really was emulated
    for name in ("fp32", "mx"):  # no intervention: one loss per step from step 0
        steps = logged[name][0]
        assert steps == list(range(len(steps)))
        if summary["divergence_step"][name] is None:
            assert len(steps) == summary["steps"]  # a stable run trains every step
    for name in ("mx_intervention", "mx_rewind_only"):
        if not [e for e in summary["events"][name] if e["kind"] != "spike"]:
            # No rule fired: the same scheme from the same weights on the same batches.
            assert losses[name] == losses["mx"]

    # The layer-norm mechanism probes are logged by the MX run and summarised.
    with open(next((out / "mx").rglob("metrics.csv")), newline="") as fh:
        columns = next(csv.reader(fh))
    for probe in ("weight_blocks_amax_half_to_1", "weight_blocks_crossed", "weight_gap"):
        assert any(c.endswith(f"/{probe}") and "mx/norm_affine/" in c for c in columns), probe
    assert any(c.startswith("mx/grad_bias/total_norms/") for c in columns)
    assert any("layer norms" in line and "linear weights" in line for line in summary["mechanism"])
    assert any("crossing a power of two" in line for line in summary["mechanism"])

    # The printed summary: a line per run carrying the report's headline, and the framing.
    for name in RUNS:
        assert summary[name] in printed.out
    # The rates come from the shipped study table, with their intervals.
    assert demo_case.BASE_RATES, demo_case.STUDY_STATUS
    for rate in demo_case.BASE_RATES:
        assert rate.line() in printed.out
    with open(demo_case.STUDY_DIR / "rates.csv", newline="") as fh:
        mx = next(r for r in csv.DictReader(fh) if r["arm"] == "mx")
    if int(mx["n"]):
        assert f"{mx['diverged']} of {mx['n']} (" in printed.out
    assert "\r" not in printed.err  # not a TTY: plain progress lines, no carriage returns
    assert re.search(r"\[demo\] mx +step +\d+/\d+ +loss", printed.err)

    page = (out / "report" / "report.html").read_text()
    headlines = dict(
        re.findall(r"<li class='headline' data-run='([^']+)'>.*?</span>: (.*?)</li>", page)
    )
    assert {k: html.unescape(v) for k, v in headlines.items()} == {n: summary[n] for n in RUNS}
    assert page.index("class='headline'") < page.index("<img")  # the answer comes first
    sections = re.findall(
        r"<section data-title='([^']+)' data-points='(\d+)'>(.*?)</section>", page, re.S
    )
    titles = [t for t, _, _ in sections]
    assert titles[0] == "Loss"
    assert any(t.startswith("γ block saturation per norm — mx") for t in titles)
    assert any(t.startswith("Gradient bias ζ per layer") for t in titles)
    assert not any("fp32" in t for t in titles)  # ζ of an fp32 run carries nothing: left out
    for title, points, body in sections:
        assert "data:image/png;base64," in body and int(points) > 0, title
    # The mechanism names real layers of the model.
    assert re.search(r"largest mean ζ over .*<code>student\.blocks\.\d", page)
    assert demo_case.STUDY_STATUS in html.unescape(page) and "proxy_cpu.yaml" in page


def test_the_demo_trains_the_study_arms_of_the_shipped_configs():
    """The demo's runs are the study's arms of the shipped YAML configs (read from the files,
    as an installed mxprobe ships them), plus only what the demo adds: its seed, a validation
    at the end, its progress, and the monitors on the MX runs."""
    base = configs.path(demo_case.BASE_CONFIG)
    assert base == Path(__file__).resolve().parents[1] / "examples/configs/proxy_cpu.yaml"
    chosen = study.arms_named(list(RUNS))
    arms = study.arm_configs(base, chosen, study.rule_paths(base, chosen))
    added = {"mxprobe.app.progress.ProgressReporter", "mxprobe.callbacks.GradientBiasMonitor",
             "mxprobe.callbacks.NormAffineMonitor"}  # fmt: skip
    for name in RUNS:
        ours = demo_config(name, demo_case.SEED, quick=False)
        callbacks = ours["trainer"].pop("callbacks")
        assert [c for c in callbacks if c["class_path"] not in added] == arms[name]["trainer"][
            "callbacks"
        ], name
        monitored = {c["class_path"] for c in callbacks} & added
        assert len(monitored) == (1 if name == "fp32" else 3), name
        expected = arms[name]
        expected["trainer"].pop("callbacks")
        expected["seed_everything"] = demo_case.SEED
        expected["model"]["seed"] = expected["data"]["seed"] = demo_case.SEED
        expected["trainer"]["val_check_interval"] = expected["trainer"]["max_steps"]
        assert ours == expected, name
    quick = demo_config("mx", demo_case.SEED, quick=True)
    assert quick["trainer"]["max_steps"] == demo_case.QUICK_STEPS
    assert quick["model"]["width"] == demo_case.QUICK["model"]["width"]


@pytest.mark.slow
def test_demo_seed_reproduces_the_study_and_keeps_its_documented_outcomes(tmp_path):
    """The full demo (7-10 minutes on 2 shared cores) on its seed: each run diverges, or not,
    where the study's cells for that seed say (the published table is reproducible), and where
    demo_case.DEMO_OUTCOMES documents (the seed still shows what the demo says it shows)."""
    from mxprobe.app import study_report

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    got = {n: summary["divergence_step"][n] for n in RUNS}
    study, _ = study_report.from_tables(demo_case.STUDY_DIR)
    cells = {n: study.results.get(n, {}).get(demo_case.SEED) for n in RUNS}
    in_study = {n: c["divergence_step"] for n, c in cells.items() if c is not None}
    assert {n: got[n] for n in in_study} == in_study, "the demo does not reproduce the study"
    assert got == demo_case.DEMO_OUTCOMES, "the demo seed no longer shows its documented case"
