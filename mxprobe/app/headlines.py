"""What happened in a run, in one line: the outcome (:mod:`mxprobe.outcome`, recomputed from the
run's recorded losses), what fired when and why, and the detector's lead time. Every step is an
optimizer step (``trainer.global_step``; a rewind restores weights, never the step count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mxprobe.app.runs import Run
from mxprobe.names import ACTION_KINDS, ALARM_KINDS, REWIND, SCALE_LR, SCALER_SKIP, SET_SCHEME
from mxprobe.outcome import DIVERGED, ENDED_UNSTABLE, RECOVERED, DivergenceTracker, judge

# A GradScaler's skipped step is the scaler working as designed, not an alarm about the run.
_ALARMS = tuple(k for k in ALARM_KINDS if k != SCALER_SKIP)


@dataclass
class RunOutcome:
    """A run's losses by step, the tracker that judged them and the rule it used."""

    run: Run
    steps: list[int]
    losses: list[float]
    tracker: DivergenceTracker
    rule: str
    events: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def outcome(self) -> str:
        return self.tracker.outcome

    @property
    def diverged(self) -> bool:
        return self.outcome == DIVERGED

    @property
    def divergence_step(self) -> int | None:
        return self.tracker.divergence_step

    @property
    def summary(self) -> dict:
        return self.tracker.summary()

    @property
    def alarms(self) -> list[dict]:
        return [e for e in self.events if e.get("kind") in _ALARMS]

    @property
    def actions(self) -> list[dict]:
        return [e for e in self.events if e.get("kind") in ACTION_KINDS]

    @property
    def trained_steps(self) -> int:
        return self.steps[-1] - self.steps[0] + 1 if self.steps else 0


def outcome(run: Run) -> RunOutcome | None:
    """The run's outcome, or None when it recorded no training loss."""
    steps, losses = run.losses
    if not steps:
        return None
    tracker, rule = judge(steps, losses, run.meta.get("model"))
    events = [e for e in run.events if isinstance(e, dict) and isinstance(e.get("step"), int)]
    return RunOutcome(run, steps, losses, tracker, rule, events)


def describe_action(event: dict) -> str:
    kind = event["kind"]
    if kind == REWIND:
        return f"rewound to step {event.get('rewound_to')}"
    if kind == SET_SCHEME:
        modules = event.get("modules") or "*"
        where = "every module" if modules == "*" else modules
        snap = ", snapped" if event.get("snap") else ""
        return f"{event.get('scheme')} on {where}{snap}"
    if kind == SCALE_LR:
        return f"lr x{event.get('factor')}"
    return kind


def _cause(first: dict) -> str:
    values = first.get("values") or {}
    trigger = first.get("trigger")
    if "spike_step" in values:
        return f"after the spike at step {values['spike_step']}"
    if trigger == "step":
        return "scheduled"
    if trigger == "metric":
        shown = ", ".join(f"{k} = {v:.3g}" for k, v in values.items() if isinstance(v, float))
        return f"on {shown}" if shown else "on its metric"
    return f"by its {trigger} trigger" if trigger else "by a rule"


def interventions(o: RunOutcome) -> list[str]:
    """One phrase per firing of a rule: ``rule R at step 370 (after the spike at step 369):
    rewound to step 300, then norm=bf16 on every module, snapped``."""
    phrases: list[str] = []
    actions = o.actions
    i = 0
    while i < len(actions):
        first = actions[i]
        group = [first]
        while i + len(group) < len(actions):
            nxt = actions[i + len(group)]
            if nxt["step"] != first["step"] or nxt.get("rule") != first.get("rule"):
                break
            group.append(nxt)
        i += len(group)
        what = ", then ".join(describe_action(e) for e in group)
        who = first.get("rule") or first["kind"]
        phrases.append(f"{who} at step {first['step']} ({_cause(first)}): {what}")
    return phrases


def _loss_words(o: RunOutcome) -> str:
    final, low = o.summary["final_loss"], o.summary["min_loss"]
    if not math.isfinite(final):
        return f"final loss {final}"
    if not math.isfinite(low) or low <= 0:
        return f"final loss {final:.3g}"
    return f"final loss {final:.3g} ({final / low:.1f}x its minimum {low:.3g})"


def _state(o: RunOutcome) -> str:
    """The outcome in words, by the rule that decided it."""
    t = o.tracker
    if o.outcome == DIVERGED:
        return f"diverged at step {o.divergence_step}"
    if o.outcome == ENDED_UNSTABLE:
        return f"ended unstable: loss above 10x its minimum since step {t.high_since}"
    spikes = f", {t.recovered_spikes} recovered spike(s)" if o.outcome == RECOVERED else ""
    return f"stable over {o.trained_steps} steps{spikes}"


def headline(o: RunOutcome, others: list[RunOutcome] = ()) -> str:
    """What happened, and nothing more: the outcome, then what the rules did and why.

    "rescued" needs evidence: another run in the report without any intervention that diverged
    no earlier than this run's first intervention, while this one did not diverge."""
    fired = interventions(o)
    state = _state(o)
    if o.diverged:
        # What the rules did, not that they tried to prevent it: a scheduled switch did not.
        return state + ("; rules acted: " + "; ".join(fired) if fired else "")
    if not fired:
        return f"{state}: {_loss_words(o)}"
    start = o.actions[0]["step"]
    baseline = [
        u for u in others if u is not o and u.diverged and not u.actions
        and u.divergence_step >= start - 1
    ]  # fmt: skip
    if baseline:
        state = (
            f"rescued ({baseline[0].name} diverged at step {baseline[0].divergence_step}), " + state
        )
    return "; ".join(fired) + f"; {state}: {_loss_words(o)}"


def lead_time(o: RunOutcome) -> int | None:
    """Steps from the detector's first alarm to the divergence (negative: the alarm came after
    it began); None when the run did not diverge or nothing alarmed."""
    if not o.diverged or not o.alarms:
        return None
    return o.divergence_step - o.alarms[0]["step"]


def lead_time_line(o: RunOutcome) -> str | None:
    lead = lead_time(o)
    if lead is None:
        return None
    alarm = o.alarms[0]
    where = (
        f"first alarm ({alarm['kind']}) at step {alarm['step']}, "
        f"divergence at step {o.divergence_step}"
    )
    if lead > 0:
        return f"{o.name}: detector {lead} step(s) ahead of the divergence — {where}"
    if lead == 0:
        return f"{o.name}: detector fired at the divergence's first step, no earlier — {where}"
    return f"{o.name}: detector fired {-lead} step(s) after the divergence began — {where}"
