"""``mxprobe study``: arm configs, cells run in fresh processes, resume, and the tables computed
from an outcome stream known in advance (rates and intervals against scipy, McNemar by hand,
the detector's lead time and false alarms)."""

import copy
import csv
import json
from pathlib import Path

import pytest
import yaml
from scipy.stats import binomtest

from mxprobe.app import study as st
from mxprobe.app import study_report
from mxprobe.app.results import RunResult
from mxprobe.outcome import DivergenceTracker
from tests.proxy_tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 100
SEEDS = [1, 2, 3, 4, 5, 6]
# The outcome stream, known in advance: which seeds diverge in which arm. MX diverges on every
# seed (the loss jumps 100x at step 20, alarm at 15); the rule averts it on all but seed 1, the
# rewind-only control on seeds 5-6, the placebo on seed 6; FP32 never diverges, one false alarm.
DIVERGING = {
    "fp32": set(),
    "mx": set(SEEDS),
    "mx_intervention": {1},
    "mx_rewind_only": {1, 2, 3, 4},
    "mx_placebo": {1, 2, 3, 4, 5},
}
JUMP, ALARM = 20, 15


def synthetic_cell(job: st.CellJob) -> dict:
    """A worker that writes a cell from the known stream instead of training (module level, so
    the spawned workers import it)."""
    cell = job.cell
    tracker = DivergenceTracker(job.factor, job.patience)
    bad = cell.seed in DIVERGING[cell.arm]
    for step in range(STEPS):
        if tracker.update(100.0 if bad and step >= JUMP else 1.0 - step / 1000):
            break
    result = RunResult.of(tracker, wall_s=0.0, cpu_s=0.0)
    alarms = [ALARM] if bad or cell.arm.startswith("mx_") else []
    alarms += [30] if (cell.arm, cell.seed) == ("fp32", 1) else []
    return st.finish_cell(cell, result, alarms, len(alarms), list(job.extra))


def _configs(tmp_path: Path, max_steps: int = 2, lr: float = 1e-3) -> Path:
    """A tiny base config and its rule configs: the shipped rules' callbacks on the tiny base."""
    base = tiny_config(max_steps=max_steps, batch_size=8)
    base["model"]["lr"] = lr
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(base))
    for suffix in ("intervention", "rewind_only", "placebo"):
        shipped = yaml.safe_load((ROOT / f"examples/configs/proxy_cpu_{suffix}.yaml").read_text())
        rule = copy.deepcopy(base)
        rule["trainer"]["callbacks"] = shipped["trainer"]["callbacks"]
        (tmp_path / f"tiny_{suffix}.yaml").write_text(yaml.safe_dump(rule))
    return path


def _plan(tmp_path: Path, base: Path, seeds=SEEDS, extra=(), patience=10, arms=st.ARMS) -> st.Plan:
    configs = st.arm_configs(base, arms, st.rule_paths(base, arms))
    return st.Plan(configs, list(seeds), tmp_path / "study", list(extra), 10.0, patience,
                   "mxprobe study (test)", "test machine")  # fmt: skip


def _csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_seed_lists_and_arm_configs(tmp_path):
    assert st.parse_seeds("1-3,7,2") == [1, 2, 3, 7]
    with pytest.raises(ValueError, match="bad seed list"):
        st.parse_seeds("1-x")
    with pytest.raises(ValueError, match=r"unknown arm\(s\) \['bogus'\]"):
        st.arms_named(["mx", "bogus"])
    base = _configs(tmp_path)
    configs = _plan(tmp_path, base).configs
    assert list(configs) == list(st.ARMS)
    assert configs["fp32"]["model"]["scheme"] == "fp32"
    assert {configs[a]["model"]["scheme"] for a in list(st.ARMS)[1:]} == {"mxfp8_e4m3"}
    # fp32 and mx carry the rules' detector and nothing else; every arm has the same detector.
    detectors = [[c for c in configs[a]["trainer"]["callbacks"]
                  if c["class_path"] == st.DETECTOR_CLASS] for a in configs]  # fmt: skip
    assert all(d == detectors[0] and len(d) == 1 for d in detectors)
    assert len(configs["mx"]["trainer"]["callbacks"]) == 1
    # A rule config must be the base config plus callbacks.
    rule = yaml.safe_load((tmp_path / "tiny_placebo.yaml").read_text())
    rule["model"]["lr"] = 0.5
    (tmp_path / "tiny_placebo.yaml").write_text(yaml.safe_dump(rule))
    with pytest.raises(ValueError, match="differs from .* outside trainer.callbacks"):
        _plan(tmp_path, base)


