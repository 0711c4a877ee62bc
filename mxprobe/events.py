"""The ``events.jsonl`` format: one strict-JSON object per line (docs/callbacks.md lists the keys).

Core layer, so that reading a run (the report, the demo) needs no Lightning. The callbacks write
it through :class:`mxprobe.callbacks.events.EventLog`; everything reads it with
:func:`read_events`.
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


def event_line(event: dict[str, Any]) -> str:
    """One line of ``events.jsonl`` (no trailing newline)."""
    return json.dumps(plain(event), allow_nan=False)


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
