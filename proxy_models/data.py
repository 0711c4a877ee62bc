"""Seeded synthetic data for the student-teacher proxy: no dataset is stored, batch ``i`` is a
pure function of (data seed, i).

``x ~ N(0, I)`` from a numpy generator seeded by (seed, stream, batch index); ``y = teacher(x) +
noise · N(0, 1)`` with the frozen teacher of ``mxprobe.models.student_teacher`` built from its own
seed. The training stream starts at batch ``global_step * accumulate_grad_batches`` when
``train_dataloader()`` is called; Lightning restores ``global_step`` from a checkpoint before it
builds the dataloaders, so a resumed run sees exactly the batches the uninterrupted run would
have seen, and two runs with the same seed see identical batches whatever their precision.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning.pytorch as pl
import numpy as np
import torch
from mxprobe.models.student_teacher import ACTIVATIONS, Teacher, build_teacher
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

_TRAIN_STREAM, _VAL_STREAM = 0, 1


def make_batch(
    teacher: Teacher,
    width: int,
    batch_size: int,
    seed: int,
    index: int,
    noise: float,
    stream: int = _TRAIN_STREAM,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``index`` of ``stream``: (x, teacher(x) + noise · N(0, 1)), each (batch, width)."""
    # numpy's SeedSequence mixes the three integers into independent streams; torch's CPU
    # generator would keep only the low 32 bits of one combined seed.
    rng = np.random.default_rng([seed, stream, index])
    x = torch.from_numpy(rng.standard_normal((batch_size, width), dtype=np.float32))
    eps = torch.from_numpy(rng.standard_normal((batch_size, width), dtype=np.float32))
    with torch.no_grad():
        y = teacher(x) + noise * eps
    return x, y


class TeacherStream(IterableDataset):
    """Yields the training batches ``start, start + 1, ...`` without end."""

    def __init__(
        self, teacher: Teacher, width: int, batch_size: int, seed: int, noise: float, start: int
    ) -> None:
        self.teacher, self.width, self.batch_size = teacher, width, batch_size
        self.seed, self.noise, self.start = seed, noise, start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = self.start
        while True:
            yield make_batch(
                self.teacher, self.width, self.batch_size, self.seed, index, self.noise
            )
            index += 1


class ProxyDataModule(pl.LightningDataModule):
    """The proxy's data: an endless seeded training stream and a fixed validation set.

    Args:
        width: model width d (linked to the model's in ``mxprobe proxy``).
        depth: number of teacher blocks (linked to the model's depth).
        activation: the teacher's φ (linked to the model's activation).
        batch_size: samples per training batch (the paper: 2048).
        seed: seed of the input and noise stream (>= 0).
        teacher_seed: seed of the teacher's weights.
        noise: std of the Gaussian label noise (the paper's code: 0.005; its text says 1e-3).
        teacher_gain: multiplies every teacher weight; 1 is the paper.
        val_batches: batches in the fixed validation set (drawn from a separate stream).

    Raises:
        ValueError: for an unknown activation or a non-positive size.

    Example::

        dm = ProxyDataModule(width=64, depth=4, batch_size=256, seed=0)
        dm.setup("fit")
        x, y = next(iter(dm.train_dataloader()))
    """

    def __init__(
        self,
        width: int = 512,
        depth: int = 4,
        activation: str = "gelu",
        batch_size: int = 2048,
        seed: int = 0,
        teacher_seed: int = 1234,
        noise: float = 0.005,
        teacher_gain: float = 1.0,
        val_batches: int = 4,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}"
            )
        if min(width, depth, batch_size) < 1 or min(val_batches, seed) < 0:
            raise ValueError(
                f"width, depth and batch_size must be positive and val_batches, seed >= 0, got "
                f"width={width} depth={depth} batch_size={batch_size} val_batches={val_batches} "
                f"seed={seed}"
            )
        self.save_hyperparameters()
        self.width, self.depth, self.activation = width, depth, activation
        self.batch_size, self.seed, self.teacher_seed = batch_size, seed, teacher_seed
        self.noise, self.teacher_gain, self.val_batches = noise, teacher_gain, val_batches
        self.teacher = build_teacher(width, depth, activation, teacher_seed, teacher_gain)
        self._val: TensorDataset | None = None

    def train_start_index(self) -> int:
        """Index of the first training batch: the batches the run has consumed so far."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        stream = TeacherStream(
            self.teacher,
            self.width,
            self.batch_size,
            self.seed,
            self.noise,
            self.train_start_index(),
        )
        # batch_size=None: the stream already yields whole batches.
        return DataLoader(stream, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        if self._val is None:
            batches = [
                make_batch(
                    self.teacher,
                    self.width,
                    self.batch_size,
                    self.seed,
                    j,
                    self.noise,
                    _VAL_STREAM,
                )
                for j in range(self.val_batches)
            ]
            xs = [x for x, _ in batches] or [torch.empty(0, self.width)]
            ys = [y for _, y in batches] or [torch.empty(0, self.width)]
            self._val = TensorDataset(torch.cat(xs), torch.cat(ys))
        return DataLoader(self._val, batch_size=self.batch_size, shuffle=False)