def test_known_outcomes_give_the_rates_tests_and_detector_scores(tmp_path):
    plan = _plan(tmp_path, _configs(tmp_path))
    assert plan.run(0, lambda line: None, train=synthetic_cell) == 0
    out = plan.out
    rows = _csv(out / "outcomes.csv")
    assert len(rows) == len(SEEDS) * len(st.ARMS)
    assert list(rows[0])[:7] == ["seed", "arm", "diverged", "divergence_step", "final_loss",
                                 "min_loss", "first_alarm_step"]  # fmt: skip
    for row in rows:
        bad = int(row["seed"]) in DIVERGING[row["arm"]]
        assert row["diverged"] == str(bad).lower()
        assert row["divergence_step"] == (str(JUMP) if bad else "")
    rates = {r["arm"]: r for r in _csv(out / "rates.csv")}
    for arm, seeds in DIVERGING.items():
        ci = binomtest(len(seeds), len(SEEDS)).proportion_ci(method="exact")
        assert int(rates[arm]["diverged"]) == len(seeds) and int(rates[arm]["n"]) == len(SEEDS)
        assert float(rates[arm]["ci_low"]) == pytest.approx(ci.low, abs=1e-6)
        assert float(rates[arm]["ci_high"]) == pytest.approx(ci.high, abs=1e-6)
    tests = {(t["arm_a"], t["arm_b"]): t for t in _csv(out / "tests.csv")}
    mx_fp32 = tests[("fp32", "mx")]
    assert mx_fp32["test"].startswith("exact McNemar")
    assert (mx_fp32["a_only"], mx_fp32["b_only"]) == ("0", "6")
    assert float(mx_fp32["p_value"]) == pytest.approx(2 * 0.5**6)  # two-sided, 6 discordant
    rule_vs_rewind = tests[("mx_intervention", "mx_rewind_only")]
    assert (rule_vs_rewind["a_only"], rule_vs_rewind["b_only"]) == ("0", "3")
    assert float(rule_vs_rewind["p_value"]) == pytest.approx(0.25)

    found = study_report.load(out, plan.arms, plan.seeds, plan.finished, st.base_arms(plan.configs))
    seeds, averted, _ = study_report.rescue(found, "mx")
    assert seeds == SEEDS  # MX diverged on every seed
    assert {arm: (r.diverged, r.n) for arm, r in averted} == {
        "mx_intervention": (5, 6), "mx_rewind_only": (2, 6), "mx_placebo": (1, 6)
    }  # fmt: skip
    assert study_report.lead_times(found, "mx") == ([JUMP - ALARM] * 6, 0)
    assert study_report.false_alarms(found, "fp32") == (6, 1, 1, 6 * STEPS)
    text = (out / "study.md").read_text()
    assert "**Status: complete.** 6 of 6 seeds finished in all 5 arms" in text
    assert "| mx | 6/6 (54.1–100.0 %) |" in text
    assert "| fp32 | none | 0 | 6 (1) | 1.67 (1 in 600 steps) |" in text


