"""The report's figures, one question each. Every function writes one PNG and returns its path,
or ``None`` when the runs hold nothing to draw (the report then says so)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from mxprobe.app.runs import Run, finite  # noqa: E402
from mxprobe.formats import mx_format  # noqa: E402

_EVENT_STYLE = {
    "spike": ("v", "C3"),
    "nonfinite": ("x", "black"),
    "intervention": ("*", "C2"),
    "set_scheme": ("*", "C2"),
    "scale_lr": ("s", "C4"),
    "rewind": ("<", "C1"),
}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _value_at(steps: list[int], values: list[float], step: int) -> float | None:
    best = None
    for s, v in zip(steps, values, strict=True):
        if s <= step and math.isfinite(v):
            best = v
    return best


def loss_curves(runs: list[Run], path: Path) -> Path | None:
    """Training loss against step for every run (log scale), events marked and labelled."""
    drawn = [(r, r.loss_name()) for r in runs if r.loss_name()]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (run, name) in enumerate(drawn):
        steps, values = run.series(name)
        pos = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v) and v > 0]
        if pos:
            ax.plot([s for s, _ in pos], [v for _, v in pos], lw=1, color=f"C{i}", label=run.name)
        for ev in run.events:
            kind = ev.get("kind", "event")
            step = ev.get("step")
            if step is None:
                continue
            marker, color = _EVENT_STYLE.get(kind, ("o", "grey"))
            y = _value_at(steps, values, step)
            if kind == "rewind":
                target = ev.get("rewound_to")
                ax.axvline(step, color=color, ls="--", lw=0.8)
                if target is not None:
                    ax.annotate(
                        "",
                        xy=(target, y or 1),
                        xytext=(step, y or 1),
                        arrowprops={"arrowstyle": "->", "color": color},
                    )
            if y is not None:
                ax.plot([step], [y], marker=marker, color=color, ms=8, ls="none")
                label = ev.get("rule") or kind
                ax.annotate(label, (step, y), textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (log scale)")
    ax.set_title("Loss per run (▼ spike, ★ intervention, ← rewind, × non-finite)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def module_heatmap(run: Run, monitor: str, stat: str, path: Path, title: str) -> Path | None:
    """A module × step heatmap of ``mx/<monitor>/<module>/<stat>`` (the total row excluded)."""
    per_module = {m: s for m, s in run.mx_metrics(monitor, stat).items() if m != "total"}
    if not per_module:
        return None
    steps = sorted({s for st, _ in per_module.values() for s in st})
    modules = sorted(per_module)
    grid = [[math.nan] * len(steps) for _ in modules]
    col = {s: i for i, s in enumerate(steps)}
    for r, m in enumerate(modules):
        for s, v in zip(*per_module[m], strict=True):
            grid[r][col[s]] = v
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(modules) + 2))
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(modules)), modules, fontsize=7)
    ticks = list(range(0, len(steps), max(1, len(steps) // 8)))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    ax.set_xlabel("optimizer step")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=stat)
    return _save(fig, path)


def per_module_lines(
    runs: list[Run], monitor: str, stats: list[tuple[str, str]], path: Path, title: str
) -> Path | None:
    """One panel per (stat, axis label): a line per module (and run) over steps."""
    panels = [
        (stat, label) for stat, label in stats if any(r.mx_metrics(monitor, stat) for r in runs)
    ]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    for ax, (stat, label) in zip(axes[:, 0], panels, strict=True):
        for run in runs:
            for module, (steps, values) in sorted(run.mx_metrics(monitor, stat).items()):
                prefix = f"{run.name}: " if len(runs) > 1 else ""
                ax.plot(steps, values, lw=1, label=prefix + module)
        ax.set_ylabel(label)
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    axes[0, 0].set_title(title)
    return _save(fig, path)


def total_curve(runs: list[Run], monitor: str, stat: str, path: Path, ylabel: str) -> Path | None:
    series = [(r, r.mx_metrics(monitor, stat).get("total")) for r in runs]
    series = [(r, s) for r, s in series if s]
    if not series:
        return None
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
    return _save(fig, path)


OUTCOMES = ("stable", "recovered spike", "diverged")


def stability_map(rows: list[dict], x: str, y: str, path: Path) -> Path | None:
    """Cells (x value × y value) coloured by the worst outcome over seeds, with counts."""
    if not rows or x not in rows[0] or y not in rows[0]:
        return None
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
    return _save(fig, path)


def _sort_key(v):
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def e4m3_code_gaps(path: Path) -> Path:
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
    return _save(fig, path)
