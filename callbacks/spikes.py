"""Loss-spike and non-finite detection from the training-step loss and the gradient norm."""

from __future__ import annotations

import itertools
import math
from collections import deque
from typing import Any

import lightning.pytorch as pl
import torch
from mxprobe.callbacks.distributed import local_tensor, reduce_sum
from mxprobe.callbacks.events import record_event
from mxprobe.callbacks.periodic import PeriodicMonitor, publish
from mxprobe.callbacks.recorder import RunRecorder, loss_of, mean_loss
from torch.optim import Optimizer

from mxprobe.modules import is_sharded
from mxprobe.names import NONFINITE, SCALER_SKIP, SPIKE, SPIKES, TOTAL, metric

METHODS = ("zscore", "ema_ratio", "derivative")
DEFAULT_THRESHOLDS = {"zscore": 6.0, "ema_ratio": 2.0, "derivative": 0.01}
SIGNALS = ("loss", "grad_norm", "nonfinite", "scaler_skip")
_KEPT_EVENTS = 100


class LossSpikeDetector(PeriodicMonitor):
    r"""Detect loss spikes, gradient-norm blow-ups and non-finite values, once per optimizer step.

    The loss is read from the ``training_step`` output (``on_train_batch_end``: a loss tensor
    or a mapping with ``"loss"``), averaged over the micro-batches of an optimizer step and,
    under DDP, over ranks (one all-reduce per step), so every rank sees the same loss and
    takes the same decision. The gradient norm is the 2-norm of all gradients in
    ``on_before_optimizer_step`` (reduced, unscaled, before clipping).

    ``method`` picks the loss rule; ``score`` is compared with ``threshold`` (its default
    depends on the method, in parentheses), over the previous ``window`` finite losses:

    - ``zscore`` (6.0): ``(L - mean) / std`` of the window.
    - ``ema_ratio`` (2.0): ``L / EMA``, the EMA with decay ``ema_decay`` over previous losses
      (meaningful for positive losses).
    - ``derivative`` (0.01): the paper's smoothed-derivative rule: with ``m_t`` the moving
      average of the last ``window`` losses, ``(m_t - m_{t-1}) / |m_{t-1}|``, i.e. the
      relative rise of the smoothed loss in one step.

    No loss rule fires before ``window`` finite losses have been seen. With
    ``grad_norm_factor`` set, a gradient norm above ``grad_norm_factor`` times its EMA (same
    decay and warm-up) is also a spike. A NaN/Inf loss or gradient norm is always an event
    (kind ``nonfinite``), whatever the method and warm-up; non-finite losses never enter the
    history. Under a ``GradScaler`` (``precision="16-mixed"``) a finite loss with a non-finite
    gradient norm is the scaler skipping the step and lowering its scale, by design: that is
    an event of kind ``scaler_skip``, which rules ignore unless their trigger asks for
    ``signal: scaler_skip``.

    Rewind: :meth:`rewind_to` (called by a rule's ``rewind`` action) drops from the window
    the losses of the steps the rewind undoes, the spike that caused it among them, so the
    spike does not stay in the window (inflating its std and masking a repeat) and the window
    holds the history of the weights training resumes from (the detector keeps the last
    ``max(10 * window, 1000)`` losses for this; a window short of entries after a longer
    rewind warms up again). The EMAs (``ema_ratio``, gradient norm) are kept as they are.

    A *spike* is the first step of an anomalous episode (the episode ends at the first normal
    step), so a diverging run writes one event, not one per step. Each event goes to the run
    record, where :class:`~mxprobe.callbacks.PrecisionIntervention` reads it, and is kept in
    :attr:`spikes` (the last 100 events; :meth:`events_at` gives those of one step). All of
    it, history included, is in ``state_dict``, so a resumed run detects exactly as the
    uninterrupted one.

    Logged every ``trainer.log_every_n_steps`` steps (Lightning's ``self.log`` costs ~0.2 ms
    per key on CPU, ~1% of a small model's step for three keys): ``mx/spikes/total/loss`` (the
    reduced loss), ``mx/spikes/total/score`` and ``mx/spikes/total/grad_norm``; anomalies are
    events, whatever the step.

    Args:
        method: ``"zscore"``, ``"ema_ratio"`` or ``"derivative"``.
        window: losses in the rolling window / moving average, and the warm-up length.
        threshold: score above which a step is a spike; ``None``: the method's default.
        ema_decay: decay of the loss EMA (``ema_ratio``) and of the gradient-norm EMA.
        grad_norm_factor: flag a gradient norm above this multiple of its EMA; ``None``: off.

    Raises:
        ValueError: for an unknown method or a non-positive window, threshold or factor, or an
            ``ema_decay`` outside (0, 1).

    Example::

        trainer = Trainer(callbacks=[LossSpikeDetector(method="zscore", window=100)])
    """

    monitor = SPIKES

    def __init__(
        self,
        method: str = "zscore",
        window: int = 100,
        threshold: float | None = None,
        ema_decay: float = 0.99,
        grad_norm_factor: float | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an integer >= 2, got {window!r}")
        if threshold is not None and not threshold > 0:
            raise ValueError(f"threshold must be positive, got {threshold!r}")
        if not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay!r}")
        if grad_norm_factor is not None and not grad_norm_factor > 0:
            raise ValueError(f"grad_norm_factor must be positive, got {grad_norm_factor!r}")
        self.method = method
        self.window = window
        self.threshold = DEFAULT_THRESHOLDS[method] if threshold is None else float(threshold)
        self.ema_decay = ema_decay
        self.grad_norm_factor = grad_norm_factor
        self._kept = max(10 * window, 1000)
        self.spikes: list[dict[str, Any]] = []
        # Longer than the window, so that a rewind, which drops the losses it undoes, leaves
        # older ones to refill the window with.
        self._history: deque[float] = deque(maxlen=self._kept)
        self._history_steps: deque[int] = deque(maxlen=self._kept)  # the step of each loss
        self._loss_ema: float | None = None
        self._grad_ema: float | None = None
        self._grad_count = 0
        self._in_spike = False
        self._in_nonfinite = False
        self._losses: list[torch.Tensor] = []
        self._grad_sq: list[torch.Tensor] = []
        self._step = 0
        self._scaler = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            method=self.method, window=self.window, threshold=self.threshold
        )

    @property
    def last_spike(self) -> dict[str, Any] | None:
        """The newest event, or ``None``."""
        return self.spikes[-1] if self.spikes else None

    def events_at(self, step: int) -> list[dict[str, Any]]:
        """The events (spike and/or nonfinite) of optimizer step ``step``."""
        return [e for e in self.spikes[-2:] if e["step"] == step]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        RunRecorder.of(trainer).on_rewind(self.rewind_to)
        self.every_n_steps = trainer.log_every_n_steps
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scaler = scaler is not None and scaler.is_enabled()

    def rewind_to(self, step: int) -> None:
        """Drop the losses of steps ``>= step`` from the window (see the class docstring)."""
        while self._history_steps and self._history_steps[-1] >= step:
            self._history.pop()
            self._history_steps.pop()
        self._in_spike = self._in_nonfinite = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step = trainer.global_step
        self._losses, self._grad_sq = [], []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        # FSDP2: each rank holds disjoint shards of the gradients; their squares add up over
        # ranks (one all-reduce), so every rank sees the norm of the full gradient.
        shards = [local_tensor(g) for g in grads if is_sharded(g)]
        whole = [g for g in grads if not is_sharded(g)]
        total = squared_norm(whole) if whole else None
        if shards:
            shard_sq = reduce_sum(trainer, squared_norm(shards))
            total = shard_sq if total is None else total + shard_sq
        self._grad_sq.append(total)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = loss_of(outputs)
        if loss is not None:
            self._losses.append(loss.float().reshape(()))
        if trainer.global_step == self._step:
            return  # accumulating: the optimizer has not stepped yet
        step, self._step = self._step, trainer.global_step
        loss_value, grad_norm = self._reduced(trainer, pl_module)
        self._losses, self._grad_sq = [], []
        score = self._check(trainer, step, loss_value, grad_norm)
        if not self.measures(step):
            return
        metrics = {"score": score, "loss": loss_value, "grad_norm": grad_norm}
        publish(
            trainer,
            pl_module,
            {metric(SPIKES, TOTAL, k): v for k, v in metrics.items() if v is not None},
            step=step,
        )

    def _reduced(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[float | None, float | None]:
        """(loss averaged over micro-batches and ranks, gradient norm); ``None`` when absent.

        Few torch ops: this runs every step, and each small op costs ~10 us there."""
        # Gradients are identical on every rank after DDP's all-reduce: no reduction needed.
        grad_norm = math.sqrt(sum(g.item() for g in self._grad_sq)) if self._grad_sq else None
        return mean_loss(trainer, pl_module, self._losses), grad_norm

    def _check(
        self, trainer: pl.Trainer, step: int, loss: float | None, grad_norm: float | None
    ) -> float:
        """Update the state with one step; emit its events; return the loss score."""
        values: dict[str, float | None] = {"loss": loss, "grad_norm": grad_norm}
        nonfinite = any(v is not None and not math.isfinite(v) for v in (loss, grad_norm))
        signals = []
        score = math.nan
        if loss is not None and math.isfinite(loss):
            score = self._loss_score(loss)
            if score > self.threshold:
                signals.append("loss")
            self._update_loss(step, loss)
        if self.grad_norm_factor is not None and grad_norm is not None and math.isfinite(grad_norm):
            if self._grad_ema is not None and self._grad_count >= self.window:
                values["grad_norm_ratio"] = grad_norm / self._grad_ema
                if grad_norm > self.grad_norm_factor * self._grad_ema:
                    signals.append("grad_norm")
            self._grad_ema = _ema(self._grad_ema, grad_norm, self.ema_decay)
            self._grad_count += 1
        values["score"] = score
        if signals and not self._in_spike:
            self._emit(trainer, step, SPIKE, signals, values)
        skipped = self._scaler and nonfinite and loss is not None and math.isfinite(loss)
        if nonfinite and not self._in_nonfinite:
            kind = SCALER_SKIP if skipped else NONFINITE
            self._emit(trainer, step, kind, [kind], values)
        self._in_spike, self._in_nonfinite = bool(signals), nonfinite
        return score

    def _loss_score(self, loss: float) -> float:
        """The method's score of ``loss`` against the window (NaN during warm-up)."""
        if len(self._history) < self.window:
            return math.nan
        h = list(itertools.islice(self._history, len(self._history) - self.window, None))
        mean = sum(h) / len(h)
        if self.method == "zscore":
            std = math.sqrt(sum((v - mean) ** 2 for v in h) / len(h))
            if std == 0:
                return 0.0 if loss == mean else math.copysign(math.inf, loss - mean)
            return (loss - mean) / std
        if self.method == "ema_ratio":
            return loss / self._loss_ema if self._loss_ema else math.nan
        # derivative: m_t - m_{t-1} = (L_t - L_{t-window}) / window.
        return (loss - h[0]) / (self.window * abs(mean)) if mean else math.nan

    def _update_loss(self, step: int, loss: float) -> None:
        self._history.append(loss)
        self._history_steps.append(step)
        self._loss_ema = _ema(self._loss_ema, loss, self.ema_decay)

    def _emit(
        self,
        trainer: pl.Trainer,
        step: int,
        kind: str,
        signals: list[str],
        values: dict[str, float | None],
    ) -> None:
        event = {
            "step": step,
            "kind": kind,
            "rule": None,
            "signals": signals,
            "method": self.method,
            "threshold": self.threshold,
            "values": dict(values),
            "scheme_before": None,
            "scheme_after": None,
            "source": type(self).__name__,
        }
        self.spikes = [*self.spikes[-(_KEPT_EVENTS - 1) :], event]
        record_event(trainer, event)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self._history),
            "history_steps": list(self._history_steps),
            "loss_ema": self._loss_ema,
            "grad_ema": self._grad_ema,
            "grad_count": self._grad_count,
            "in_spike": self._in_spike,
            "in_nonfinite": self._in_nonfinite,
            "spikes": [dict(e) for e in self.spikes],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._history = deque(state_dict["history"], maxlen=self._kept)
        self._history_steps = deque(state_dict["history_steps"], maxlen=self._kept)
        self._loss_ema = state_dict["loss_ema"]
        self._grad_ema = state_dict["grad_ema"]
        self._grad_count = state_dict["grad_count"]
        self._in_spike = state_dict["in_spike"]
        self._in_nonfinite = state_dict["in_nonfinite"]
        self.spikes = [dict(e) for e in state_dict["spikes"]]


def squared_norm(tensors: list[torch.Tensor], multi_tensor: bool | None = None) -> torch.Tensor:
    """Sum of the squares of all elements of ``tensors`` (fp32, 0-d, on their device).

    This runs every step. ``multi_tensor`` (default: off on CPU, on elsewhere) picks one
    multi-tensor norm kernel, which beats a launch per tensor on GPU; on CPU a BLAS dot per
    tensor is ~1.5x faster and accumulates more accurately.
    """
    with torch.no_grad():  # one context instead of a detach per tensor: few ops per step
        flat = [
            t.reshape(-1) if t.dtype == torch.float32 else t.float().reshape(-1) for t in tensors
        ]
        if multi_tensor is None:
            multi_tensor = flat[0].device.type != "cpu"
        if multi_tensor:
            return torch.stack(torch._foreach_norm(flat)).square().sum()
        return torch.stack([torch.dot(v, v) for v in flat]).sum()


def _ema(ema: float | None, value: float, decay: float) -> float:
    return value if ema is None else decay * ema + (1 - decay) * value
