"""A study's tables and ``study.md``, rebuilt from its cell results after every cell.

- ``outcomes.csv``: one row per finished cell (:data:`OUTCOME_COLUMNS`).
- ``rates.csv``: each arm's divergence rate over its finished seeds, 95 % Clopper–Pearson.
- ``tests.csv``: each pair of arms, exact McNemar over the seeds both finished (paired: same
  initial weights and batches).
- ``study.md``: how far the study got, the rates, each arm without rules against ``fp32``, the
  rescue rates of the rule arms among the seeds where their base arm diverged (the first rule
  arm of a base against the others, its controls), the tests, and the detector scored (lead
  time, false alarms per 1000 steps on runs that never diverged).
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from mxprobe import atomic
from mxprobe.app.rates import RATE_COLUMNS, TEST_COLUMNS, arm_tests, rate, rates
from mxprobe.outcome import read_diverged

OUTCOME_COLUMNS = (
    "seed",
    "arm",
    "diverged",
    "divergence_step",
    "final_loss",
    "min_loss",
    "first_alarm_step",
    "alarms",
    "steps",
    "actions",
    "code",
    "derived_from",
)
REFERENCE_ARM = "fp32"
SIGNIFICANCE = 0.05


@dataclass
class Study:
    """The finished cells of a study: ``results[arm][seed]`` is a cell's result dict;
    ``bases[rule arm]`` its base arm (``mxprobe.app.study.base_arms``); ``about[arm]`` a line
    saying what the arm is."""

    arms: list[str]
    seeds: list[int]
    results: dict[str, dict[int, dict]]
    bases: dict[str, str] = field(default_factory=dict)
    about: dict[str, str] = field(default_factory=dict)

    def rule_arms(self, base: str) -> list[str]:
        """The rule arms of ``base``, in study order: the first is the rule, the rest its
        controls."""
        return [a for a in self.arms if self.bases.get(a) == base]

    @property
    def rescued_bases(self) -> list[str]:
        """The base arms that have rule arms, in study order."""
        return [a for a in self.arms if self.rule_arms(a)]

    def done(self, arm: str) -> list[int]:
        return sorted(self.results.get(arm, {}))

    @property
    def complete_seeds(self) -> list[int]:
        return [s for s in self.seeds if all(s in self.results.get(a, {}) for a in self.arms)]

    def diverged(self, arm: str, seeds: list[int] | None = None) -> dict[str, bool]:
        cells = self.results.get(arm, {})
        return {
            str(s): bool(cells[s]["diverged"])
            for s in (self.done(arm) if seeds is None else seeds)
            if s in cells
        }

    def outcome_rows(self) -> list[dict]:
        rows = []
        for seed in self.seeds:
            for arm in self.arms:
                r = self.results.get(arm, {}).get(seed)
                if r is not None:
                    rows.append(
                        {
                            **{k: r.get(k) for k in OUTCOME_COLUMNS},
                            "diverged": bool(r["diverged"]),
                            "alarms": _alarm_count(r),
                        }
                    )
        return rows


def _alarm_count(result: dict) -> int:
    """A cell's alarms (a cell result lists them; a row read back from outcomes.csv counts)."""
    if "alarm_steps" in result:
        return len(result["alarm_steps"] or [])
    return int(result.get("alarm_count") or 0)


def paired_tests(study: Study, seeds: list[int] | None = None) -> list[dict]:
    """Exact McNemar for every pair of arms over the seeds (of ``seeds``) both finished."""
    rows = []
    for i, a in enumerate(study.arms):
        for b in study.arms[i + 1 :]:
            common = [
                s
                for s in (study.seeds if seeds is None else seeds)
                if s in study.results.get(a, {}) and s in study.results.get(b, {})
            ]
            if common:
                rows += arm_tests({a: study.diverged(a, common), b: study.diverged(b, common)})
    return rows