def test_a_rerun_skips_finished_cells_and_redoes_broken_or_stale_ones(tmp_path):
    base = _configs(tmp_path)
    plan = _plan(tmp_path, base, seeds=[1, 2])
    plan.run(0, lambda line: None, train=synthetic_cell)
    before = {c: c.result_path.stat().st_mtime_ns for c in plan.cells}
    broken, gone = st.Cell(plan.out, "mx", 2), st.Cell(plan.out, "fp32", 1)
    broken.result_path.write_text('{"seed": 2, "arm": "mx", "diver')  # killed mid-write
    gone.result_path.unlink()
    partial = plan.out / "study.md"
    found = study_report.load(plan.out, plan.arms, plan.seeds, plan.finished)
    study_report.write(plan.out, found, "c", "m")
    assert "PARTIAL" in partial.read_text() and "fp32 1/2" in partial.read_text()
    log = []
    plan.run(0, log.append, train=synthetic_cell)
    assert log[0] == "10 cells, 8 finished, 2 to run with 0 job(s) -> " + str(plan.out)
    for cell, stamp in before.items():
        rerun = cell in (broken, gone)
        assert (cell.result_path.stat().st_mtime_ns != stamp) == rerun, cell
    # A changed setting for every cell makes every cell stale.
    stale = _plan(tmp_path, base, seeds=[1, 2], extra=["--trainer.max_steps=3"])
    log.clear()
    stale.run(0, log.append, train=synthetic_cell)
    assert log[0].startswith("10 cells, 0 finished, 10 to run")
    assert json.loads(broken.result_path.read_text())["diverged"] is True


@pytest.mark.slow
def test_real_cells_train_and_read_their_alarms_from_the_run_record(tmp_path):
    """One real tiny cell per arm, in spawned workers: at lr 1e30 the first Adam step makes every
    arm's loss non-finite (diverged at step 1, known in advance), and the detector's non-finite
    alarm at step 1 is read back from each run record."""
    plan = _plan(tmp_path, _configs(tmp_path, max_steps=10, lr=1e30), seeds=[1], patience=500)
    assert plan.run(2, lambda line: None) == 0
    rows = _csv(plan.out / "outcomes.csv")
    assert [r["arm"] for r in rows] == list(st.ARMS)
    for row in rows:
        assert (row["diverged"], row["divergence_step"], row["first_alarm_step"]) == (
            "true", "1", "1"
        ), row  # fmt: skip


def _train_losses(config: dict, run_dir: Path) -> list[float]:
    from mxprobe.app.training import TrainJob, train_run

    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    train_run(TrainJob(str(path), str(run_dir), threads=1))
    with open(next(run_dir.rglob("metrics.csv")), newline="") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
def test_the_demo_trains_the_study_cells_losses(tmp_path):
    """`mxprobe demo --seed S` can only reproduce the study's row for S if its runs (with their
    monitors and progress) train the same losses as the study's cells: MX, 60 steps, compiled."""
    from mxprobe.app.cli.demo import demo_config

    base = ROOT / "examples/configs/proxy_cpu.yaml"
    arms = st.arms_named(["mx", "mx_intervention"])
    study_mx = st.arm_configs(base, arms, st.rule_paths(base, arms))["mx"]
    study_mx["seed_everything"] = 3
    study_mx["model"]["seed"] = study_mx["data"]["seed"] = 3
    demo_mx = demo_config("mx", 3, quick=False, steps=60)
    study_mx["trainer"]["max_steps"] = 60
    assert _train_losses(demo_mx, tmp_path / "demo") == _train_losses(study_mx, tmp_path / "study")


def test_no_mx_divergence_means_no_rescue_rows():
    """With no seed where MX diverged, the rescue table and its tests are empty (not the tests
    over all seeds)."""
    cell = {"diverged": False, "divergence_step": None, "final_loss": 0.01, "steps": 10}
    bases = dict.fromkeys(["mx_intervention", "mx_rewind_only", "mx_placebo"], "mx")
    results = {a: {1: cell, 2: cell} for a in st.ARMS}
    found = study_report.Study(list(st.ARMS), [1, 2], results, bases)
    seeds, averted, tests = study_report.rescue(found, "mx")
    assert seeds == [] and tests == []
    assert [a for a, r in averted if r.n == 0] == list(bases)
    assert "Too few finished seeds to compare mx_intervention" in study_report.render(
        found, "c", "m"
    )


