"""The base of mxprobe's periodic monitors and how a reading is published (to the run record,
where the detector and the rules read it, and to each logger at the step it measured)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from mxprobe.callbacks.recorder import RunRecorder

from mxprobe.checks import check_int


def is_monitored_step(step: int, every_n_steps: int) -> bool:
    return every_n_steps > 0 and step % every_n_steps == 0


def check_every_n_steps(every_n_steps: int) -> None:
    check_int(every_n_steps, "every_n_steps")


class PeriodicMonitor(Callback):
    """Base of the monitors that measure at every ``every_n_steps``-th optimizer step and
    publish readings under ``mx/<monitor>/`` (:func:`mxprobe.names.monitor_prefix`), with
    ``monitor`` one of :data:`mxprobe.names.MONITORS`."""

    monitor = ""
    every_n_steps = 1

    def measures(self, step: int) -> bool:
        """Whether optimizer step ``step`` is measured."""
        return is_monitored_step(step, self.every_n_steps)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Rules check at on_fit_start that their monitor is here, subclasses included.
        RunRecorder.of(trainer).monitors.add(self.monitor)


def publish(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    stats: dict[str, torch.Tensor | float],
    step: int | None = None,
) -> None:
    """Publish readings (already identical on every rank, so no ``sync_dist``) of the step
    they measured (default ``trainer.global_step``): to the run record, where the detector and
    the rules read them, and once to each logger at that step, whatever
    ``log_every_n_steps`` is.

    Lightning's ``log_dict(on_step=True)`` writes a value only on steps where
    ``(step + 1) % log_every_n_steps == 0`` and re-emits it on later logging rows until it is
    logged again (a reading at step 5 appears at step 9), so the values go straight to the
    loggers at their own step; ``trainer.callback_metrics`` gets them too, for the user's own
    code (``ModelCheckpoint(monitor=...)``), never read back by mxprobe.
    """
    if not stats:
        return
    values = {k: torch.as_tensor(v).detach().float() for k, v in stats.items()}
    pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1, logger=False)
    step = trainer.global_step if step is None else step
    plain = {k: v.item() for k, v in values.items()}
    RunRecorder.of(trainer).publish(step, plain)
    for logger in trainer.loggers:
        logger.log_metrics(plain, step=step)
