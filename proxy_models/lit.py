"""LightningModule of the student-teacher proxy: MSE, Adam, MX emulation via mxprobe.convert."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from mxprobe.callbacks.precision_state import load_schemes, save_schemes
from mxprobe.models.checks import check_adam
from mxprobe.models.student_teacher import ProxyConfig, build_student

import mxprobe
from mxprobe.scheme import PrecisionScheme, parse_scheme

SCHEDULES = ("constant", "cosine")


class ProxyLitModule(pl.LightningModule):
    """The paper's proxy student trained with MSE against the data module's teacher targets.

    Args:
        depth: residual blocks of the student.
        width: model width d.
        activation: φ, one of ``gelu``, ``swiglu``, ``relu``, ``linear``.
        layer_norm: pre-LN in every block (``False``: the paper's no-LN ablation).
        init: ``default`` (PyTorch's init, the paper) or ``custom`` (see ``ProxyConfig``).
        seed: seed of the student's initial weights; runs with the same seed start from the same
            weights whatever their scheme.
        lr: Adam learning rate (the paper: 6e-4).
        betas: Adam betas (the paper: 0.9, 0.999).
        eps: Adam epsilon (the paper: 1e-8).
        schedule: ``constant`` (the paper) or ``cosine`` (decays to ``min_lr_ratio`` · lr at
            ``trainer.max_steps``).
        warmup_steps: linear warmup from 0 (0 = none, the paper).
        min_lr_ratio: final lr of the cosine schedule as a fraction of ``lr``.
        scheme: precision scheme (preset or string form, see ``mxprobe.scheme``).
        overrides: per-layer overrides ``{glob on module name: scheme or partial}``, e.g.
            ``{"blocks.*.ln": "norm=bf16"}``.
        compiled: run the student through ``mxprobe.compile_model`` (torch.compile with exact
            emulated roundings). An MX step at d=64 then costs ~2x an fp32 step instead of
            ~6x, after a first compilation of ~20-60 s (cached on disk); a precision switch
            recompiles once per new scheme. Results equal eager up to the order of reductions.

    Gradient clipping is off unless the Trainer's ``gradient_clip_val`` asks for it (the paper
    does not clip). Modules whose resolved scheme is all-fp32 run PyTorch's own forward
    (``mx_scheme = None``), so an fp32 run is bit-identical to an unconverted model; every module
    is still an MX module, so callbacks can switch its precision mid-run. Checkpoints keep the
    current scheme of every MX module, however it changed (a rule, ``mxprobe.amend_scheme``), and
    loading one puts them back (``mxprobe.callbacks.precision_state``).

    Raises:
        ValueError: for an unknown activation, init, schedule, scheme or override, and for a
            non-positive lr, betas outside [0, 1), a negative eps or warmup.

    Example::

        model = ProxyLitModule(depth=4, width=64, lr=1e-2, scheme="mxfp8_e4m3")
        loss = model.compute_loss((x, y))
    """

    def __init__(
        self,
        depth: int = 4,
        width: int = 512,
        activation: str = "gelu",
        layer_norm: bool = True,
        init: str = "default",
        seed: int = 0,
        lr: float = 6e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        schedule: str = "constant",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        scheme: str = "fp32",
        overrides: dict[str, str] | None = None,
        compiled: bool = False,
    ) -> None:
        super().__init__()
        check_adam(lr, betas, eps, min_lr_ratio=min_lr_ratio)
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if schedule not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}"
            )
        self.save_hyperparameters()
        self.config = ProxyConfig(depth, width, activation, layer_norm, init)
        self.student = build_student(self.config, seed)
        mxprobe.convert(self.student, scheme, overrides)
        full = PrecisionScheme()
        for module in self.student.modules():
            if isinstance(module, mxprobe.modules.MxModule) and module.mx_scheme == full:
                module.mx_scheme = None
        # A compiled bound method, not a module attribute: state_dict keys stay the student's.
        self._student_forward = mxprobe.compile_model(self.student.forward) if compiled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def compute_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """MSE of the student on ``batch = (x, y)``; no logging, no side effects."""
        x, y = batch
        # Evaluation without grad runs eager: one compilation for training is enough.
        compiled = self._student_forward is not None and torch.is_grad_enabled()
        forward = self._student_forward if compiled else self.student
        return F.mse_loss(forward(x), y)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self.log("val/loss", self.compute_loss(batch), on_step=False, on_epoch=True)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
        if hp.schedule == "constant" and hp.warmup_steps == 0:
            return optimizer
        total = self.trainer.max_steps
        if hp.schedule == "cosine" and total <= 0:
            raise ValueError("schedule 'cosine' needs trainer.max_steps > 0 to know where it ends")
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _LrFactor(hp.schedule, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_schemes(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        load_schemes(self, checkpoint)

    @property
    def scheme(self) -> PrecisionScheme:
        """The scheme this module was built with (interventions may have changed modules since)."""
        return parse_scheme(self.hparams.scheme)


class _LrFactor:
    """lr multiplier at a step: linear warmup, then constant or cosine to ``min_ratio``.

    A class, not a lambda, so the scheduler's state pickles into checkpoints.
    """

    def __init__(self, schedule: str, warmup: int, total: int, min_ratio: float) -> None:
        self.schedule, self.warmup, self.total, self.min_ratio = schedule, warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
