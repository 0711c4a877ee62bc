"""DDP and FSDP2 helpers the mxprobe callbacks share: sums and means over ranks, whole and
local views of sharded (``DTensor``) parameters, and the check that sharding is FSDP2's."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from mxprobe.modules import is_sharded


def reduce_sum(trainer: pl.Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks (unchanged on one process)."""
    if trainer.world_size > 1:
        return trainer.strategy.reduce(tensor.clone(), reduce_op="sum")
    return tensor


def reduce_mean(trainer: pl.Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` averaged over ranks (unchanged on one process)."""
    if trainer.world_size > 1:
        return trainer.strategy.reduce(tensor.clone(), reduce_op="mean")
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
