"""Smoke check of the package as users install it (a built wheel in a clean venv), run from
outside the source tree by `make smoke`: the import resolves to the installed package, the
native kernel builds from the shipped C source, and a short Lightning run with the callbacks
converts, monitors and records."""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from mxprobe.callbacks import GradientBiasMonitor, LossSpikeDetector, NormAffineMonitor, read_record
from torch import nn

import mxprobe
from mxprobe import kernels

here = Path(mxprobe.__file__).resolve()
assert "site-packages" in here.parts, f"mxprobe imported from {here}, not the installed wheel"
state = kernels.status()
assert state.native, f"native kernel unavailable: {state.native_reason}"


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 1))

    def compute_loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def training_step(self, batch, batch_idx):
        return self.compute_loss(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 32, generator=g)
        return torch.utils.data.DataLoader(
            list(zip(x, x.sum(1, keepdim=True), strict=True)), batch_size=16
        )


torch.manual_seed(0)
module = Tiny()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    mxprobe.convert(module, "mxfp8_e4m3")
with tempfile.TemporaryDirectory() as root:
    pl.Trainer(
        max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
        callbacks=[GradientBiasMonitor(2), NormAffineMonitor(2), LossSpikeDetector()],
    ).fit(module)  # fmt: skip
    record = read_record(root)
    assert len(record.losses[0]) == 8 and any("grad_bias" in k for k in record.readings)
print(f"installed mxprobe OK: {here.parent}, native kernel: {state.summary()}", file=sys.stderr)
