"""LightningModule of the student-teacher proxy: MSE, Adam, MX emulation via mxprobe.convert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mxprobe.models.lit_base import SCHEDULES, LrSchedule, MxLitModule, check_adam
from mxprobe.models.student_teacher import ProxyConfig, build_student

import mxprobe
from mxprobe.checks import check_choice, check_int


class ProxyLitModule(MxLitModule):
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

    The architecture arguments are ``ProxyConfig``'s fields, flat rather than one ``config``,
    because the data module's teacher takes the same ``width``, ``depth`` and ``activation``:
    the CLI links ``model.width`` to ``data.width``, and sweeps vary ``model.activation``.
    Gradient clipping is off unless the Trainer's ``gradient_clip_val`` asks for it (the paper
    does not clip). Conversion (all-fp32 modules run PyTorch's own forward), ``train/loss``,
    the LR schedule and the schemes in checkpoints are those of the base,
    :class:`~mxprobe.models.lit_base.MxLitModule`.

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
        check_int(warmup_steps, "warmup_steps", minimum=0)
        check_choice(schedule, SCHEDULES, "schedule")
        self.save_hyperparameters()
        self.config = ProxyConfig(depth, width, activation, layer_norm, init)
        self.student = self.convert_network(build_student(self.config, seed), scheme, overrides)
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

    def validation_step(self, batch, batch_idx: int) -> None:
        self.log("val/loss", self.compute_loss(batch), on_step=False, on_epoch=True)

    def make_optimizer(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.Adam(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)

    def lr_schedule(self) -> LrSchedule | None:
        hp = self.hparams
        if hp.schedule == "constant" and hp.warmup_steps == 0:
            return None
        total = self.trainer.max_steps
        if hp.schedule == "cosine" and total <= 0:
            raise ValueError("schedule 'cosine' needs trainer.max_steps > 0 to know where it ends")
        return LrSchedule(hp.schedule, hp.warmup_steps, total, hp.min_lr_ratio)
