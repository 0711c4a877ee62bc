"""The report's figures, one question each. Every function writes one PNG and returns ``(path,
points)``, the number of finite values drawn, or ``(None, 0)`` when the runs hold nothing to
draw (the report then leaves the panel out or says so)."""

from __future__ import annotations

import functools
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap, LogNorm  # noqa: E402

from mxprobe import atomic  # noqa: E402
from mxprobe.app.headlines import RunOutcome  # noqa: E402
from mxprobe.app.mechanism import Mechanism  # noqa: E402
from mxprobe.app.runs import Run, finite  # noqa: E402
from mxprobe.formats import mx_format  # noqa: E402
from mxprobe.names import (  # noqa: E402
    NONFINITE,
    REWIND,
    SCALE_LR,
    SCALER_SKIP,
    SET_SCHEME,
    SPIKE,
    TOTAL,
)
from mxprobe.outcome import DIVERGED, RECOVERED, STABLE  # noqa: E402

Figure = tuple[Path | None, int]

_EVENT_STYLE = {
    SPIKE: ("v", "C3"),
    NONFINITE: ("x", "black"),
    SCALER_SKIP: (".", "grey"),
    SET_SCHEME: ("*", "C2"),
    SCALE_LR: ("s", "C4"),
    REWIND: ("<", "C1"),
}


def _literal_text(draw):
    """Draw run-supplied text (run, module, rule and column names) as written: matplotlib would
    read a ``$`` in it as the start of mathtext, which can fail to parse and stop the report."""

    @functools.wraps(draw)
    def literal(*args, **kwargs):
        with plt.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return literal


