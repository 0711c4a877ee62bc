"""The run record's writer in a run: :class:`RunRecorder`, and the one place where the
callbacks publish readings and events and read them back.

Readings flow one way: a monitor publishes (:func:`mxprobe.callbacks.events.publish`, which
also sends them to the user's loggers); the recorder keeps the newest readings and events in
memory and writes them to the record (:mod:`mxprobe.record`); the detector and the rules read
from the recorder, never from ``trainer.callback_metrics``.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from mxprobe.callbacks.checkpoint_io import use_verified_checkpoints

from mxprobe.modules import MxModule
from mxprobe.names import ALARM_KINDS, monitor_of
from mxprobe.record import RECORD_FILE, RecordError, RecordWriter

_RECORDERS: weakref.WeakKeyDictionary[pl.Trainer, RunRecorder] = weakref.WeakKeyDictionary()


def loss_of(outputs: Any) -> torch.Tensor | None:
    """The loss a ``training_step`` returned (a tensor, or a mapping with ``"loss"``)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    if isinstance(outputs, Mapping) and isinstance(outputs.get("loss"), torch.Tensor):
        return outputs["loss"].detach()
    return None


def mean_loss(
    trainer: pl.Trainer, pl_module: pl.LightningModule, losses: list[torch.Tensor]
) -> float | None:
    """The mean of one optimizer step's micro-batch losses over micro-batches and, under DDP,
    ranks (one all-reduce; every rank must call it); ``None`` when there is none."""
    if trainer.world_size == 1:
        return sum(v.item() for v in losses) / len(losses) if losses else None
    device = pl_module.device
    total = torch.stack(losses).to(device).sum() if losses else torch.zeros((), device=device)
    count = torch.tensor(float(len(losses)), device=device)
    total, count = trainer.strategy.reduce(torch.stack([total, count]), reduce_op="sum").tolist()
    return total / count if count else None


def _schemes(pl_module: pl.LightningModule) -> str:
    """The distinct schemes of the MX modules (a module with none computes in full precision)."""
    schemes = {m.active_scheme() for m in pl_module.modules() if isinstance(m, MxModule)}
    found = sorted("full precision" if s is None else str(s) for s in schemes)
    return " | ".join(found) if found else "no MX module (full precision)"


