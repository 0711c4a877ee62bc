"""A tiny MX LightningModule for the callback tests: pre-LN residual MLP student, fixed random
teacher, batches generated from their global step (so resume is exact), Adam.

Knobs for tests: ``return_dict`` (``training_step`` returns ``{"loss": ...}``), ``spike_at``
(multiply the loss of that step by ``spike_factor``, on ``spike_rank`` only when given),
``nan_at`` (make the loss of that step NaN) and ``schedule`` (a per-step LambdaLR decay). Under
DDP each rank draws its own batches (the seed includes the rank).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import mxprobe


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class StepBatches(IterableDataset):
    """Batch ``i`` (x, teacher(x)) drawn from a generator seeded with ``(seed, stream, i)``;
    the teacher depends on ``seed`` only."""

    def __init__(self, start: int, d: int, batch_size: int, seed: int = 0, stream: int = 0):
        self.start, self.d, self.batch_size = start, d, batch_size
        self.key = (seed * 1_000_003 + stream) * 1_000_003
        g = torch.Generator().manual_seed(seed)
        self.teacher = torch.randn(d, d, generator=g) / d**0.5

    def __iter__(self):
        i = self.start
        while True:
            g = torch.Generator().manual_seed(self.key + i)
            x = torch.randn(self.batch_size, self.d, generator=g)
            yield x, torch.tanh(x @ self.teacher) + 0.01 * torch.randn(x.shape, generator=g)
            i += 1


class TinyMx(pl.LightningModule):
    def __init__(
        self,
        d: int = 32,
        depth: int = 2,
        scheme: str = "mxfp8_e4m3",
        lr: float = 3e-3,
        batch_size: int = 32,
        seed: int = 0,
        return_dict: bool = False,
        spike_at: int | None = None,
        spike_factor: float = 1000.0,
        spike_rank: int | None = None,
        nan_at: int | None = None,
        schedule: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = nn.Sequential(*[Block(d) for _ in range(depth)])
        mxprobe.convert(self.model, scheme)
        self.d, self.lr, self.batch_size, self.seed = d, lr, batch_size, seed
        self.return_dict = return_dict
        self.spike_at, self.spike_factor, self.spike_rank = spike_at, spike_factor, spike_rank
        self.nan_at = nan_at
        self.schedule = schedule

    def mse(self, batch) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.model(x), y)

    def compute_loss(self, batch) -> torch.Tensor:
        return self.mse(batch)

    def training_step(self, batch, batch_idx):
        loss = self.mse(batch)
        step = self.trainer.global_step
        rank_ok = self.spike_rank is None or self.spike_rank == self.global_rank
        if step == self.spike_at and rank_ok:
            loss = loss * self.spike_factor
        if step == self.nan_at:
            loss = loss * float("nan")
        self.log("train/loss", loss)
        return {"loss": loss} if self.return_dict else loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        if not self.schedule:
            return optimizer
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + 0.1 * s))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}

    def train_dataloader(self):
        start = self.trainer.global_step
        data = StepBatches(start, self.d, self.batch_size, self.seed, stream=self.global_rank)
        return DataLoader(data, batch_size=None)


class NoComputeLoss(TinyMx):
    """The same module without the ``compute_loss`` protocol."""

    compute_loss = None


def trainer(root, max_steps: int, callbacks=(), **kwargs) -> pl.Trainer:
    """A quiet single-process CPU trainer writing under ``root``."""
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        default_root_dir=os.fspath(root),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    options.update(kwargs)
    return pl.Trainer(**options)


# Launcher variables a shell or CI may export (MASTER_PORT=29500 is common). Passed on, they would
# give every two-process run the same rendezvous port: two test sessions at once (or a leftover
# process) and the second's rank 0 fails with EADDRINUSE while its rank 1 waits out the timeout;
# LOCAL_RANK would make Lightning think the ranks were started for it. Without them, Lightning's
# launcher asks the OS for a free port (bind to port 0) for each run and hands it to the other rank.
LAUNCHER_VARS = (
    "MASTER_ADDR", "MASTER_PORT", "STANDALONE_PORT", "RANK", "LOCAL_RANK", "GROUP_RANK",
    "NODE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
)  # fmt: skip


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment without :data:`LAUNCHER_VARS`, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**env, **extra}


def run_ranks(script: str, out_dir, *args: str, timeout: int = 240) -> list[dict]:
    """Run ``script`` (a test module that writes ``rank{r}.json`` into ``out_dir`` from two
    Lightning processes; ``args`` follow ``out_dir`` on its command line) in a fresh
    interpreter; the two ranks' results.

    What the two ranks share is safe: the rendezvous port is a free one picked for this run
    (see :data:`LAUNCHER_VARS`), each rank writes only its own ``rank{r}.json`` and every other
    file under ``out_dir`` is written by rank 0 alone or by Lightning's coordinated checkpoint
    code, and each rank seeds its own generators."""
    root = Path(__file__).resolve().parents[1]
    env = subprocess_env(PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, script, str(out_dir), *args], env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in (0, 1)]
