"""The base of mxprobe's LightningModules (the proxy's and the LLM's): the MX conversion, the
``compute_loss`` contract, the warmup + cosine LR schedule, and the schemes in checkpoints."""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence

import lightning.pytorch as pl
import torch
from mxprobe.callbacks.precision_state import load_schemes, save_schemes
from torch import nn

from mxprobe import nvfp4_random
from mxprobe.checks import check_choice
from mxprobe.convert import convert
from mxprobe.modules import MxModule
from mxprobe.scheme import PrecisionScheme, parse_scheme

SCHEDULES = ("constant", "cosine")


class LrSchedule:
    """The lr factor at an optimizer step: linear warmup from ``1 / warmup`` to 1 over the first
    ``warmup`` steps, then 1 (``constant``) or a cosine decay to ``min_ratio`` at step ``total``
    and ``min_ratio`` after it (``cosine``).

    A class, not a lambda, so the scheduler's state pickles into checkpoints.

    Raises:
        ValueError: for a schedule other than ``constant`` or ``cosine``.
    """

    def __init__(self, schedule: str, warmup: int, total: int, min_ratio: float) -> None:
        check_choice(schedule, SCHEDULES, "schedule")
        self.schedule, self.warmup, self.total, self.min_ratio = schedule, warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def check_adam(lr: float, betas: Sequence[float], eps: float, **fractions: float) -> None:
    """Raise ValueError unless ``lr`` > 0, each beta in [0, 1), ``eps`` >= 0 (all finite) and
    each of ``fractions`` (``name=value``) in [0, 1]. The modules call it in ``__init__``, so a
    bad value in a YAML or on the command line is refused before any work, naming the setting."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {list(betas)!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    for name, value in fractions.items():
        if not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")


class MxLitModule(pl.LightningModule, abc.ABC):
    """What mxprobe's LightningModules share; a subclass builds its network, converts it with
    :meth:`convert_network`, and defines :meth:`compute_loss`, :meth:`make_optimizer` and
    :meth:`lr_schedule`.

    - ``compute_loss(batch) -> Tensor``: the loss of a batch, no logging, no side effects. The
      callbacks that need a second forward/backward (the shadow full-precision gradient of
      ``GradientBiasMonitor``) call it; ``training_step`` logs it as ``train/loss``.
    - Modules whose resolved scheme is all-fp32 run PyTorch's own forward (``mx_scheme =
      None``), so an fp32 run is bit-identical to an unconverted model; every module is still
      an MX module, so callbacks can switch its precision mid-run.
    - ``configure_optimizers``: :meth:`make_optimizer`, stepped per optimizer step by a
      ``LambdaLR`` of :meth:`lr_schedule` (none when that is ``None``).
    - Checkpoints keep the current scheme of every MX module, however it changed (a rule,
      ``mxprobe.amend_scheme``, ``mxprobe.set_scheme``), and loading one puts them back
      (``mxprobe.callbacks.precision_state``).
    """

    def convert_network(
        self,
        network: nn.Module,
        scheme: str | PrecisionScheme,
        overrides: Mapping[str, str] | None,
    ) -> nn.Module:
        """``mxprobe.convert(network, scheme, overrides)``, then all-fp32 modules to ``None``."""
        convert(network, scheme, overrides)
        full = PrecisionScheme()
        for module in network.modules():
            if isinstance(module, MxModule) and module.mx_scheme == full:
                module.mx_scheme = None
        return network

    @abc.abstractmethod
    def compute_loss(self, batch) -> torch.Tensor:
        """The loss of ``batch``; no logging, no side effects."""

    @abc.abstractmethod
    def make_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over this module's parameters."""

    @abc.abstractmethod
    def lr_schedule(self) -> LrSchedule | None:
        """The lr factor per optimizer step (``None``: the lr stays as the optimizer has it)."""

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # NVFP4's random signs and stochastic rounding, keyed so that a resume draws the same.
        nvfp4_random.set_iteration(self.trainer.global_step, batch_idx)

    def configure_optimizers(self):
        schedule = self.lr_schedule()
        optimizer = self.make_optimizer()
        if schedule is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
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
