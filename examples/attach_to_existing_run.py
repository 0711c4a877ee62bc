"""Attach mxprobe to a training run you already have: three additions.

``DenoisingMLP`` and ``make_data`` below are an ordinary Lightning project that knows nothing
about mxprobe. The three additions marked ``# mxprobe`` make the same run train under MX e4m3
emulation with the gradient-bias, LayerNorm-affine and activation monitors, a loss-spike
detector and an intervention rule:

    import mxprobe, mxprobe.callbacks as mxcb                  # 1. the packages
    mxprobe.convert(model, "mxfp8_e4m3")                       # 2. every Linear/LayerNorm/GELU
    Trainer(..., callbacks=[mxcb.GradientBiasMonitor(), ...])  # 3. monitors, intervention

Only ``GradientBiasMonitor`` asks something of the module: a ``compute_loss(batch)`` method (the
loss ``training_step`` returns, with no logging) to recompute the batch in full precision; this
module, like many, already has one. Trains 60 steps on CPU in seconds; prints the loss, the
monitor readings and the intervention from the run record (``mxprobe_record.sqlite`` in the
run's directory); ``mxprobe report DIR`` then reads it.

    python examples/attach_to_existing_run.py [--out DIR] [--steps N]

(On a machine shared with other jobs, OMP_NUM_THREADS=1 makes it several times faster: with
tensors this small, a second OpenMP thread mostly spin-waits for a busy core.)
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import mxprobe.callbacks as mxcb  # mxprobe (1/3)
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mxprobe  # mxprobe (1/3)


class DenoisingMLP(pl.LightningModule):
    """A user's model: recover a clean signal from a noisy one with a residual LayerNorm MLP."""

    def __init__(self, width: int = 64, depth: int = 3, lr: float = 3e-3):
        super().__init__()
        self.lr = lr
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width),
                nn.Linear(width, 4 * width),
                nn.GELU(),
                nn.Linear(4 * width, width),
            )
            for _ in range(depth)
        )
        self.head = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)

    def compute_loss(self, batch) -> torch.Tensor:
        noisy, clean = batch
        return F.mse_loss(self(noisy), clean)

    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.compute_loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def make_data(n: int, width: int = 64, seed: int = 0) -> TensorDataset:
    """Smooth random signals plus noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, width)
    freq = torch.rand(n, 3, 1, generator=g) * 6
    phase = torch.rand(n, 3, 1, generator=g) * 6.28
    clean = torch.sin(6.28 * freq * t + phase).sum(1)
    return TensorDataset(clean + 0.3 * torch.randn(n, width, generator=g), clean)


# A scheduled switch; a `{kind: spike}` trigger would react to a LossSpikeDetector event instead.
NORMS_TO_BF16_AT_40 = {
    "name": "norms-to-bf16",
    "trigger": {"kind": "step", "at": 40},
    "action": {"kind": "set_scheme", "scheme": "norm=bf16"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/attach_to_existing_run")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    pl.seed_everything(0)
    model = DenoisingMLP()
    train = DataLoader(make_data(4096, seed=0), batch_size=64, shuffle=True)
    val = DataLoader(make_data(512, seed=1), batch_size=128)

    mxprobe.convert(model, "mxfp8_e4m3")  # mxprobe (2/3)
    trainer = pl.Trainer(
        max_steps=args.steps,
        val_check_interval=30,
        accelerator="cpu",
        devices=1,
        logger=pl.loggers.CSVLogger(args.out, name=""),
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[  # mxprobe (3/3)
            mxcb.GradientBiasMonitor(every_n_steps=20),
            mxcb.NormAffineMonitor(every_n_steps=20),
            mxcb.ActivationMonitor(every_n_steps=20),
            mxcb.LossSpikeDetector(window=20),
            mxcb.PrecisionIntervention(rules=[NORMS_TO_BF16_AT_40]),
        ],
    )
    trainer.fit(model, train, val)

    record = mxcb.read_record(trainer.log_dir)
    steps, losses = record.losses
    print(f"\ntrain loss at step {steps[-1]}: {losses[-1]:.4f}")
    for name in ("mx/grad_bias/total/cosine", "mx/grad_bias/total/zeta"):
        at, values = record.readings[name]
        print(f"{name} at step {at[-1]}: {values[-1]:.4f}")
    for event in record.events:
        after = sorted(set(event["scheme_after"].values()))
        print(f"event at step {event['step']}: {event['kind']} by {event['rule']!r} -> {after}")
    print(f"run record: {record.path}")


if __name__ == "__main__":
    main()
