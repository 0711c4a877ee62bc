"""What happened in a run, in one line: the outcome (mxprobe.outcome's divergence, recomputed from
the run's own logged losses), what fired when, and the detector's lead time.

Steps are counted in training batches, in the order the run trained them: a rewind sends the
optimizer's global step back but not the batch count (the run goes on with fresh batches), so a
batch index is the x axis every run shares. Until a run's first rewind, batch = global step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mxprobe.app.runs import Run
from mxprobe.outcome import divergence_summary

ALARMS = ("spike", "nonfinite")
ACTIONS = ("rewind", "set_scheme", "scale_lr")


@dataclass
class RunOutcome:
    """A run's losses in training order, its divergence summary, and its events with ``batch``
    (the training batch each one belongs to) added."""

    run: Run
    steps: list[int]
    losses: list[float]
    summary: dict
    events: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def diverged(self) -> bool:
        return self.summary["diverged"] == "true"

    @property
    def divergence_batch(self) -> int | None:
        return self.summary["divergence_step"] if self.diverged else None

    @property
    def alarms(self) -> list[dict]:
        return [e for e in self.events if e.get("kind") in ALARMS]

    @property
    def actions(self) -> list[dict]:
        return [e for e in self.events if e.get("kind") in ACTIONS]

    def global_step(self, batch: int) -> int:
        return self.steps[batch] if 0 <= batch < len(self.steps) else batch


def _place_events(steps: list[int], events: list[dict]) -> list[dict]:
    """Each event with the training batch it belongs to.

    A rewind shows in the logged steps as a step that does not follow its predecessor; the n-th
    rewind event is the n-th such jump. Other events lie at the first batch at or after the
    previous event whose global step is theirs (the action the rewind applies is at the batch
    after the jump)."""
    jumps = [i for i in range(1, len(steps)) if steps[i] != steps[i - 1] + 1]
    placed, cursor, n_rewinds = [], 0, 0
    for event in events:
        step = event.get("step")
        if not isinstance(step, int):
            continue
        if event.get("kind") == "rewind" and n_rewinds < len(jumps):
            batch = jumps[n_rewinds]
            n_rewinds += 1
        else:
            batch = next((i for i in range(cursor, len(steps)) if steps[i] == step), None)
            if batch is None:  # logged after the last loss (or no loss logged at all)
                batch = len(steps) if step >= (steps[-1] if steps else 0) else step
        cursor = batch
        placed.append({**event, "batch": batch})
    return placed


def outcome(run: Run) -> RunOutcome | None:
    """The run's outcome, or None when it logged no training loss."""
    name = run.loss_name()
    if name is None:
        return None
    steps, losses = run.series(name)
    return RunOutcome(
        run, steps, losses, divergence_summary(losses), _place_events(steps, run.events)
    )


def _step_words(o: RunOutcome, batch: int) -> str:
    step = o.global_step(batch)
    return f"step {batch}" if step == batch else f"batch {batch} (global step {step})"


def describe_action(o: RunOutcome, event: dict) -> str:
    kind = event["kind"]
    if kind == "rewind":
        return f"rewound to step {event.get('rewound_to')}"
    if kind == "set_scheme":
        modules = event.get("modules") or "*"
        where = "every module" if modules == "*" else modules
        snap = ", snapped" if event.get("snap") else ""
        return f"{event.get('scheme')} on {where}{snap}"
    if kind == "scale_lr":
        return f"lr x{event.get('factor')}"
    return kind


def interventions(o: RunOutcome) -> list[str]:
    """One phrase per firing of a rule: ``step 369 spike -> rule R at step 370: rewound to step
    300, then norm=bf16 on every module, snapped``."""
    phrases: list[str] = []
    actions = o.actions
    i = 0
    while i < len(actions):
        first = actions[i]
        group = [first]
        while i + len(group) < len(actions) and actions[i + len(group)]["batch"] == first["batch"]:
            group.append(actions[i + len(group)])
        # The rewind's `then` is placed after the jump: same firing, next batch.
        if first["kind"] == "rewind" and i + 1 < len(actions):
            then = actions[i + 1]
            if then["kind"] != "rewind" and then["batch"] == first["batch"] and then not in group:
                group.append(then)
        i += len(group)
        spike = (first.get("values") or {}).get("spike_step")
        cause = f"spike at step {spike} -> " if spike is not None else ""
        what = ", then ".join(describe_action(o, e) for e in group)
        phrases.append(
            f"{cause}{first.get('rule') or first['kind']} at step {first['step']}: {what}"
        )
    return phrases


def _ratio(o: RunOutcome) -> str:
    final, low = o.summary["final_loss"], o.summary["min_loss"]
    if not math.isfinite(final):
        return f"final loss {final}"
    return f"final loss {final:.3g} ({final / low:.1f}x its minimum {low:.3g})"


def headline(o: RunOutcome, others: list[RunOutcome] = ()) -> str:
    """``stable ...`` / ``diverged at step N ...`` / ``rescued: ...``.

    "rescued" needs evidence: another run in the report without any intervention that diverged
    no earlier than this run's first intervention. Without one, a run the rules changed and that
    did not diverge is "stable after intervention"."""
    fired = interventions(o)
    if o.diverged:
        text = f"diverged at {_step_words(o, o.divergence_batch)}"
        if fired:
            text += " despite " + "; ".join(fired)
        return text
    if not fired:
        spikes = o.summary["recovered_spikes"]
        tail = f", {spikes} recovered spike(s)" if spikes else ""
        return f"stable over {len(o.losses)} steps: {_ratio(o)}{tail}"
    start = o.actions[0]["batch"]
    baseline = [
        u
        for u in others
        if u is not o and u.diverged and not u.actions and u.divergence_batch >= start - 1
    ]
    word = "rescued" if baseline else "stable after intervention"
    versus = (
        f" ({baseline[0].name} diverged at step {baseline[0].divergence_batch})" if baseline else ""
    )
    return f"{word}{versus}: " + "; ".join(fired) + f"; {_ratio(o)}"


def lead_time(o: RunOutcome) -> int | None:
    """Training batches from the detector's first alarm to the divergence (negative: the alarm
    came after it began); None when the run did not diverge or nothing alarmed."""
    if not o.diverged or not o.alarms:
        return None
    return o.divergence_batch - o.alarms[0]["batch"]


def lead_time_line(o: RunOutcome) -> str | None:
    lead = lead_time(o)
    if lead is None:
        return None
    alarm = o.alarms[0]
    where = (
        f"first alarm ({alarm['kind']}) at step {alarm['batch']}, "
        f"divergence at step {o.divergence_batch}"
    )
    if lead > 0:
        return f"{o.name}: detector {lead} step(s) ahead of the divergence — {where}"
    if lead == 0:
        return f"{o.name}: detector fired at the divergence's first step, no earlier — {where}"
    return f"{o.name}: detector fired {-lead} step(s) after the divergence began — {where}"
