"""docs/nvfp4.md quotes the format study (docs/nvfp4_study) as its tables compute it: every arm's
divergence rate, each format's paired test against fp32 and the rescue rates, so the page cannot
keep a stale number after the study is resumed or rerun."""

from __future__ import annotations

from pathlib import Path

from mxprobe.app import study_report
from mxprobe.app.rates import rates

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "docs/nvfp4_study"
PAGE = " ".join((ROOT / "docs/nvfp4.md").read_text().split())  # line breaks as spaces


def test_the_page_quotes_every_rate_of_the_study_table():
    study, meta = study_report.from_tables(STUDY)
    assert meta["complete_seeds"] == len(meta["seeds"]), "the quoted study is unfinished"
    assert f"{len(meta['seeds'])} seeds" in PAGE
    for r in rates({a: study.diverged(a) for a in study.arms}):
        assert f"| `{r.arm}` | {r.words()} |" in PAGE, r.arm


def test_the_page_quotes_each_test_against_fp32_and_the_rescue():
    study, _ = study_report.from_tables(STUDY)
    for t in study_report.paired_tests(study):
        if "fp32" in (t["arm_a"], t["arm_b"]):
            other = t["arm_b"] if t["arm_a"] == "fp32" else t["arm_a"]
            assert f"`{other}` against `fp32`: p = {t['p_value']:.3g}" in PAGE, other
    for base in study.rescued_bases:
        seeds, averted, tests = study_report.rescue(study, base)
        assert f"the {len(seeds)} seeds where `{base}` diverged" in PAGE
        for arm, r in averted:
            assert f"`{arm}` kept {r.words()} from diverging" in PAGE, arm
        for t in tests:
            assert f"`{t['arm_a']}` against `{t['arm_b']}` there: p = {t['p_value']:.3g}" in PAGE


def _percent(value: float, signed: bool) -> str:
    text = f"{100 * value:+.2f} %" if signed else f"{100 * value:.1f} %"
    return text.replace("-", "−")


def test_the_page_quotes_the_monitored_gamma_bias():
    """The γ table: means over the readings of docs/nvfp4_study/gamma.csv (benchmarks/
    nvfp4_monitored_gamma.py), early (steps 25–125) and all after step 0."""
    import csv
    import statistics

    with open(STUDY / "gamma.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) > 0]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        cells = []
        for window in (lambda s: s < 150, lambda s: True):
            picked = [r for r in rows if r["arm"] == arm and window(int(r["step"]))]
            mean = {k: statistics.fmean(float(r[k]) for r in picked) for k in picked[0]
                    if k.startswith("weight_")}  # fmt: skip
            cells += [_percent(mean["weight_rel_bias"], True),
                      _percent(mean["weight_saturation"], False),
                      f"{mean['weight_mean']:.3f}"]  # fmt: skip
        assert f"| `{arm}` | " + " | ".join(cells) + " |" in PAGE, (arm, cells)
