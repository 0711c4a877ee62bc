"""The outcome of a training run: the one definition of divergence that the proxy CLI, the
sweep, the demo, the benchmarks and the report share (docs/proxy.md, docs/report.md).

A step is *high* when its loss is non-finite or above ``factor`` (10) × the running minimum of the
loss so far. A run *diverges* at the first step of ``patience`` consecutive high steps (a
non-finite loss diverges at once); a shorter high episode that ends is a *recovered spike*.

Two rules set ``patience``: the **proxy rule** (500 steps, the shipped student-teacher proxy's
convention, docs/proxy.md) and the **general rule** for any other run, whose length is not the
proxy's: ``max(3, ceil(5 % of the steps the run trained))``. Under either, a high episode still
open at the end of the run but shorter than ``patience`` is *ended unstable*, never *stable*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DIVERGENCE_FACTOR = 10.0
DIVERGENCE_PATIENCE = 500
GENERAL_PATIENCE_SHARE = 0.05
GENERAL_PATIENCE_MIN = 3
PROXY_MODEL = "ProxyLitModule"

STABLE = "stable"
RECOVERED = "recovered spike"
DIVERGED = "diverged"
ENDED_UNSTABLE = "ended unstable"
OUTCOMES = (STABLE, RECOVERED, DIVERGED, ENDED_UNSTABLE)


@dataclass
class DivergenceTracker:
    """Online divergence test over a loss sequence (one value per training batch).

    ``update(loss)`` returns True once the run has diverged (see the module docstring).
    """

    factor: float = DIVERGENCE_FACTOR
    patience: int = DIVERGENCE_PATIENCE
    running_min: float = math.inf
    high_since: int | None = None
    divergence_step: int | None = None
    recovered_spikes: int = 0
    step: int = 0
    losses: list[float] = field(default_factory=list)

    def update(self, loss: float, step: int | None = None) -> bool:
        """Take the loss of ``step`` (default: the next step after the last one); steps may
        skip (a loss logged every few steps), and ``patience`` counts steps, not readings."""
        step = self.step if step is None else step
        self.step = step + 1
        self.losses.append(loss)
        if self.divergence_step is not None:
            return True
        finite = math.isfinite(loss)
        if finite and loss <= self.factor * self.running_min:
            if self.high_since is not None:
                self.recovered_spikes += 1
            self.high_since = None
        elif self.high_since is None:
            self.high_since = step
        if finite:
            self.running_min = min(self.running_min, loss)
        if not finite or (
            self.high_since is not None and step - self.high_since + 1 >= self.patience
        ):
            self.divergence_step = self.high_since
        return self.divergence_step is not None

    def summary(self) -> dict:
        """``final_loss``, ``min_loss`` (smallest finite loss), ``diverged`` (a bool),
        ``divergence_step`` (None when the run did not diverge) and ``recovered_spikes``."""
        finite = [v for v in self.losses if math.isfinite(v)]
        return {
            "final_loss": self.losses[-1] if self.losses else math.nan,
            "min_loss": min(finite) if finite else math.nan,
            "diverged": self.divergence_step is not None,
            "divergence_step": self.divergence_step,
            "recovered_spikes": self.recovered_spikes,
        }

    @property
    def outcome(self) -> str:
        """:data:`DIVERGED`, :data:`ENDED_UNSTABLE` (high at the end, not yet ``patience``
        steps), :data:`RECOVERED` or :data:`STABLE`."""
        if self.divergence_step is not None:
            return DIVERGED
        if self.high_since is not None:
            return ENDED_UNSTABLE
        return RECOVERED if self.recovered_spikes else STABLE


def divergence_summary(
    losses: list[float], factor: float = DIVERGENCE_FACTOR, patience: int = DIVERGENCE_PATIENCE
) -> dict:
    """The summary columns (without scheme and seed) of a finished loss sequence."""
    tracker = DivergenceTracker(factor, patience)
    for value in losses:
        tracker.update(value)
    return tracker.summary()


def read_diverged(value) -> bool | None:
    """A ``diverged`` value read back from a table or result file: a bool as is, the text
    ``true``/``false`` (any case) of a CSV table or of a result file written before summaries
    held bools as that bool, anything else (an unfinished run's empty field) None."""
    if isinstance(value, bool):
        return value
    return {"true": True, "false": False}.get(str(value).strip().lower())


def general_patience(steps_trained: int) -> int:
    """The general rule's patience for a run of ``steps_trained`` optimizer steps."""
    return max(GENERAL_PATIENCE_MIN, math.ceil(GENERAL_PATIENCE_SHARE * steps_trained))


def judge(
    steps: list[int], losses: list[float], model: str | None
) -> tuple[DivergenceTracker, str]:
    """The tracker fed a run's losses at their steps, and the rule it used (in words): the
    proxy rule for the shipped proxy (``model`` = ``ProxyLitModule``), else the general
    rule."""
    if model == PROXY_MODEL:
        patience, rule = DIVERGENCE_PATIENCE, f"proxy rule: {DIVERGENCE_PATIENCE} high steps"
    else:
        trained = steps[-1] - steps[0] + 1 if steps else 0
        patience = general_patience(trained)
        rule = f"general rule: {patience} high steps (5 % of {trained}, at least 3)"
    tracker = DivergenceTracker(DIVERGENCE_FACTOR, patience)
    for step, loss in zip(steps, losses, strict=True):
        tracker.update(loss, step)
    return tracker, rule
