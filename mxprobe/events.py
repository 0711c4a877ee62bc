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


def read_events(path: str | os.PathLike, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """Every event of an ``events.jsonl`` file, in order.

    A line that is not JSON (a run killed while writing it) is skipped and said: appended to
    ``notes`` when given, else as a ``RuntimeWarning``.
    """
    events, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    if bad:
        note = f"{os.path.basename(path)}: skipped {bad} unreadable event line(s)"
        if notes is None:
            warnings.warn(f"{path}: {note}", RuntimeWarning, stacklevel=2)
        else:
            notes.append(note)
    return events
