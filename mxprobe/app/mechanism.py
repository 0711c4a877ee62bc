"""The mechanism before a divergence, from the monitors of one run: layer-norm γ block
saturation per norm (NormAffineMonitor, format in force) and ζ per layer (GradientBiasMonitor)
in the steps before the divergence, with the top layers named.

The run read is the first that diverged without any intervention and has MX readings (the
demo's ``mx``); failing that, the first with MX readings, over its whole length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mxprobe.app.headlines import RunOutcome

# Readings in this many steps before the divergence count as "before it".
WINDOW = 100
TOP = 3

Series = dict[str, tuple[list[int], list[float]]]


@dataclass
class Mechanism:
    """One run's γ saturation and ζ series, the divergence step (None: did not diverge) and the
    window ``(first, last)`` of steps whose readings rank the layers."""

    run: str
    divergence: int | None
    window: tuple[int, int]
    saturation: Series
    zeta: Series

    def _ranked(self, series: Series) -> list[tuple[str, float]]:
        lo, hi = self.window
        means = {}
        for module, (steps, values) in series.items():
            inside = [v for s, v in zip(steps, values, strict=True) if lo <= s <= hi]
            inside = [v for v in inside if math.isfinite(v)]
            if inside:
                means[module] = sum(inside) / len(inside)
        return sorted(means.items(), key=lambda kv: -kv[1])

    def ranked_zeta(self) -> list[tuple[str, float]]:
        return self._ranked(self.zeta)

    def top_zeta(self) -> list[tuple[str, float]]:
        return self._ranked(self.zeta)[:TOP]

    def top_saturation(self) -> list[tuple[str, float]]:
        return self._ranked(self.saturation)[:TOP]

    def summary(self) -> list[str]:
        lo, hi = self.window
        when = (
            f"steps {lo}–{hi}, the readings before {self.run}'s divergence at step "
            f"{self.divergence}"
            if self.divergence is not None
            else f"steps {lo}–{hi} of {self.run} (it did not diverge)"
        )
        lines = []
        if self.zeta:
            top = ", ".join(f"`{m}` {v:.3g}" for m, v in self.top_zeta())
            lines.append(f"largest mean ζ over {when}: {top}")
        if self.saturation:
            top = ", ".join(f"`{m}` {100 * v:.2g}%" for m, v in self.top_saturation())
            lines.append(f"largest mean γ block saturation over {when}: {top}")
        return lines


def _in_force(o: RunOutcome, stat: str) -> Series:
    """``mx/norm_affine/<norm>/<stat>`` (the ``ref_`` statistics of a format not in force are
    other columns, never read here)."""
    return {m: s for m, s in o.run.mx_metrics("norm_affine", stat).items() if m != "total"}


def _zeta(o: RunOutcome) -> Series:
    series = {m: s for m, s in o.run.mx_metrics("grad_bias", "zeta").items() if m != "total"}
    return series if any(v != 0 for _, vals in series.values() for v in vals) else {}


def find_mechanism(outcomes: list[RunOutcome]) -> Mechanism | None:
    measured = [o for o in outcomes if _in_force(o, "weight_saturation") or _zeta(o)]
    if not measured:
        return None
    plain = [o for o in measured if o.diverged and not o.actions]
    o = (plain or [o for o in measured if o.diverged] or measured)[0]
    saturation, zeta = _in_force(o, "weight_saturation"), _zeta(o)
    if o.diverged:
        # Batch = step until the first rewind; for a run with rewinds, rank before the first one.
        end = o.divergence_batch if not o.actions else o.actions[0]["batch"]
        hi = o.global_step(end)
        window = (max(0, hi - WINDOW), hi)
    else:
        last = max((s[-1] for s, _ in (*saturation.values(), *zeta.values()) if s), default=0)
        window = (0, last)
    return Mechanism(o.name, o.divergence_batch if o.diverged else None, window, saturation, zeta)
