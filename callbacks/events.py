"""The ``events.jsonl`` log and the helpers the mxprobe callbacks share.

Every event is one JSON object on one line of ``events.jsonl`` in the run's log directory
(``trainer.log_dir``; ``trainer.default_root_dir`` when there is no logger). Keys present in
every event:

- ``step``: ``trainer.global_step`` the event refers to. For a spike, the index of the
  optimizer step whose loss or gradient was anomalous; for an action, the index of the first
  optimizer step trained under it.
- ``kind``: ``spike``, ``nonfinite``, ``set_scheme``, ``rewind`` or ``scale_lr``.
- ``rule``: the name of the rule that acted, ``null`` for spikes.
- ``values``: the metric values behind the event (loss, score, metric value, ...).
- ``scheme_before`` / ``scheme_after``: ``{module: scheme string}`` of the modules an action
  changed (``null`` when it changed no scheme).
- ``source``: the callback that wrote it; ``time``: Unix time.

Actions add their own keys (``modules``, ``rewound_to``, ``lr_before``, ...). Non-finite
numbers are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` so that every line is
strict JSON. Only global rank 0 writes.
"""

from __future__ import annotations

import os
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from mxprobe.events import EVENTS_FILE, event_line


class EventLog:
    """Appends events to ``events.jsonl``; resolve the directory with :meth:`setup` on every
    rank (``trainer.log_dir`` is a collective under DDP)."""

    def __init__(self) -> None:
        self.path: str | None = None

    def setup(self, trainer: pl.Trainer) -> None:
        log_dir = trainer.log_dir or trainer.default_root_dir
        self.path = os.path.join(log_dir, EVENTS_FILE)

    def write(self, trainer: pl.Trainer, event: dict[str, Any]) -> None:
        if not trainer.is_global_zero or self.path is None:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        line = event_line({**event, "time": round(time.time(), 3)})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def is_monitored_step(step: int, every_n_steps: int) -> bool:
    return every_n_steps > 0 and step % every_n_steps == 0


class PeriodicMonitor(Callback):
    """Base of the monitors that measure at every ``every_n_steps``-th optimizer step and log
    under ``metric_prefix`` (how :class:`~mxprobe.callbacks.PrecisionIntervention` tells a fresh
    measurement from a stale value in ``trainer.callback_metrics``)."""

    metric_prefix = ""
    every_n_steps = 1

    def measures(self, step: int) -> bool:
        """Whether optimizer step ``step`` is measured."""
        return is_monitored_step(step, self.every_n_steps)


def reduce_sum(trainer: pl.Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks (unchanged on one process)."""
    if trainer.world_size > 1:
        return trainer.strategy.reduce(tensor.clone(), reduce_op="sum")
    return tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter or gradient sharded by FSDP2)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


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


def log_stats(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    stats: dict[str, torch.Tensor | float],
    step: int | None = None,
) -> None:
    """Log readings (already identical on every rank, so no ``sync_dist``) once, at the step
    they measured (default ``trainer.global_step``, the batch index Lightning's own on-step
    metrics carry), whatever ``log_every_n_steps`` is.

    Lightning's ``log_dict(on_step=True)`` writes a value only on steps where
    ``(step + 1) % log_every_n_steps == 0`` and re-emits it on later logging rows until it is
    logged again (a reading at step 5 appears at step 9 and a monitor's step-0 reading
    repeats on rows 1-4), so the values go straight to the loggers at their own step, and
    into ``trainer.callback_metrics`` (``logger=False``) for rules to read.
    """
    if not stats:
        return
    values = {k: torch.as_tensor(v).detach().float() for k, v in stats.items()}
    pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1, logger=False)
    step = trainer.global_step if step is None else step
    plain = {k: v.item() for k, v in values.items()}
    for logger in trainer.loggers:
        logger.log_metrics(plain, step=step)


def check_every_n_steps(every_n_steps: int) -> None:
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")


def scheme_strings(schemes: dict[str, Any]) -> dict[str, str | None]:
    """``{module: str(scheme)}`` (``None`` stays ``None``)."""
    return {name: None if s is None else str(s) for name, s in schemes.items()}