class RunRecorder(Callback):
    r"""Keeps the run record: every training loss, monitor reading and event, by optimizer
    step, in ``mxprobe_record.sqlite`` in the run's directory (``trainer.log_dir`` when the
    trainer has a logger, else ``trainer.default_root_dir``), whatever the loggers are.

    Every mxprobe callback adds one to the trainer when there is none (:meth:`of`); add it
    yourself to record a run with no other mxprobe callback. Only global rank 0 writes; each
    optimizer step is one transaction, so a crash leaves the record as of the last step.

    Resume: a fit that starts at ``global_step`` k (from a checkpoint, or k = 0 for a run that
    starts over) first deletes what the record holds at steps ``>= k``, so every step is
    recorded once. A checkpoint carries the path of its record: resumed into another directory
    (a logger's new ``version_N``), the new record starts with the old one's rows before k, and
    the old record is marked as continued there (the report then shows one run).

    Checkpoints of a recorded run are atomic, carry a SHA-256 and load checked, with
    ``weights_only=True`` (:mod:`mxprobe.callbacks.checkpoint_io`), unless the strategy already
    has a checkpoint IO of the user's own.

    Raises:
        mxprobe.record.RecordError: when the record cannot be written (disk full, read-only),
            naming the file; the record keeps its last complete step.

    Example::

        trainer = Trainer(callbacks=[RunRecorder()], logger=False)
    """

    def __init__(self) -> None:
        self.path: str | None = None
        self._writer: RecordWriter | None = None
        self._restored_path: str | None = None
        self._latest: dict[str, tuple[int, float]] = {}
        self._measured: dict[str | None, int] = {}
        self._events: list[dict[str, Any]] = []
        self._losses: list[torch.Tensor] = []
        self._step = 0
        self._rewind_listeners: list[Callable[[int], None]] = []
        self._warned_no_loss = False
        self.monitors: set[str] = set()
        """The monitors (``grad_bias``, ``spikes``, ...) whose callbacks publish here."""

    @property
    def state_key(self) -> str:
        return type(self).__qualname__

    @classmethod
    def of(cls, trainer: pl.Trainer) -> RunRecorder:
        """The trainer's recorder: the one in its callbacks, else a new one added to them."""
        recorder = _RECORDERS.get(trainer)
        if recorder is None:
            found = [c for c in trainer.callbacks if isinstance(c, cls)]
            recorder = found[0] if found else cls()
            if not found:
                # Lightning calls the hooks over this list, so the new callback's own setup
                # and every later hook run as for one the user passed.
                trainer.callbacks.append(recorder)
            _RECORDERS[trainer] = recorder
        return recorder

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if RunRecorder.of(trainer) is not self:
            raise ValueError("a Trainer takes one RunRecorder; remove the second one")
        # Before Lightning restores a ckpt_path: it is then read through the checked IO too.
        use_verified_checkpoints(trainer)
        if stage != "fit":
            return  # validate/test/predict train nothing: no record
        # trainer.log_dir is a collective under DDP: every rank asks.
        log_dir = trainer.log_dir or trainer.default_root_dir
        self.path = os.path.join(log_dir, RECORD_FILE)
        if trainer.is_global_zero and self._writer is None:
            self._writer = RecordWriter(self.path)

    def on_rewind(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(step)`` whenever a rewind restores the weights of ``step`` (once,
        however many fits register it)."""
        if listener not in self._rewind_listeners:
            self._rewind_listeners.append(listener)

    def state_dict(self) -> dict[str, Any]:
        if self._writer is not None:
            self._writer.commit()  # the checkpoint never holds a step the record lacks
        return {"path": self.path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_path = state_dict.get("path")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = self._step = trainer.global_step
        self._losses = []
        self._latest, self._measured, self._events = {}, {}, []
        writer = self._writer
        if writer is None:
            return
        old = self._restored_path
        if step > 0 and old and os.path.abspath(old) != os.path.abspath(self.path):
            if writer.copy_from(old, step):
                marker = RecordWriter(old)
                marker.meta(continued_in=self.path)
                marker.close()
                writer.meta(continued_from=old)
            else:
                rank_zero_warn(
                    f"run record {old} (this checkpoint's) is gone: steps < {step} are "
                    f"missing from {self.path}"
                )
        writer.truncate(step)
        if step > 0:
            # What the uninterrupted run's first check at step k sees: step k-1's readings.
            readings, events = writer.rows_at(step - 1)
            self.publish(step - 1, readings, record=False)
            self._events = events
        writer.meta(model=type(pl_module).__name__, scheme=_schemes(pl_module))
        writer.meta(**({"resumed_at": step} if step else {"started": True}))
        writer.commit()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = loss_of(outputs)
        if loss is not None:
            self._losses.append(loss.float().reshape(()))
        if trainer.global_step == self._step:
            return  # accumulating: the optimizer has not stepped yet
        step, self._step = self._step, trainer.global_step
        loss_value = mean_loss(trainer, pl_module, self._losses)
        self._losses = []
        if loss_value is None and not self._warned_no_loss:
            self._warned_no_loss = True
            rank_zero_warn(
                f"RunRecorder: training_step returned no loss tensor at step {step} (neither a "
                "tensor nor a mapping with 'loss', e.g. manual optimization): the run record "
                "holds no training loss and the report cannot tell whether the run diverged"
            )
        if self._writer is not None:
            if loss_value is not None:
                self._writer.loss(step, loss_value)
            self._writer.meta(last_step=step)
            self._writer.commit()

    def publish(self, step: int, values: Mapping[str, float], record: bool = True) -> None:
        """Keep readings of optimizer step ``step`` (every rank) and record them (rank 0)."""
        for name, value in values.items():
            self._latest[name] = (step, value)
            self._measured[monitor_of(name)] = step
        if self._writer is not None and record:
            self._writer.readings(step, dict(values))

    def measured(self, monitor: str, step: int) -> bool:
        """Whether ``monitor`` (``grad_bias``, ...) published readings of ``step``."""
        return self._measured.get(monitor) == step

    def reading(self, name: str) -> tuple[int, float] | None:
        """``(step, value)`` of the newest reading named ``name``, or ``None``."""
        return self._latest.get(name)

    def reading_names(self) -> list[str]:
        return sorted(self._latest)

    def event(self, trainer: pl.Trainer, event: dict[str, Any]) -> None:
        """Keep an event (every rank) and record it (rank 0)."""
        self._events = [*self._events[-99:], event]
        if self._writer is not None and trainer.is_global_zero:
            self._writer.event(event)

    def alarms_at(self, step: int) -> list[dict[str, Any]]:
        """The detector's events (spike, nonfinite, scaler_skip) of optimizer step ``step``."""
        return [e for e in self._events if e["step"] == step and e["kind"] in ALARM_KINDS]

    def rewound(self, step: int) -> None:
        for listener in self._rewind_listeners:
            listener(step)

    def _close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        try:
            self._close()
        except RecordError:
            pass  # the exception being raised says more (often this very write failing)