def test_the_demo_quotes_the_study_table(tmp_path):
    """demo_case reads its rates from a study's rates.csv/outcomes.csv: nothing typed."""
    from mxprobe.app import demo_case

    plan = _plan(tmp_path, _configs(tmp_path))
    plan.run(0, lambda line: None, train=synthetic_cell)
    rates, status = demo_case.study_rates(plan.out)
    by_what = {r.what: r for r in rates}
    mx = by_what["MX (mxfp8_e4m3) diverged"]
    ci = binomtest(6, 6).proportion_ci(method="exact")
    assert (mx.count, mx.total) == (6, 6) and mx.low == pytest.approx(ci.low, abs=1e-6)
    assert (by_what["FP32 diverged"].count, by_what["FP32 diverged"].total) == (0, 6)
    kept = {r.what.split(" kept")[0]: (r.count, r.total) for r in rates if " kept " in r.what}
    assert kept == {"the rule": (5, 6), "the rewind-only control": (2, 6),
                    "the placebo control": (1, 6)}  # fmt: skip
    assert "6 of 6 seeds finished in all 5 arms" in status and "still running" not in status
    assert demo_case.seed_in_study(2, plan.out) == (
        "seed 2 in the study: fp32 did not diverge, mx diverged at 20, mx_intervention did not "
        "diverge, mx_rewind_only diverged at 20, mx_placebo diverged at 20"
    )
    assert demo_case.study_rates(tmp_path / "nowhere")[0] == ()


# MX raises no alarm on seeds 3 and 4: there the rule arms' runs are the mx run.
QUIET_MX = {3, 4}


def cell_after_mx(job: st.CellJob) -> dict:
    """A worker for the derivation tests: a rule cell must start after its seed's mx cell and
    must never be trained on a seed where mx raised no alarm."""
    cell = job.cell
    if cell.arm.startswith("mx_"):
        mx = st.Cell(cell.out, "mx", cell.seed).result()
        assert mx is not None, f"{cell} started before its seed's mx cell finished"
        assert cell.seed not in QUIET_MX, f"{cell} trained, though mx raised no alarm"
    tracker = DivergenceTracker(job.factor, job.patience)
    for step in range(STEPS):
        tracker.update(1.0 - step / 1000)
    alarms = [] if cell.arm == "fp32" or cell.seed in QUIET_MX else [ALARM]
    result = RunResult.of(tracker, wall_s=1.0, cpu_s=1.0)
    return st.finish_cell(cell, result, alarms, 0, list(job.extra))


@pytest.mark.parametrize(
    "jobs",
    [0, pytest.param(2, marks=pytest.mark.slow)],  # 2: spawned processes, about 20 s
)
def test_rule_cells_of_a_seed_without_mx_alarm_are_the_mx_cell(tmp_path, jobs):
    plan = _plan(tmp_path, _configs(tmp_path), seeds=[1, 3, 4])
    assert plan.run(jobs, lambda line: None, train=cell_after_mx) == 0
    for seed in (3, 4):
        mx = st.Cell(plan.out, "mx", seed).result()
        for arm in ("mx_intervention", "mx_rewind_only", "mx_placebo"):
            cell = st.Cell(plan.out, arm, seed)
            derived = cell.result()
            assert derived["derived_from"] == "mx" and plan.finished(cell)
            same = ("diverged", "final_loss", "min_loss", "steps", "alarm_steps")
            assert {k: derived[k] for k in same} == {k: mx[k] for k in same}
    assert "derived_from" not in st.Cell(plan.out, "mx_placebo", 1).result()
    text = (plan.out / "study.md").read_text()
    assert "not retrained" in text and "mx_intervention 2, mx_rewind_only 2, mx_placebo 2" in text
    rows = [r for r in _csv(plan.out / "outcomes.csv") if r["derived_from"] == "mx"]
    assert len(rows) == 6


def test_only_rules_that_fire_on_alarms_let_a_cell_be_derived(tmp_path):
    configs = _plan(tmp_path, _configs(tmp_path)).configs
    assert st.acts_only_on_alarms(configs["mx_intervention"])
    assert not st.acts_only_on_alarms(configs["mx"])  # no rule: nothing to derive from
    at_step = copy.deepcopy(configs["mx_intervention"])
    for callback in at_step["trainer"]["callbacks"]:
        for rule in (callback.get("init_args") or {}).get("rules") or []:
            rule["trigger"] = {"kind": "step", "at": 5}
    assert not st.acts_only_on_alarms(at_step)


