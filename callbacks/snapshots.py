"""Snapshots for rewinds: a LightningModule's and its optimizers' state copied to CPU every few
steps, the newest few kept, any of them restored exactly and in place.

Under FSDP2 the state of a sharded parameter (its weights, its Adam moments) is a ``DTensor``:
each rank copies only its own shard (:class:`LocalShard`, no communication, nothing gathered on
one rank) and restores it into the same sharding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn

from mxprobe.checks import check_int
from mxprobe.modules import is_sharded


@dataclasses.dataclass
class LocalShard:
    """This rank's shard of a ``DTensor``, copied to CPU, and what rebuilds the ``DTensor``."""

    local: torch.Tensor
    device: torch.device
    mesh: Any
    placements: tuple
    shape: torch.Size
    stride: tuple[int, ...]

    def to_dtensor(self) -> torch.Tensor:
        """A new ``DTensor`` on the original device holding a copy of the shard."""
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            self.local.to(self.device, copy=True),
            self.mesh,
            self.placements,
            shape=self.shape,
            stride=self.stride,
        )


def _cpu_tensor(t: torch.Tensor) -> torch.Tensor | LocalShard:
    if is_sharded(t):
        local = t.to_local().detach().to("cpu", copy=True)
        return LocalShard(local, t.device, t.device_mesh, tuple(t.placements), t.shape, t.stride())
    return t.detach().to("cpu", copy=True)


def _cpu_copy(obj: Any) -> Any:
    return apply_to_collection(obj, torch.Tensor, _cpu_tensor)


def _clone(obj: Any) -> Any:
    """A copy to load into live objects: tensors cloned, shards rebuilt as ``DTensor``."""
    return apply_to_collection(
        obj,
        (torch.Tensor, LocalShard),
        lambda t: t.to_dtensor() if isinstance(t, LocalShard) else t.clone(),
    )


def _has_shards(obj: Any) -> bool:
    found = []
    apply_to_collection(obj, LocalShard, found.append)
    return bool(found)


@dataclasses.dataclass
class Snapshot:
    """The state at the start of optimizer step ``step`` (before it trains)."""

    step: int
    model: dict[str, torch.Tensor | LocalShard]
    """The module's ``state_dict`` (weights and buffers), on CPU; this rank's shards under
    FSDP2."""
    optimizers: list[dict[str, Any]]
    """Every optimizer's ``state_dict`` (moments, step counts, param groups), on CPU; this
    rank's shards of sharded state under FSDP2."""


class SnapshotStore:
    """Takes a snapshot every ``every`` steps and keeps the newest ``keep``, oldest first.

    Args:
        every: optimizer steps between snapshots (a snapshot is due at multiples of it).
        keep: snapshots kept; taking one more drops the oldest.

    Raises:
        ValueError: for an ``every`` or ``keep`` that is not a positive integer.
    """

    def __init__(self, every: int, keep: int) -> None:
        check_int(every, "snapshot_every")
        check_int(keep, "keep_snapshots")
        self.every, self.keep = every, keep
        self.snapshots: list[Snapshot] = []

    def due(self, step: int) -> bool:
        """Whether a snapshot should be taken at ``step`` (and is not taken yet)."""
        if step % self.every:
            return False
        return not self.snapshots or self.snapshots[-1].step != step

    def take(self, module: nn.Module, optimizers: list[torch.optim.Optimizer], step: int) -> None:
        snapshot = Snapshot(
            step=step,
            model=_cpu_copy(module.state_dict()),
            optimizers=[_cpu_copy(o.state_dict()) for o in optimizers],
        )
        kept = self.snapshots[max(0, len(self.snapshots) + 1 - self.keep) :]
        self.snapshots = [*kept, snapshot]

    def rewind(
        self, module: nn.Module, optimizers: list[torch.optim.Optimizer], step: int, steps: int
    ) -> int | None:
        """Restore the newest snapshot taken at ``step - steps`` or before (the oldest one,
        with a warning, when none is that old) and drop the newer ones, which belong to the
        abandoned trajectory. Returns the restored snapshot's step, ``None`` (with a warning)
        when there is no snapshot."""
        if not self.snapshots:
            rank_zero_warn(f"rewind at step {step}: no snapshot to rewind to; only `then` applies")
            return None
        old_enough = [s for s in self.snapshots if s.step <= step - steps]
        snapshot = old_enough[-1] if old_enough else self.snapshots[0]
        if not old_enough:
            rank_zero_warn(
                f"rewind at step {step} by {steps} steps: the oldest snapshot kept is at "
                f"step {snapshot.step}; rewinding there (raise keep_snapshots or "
                "snapshot_every to reach further)"
            )
        self.restore(module, optimizers, snapshot)
        self.snapshots = [s for s in self.snapshots if s.step <= snapshot.step]
        return snapshot.step

    @staticmethod
    def restore(
        module: nn.Module, optimizers: list[torch.optim.Optimizer], snapshot: Snapshot
    ) -> None:
        """Put back the snapshot's weights, buffers and optimizer *state*; parameter-group
        hyperparameters (``lr``, betas...) keep their current values, so the LR schedule stays
        a function of ``global_step``."""
        # load_state_dict copies into the existing parameters, so DDP and optimizers keep them;
        # a sharded parameter takes back its own shard.
        model = _clone(snapshot.model) if _has_shards(snapshot.model) else snapshot.model
        module.load_state_dict(model)
        for optimizer, saved in zip(optimizers, snapshot.optimizers, strict=True):
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            # A clone: the optimizer would otherwise update the snapshot's tensors in place.
            optimizer.load_state_dict(_clone(saved))
            for group, h in zip(optimizer.param_groups, hyper, strict=True):
                group.update(h)

    def state_dict(self) -> list[dict[str, Any]]:
        # Not dataclasses.asdict: it would deep-copy every tensor.
        return [
            {"step": s.step, "model": s.model, "optimizers": s.optimizers} for s in self.snapshots
        ]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        self.snapshots = [Snapshot(**s) for s in state]