def rescue(study: Study, base: str) -> tuple[list[int], list[tuple[str, object]], list[dict]]:
    """The seeds where the ``base`` arm diverged and each of its rule arms finished; each rule
    arm's *averted* rate there (did not diverge); the paired tests of the rule (the first rule
    arm) against each control (the others) on them."""
    rule_arms = study.rule_arms(base)
    seeds = [s for s, d in study.diverged(base).items() if d]
    seeds = [int(s) for s in seeds if all(int(s) in study.results.get(a, {}) for a in rule_arms)]
    averted = []
    for arm in rule_arms:
        kept = sum(not d for d in study.diverged(arm, seeds).values())
        averted.append((arm, rate(arm, kept, len(seeds))))
    tests = [
        t
        for t in paired_tests(study, seeds)
        if t["arm_a"] in rule_arms
        and t["arm_b"] in rule_arms
        and rule_arms[0] in (t["arm_a"], t["arm_b"])
    ]
    return seeds, averted, tests


def lead_times(study: Study, arm: str) -> tuple[list[int], int]:
    """Lead times (divergence step minus first alarm step; positive: the alarm came first) of
    the arm's diverged runs that alarmed, and how many diverged runs never alarmed."""
    leads, silent = [], 0
    for r in study.results.get(arm, {}).values():
        if r["diverged"]:
            if r.get("first_alarm_step") is None:
                silent += 1
            else:
                leads.append(int(r["divergence_step"]) - int(r["first_alarm_step"]))
    return sorted(leads), silent


def false_alarms(study: Study, arm: str) -> tuple[int, int, int, int]:
    """On the arm's runs that never diverged: runs, runs with an alarm, alarms, steps."""
    clean = [r for r in study.results.get(arm, {}).values() if not r["diverged"]]
    alarms = [_alarm_count(r) for r in clean]
    return len(clean), sum(a > 0 for a in alarms), sum(alarms), sum(int(r["steps"]) for r in clean)


def _distribution(values: list[int]) -> str:
    if not values:
        return "none"
    if len(values) < 4:
        return ", ".join(map(str, values))
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (
        f"median {q2:g}, quartiles {q1:g}–{q3:g}, range {values[0]}–{values[-1]}; "
        f"all: {', '.join(map(str, values))}"
    )


def _cell_words(r: dict | None) -> str:
    if r is None:
        return "…"
    if r["diverged"]:
        return f"**div {r['divergence_step']}**"
    return f"{r['final_loss']:.3g}"


