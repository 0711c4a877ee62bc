"""A tiny MX LightningModule for FSDP2: the pre-LN residual MLP of
:mod:`tests.helpers_lightning`, built, ``mxprobe.convert``-ed and ``fully_shard``-ed (each block,
then the root) in ``configure_model``, trained with Lightning's ``ModelParallelStrategy`` on CPU
processes (gloo)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

import mxprobe
from tests.helpers_lightning import Block, TinyMx, trainer


class TinyMxFsdp2(TinyMx):
    """:class:`TinyMx` whose model exists only from ``configure_model`` on, sharded by FSDP2.
    Every rank builds the same initial weights (seeded), then keeps its shard."""

    def __init__(self, d: int = 32, depth: int = 2, scheme: str = "mxfp8_e4m3", **kwargs) -> None:
        super().__init__(d=d, depth=depth, scheme=scheme, **kwargs)
        self.model = None
        self.depth, self.scheme = depth, scheme

    def configure_model(self) -> None:
        if self.model is not None:
            return
        torch.manual_seed(self.seed)
        model = nn.Sequential(*[Block(self.d) for _ in range(self.depth)])
        mxprobe.convert(model, self.scheme)
        mesh = self.device_mesh["data_parallel"]
        for block in model:
            fully_shard(block, mesh=mesh)
        self.model = fully_shard(model, mesh=mesh)


def fsdp2_trainer(root, max_steps: int, callbacks=(), **kwargs) -> pl.Trainer:
    """A quiet two-process CPU trainer under FSDP2 (``ModelParallelStrategy``, gloo)."""
    fsdp2 = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return trainer(root, max_steps, callbacks, devices=2, strategy=fsdp2, **kwargs)
