"""Gradient bias: the MX gradient against the full-precision gradient at the same weights and
batch."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from mxprobe.callbacks.distributed import (
    check_fsdp2_sharding,
    local_tensor,
    reduce_mean,
    reduce_sum,
)
from mxprobe.callbacks.periodic import (
    PeriodicMonitor,
    check_every_n_steps,
    is_monitored_step,
    publish,
)
from torch import nn
from torch.optim import Optimizer

from mxprobe import full_precision
from mxprobe.convert import named_modules
from mxprobe.modules import MxModule, is_sharded
from mxprobe.names import GRAD_BIAS, TOTAL, TOTAL_LINEARS, TOTAL_NORMS, metric
from mxprobe.scheme import matches_glob
from mxprobe.stats import gradient_comparison, gradient_sums

COMPUTE_LOSS_PROTOCOL = (
    "GradientBiasMonitor needs `{cls}.compute_loss(batch) -> Tensor`: the same loss that "
    "`training_step` returns for that batch (before Lightning's 1/accumulate_grad_batches "
    "scaling), computed deterministically with no logging and no side effects. The monitor "
    "calls it a second time under mxprobe.full_precision(model) to get the shadow "
    "full-precision gradient."
)


GROUPS = (TOTAL_NORMS, TOTAL_LINEARS)


def _group(module: nn.Module) -> str | None:
    """``total_norms`` for an MX norm, ``total_linears`` for an MX GEMM module, else None."""
    if not isinstance(module, MxModule):
        return None
    if "norm_affine" in module.mx_roles:
        return "total_norms"
    return "total_linears" if "weight" in module.mx_roles else None


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class GradientBiasMonitor(PeriodicMonitor):
    r"""Compare the MX gradient with the full-precision gradient at the same weights and batch.

    Every ``every_n_steps`` optimizer steps (``global_step % every_n_steps == 0``), in
    ``on_before_optimizer_step`` (gradients complete, reduced across ranks, unscaled, not yet
    clipped), the monitor recomputes the loss of the step's batch with
    ``pl_module.compute_loss(batch)`` under :func:`mxprobe.full_precision`, takes its gradient
    with ``torch.autograd.grad`` (``.grad`` is never touched, the global RNG state is
    restored afterwards) and logs, per module owning parameters whose qualified name matches
    ``modules`` and in total over all the optimizer's parameters that have a gradient:

    ``mx/grad_bias/<module>/<stat>``, ``mx/grad_bias/total/<stat>`` and the paper's contrast
    ``mx/grad_bias/total_norms/<stat>`` (every MX norm's γ, β together) against
    ``mx/grad_bias/total_linears/<stat>`` (every MX GEMM module's weights) with ``stat`` in
    ``cosine``, ``zeta`` (``||g_q - g_fp||^2 / ||g_fp||^2``), ``bias``
    (``<g_q, g_fp> / ||g_fp||^2 - 1``), ``mean_diff`` and ``norm_ratio`` (see
    :mod:`mxprobe.stats`).

    Same randomness: the torch RNG state (CPU, and the module's CUDA device) is captured at
    each monitored micro-batch's ``on_train_batch_start`` and restored before its shadow
    ``compute_loss``, so dropout draws the same masks and ``zeta`` measures quantization only
    (exactly 0 under an all-fp32 scheme). Stochastic rounding also draws from the global
    generator in the MX pass alone, which shifts the masks drawn after it: the monitor warns at
    ``on_fit_start`` when a model has both.

    Gradient accumulation: every micro-batch of a monitored step is captured; the shadow
    gradient is ``sum_i grad(compute_loss(batch_i)) / accumulate_grad_batches``, the very sum
    Lightning accumulates in ``.grad`` (the weights do not change between micro-batches), so
    the comparison is exact rather than a last-micro-batch estimate. Memory: the captured
    micro-batches of one step stay referenced until its optimizer step.

    DDP: ``.grad`` is already averaged over ranks, so the shadow gradient is averaged too
    (one all-reduce of the flattened shadow gradient, ``reduce_op="mean"``) before the
    comparison; every rank then logs the same global statistics.

    FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``): ``.grad`` is this rank's
    shard of the rank-averaged gradient. The shadow is one plain ``backward`` per captured
    micro-batch, which FSDP2 reduce-scatters into ``.grad`` exactly like the MX gradient
    (``.grad`` is set aside first and put back after, the same tensors, so training is
    unchanged); the 7-vector sums of each module are taken over the local shards and added
    over ranks (one all-reduce), so every rank logs the statistics of the full gradients.

    Args:
        every_n_steps: measure at optimizer steps whose ``global_step`` is a multiple of this.
        modules: glob on the qualified module names (relative to the LightningModule) for the
            per-module statistics; the total always covers every parameter.
        per_module: log per-module statistics (``False``: totals only).

    Raises:
        MisconfigurationException: at ``setup`` when the LightningModule has no
            ``compute_loss(batch)`` method (the message explains the protocol); at
            ``on_fit_start`` for a parameter sharded other than FSDP2's ``Shard(0)`` on a 1-d
            mesh (tensor parallelism, HSDP).
        ValueError: for ``every_n_steps < 1``.

    Example::

        trainer = Trainer(callbacks=[GradientBiasMonitor(every_n_steps=50)])
    """

    monitor = GRAD_BIAS

    def __init__(
        self, every_n_steps: int = 50, modules: str = "*", per_module: bool = True
    ) -> None:
        check_every_n_steps(every_n_steps)
        self.every_n_steps = every_n_steps
        self.modules = modules
        self.per_module = per_module
        self._batches: list[Any] = []
        self._batches_step = -1
        self._owner: dict[torch.nn.Parameter, str] = {}
        self._groups: dict[str, str] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, modules=self.modules)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not callable(getattr(pl_module, "compute_loss", None)):
            raise MisconfigurationException(
                "LightningModule has no compute_loss method. "
                + COMPUTE_LOSS_PROTOCOL.format(cls=type(pl_module).__name__)
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model, so that a model built there is seen.
        check_fsdp2_sharding(pl_module, "GradientBiasMonitor")
        self._owner = {}
        self._groups: dict[str, str] = {}
        for name, module in named_modules(pl_module):
            for p in module.parameters(recurse=False):
                self._owner.setdefault(p, name or "<root>")
            group = _group(module)
            if group:
                self._groups[name or "<root>"] = group
        stochastic = any(
            isinstance(m, MxModule)
            and m.mx_scheme is not None
            and m.mx_scheme.rounding == "stochastic"
            for m in pl_module.modules()
        )
        dropout = any(
            isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in pl_module.modules()
        )
        if stochastic and dropout:
            rank_zero_warn(
                "GradientBiasMonitor: stochastic rounding draws from torch's global generator "
                "in the MX pass only, so the shadow pass's dropout masks differ after the first "
                "quantization: zeta includes dropout noise (use rounding=even, or dropout 0)"
            )
        if not any(isinstance(m, MxModule) for m in pl_module.modules()):
            rank_zero_warn(
                "GradientBiasMonitor: the model has no MX module, so the shadow pass computes "
                "what the training pass does and zeta is 0 (call mxprobe.convert before fit)"
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step != self._batches_step:
            self._batches, self._batches_step = [], step
        if is_monitored_step(step, self.every_n_steps):
            self._batches.append((batch, _rng_state(pl_module.device)))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if not self._batches or self._batches_step != trainer.global_step:
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if params:
            sharded = any(is_sharded(p) for p in params)
            if sharded:
                shadow = self._sharded_shadow_gradient(trainer, pl_module, params)
            else:
                shadow = self._shadow_gradient(trainer, pl_module, params)
            publish(trainer, pl_module, self._statistics(trainer, params, shadow, sharded))
        self._batches = []

    def _loss_scale(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        # Lightning divides every micro-batch loss by accumulate_grad_batches (automatic
        # optimization only), also for a short last window; the shadow must match.
        return 1.0 / trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1.0

    def _shadow_gradient(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        scale = self._loss_scale(trainer, pl_module)
        shadow = [torch.zeros_like(p) for p in params]
        devices = [params[0].device] if params[0].device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), full_precision(pl_module):
            for batch, rng in self._batches:
                # The MX pass's random state: the same dropout masks, so zeta is quantization's.
                _set_rng_state(rng, params[0].device)
                loss = pl_module.compute_loss(batch) * scale
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for s, g in zip(shadow, grads, strict=True):
                    if g is not None:
                        s.add_(g)
        if trainer.world_size > 1:
            flat = reduce_mean(trainer, torch.cat([s.reshape(-1) for s in shadow]))
            shadow = [
                t.view_as(s)
                for t, s in zip(flat.split([s.numel() for s in shadow]), shadow, strict=True)
            ]
        return shadow

    def _sharded_shadow_gradient(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The shadow gradient under FSDP2, sharded and averaged over ranks like ``.grad``.

        FSDP2 computes with unsharded copies of the parameters that autograd does not link to
        the sharded ones (``torch.autograd.grad`` would give ``None``), so the shadow is a
        plain ``backward`` that FSDP2 reduce-scatters into ``.grad``, as it does the MX
        gradient; the MX gradients are set aside before and put back (the same tensors) after.
        """
        scale = self._loss_scale(trainer, pl_module)
        every = list(pl_module.parameters())
        real = [p.grad for p in every]
        for p in every:
            p.grad = None
        devices = [params[0].device] if params[0].device.type == "cuda" else []
        try:
            with (
                torch.random.fork_rng(devices=devices),
                torch.enable_grad(),
                full_precision(pl_module),
            ):
                for batch, rng in self._batches:
                    _set_rng_state(rng, params[0].device)
                    (pl_module.compute_loss(batch) * scale).backward()
            shadow = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        finally:
            for p, g in zip(every, real, strict=True):
                p.grad = g
        return shadow

    def _statistics(
        self,
        trainer: pl.Trainer,
        params: list[torch.Tensor],
        shadow: list[torch.Tensor],
        sharded: bool = False,
    ) -> dict[str, torch.Tensor]:
        per_module: dict[str, torch.Tensor] = {}
        for p, s in zip(params, shadow, strict=True):
            name = self._owner.get(p, "<unnamed>")
            # Under FSDP2 the sums of this rank's shards; added over ranks below.
            sums = gradient_sums(local_tensor(p.grad), local_tensor(s))
            per_module[name] = per_module[name] + sums if name in per_module else sums
        if sharded:
            # Every rank holds a shard of every parameter, in the same order: same names.
            reduced = reduce_sum(trainer, torch.stack(list(per_module.values())))
            per_module = dict(zip(per_module, reduced, strict=True))
        stats = {}
        if self.per_module:
            for name, sums in per_module.items():
                if matches_glob(name, self.modules):
                    for stat, v in gradient_comparison(sums).items():
                        stats[metric(GRAD_BIAS, name, stat)] = v
        total = torch.stack(list(per_module.values())).sum(0)
        for stat, v in gradient_comparison(total).items():
            stats[metric(GRAD_BIAS, TOTAL, stat)] = v
        # The paper's contrast: the norms' affine parameters against the GEMM weights.
        for group in GROUPS:
            members = [sums for name, sums in per_module.items() if self._groups.get(name) == group]
            if members:
                for stat, v in gradient_comparison(torch.stack(members).sum(0)).items():
                    stats[metric(GRAD_BIAS, group, stat)] = v
        return stats