def render(study: Study, command: str, machine: str) -> str:
    """``study.md``: every number computed from the cells."""
    complete = study.complete_seeds
    n = len(study.seeds)
    done = ", ".join(f"{a} {len(study.done(a))}/{n}" for a in study.arms)
    status = "complete" if len(complete) == n else "PARTIAL — still running or interrupted"
    lines = [
        "# Study: divergence over seeds, and the rules against their controls",
        "",
        f"**Status: {status}.** {len(complete)} of {n} seeds finished in all {len(study.arms)} "
        f"arms; cells finished per arm: {done}. Rates below are over each arm's finished seeds; "
        "tests and the rescue tables over seeds finished in the arms compared.",
        "",
        f"- Command (rerun it to resume; finished cells are skipped): `{command}`",
        f"- Machine: {machine}",
        f"- Code: {_codes(study)} (git commit of each finished cell; `+modified`: tracked "
        "sources differed from it; docs/study_running.md)",
        f"- Cells written from their base arm's cell, not retrained (no alarm there, so the "
        f"rules never fired and the run is the base run; docs/study_running.md): {_derived(study)}",
        "- Arms (configs/*.yaml here; a rule arm's base arm is the arm without rules of its "
        "scheme; arms without rules carry the rules' spike detector only, so their alarms are "
        "scored too):",
        *(f"  - `{a}`: {study.about.get(a, '?')}" + (
            f"; base arm `{study.bases[a]}`" if a in study.bases else "") for a in study.arms),
        "- Divergence: mxprobe.outcome (loss above 10× its running minimum for 500 consecutive "
        "steps, or non-finite); a run stops at its divergence.",
        "",
        "## Divergence rates (95 % Clopper–Pearson)",
        "",
        "| arm | diverged / finished (95 % CI) |",
        "|---|---|",
    ]  # fmt: skip
    arms = {a: study.diverged(a) for a in study.arms}
    lines += [f"| {r.arm} | {r.words()} |" for r in rates(arms)]
    rescues = {base: rescue(study, base) for base in study.rescued_bases}
    for base, (seeds, averted, tests) in rescues.items():
        lines += ["", f"## Rescue: seeds where `{base}` diverged", ""]
        if seeds:
            lines.append(
                f"Seeds where `{base}` diverged and its rule arms finished: {len(seeds)} "
                f"({', '.join(map(str, seeds))}). Share that did **not** diverge:"
            )
            lines += [""] + [f"- {arm}: {r.words()}" for arm, r in averted]
            lines += ["", "Rule against each control on these seeds (exact McNemar):"]
            lines += [""] + ([_test_words(t) for t in tests] or ["- no control arm"])
        else:
            lines.append(f"No seed yet where `{base}` diverged with its rule arms finished.")
    lines += ["", "## Paired tests over all seeds (exact McNemar; tests.csv)", ""]
    lines += [_test_words(t) for t in paired_tests(study)] or ["none yet"]
    lines += _detector_lines(study)
    lines += _verdict(study, rescues)
    lines += ["", "## Per seed", "", "final loss, or the divergence step", ""]
    lines += ["| seed | " + " | ".join(study.arms) + " |", "|---" * (len(study.arms) + 1) + "|"]
    for s in study.seeds:
        cells = [_cell_words(study.results.get(a, {}).get(s)) for a in study.arms]
        if any(c != "…" for c in cells):
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _derived(study: Study) -> str:
    counts = {
        a: sum(bool(r.get("derived_from")) for r in study.results.get(a, {}).values())
        for a in study.arms
    }
    return ", ".join(f"{a} {n}" for a, n in counts.items() if n) or "none"


def _codes(study: Study) -> str:
    codes = {str(r.get("code")) for cells in study.results.values() for r in cells.values()}
    return ", ".join(sorted(codes)) or "none yet"


def _test_words(t: dict) -> str:
    return (
        f"- {t['arm_a']} vs {t['arm_b']}: {t['a_diverged']} vs {t['b_diverged']} diverged of "
        f"{t['n']}; diverged in {t['arm_a']} only {t['a_only']}, in {t['arm_b']} only "
        f"{t['b_only']}; {t['test']} p = {t['p_value']:.4g}"
    )


def _detector_lines(study: Study) -> list[str]:
    lines = [
        "",
        "## The detector scored",
        "",
        "Lead time = divergence step − first alarm step (positive: the alarm came first). "
        "False alarms: alarms on runs that never diverged, per 1000 trained steps (in rule "
        "arms each alarm also fired the rule).",
        "",
        "| arm | diverged runs: lead times | diverged, no alarm | never-diverged runs "
        "(with an alarm) | alarms / 1000 steps on them |",
        "|---|---|---|---|---|",
    ]
    for arm in study.arms:
        leads, silent = lead_times(study, arm)
        runs, alarmed, alarms, steps = false_alarms(study, arm)
        per_k = f"{1000 * alarms / steps:.3g} ({alarms} in {steps} steps)" if steps else "–"
        lines.append(
            f"| {arm} | {_distribution(leads)} | {silent} | {runs} ({alarmed}) | {per_k} |"
        )
    return lines


