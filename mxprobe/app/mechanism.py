"""The mechanism before a divergence, from the monitors of one run: layer-norm γ block
saturation per norm (NormAffineMonitor, format in force) and ζ per layer (GradientBiasMonitor)
in the steps before the divergence, with the top layers named.

The run read is the first that diverged without any intervention and has MX readings (the
demo's ``mx``); failing that, the first with MX readings, over its whole length.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from mxprobe.app.headlines import RunOutcome
from mxprobe.names import (
    AGGREGATES,
    GRAD_BIAS,
    NORM_AFFINE,
    SET_SCHEME,
    TOTAL,
    TOTAL_LINEARS,
    TOTAL_NORMS,
)

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
    crossed: Series = dataclasses.field(default_factory=dict)
    below_one: Series = dataclasses.field(default_factory=dict)
    groups: Series = dataclasses.field(default_factory=dict)  # total_norms / total_linears ζ
    switches: list[int] = dataclasses.field(default_factory=list)  # steps of set_scheme events

    def _ranked(self, series: Series, total: bool = False) -> list[tuple[str, float]]:
        lo, hi = self.window
        means = {}
        for module, (steps, values) in series.items():
            inside = [v for s, v in zip(steps, values, strict=True) if lo <= s <= hi]
            inside = [v for v in inside if math.isfinite(v)]
            if inside:
                means[module] = sum(inside) / (1 if total else len(inside))
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
        if len(self.groups) == 2:
            means = dict(self._ranked(self.groups))
            lines.append(
                f"mean ζ over {when}: layer norms {means.get('total_norms', math.nan):.3g} vs "
                f"linear weights {means.get('total_linears', math.nan):.3g}"
            )
        if self.saturation:
            top = ", ".join(f"`{m}` {100 * v:.0f}%" for m, v in self.top_saturation())
            lines.append(f"largest mean γ block saturation over {when}: {top}")
        if self.below_one:
            top = ", ".join(f"`{m}` {100 * v:.0f}%" for m, v in self._ranked(self.below_one)[:TOP])
            lines.append(f"largest mean share of γ blocks with max below 1 over {when}: {top}")
        if self.crossed:
            ranked = self._ranked(self.crossed, total=True)
            top = ", ".join(f"`{m}` {v:.0f}" for m, v in ranked[:TOP])
            lines.append(
                f"γ blocks crossing a power of two between readings over {when}: "
                f"{sum(v for _, v in ranked):.0f} in all; most: {top}"
            )
        return lines


def _in_force(o: RunOutcome, stat: str) -> Series:
    """``mx/norm_affine/<norm>/<stat>`` at the readings where the norm's own MX format was in
    force (``in_force`` 1): a reference format's statistics never read as saturation."""
    flags = o.run.mx_metrics(NORM_AFFINE, "in_force")
    out = {}
    for module, (steps, values) in o.run.mx_metrics(NORM_AFFINE, stat).items():
        if module == TOTAL:
            continue
        # 0.1.0 records have no in_force where their stats were in force.
        force = dict(zip(*flags.get(module, ([], [])), strict=True))
        kept = [(s, v) for s, v in zip(steps, values, strict=True) if force.get(s, 1.0) == 1.0]
        if kept:
            out[module] = ([s for s, _ in kept], [v for _, v in kept])
    return out


def _below_one(o: RunOutcome) -> Series:
    """Share of γ blocks whose max is below 1 (the two lower binades of the probes)."""
    low = o.run.mx_metrics(NORM_AFFINE, "weight_blocks_amax_lt_half")
    mid = o.run.mx_metrics(NORM_AFFINE, "weight_blocks_amax_half_to_1")
    out = {}
    for module, (steps, values) in mid.items():
        below = dict(zip(*low.get(module, ([], [])), strict=True))
        out[module] = (steps, [v + below.get(s, 0.0) for s, v in zip(steps, values, strict=True)])
    return out


def _zeta(o: RunOutcome) -> Series:
    series = {m: s for m, s in o.run.mx_metrics(GRAD_BIAS, "zeta").items() if m not in AGGREGATES}
    return series if any(v != 0 for _, vals in series.values() for v in vals) else {}


def find_mechanism(outcomes: list[RunOutcome]) -> Mechanism | None:
    measured = [o for o in outcomes if _in_force(o, "weight_saturation") or _zeta(o)]
    if not measured:
        return None
    plain = [o for o in measured if o.diverged and not o.actions]
    o = (plain or [o for o in measured if o.diverged] or measured)[0]
    saturation, zeta = _in_force(o, "weight_saturation"), _zeta(o)
    if o.diverged:
        # For a run with rewinds, rank before the first action: later readings are of weights
        # the rules changed.
        hi = o.divergence_step if not o.actions else min(o.divergence_step, o.actions[0]["step"])
        window = (max(0, hi - WINDOW), hi)
    else:
        last = max((s[-1] for s, _ in (*saturation.values(), *zeta.values()) if s), default=0)
        window = (0, last)
    crossed = o.run.mx_metrics(NORM_AFFINE, "weight_blocks_crossed")
    divergence = o.divergence_step if o.diverged else None
    groups = {
        m: series
        for m, series in o.run.mx_metrics(GRAD_BIAS, "zeta").items()
        if m in (TOTAL_NORMS, TOTAL_LINEARS)
    }
    switches = sorted({e["step"] for e in o.actions if e["kind"] == SET_SCHEME})
    return Mechanism(
        o.name, divergence, window, saturation, zeta, crossed, _below_one(o), groups, switches
    )
