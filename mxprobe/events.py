"""Events as strict JSON (:func:`plain`), and the ``events.jsonl`` file of mxprobe 0.1.0 runs,
one object per line, which the report still reads (:func:`read_events`). Runs now keep their
events in the run record (:mod:`mxprobe.record`); docs/callbacks.md lists the keys.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

import torch

EVENTS_FILE = "events.jsonl"


def plain(value: Any) -> Any:
    """``value`` with tensors as numbers and non-finite floats as strings (strict JSON)."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


# Notes about one file's bad lines stop after this many: a file of garbage is one more note.
MAX_LINE_NOTES = 5


def read_events(path: str | os.PathLike, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """Every event of an ``events.jsonl`` file, in order.

    A line that is not UTF-8, not JSON (a run killed while writing it) or not a JSON object is
    skipped and said, naming the file and line: appended to ``notes`` when given, else as a
    ``RuntimeWarning``.
    """
    events, skipped = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                event = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skipped.append(f"line {number}: not UTF-8")
                continue
            except json.JSONDecodeError:
                skipped.append(f"line {number}: not JSON")
                continue
            if isinstance(event, dict):
                events.append(event)
            else:
                skipped.append(f"line {number}: a JSON {type(event).__name__}, not an object")
    name = os.path.basename(path)
    lines = [f"{name} {why}: unreadable event line, skipped" for why in skipped[:MAX_LINE_NOTES]]
    if len(skipped) > MAX_LINE_NOTES:
        lines.append(f"{name}: {len(skipped) - MAX_LINE_NOTES} more unreadable event lines")
    for note in lines:
        if notes is None:
            warnings.warn(f"{path}: {note}", RuntimeWarning, stacklevel=2)
        else:
            notes.append(note)
    return events
