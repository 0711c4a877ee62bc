"""Finding and reading runs: the run record (``mxprobe_record.sqlite``) of each run below a
directory, whatever the run's loggers were.

A directory tree with no record at all is read in the 0.1.0 layout (a Lightning CSVLogger's
``metrics.csv`` with mxprobe's ``events.jsonl`` beside it or above), with a note: its steps are
those the loggers wrote, which may skip steps and repeat history after a resume.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from mxprobe.events import EVENTS_FILE, MAX_LINE_NOTES, read_events
from mxprobe.names import parse_metric
from mxprobe.record import RecordError, find_records, read_record

Series = tuple[list[int], list[float]]
LEGACY_LOSS_COLUMNS = ("train/loss_step", "train/loss", "train_loss", "loss")


@dataclass
class Run:
    """One run: its training losses and readings by optimizer step, its events, what the
    record says of it (``meta``: model, scheme, ...) and what went wrong reading it."""

    name: str
    path: Path
    losses: Series = field(default_factory=lambda: ([], []))
    metrics: dict[str, Series] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def series(self, name: str) -> Series:
        return self.metrics.get(name, ([], []))

    def mx_metrics(self, monitor: str, stat: str) -> dict[str, Series]:
        """{module: series} of the ``mx/<monitor>/<module>/<stat>`` readings."""
        out = {}
        for name, series in self.metrics.items():
            parsed = parse_metric(name)
            if parsed and parsed[0] == monitor and parsed[2] == stat and series[0]:
                out[parsed[1]] = series
        return out

    @property
    def last_step(self) -> int | None:
        steps = [s[-1] for s, _ in (self.losses, *self.metrics.values()) if s]
        return max(steps) if steps else None


def _to_float(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_metrics(path: Path) -> tuple[dict[str, Series], list[str]]:
    """The columns of a CSVLogger ``metrics.csv`` as series by step (0.1.0 layout)."""
    notes: list[str] = []
    metrics: dict[str, Series] = {}
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
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


# The types of the event keys the report reads (docs/callbacks.md, Events); an event breaking
# them (a hand-edited or hostile record) is skipped with a note instead of stopping the report.
_NUMBER = (int, float, str)  # non-finite numbers are written as "nan", "inf", "-inf"
_EVENT_TYPES: dict[str, tuple[type, ...]] = {
    "step": (int,),
    "kind": (str,),
    "rule": (str, type(None)),
    "values": (dict, type(None)),
    "rewound_to": (int, type(None)),
    "scheme": (str, type(None)),
    "modules": (str, list, type(None)),
    "snap": (bool, type(None)),
    "factor": (*_NUMBER, type(None)),
}
_REQUIRED_EVENT_KEYS = ("step", "kind")


def _event_problem(event) -> str | None:
    """Why ``event`` cannot be reported, or None."""
    if not isinstance(event, dict):
        return f"a JSON {type(event).__name__}, not an object"
    for key in _REQUIRED_EVENT_KEYS:
        if key not in event:
            return f"no {key!r}"
    for key, types in _EVENT_TYPES.items():
        if key in event and not _has_type(event[key], types):
            value = event[key]
            return f"{key!r} is {type(value).__name__} {value!r:.40}, expected {_names(types)}"
    return None


def _has_type(value, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # an int to Python, but never a step or a factor
        return bool in types
    return isinstance(value, types)


def _names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def checked_events(events: list, where: str, notes: list[str]) -> list[dict]:
    """The events of ``events`` the report can read; each other one is a note naming
    ``where`` and its place (at most ``MAX_LINE_NOTES`` notes per source)."""
    kept, skipped = [], []
    for number, event in enumerate(events, start=1):
        problem = _event_problem(event)
        if problem is None:
            kept.append(event)
        else:
            skipped.append(f"{where} event {number}: {problem}, skipped")
    notes += skipped[:MAX_LINE_NOTES]
    if len(skipped) > MAX_LINE_NOTES:
        notes.append(f"{where}: {len(skipped) - MAX_LINE_NOTES} more bad events")
    return kept


def _name(run_dir: Path, root: Path) -> str:
    return str(run_dir.relative_to(root.parent)) if run_dir != root else root.name


def _recorded_runs(root: Path, notes: list[str]) -> list[Run]:
    runs = []
    for path in find_records(root):
        run = Run(name=_name(path.parent, root), path=path.parent)
        try:
            record = read_record(path)
        except RecordError as err:
            notes.append(str(err))
            continue
        continued = record.meta.get("continued_in")
        if isinstance(continued, str) and continued and Path(continued).exists():
            notes.append(f"{run.name}: resumed into {continued}, reported there")
            continue
        run.losses, run.metrics, run.meta = record.losses, record.readings, record.meta
        run.notes += record.notes
        run.events = checked_events(record.events, path.name, run.notes)
        if record.meta.get("continued_from"):
            run.notes.append(f"resumed from a checkpoint of {record.meta['continued_from']}")
        runs.append(run)
    return runs


def _legacy_runs(root: Path) -> list[Run]:
    runs = []
    for metrics_path in sorted(root.rglob("metrics.csv")):
        run = Run(name=_name(metrics_path.parent, root), path=metrics_path.parent)
        run.metrics, run.notes = read_metrics(metrics_path)
        run.notes.insert(
            0,
            "no run record: read in the 0.1.0 layout (metrics.csv + events.jsonl), so steps are "
            "those the loggers wrote",
        )
        loss = next((c for c in LEGACY_LOSS_COLUMNS if run.metrics.get(c, ([], []))[0]), None)
        if loss is not None:
            run.losses = run.metrics.pop(loss)
        events_path = _find_events(metrics_path.parent, root)
        if events_path is not None:
            run.events = checked_events(
                read_events(events_path, run.notes), events_path.name, run.notes
            )
        runs.append(run)
    return runs


def find_runs(paths: list[str | Path], notes: list[str] | None = None) -> list[Run]:
    """Every run under ``paths``: each run record below them; where a path holds no record,
    each ``metrics.csv`` (0.1.0 layout). Records that cannot be read are skipped and said in
    ``notes``."""
    notes = [] if notes is None else notes
    runs = []
    for root in map(Path, paths):
        found = _recorded_runs(root, notes)
        runs += found if found or find_records(root) else _legacy_runs(root)
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
