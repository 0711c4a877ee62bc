"""The outcome of a training run: the one definition of divergence that the proxy CLI, the
sweep, the demo and the benchmarks share (docs/proxy.md).

A step is *high* when its loss is non-finite or above ``factor`` (10) × the running minimum of the
loss so far. A run *diverges* at the first step of ``patience`` (500) consecutive high steps (a
non-finite loss diverges at once); a shorter high episode that ends is a *recovered spike*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DIVERGENCE_FACTOR = 10.0
DIVERGENCE_PATIENCE = 500


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

    def update(self, loss: float) -> bool:
        step = self.step
        self.step += 1
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
        finite = [v for v in self.losses if math.isfinite(v)]
        return {
            "final_loss": self.losses[-1] if self.losses else math.nan,
            "min_loss": min(finite) if finite else math.nan,
            "diverged": "true" if self.divergence_step is not None else "false",
            "divergence_step": "" if self.divergence_step is None else self.divergence_step,
            "recovered_spikes": self.recovered_spikes,
        }


def divergence_summary(
    losses: list[float], factor: float = DIVERGENCE_FACTOR, patience: int = DIVERGENCE_PATIENCE
) -> dict:
    """The summary columns (without scheme and seed) of a finished loss sequence."""
    tracker = DivergenceTracker(factor, patience)
    for value in losses:
        tracker.update(value)
    return tracker.summary()
