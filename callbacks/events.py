"""Events: what the callbacks record when something happens (a spike, a rule's action).

Events (format in docs/callbacks.md) go to the run record
(:class:`~mxprobe.callbacks.recorder.RunRecorder`). Keys present in every event
(:data:`mxprobe.names.EVENT_FIELDS`):

- ``step``: ``trainer.global_step`` the event refers to. For a spike, the index of the
  optimizer step whose loss or gradient was anomalous; for an action, the index of the first
  optimizer step trained under it.
- ``kind``: one of :data:`mxprobe.names.EVENT_KINDS`.
- ``rule``: the name of the rule that acted, ``null`` for spikes.
- ``values``: the metric values behind the event (loss, score, metric value, ...).
- ``scheme_before`` / ``scheme_after``: ``{module: scheme string}`` of the modules an action
  changed (``null`` when it changed no scheme).
- ``source``: the callback that wrote it; ``time``: Unix time.

Actions add their own keys (:data:`mxprobe.names.ACTION_FIELDS`). Only global rank 0 writes.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from mxprobe.callbacks.recorder import RunRecorder


def record_event(trainer: pl.Trainer, event: dict[str, Any]) -> None:
    """Keep ``event`` in the run's recorder (rank 0 writes it), stamped with the time."""
    RunRecorder.of(trainer).event(trainer, {**event, "time": round(time.time(), 3)})


def scheme_strings(schemes: dict[str, Any]) -> dict[str, str | None]:
    """``{module: str(scheme)}`` (``None`` stays ``None``)."""
    return {name: None if s is None else str(s) for name, s in schemes.items()}
