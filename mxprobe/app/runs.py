"""Reading run directories: Lightning ``CSVLogger`` metrics and mxprobe's ``events.jsonl``.

A run is any directory holding a ``metrics.csv`` (searched recursively, so a CSVLogger's
``name/version_N`` layout works). Reading is forgiving: a run killed halfway has a truncated last
line, metrics are sparse (each logging call fills only its columns), and events may be missing.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from mxprobe.events import EVENTS_FILE, read_events

# mx/<monitor>/<module>/<stat>; module names contain dots, never slashes.
_MX_METRIC = re.compile(r"^mx/(?P<monitor>[^/]+)/(?P<module>.+)/(?P<stat>[^/]+)$")


@dataclass
class Run:
    """One run's metrics ({name: (steps, values)}), events, and what went wrong reading it."""

    name: str
    path: Path
    metrics: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def series(self, name: str) -> tuple[list[int], list[float]]:
        return self.metrics.get(name, ([], []))

    def loss_name(self) -> str | None:
        """The per-step training loss column (first match among the usual names)."""
        for candidate in ("train/loss_step", "train/loss", "train_loss", "loss"):
            if self.metrics.get(candidate, ([], []))[0]:
                return candidate
        return None

    def mx_metrics(self, monitor: str, stat: str) -> dict[str, tuple[list[int], list[float]]]:
        """{module: series} of the ``mx/<monitor>/<module>/<stat>`` metrics."""
        out = {}
        for name, series in self.metrics.items():
            m = _MX_METRIC.match(name)
            if m and m["monitor"] == monitor and m["stat"] == stat and series[0]:
                out[m["module"]] = series
        return out

    @property
    def last_step(self) -> int | None:
        steps = [s[-1] for s, _ in self.metrics.values() if s]
        return max(steps) if steps else None


def _to_float(text: str) -> float | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_metrics(path: Path) -> tuple[dict[str, tuple[list[int], list[float]]], list[str]]:
    notes: list[str] = []
    metrics: dict[str, tuple[list[int], list[float]]] = {}
    with open(path, newline="") as fh:
        lines = fh.read().splitlines()
    if not lines:
        return metrics, [f"{path} is empty"]
    reader = csv.DictReader(lines)
    header = reader.fieldnames or []
    bad = 0
    for row in reader:
        if None in row or any(v is None for v in row.values()):
            bad += 1  # truncated line from a killed run
            continue
        step = _to_float(row.get("step", ""))
        if step is None:
            continue
        for key in header:
            if key in ("step", "epoch"):
                continue
            value = _to_float(row[key])
            if value is None:
                continue
            steps, values = metrics.setdefault(key, ([], []))
            steps.append(int(step))
            values.append(value)
    if bad:
        notes.append(f"{path.name}: skipped {bad} incomplete line(s) (run killed while writing?)")
    return metrics, notes


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every run under ``paths`` (a directory with metrics.csv, searched recursively)."""
    runs = []
    for root in map(Path, paths):
        for metrics_path in sorted(root.rglob("metrics.csv")):
            run_dir = metrics_path.parent
            name = str(run_dir.relative_to(root.parent)) if run_dir != root else root.name
            run = Run(name=name, path=run_dir)
            run.metrics, run.notes = read_metrics(metrics_path)
            events_path = _find_events(run_dir, root)
            if events_path is not None:
                run.events = read_events(events_path, run.notes)
            runs.append(run)
    return runs


def _find_events(run_dir: Path, root: Path) -> Path | None:
    """events.jsonl next to metrics.csv, or in a parent up to ``root``."""
    current = run_dir
    while True:
        candidate = current / EVENTS_FILE
        if candidate.exists():
            return candidate
        if current == root or current.parent == current:
            return None
        current = current.parent


def finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]