def _verdict(study: Study, rescues: dict) -> list[str]:
    lines = ["", "## What holds and what does not (computed)", ""]
    reference = study.diverged(REFERENCE_ARM)
    plain = [a for a in study.arms if a != REFERENCE_ARM and a not in study.bases]
    for arm in plain if reference else []:
        pair = [t for t in paired_tests(study) if {t["arm_a"], t["arm_b"]} == {REFERENCE_ARM, arm}]
        if pair:
            t = pair[0]
            verdict = "differ" if t["p_value"] < SIGNIFICANCE else "do not differ detectably"
            lines.append(
                f"- {arm} and {REFERENCE_ARM} divergence rates {verdict} on these seeds "
                f"(p = {t['p_value']:.3g}, {t['n']} paired seeds)."
            )
    for base, (_, _, tests) in rescues.items():
        rule = study.rule_arms(base)[0]
        for t in tests:
            other = t["arm_b"] if t["arm_a"] == rule else t["arm_a"]
            significant = t["p_value"] < SIGNIFICANCE
            lines.append(
                f"- {rule} vs {other} on the seeds where {base} diverged: "
                + (
                    "a significant difference"
                    if significant
                    else "no significant difference at this n"
                )
                + f" (p = {t['p_value']:.3g})."
            )
        if not tests:
            lines.append(f"- Too few finished seeds to compare {rule} with its controls.")
    return lines


def load(
    out: Path,
    arms: list[str],
    seeds: list[int],
    finished,
    bases: dict[str, str] | None = None,
    about: dict[str, str] | None = None,
) -> Study:
    """The finished cells (``finished(cell)``) of ``arms`` × ``seeds`` under ``out``; ``bases``
    and ``about`` as :class:`Study` has them."""
    from mxprobe.app.study import Cell

    results: dict[str, dict[int, dict]] = {}
    for arm in arms:
        for seed in seeds:
            cell = Cell(out, arm, seed)
            if finished(cell):
                results.setdefault(arm, {})[seed] = cell.result()
    return Study(list(arms), list(seeds), results, dict(bases or {}), dict(about or {}))


def from_tables(folder: Path) -> tuple[Study, dict]:
    """A shipped study read back from its ``outcomes.csv`` and ``study.json`` (what the demo
    and the README quote)."""
    meta = json.loads((folder / "study.json").read_text())
    results: dict[str, dict[int, dict]] = {}
    with open(folder / "outcomes.csv", newline="") as f:
        for row in csv.DictReader(f):
            step = row["divergence_step"]
            results.setdefault(row["arm"], {})[int(row["seed"])] = {
                **row,
                "diverged": read_diverged(row["diverged"]),
                "divergence_step": int(step) if step else None,
                "final_loss": float(row["final_loss"]),
                "first_alarm_step": int(row["first_alarm_step"])
                if row["first_alarm_step"]
                else None,
                "alarm_count": int(row["alarms"] or 0),
            }
    return Study(meta["arms"], meta["seeds"], results, meta["bases"], meta["about"]), meta


def write(out: Path, study: Study, command: str, machine: str) -> None:
    """outcomes.csv, rates.csv, tests.csv, study.json (command, machine, seeds, arms, bases,
    about) and
    study.md in ``out`` (each atomically)."""
    meta = {"command": command, "machine": machine, "seeds": study.seeds, "arms": study.arms,
            "bases": study.bases, "about": study.about,
            "complete_seeds": len(study.complete_seeds),
            "finished": {a: len(study.done(a)) for a in study.arms}}  # fmt: skip
    atomic.write_text(out / "study.json", json.dumps(meta, indent=1))
    atomic.write_csv(out / "outcomes.csv", study.outcome_rows(), OUTCOME_COLUMNS)
    arms = {a: study.diverged(a) for a in study.arms}
    atomic.write_csv(out / "rates.csv", [r.row() for r in rates(arms)], RATE_COLUMNS)
    atomic.write_csv(out / "tests.csv", paired_tests(study), TEST_COLUMNS)
    atomic.write_text(out / "study.md", render(study, command, machine))
