"""Helpers the mxprobe callbacks share: publishing readings and events, and DDP/FSDP2 tensors.

Events (format in docs/callbacks.md) and readings go to the run record
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
import torch
from lightning.pytorch.callbacks import Callback
from mxprobe.callbacks.recorder import RunRecorder

from mxprobe.checks import check_int
from mxprobe.modules import is_sharded


def record_event(trainer: pl.Trainer, event: dict[str, Any]) -> None:
    """Keep ``event`` in the run's recorder (rank 0 writes it), stamped with the time."""
    RunRecorder.of(trainer).event(trainer, {**event, "time": round(time.time(), 3)})


def is_monitored_step(step: int, every_n_steps: int) -> bool:
    return every_n_steps > 0 and step % every_n_steps == 0


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


def reduce_sum(trainer: pl.Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks (unchanged on one process)."""
    if trainer.world_size > 1:
        return trainer.strategy.reduce(tensor.clone(), reduce_op="sum")
    return tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole on every rank: a ``DTensor`` is gathered (a collective: every rank
    must call it in the same order), anything else is returned as is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (no communication); anything else as is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def check_fsdp2_sharding(module: torch.nn.Module, who: str) -> None:
    """Raise unless every sharded parameter of ``module`` is FSDP2's: ``Shard(0)`` on a 1-d
    mesh, so that the ranks' shards are disjoint and their sums add up to the full tensor.

    Raises:
        MisconfigurationException: naming the parameter and its placements (tensor
            parallelism, HSDP's replicated dimension).
    """
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    for name, p in module.named_parameters():
        if not is_sharded(p):
            continue
        from torch.distributed.tensor import Shard

        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise MisconfigurationException(
                f"{who} supports sharded parameters only as FSDP2 shards them (Shard(0) on a "
                f"1-d data-parallel mesh); {name!r} has placements {tuple(p.placements)} on a "
                f"{p.device_mesh.ndim}-d mesh (tensor parallelism and HSDP are not supported)"
            )


def reduce_mean(trainer: pl.Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` averaged over ranks (unchanged on one process)."""
    if trainer.world_size > 1:
        return trainer.strategy.reduce(tensor.clone(), reduce_op="mean")
    return tensor


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


def check_every_n_steps(every_n_steps: int) -> None:
    check_int(every_n_steps, "every_n_steps")


def scheme_strings(schemes: dict[str, Any]) -> dict[str, str | None]:
    """``{module: str(scheme)}`` (``None`` stays ``None``)."""
    return {name: None if s is None else str(s) for name, s in schemes.items()}