def test_arms_defined_by_name_scheme_and_rule():
    assert st.parse_arm("nv=nvfp4") == ("nv", st.Arm("nvfp4"))
    assert st.parse_arm("nv_full=nvfp4_recipe,norm=nvfp4+intervention") == (
        "nv_full", st.Arm("nvfp4_recipe,norm=nvfp4", "intervention")
    )  # fmt: skip
    for bad in ("nvfp4", "=nvfp4", "nv=", "nv=nvfp4+", "n v=nvfp4"):
        with pytest.raises(ValueError, match="bad arm"):
            st.parse_arm(bad)
    with pytest.raises(ValueError, match="unknown"):
        st.parse_arm("nv=nvfp5")
    with pytest.raises(ValueError, match="built in otherwise"):
        st.arms_named(["mx"], {"mx": st.Arm("nvfp4")})
    assert st.arms_named(["fp32"], {"fp32": st.Arm("fp32")}) == {"fp32": st.Arm("fp32")}
    with pytest.raises(ValueError, match="repeat"):
        st.arms_named(["fp32", "fp32"])


# A format study: the rule arm's base is the arm without rules of its scheme, not `mx`.
FORMAT_ARMS = {
    "fp32": st.Arm("fp32"),
    "e4m3": st.Arm("mxfp8_e4m3"),
    "nv": st.Arm("nvfp4"),
    "nv_rule": st.Arm("nvfp4", "intervention"),
    "nv_rewind": st.Arm("nvfp4", "rewind_only"),
}
NV_DIVERGING = {"fp32": set(), "e4m3": {2}, "nv": {1, 2}, "nv_rule": {2}, "nv_rewind": {1, 2}}


def format_cell(job: st.CellJob) -> dict:
    """Writes a cell of the format study from NV_DIVERGING; nv alarms on seeds 1-2 only, so
    the rule arms of seed 3 must be derived from nv's cell, never trained."""
    cell = job.cell
    assert not (cell.arm.startswith("nv_") and cell.seed == 3), f"{cell} trained"
    if cell.arm.startswith("nv_"):
        assert st.Cell(cell.out, "nv", cell.seed).result() is not None, "nv first"
    tracker = DivergenceTracker(job.factor, job.patience)
    bad = cell.seed in NV_DIVERGING[cell.arm]
    for step in range(STEPS):
        if tracker.update(100.0 if bad and step >= JUMP else 1.0 - step / 1000):
            break
    alarms = [ALARM] if cell.arm.startswith("nv") and cell.seed != 3 else []
    result = RunResult.of(tracker, wall_s=1.0, cpu_s=1.0)
    return st.finish_cell(cell, result, alarms, len(alarms), list(job.extra))


def test_a_format_study_derives_and_rescues_against_each_rule_arms_own_base(tmp_path):
    plan = _plan(tmp_path, _configs(tmp_path), seeds=[1, 2, 3], arms=FORMAT_ARMS)
    assert st.base_arms(plan.configs) == {"nv_rule": "nv", "nv_rewind": "nv"}
    assert plan.run(0, lambda line: None, train=format_cell) == 0
    for arm in ("nv_rule", "nv_rewind"):
        assert st.Cell(plan.out, arm, 3).result()["derived_from"] == "nv"
    study, meta = study_report.from_tables(plan.out)
    assert meta["bases"] == {"nv_rule": "nv", "nv_rewind": "nv"}
    assert study.rescued_bases == ["nv"]
    seeds, averted, tests = study_report.rescue(study, "nv")
    assert seeds == [1, 2]
    assert {a: (r.diverged, r.n) for a, r in averted} == {"nv_rule": (1, 2), "nv_rewind": (0, 2)}
    assert [(t["arm_a"], t["arm_b"]) for t in tests] == [("nv_rule", "nv_rewind")]
    text = (plan.out / "study.md").read_text()
    assert "## Rescue: seeds where `nv` diverged" in text and "where `mx`" not in text
    assert "- `nv_rule`: scheme `nvfp4`, rules spike-rewind-norms-bf16; base arm `nv`" in text
    assert "- nv and fp32 divergence rates do not differ detectably" in text
    assert "- e4m3 and fp32 divergence rates" in text and "- nv_rule and fp32" not in text