def _save(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG, atomically (a full disk leaves the previous figure)."""
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic.write_bytes(path, png.getvalue())
    return path


@_literal_text
def loss_curves(outcomes: list[RunOutcome], path: Path) -> Figure:
    """Training loss against the optimizer step for every run (log scale), with its events and
    where its divergence begins."""
    if not outcomes:
        return None, 0
    fig, ax = plt.subplots(figsize=(10, 5.2))
    points = 0
    for i, o in enumerate(outcomes):
        color = f"C{i}"
        pos = [(s, v) for s, v in zip(o.steps, o.losses, strict=True) if math.isfinite(v) and v > 0]
        points += len(pos)
        if pos:
            ax.plot([s for s, _ in pos], [v for _, v in pos], lw=0.9, color=color, label=o.name)
        for ev in o.events:
            marker, ev_color = _EVENT_STYLE.get(ev.get("kind"), ("o", "grey"))
            y = _value_at(o, ev["step"])
            if ev.get("kind") == REWIND:
                ax.axvline(ev["step"], color=color, ls="--", lw=0.8, alpha=0.7)
                ax.annotate(
                    f"{o.name}: rewind to step {ev.get('rewound_to')}",
                    (ev["step"], 1.0),
                    xycoords=("data", "axes fraction"),
                    textcoords="offset points",
                    xytext=(3, -12 - 10 * (i % 3)),
                    fontsize=7,
                    color=color,
                )
            elif y is not None:
                ax.plot([ev["step"]], [y], marker=marker, color=ev_color, ms=7, ls="none")
        if o.diverged:
            y = _value_at(o, o.divergence_step)
            if y is not None:
                ax.plot([o.divergence_step], [y], marker="X", color=color, ms=11, mec="black")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (log scale)")
    ax.set_title("Loss per run (▼ detector alarm, ★ precision change, ■ lr change, X divergence)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path), points


def _value_at(o: RunOutcome, step: int) -> float | None:
    """The last finite positive loss at or before ``step``."""
    for s, v in zip(reversed(o.steps), reversed(o.losses), strict=True):
        if s <= step and math.isfinite(v) and v > 0:
            return v
    return None


def _mark_divergence(ax, mech: Mechanism) -> None:
    if mech.divergence is not None:
        ax.axvline(mech.divergence, color="C3", ls="--", lw=1)
        ax.annotate(
            f"divergence begins (step {mech.divergence})",
            (mech.divergence, 0.95),
            xycoords=("data", "axes fraction"),
            textcoords="offset points",
            xytext=(4, 0),
            fontsize=8,
            color="C3",
        )


@_literal_text
def norm_saturation(mech: Mechanism, path: Path) -> Figure:
    """Per norm: the fraction of γ elements clipped in their block, over steps."""
    if not mech.saturation:
        return None, 0
    fig, ax = plt.subplots(figsize=(10, 3.8))
    points = 0
    for module, (steps, values) in sorted(mech.saturation.items()):
        ax.plot(steps, [100 * v for v in values], lw=1.2, marker=".", ms=3, label=module)
        points += len(finite(values))
    _mark_divergence(ax, mech)
    for step in mech.switches:
        # A norm switched away from MX has no in-force saturation: its line ends here.
        ax.axvline(step, color="C2", ls=":", lw=1.2)
        ax.annotate(
            f"precision switch (step {step})",
            (step, 0.85),
            xycoords=("data", "axes fraction"),
            textcoords="offset points",
            xytext=(4, 0),
            fontsize=8,
            color="C2",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("γ elements saturated (%)")
    ax.set_title(f"{mech.run}: layer-norm γ block saturation (E4M3, in force)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    return _save(fig, path), points


@_literal_text
def zeta_heatmap(mech: Mechanism, path: Path) -> Figure:
    """A module × step heatmap of ζ over the mechanism's window (log colour scale)."""
    lo, hi = mech.window
    cells = {
        m: {s: v for s, v in zip(*series, strict=True) if lo <= s <= hi}
        for m, series in mech.zeta.items()
    }
    cells = {m: c for m, c in cells.items() if c}
    if not cells:
        return None, 0
    steps = sorted({s for c in cells.values() for s in c})
    ranked = [m for m, _ in mech.ranked_zeta()]
    modules = [m for m in ranked if m in cells] + sorted(set(cells) - set(ranked))
    grid = [[cells[m].get(s, math.nan) for s in steps] for m in modules]
    positive = [v for row in grid for v in row if math.isfinite(v) and v > 0]
    points = sum(math.isfinite(v) for row in grid for v in row)
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(modules) + 1.8))
    norm = LogNorm(min(positive), max(positive)) if positive else None
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm)
    ax.set_yticks(range(len(modules)), modules, fontsize=7)
    ticks = list(range(0, len(steps), max(1, len(steps) // 10)))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    ax.set_xlabel("optimizer step")
    ax.set_title(f"{mech.run}: ζ per module, steps {lo}–{hi} (largest mean ζ on top)")
    fig.colorbar(image, ax=ax, label="ζ (log)")
    return _save(fig, path), points


@_literal_text
def per_module_lines(
    runs: list[Run], monitor: str, stats: list[tuple[str, str]], path: Path, title: str
) -> Figure:
    """One panel per (stat, axis label): a line per module (and run) over steps."""
    panels = [
        (stat, label) for stat, label in stats if any(r.mx_metrics(monitor, stat) for r in runs)
    ]
    if not panels:
        return None, 0
    points = 0
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    for ax, (stat, label) in zip(axes[:, 0], panels, strict=True):
        for run in runs:
            for module, (steps, values) in sorted(run.mx_metrics(monitor, stat).items()):
                prefix = f"{run.name}: " if len(runs) > 1 else ""
                ax.plot(steps, values, lw=1, label=prefix + module)
                points += len(finite(values))
        ax.set_ylabel(label)
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    axes[0, 0].set_title(title)
    return _save(fig, path), points


@_literal_text
def total_curve(runs: list[Run], monitor: str, stat: str, path: Path, ylabel: str) -> Figure:
    series = [(r, r.mx_metrics(monitor, stat).get(TOTAL)) for r in runs]
    series = [(r, s) for r, s in series if s]
    if not series:
        return None, 0
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, (run, (steps, values)) in enumerate(series):
        ax.plot(steps, values, lw=1, color=f"C{i}", label=run.name)
    if all(v > 0 for _, (_, vals) in series for v in finite(vals)):
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} over training (all modules)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path), sum(len(finite(values)) for _, (_, values) in series)


# Worst last: a cell shows the worst outcome over its seeds.
OUTCOMES = (STABLE, RECOVERED, DIVERGED)


@_literal_text
def stability_map(rows: list[dict], x: str, y: str, path: Path) -> Figure:
    """Cells (x value × y value) coloured by the worst outcome over seeds, with counts."""
    if not rows or x not in rows[0] or y not in rows[0]:
        return None, 0
    xs = sorted({r[x] for r in rows}, key=_sort_key)
    ys = sorted({r[y] for r in rows}, key=_sort_key)
    grid = [[math.nan] * len(xs) for _ in ys]
    text = [[""] * len(xs) for _ in ys]
    for j, yv in enumerate(ys):
        for i, xv in enumerate(xs):
            cell = [r["outcome"] for r in rows if r[x] == xv and r[y] == yv]
            if not cell:
                continue
            grid[j][i] = max(OUTCOMES.index(o) for o in cell)
            text[j][i] = f"{cell.count('diverged')}/{len(cell)} div"
    fig, ax = plt.subplots(figsize=(1.3 * len(xs) + 3, 0.6 * len(ys) + 2))
    cmap = ListedColormap(["#4caf50", "#ffb300", "#e53935"])
    ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=2.5, aspect="auto")
    for j in range(len(ys)):
        for i in range(len(xs)):
            ax.text(i, j, text[j][i], ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(xs)), [str(v) for v in xs], rotation=30)
    ax.set_yticks(range(len(ys)), [str(v) for v in ys])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(3)]
    ax.legend(handles, OUTCOMES, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.set_title("Stability map (worst outcome over seeds; diverged/total)")
    return _save(fig, path), len(rows)


def _sort_key(v):
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def e4m3_code_gaps(path: Path) -> Figure:
    """Relative gap between consecutive E4M3 codes against code index (paper Figure 3, left),
    with the region a floor-scaled block max can reach but no code represents."""
    values = mx_format("fp8_e4m3").magnitudes()  # codes 0x00 .. 0x7E
    idx = list(range(1, len(values) - 1))
    gaps = [(values[i + 1] - values[i]) / values[i] for i in idx]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.semilogy(idx, gaps, ".-", color="C0", label="E4M3 (positive codes)")
    top = len(values) - 1
    ax.axvspan(top, top + 2, color="C3", alpha=0.25, label="overflow: scaled max in (448, 512)")
    ax.axvline(top, color="C3", lw=1)
    ax.set_xlabel("code index (0x01 .. 0x7E)")
    ax.set_ylabel("relative gap to next code, (v[i+1] - v[i]) / v[i]")
    ax.set_title("E4M3: relative spacing of consecutive codes")
    ax.legend(loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path), len(gaps)
