"""Quantization monitors: LayerNorm/RMSNorm affine parameters and MX linear inputs."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from mxprobe.callbacks.distributed import full_tensor, reduce_sum
from mxprobe.callbacks.periodic import (
    PeriodicMonitor,
    check_every_n_steps,
    is_monitored_step,
    publish,
)
from torch import nn
from torch.optim import Optimizer

from mxprobe.convert import named_modules
from mxprobe.formats import NVFP4, canonical_format, is_mx
from mxprobe.modules import MxModule, nvfp4_settings
from mxprobe.names import ACTIVATIONS, NORM_AFFINE, metric
from mxprobe.nvfp4 import nvfp4_clip_counts, quantize_nvfp4
from mxprobe.quantize import quantize_mx
from mxprobe.scheme import PrecisionScheme, matches_glob
from mxprobe.stats import (
    binade_shares,
    block_dynamic_range,
    block_max_exponents,
    floor_overflow_fraction,
    nvfp4_quantization_sums,
    quantization_stats,
    quantization_sums,
    relative_bias,
    relative_error,
    saturation_fraction,
)

_TORCH_NORMS = (nn.LayerNorm, nn.RMSNorm)


def is_norm(module: nn.Module) -> bool:
    """An MX norm (any class ``convert`` emulated as a norm) or an unconverted torch norm."""
    if isinstance(module, MxModule):
        return "norm_affine" in module.mx_roles
    return isinstance(module, _TORCH_NORMS)


def is_gemm(module: nn.Module) -> bool:
    """An MX linear-like module (``nn.Linear``, transformers' ``Conv1D``, registered linears)."""
    return isinstance(module, MxModule) and "weight" in module.mx_roles


def _matching(pl_module: nn.Module, kind, pattern: str) -> list[tuple[str, nn.Module]]:
    return [
        (name, m) for name, m in named_modules(pl_module) if kind(m) and matches_glob(name, pattern)
    ]


def _warn_if_empty(monitor, found: list, what: str) -> None:
    if not found:
        rank_zero_warn(
            f"{type(monitor).__name__}(modules={monitor.modules!r}) finds no {what} in the "
            "model: it will log nothing (call mxprobe.convert before fit, or fix the glob)"
        )


def _check_reference(reference_format: str | None) -> str | None:
    if reference_format is None:
        return None
    fmt = canonical_format(reference_format)
    if not is_mx(fmt):
        raise ValueError(
            f"reference_format must be an MX element format (e.g. 'e4m3'), got {reference_format!r}"
        )
    return fmt


def _mx_settings(scheme: PrecisionScheme) -> dict:
    """How ``scheme`` blocks, scales and rounds its MX roles (the monitors quantize as it does)."""
    return {
        "block_size": scheme.block_size,
        "scale_mode": scheme.scale_mode,
        "rounding": scheme.rounding,
    }


def _seeded(monitor, device: torch.device) -> torch.Generator:
    """The monitor's own generator on ``device`` (seeded 0: stochastic readings repeat), so its
    draws never touch torch's global generator and the training run it watches."""
    if monitor._generator is None or monitor._generator.device != device:
        monitor._generator = torch.Generator(device).manual_seed(0)
    return monitor._generator


def _format_in_use(module: nn.Module, role: str, reference: str | None) -> tuple:
    """(MX format or NVFP4, scheme giving block/scale/rounding, whether it is the module's own
    format); the format is ``reference`` when the module's role is neither now, ``None`` to
    skip."""
    scheme = module.active_scheme() if isinstance(module, MxModule) else None
    if scheme is not None and (is_mx(getattr(scheme, role)) or getattr(scheme, role) == NVFP4):
        return getattr(scheme, role), scheme, True
    if reference is None:
        return None, None, False
    return reference, scheme or PrecisionScheme(), False


def _operand(module: nn.Module, name: str) -> torch.Tensor | None:
    """The tensor the norm's forward multiplies by (``1 + w`` for a unit-offset norm), whole:
    a parameter sharded by FSDP2 is gathered (every rank gets the full tensor)."""
    if getattr(module, name, None) is None:
        return None
    value = module.forward_operand(name) if isinstance(module, MxModule) else getattr(module, name)
    return full_tensor(value)


class NormAffineMonitor(PeriodicMonitor):
    r"""Block-quantization statistics of every LayerNorm/RMSNorm affine weight (γ) and bias (β).

    Every ``every_n_steps`` optimizer steps, in ``on_before_optimizer_step`` (the weights the
    step's forward used), for every norm whose qualified name matches ``modules`` — every
    module ``convert`` emulates as a norm (torch, transformers, timm, litgpt, registered
    classes) and unconverted ``nn.LayerNorm``/``nn.RMSNorm`` — the affine operands are
    quantized as the module's current ``norm_affine`` format says, with its block size, scale
    mode and rounding. The operand is what the forward multiplies by: ``1 + w`` for a norm
    that scales by ``1 + w`` (see :mod:`mxprobe.adapters`). When that format is not MX
    (``fp32``, ``bf16``, ``fp16``, an unconverted module or one inside
    :func:`mxprobe.full_precision`) the statistics are those the ``reference_format`` would
    give (blocks of 32, floor scale, ties to even unless the module's scheme says otherwise),
    under the same names, with ``in_force`` 0: a switch away from MX does not rename a series
    (a rule watching it keeps its metric), and the report reads saturation only where
    ``in_force`` is 1, so a norm not in force is never reported as saturated. Warns at
    ``on_fit_start`` when no norm matches.

    Logged as ``mx/norm_affine/<module>/<stat>``:

    - ``weight_saturation``: fraction of γ elements clipped in their MX block.
    - ``weight_floor_overflow``: fraction of γ blocks whose max has a mantissa above the
      element format's (``amax / 2^floor(log2 amax) > max_norm / 2^emax``).
    - ``weight_rel_bias``: mean of ``q(γ)/γ - 1`` (negative: quantized γ is smaller).
    - ``weight_rel_error``: ``||q(γ) - γ|| / ||γ||``.
    - ``weight_mean``, ``weight_std``: of γ itself.
    - ``bias_saturation``, ``bias_floor_overflow``, ``bias_rel_bias``, ``bias_rel_error``:
      the same for β when the module has one.
    - ``weight_gap``: mean of ``q(γ) - γ``, the effective γ the forward uses minus the latent
      one the optimizer updates (e4m3 floor: about ``-0.06`` when γ sits in [0.875, 1)).

    Mechanism probes (the paper's: γ clustered near 1 drifts down through the saturating zone
    of the floor scale), whatever the format in force:

    - ``weight_blocks_amax_lt_half``, ``weight_blocks_amax_half_to_1``,
      ``weight_blocks_amax_1_to_2``, ``weight_blocks_amax_ge_2``: share of γ blocks whose
      maximum lies in that scale binade (``floor(log2 amax)``, which sets the block's floor
      scale). The share in the *saturating zone* (for E4M3, max in [0.875, 1)·2^k, where the
      floor scale clips every γ of [0.875, 1) to 0.875) is ``weight_floor_overflow`` above.
    - ``weight_blocks_crossed``: number of γ blocks whose binade changed since this monitor's
      previous reading of the module (each crossing rescales the whole block: with E4M3 up to
      12.5 % per element); kept in ``state_dict`` so a resumed run counts on.
    - ``in_force``: 1 when the statistics are for the module's own MX or NVFP4 format, 0 when
      for the reference format.

    A norm whose ``norm_affine`` is NVFP4 is measured in NVFP4 (``rel_bias``, ``rel_error``,
    ``gap`` of the NVFP4 value); ``*_saturation`` is then the fraction of elements that, scaled
    by their block, land above 6 and are clipped, ``*_blocks_clipped`` the fraction of blocks
    holding one, ``*_dynamic_range`` the largest log2(max / min nonzero |x|) over blocks of
    16; ``*_floor_overflow`` (MX's floor scale) is not reported.

    Parameters are identical on every rank under DDP, so nothing is reduced. Under FSDP2 each
    γ/β is gathered (``DTensor.full_tensor()``, one all-gather of ``d`` elements per tensor)
    and measured whole: FSDP2 splits the block axis of these 1-d tensors at offsets that need
    not be multiples of the block size, and the statistics are then those of one process.

    Args:
        every_n_steps: measure at optimizer steps whose ``global_step`` is a multiple of this.
        reference_format: MX element format for modules whose ``norm_affine`` is not MX
            (``None``: report only ``weight_mean``/``weight_std`` for them).
        modules: glob on qualified module names (relative to the LightningModule).

    Raises:
        ValueError: ``every_n_steps < 1`` or a ``reference_format`` that is not MX.

    Example::

        trainer = Trainer(callbacks=[NormAffineMonitor(every_n_steps=50)])
    """

    monitor = NORM_AFFINE

    def __init__(
        self, every_n_steps: int = 50, reference_format: str | None = "e4m3", modules: str = "*"
    ) -> None:
        check_every_n_steps(every_n_steps)
        self.every_n_steps = every_n_steps
        self.reference_format = _check_reference(reference_format)
        self.modules = modules
        self._generator: torch.Generator | None = None
        # {module: floor(log2) of each γ block max at the last reading}, for blocks_crossed.
        self._binades: dict[str, torch.Tensor] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, modules=self.modules)

    def state_dict(self) -> dict[str, Any]:
        return {"binades": {k: v.tolist() for k, v in self._binades.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        binades = state_dict.get("binades", {})
        self._binades = {k: torch.tensor(v, dtype=torch.int32) for k, v in binades.items()}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if not is_monitored_step(trainer.global_step, self.every_n_steps):
            return
        stats = {}
        with torch.no_grad():
            for name, module in _matching(pl_module, is_norm, self.modules):
                for stat, v in self._module_stats(module).items():
                    stats[metric(NORM_AFFINE, name, stat)] = v
                weight = _operand(module, "weight")
                if weight is not None:
                    for stat, v in self._probes(name, module, weight).items():
                        stats[metric(NORM_AFFINE, name, stat)] = v
        publish(trainer, pl_module, stats)

    def _probes(self, name: str, module: nn.Module, weight: torch.Tensor) -> dict:
        """The mechanism probes of γ (see the class docstring): binade shares, crossings."""
        scheme = module.active_scheme() if isinstance(module, MxModule) else None
        block_size = (scheme or PrecisionScheme()).block_size
        binades = block_max_exponents(weight, block_size=block_size).cpu()
        stats = {f"weight_blocks_{k}": v for k, v in binade_shares(binades).items()}
        previous = self._binades.get(name)
        if previous is not None and previous.shape == binades.shape:
            stats["weight_blocks_crossed"] = (previous != binades).sum().double()
        self._binades[name] = binades
        return stats

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model: a model built there exists only from here on.
        _warn_if_empty(self, _matching(pl_module, is_norm, self.modules), "norm")

    def _module_stats(self, module: nn.Module) -> dict[str, torch.Tensor]:
        fmt, scheme, in_force = _format_in_use(module, "norm_affine", self.reference_format)
        stats: dict[str, torch.Tensor] = {}
        weight = _operand(module, "weight")
        if weight is not None:
            stats["weight_mean"] = weight.mean()
            stats["weight_std"] = weight.std() if weight.numel() > 1 else weight.new_zeros(())
        for role, p in (("weight", weight), ("bias", _operand(module, "bias"))):
            if p is None or fmt is None:
                continue
            if fmt == NVFP4:
                q, readings = _nvfp4_readings(role, p, scheme)
            else:
                q, readings = self._mx_readings(role, p, fmt, scheme)
            stats.update(readings)
            stats[f"{role}_rel_bias"] = relative_bias(p, q)
            stats[f"{role}_rel_error"] = relative_error(p, q)
            stats[f"{role}_gap"] = (q.double() - p.double()).mean()
        stats["in_force"] = torch.tensor(float(in_force))
        return stats

    def _mx_readings(self, role: str, p: torch.Tensor, fmt: str, scheme) -> tuple:
        """``p`` quantized as ``fmt`` under ``scheme``, and its MX saturation readings."""
        q = quantize_mx(p, fmt, **_mx_settings(scheme), generator=_seeded(self, p.device))
        kw = {"block_size": scheme.block_size}
        return q, {
            f"{role}_saturation": saturation_fraction(p, fmt, scale_mode=scheme.scale_mode, **kw),
            f"{role}_floor_overflow": floor_overflow_fraction(p, fmt, **kw),
        }


def _nvfp4_readings(role: str, p: torch.Tensor, scheme: PrecisionScheme) -> tuple:
    """``p`` quantized to NVFP4 as ``scheme`` gives ``norm_affine``, and what saturation is
    there: elements clipped at ±6 after scaling, blocks holding one, the blocks' dynamic range."""
    tensor_scale, tile, _ = nvfp4_settings(scheme, "norm_affine", p.dim())
    q = quantize_nvfp4(p, tensor_scale=tensor_scale, tile=tile)
    clipped, blocks_clipped, blocks = nvfp4_clip_counts(p, tensor_scale=tensor_scale, tile=tile)
    return q, {
        f"{role}_saturation": clipped / max(p.numel(), 1),
        f"{role}_blocks_clipped": blocks_clipped / blocks.clamp_min(1),
        f"{role}_dynamic_range": block_dynamic_range(p, block_size=16),
    }


class ActivationMonitor(PeriodicMonitor):
    r"""Quantization statistics of the inputs of MX linear layers.

    On every ``every_n_steps``-th optimizer step a forward hook is attached to each MX
    linear-like module (``MxLinear``, transformers' ``Conv1D``, ...) whose name matches
    ``modules`` (in ``on_train_batch_start``) and removed again in
    ``on_before_optimizer_step``, so other steps pay nothing. The hook
    quantizes the layer's input X as the module's ``act`` role says (same format, block size,
    scale mode and rounding, along the feature axis) and accumulates additive sums over every
    call of the step (all micro-batches); passes in full precision (shadow passes) are
    skipped. Layers whose ``act`` is not MX are measured under ``reference_format`` when one
    is given, else skipped. Logged as ``mx/activations/<module>/<stat>``:

    - ``saturation``: fraction of input elements clipped in their MX block.
    - ``underflow``: of the nonzero input elements, the fraction that became zero.
    - ``sqnr_db``: ``10 log10(sum x^2 / sum (x - q)^2)`` of the quantized input.

    DDP: the sums are added over ranks (one all-reduce) before the statistics are formed, so
    every rank logs the statistics of the global batch.

    Args:
        every_n_steps: measure at optimizer steps whose ``global_step`` is a multiple of this.
        modules: glob on qualified module names (relative to the LightningModule).
        reference_format: MX element format for layers whose ``act`` role is not MX, or
            ``None`` to skip them.

    Raises:
        ValueError: ``every_n_steps < 1`` or a ``reference_format`` that is not MX.

    Example::

        trainer = Trainer(callbacks=[ActivationMonitor(every_n_steps=50)])
    """

    monitor = ACTIVATIONS

    def __init__(
        self, every_n_steps: int = 50, modules: str = "*", reference_format: str | None = None
    ) -> None:
        check_every_n_steps(every_n_steps)
        self.every_n_steps = every_n_steps
        self.modules = modules
        self.reference_format = _check_reference(reference_format)
        self._handles: list[Any] = []
        self._sums: dict[str, torch.Tensor] = {}
        self._generator: torch.Generator | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, modules=self.modules)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._handles or not is_monitored_step(trainer.global_step, self.every_n_steps):
            return
        self._sums = {}
        for name, module in _matching(pl_module, is_gemm, self.modules):
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _warn_if_empty(self, _matching(pl_module, is_gemm, self.modules), "MX linear layer")

    def _hook(self, name: str):
        def hook(module: MxModule, inputs: tuple, output: Any) -> None:
            if module.active_scheme() is None:
                return
            fmt, scheme, _ = _format_in_use(module, "act", self.reference_format)
            if fmt is None:
                return
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            if fmt == NVFP4:
                tensor_scale, tile, _ = nvfp4_settings(scheme, "act")
                sums = nvfp4_quantization_sums(x, tensor_scale=tensor_scale, tile=tile)
            else:
                generator = _seeded(self, x.device)
                sums = quantization_sums(x, fmt, **_mx_settings(scheme), generator=generator)
            self._sums[name] = self._sums[name] + sums if name in self._sums else sums

        return hook

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if not self._handles:
            return
        self._remove_hooks()
        names = list(self._sums)
        if trainer.world_size > 1:
            # Every rank hooks the same layers; a layer a rank did not reach adds zeros.
            names = [n for n, _ in _matching(pl_module, is_gemm, self.modules)]
            zeros = torch.zeros(6, dtype=torch.float64, device=pl_module.device)
            stacked = torch.stack([self._sums.get(n, zeros) for n in names])
            stacked = reduce_sum(trainer, stacked)
            self._sums = {n: s for n, s in zip(names, stacked, strict=True) if s[0] > 0}
        stats = {}
        for name, sums in self._sums.items():
            for stat, v in quantization_stats(sums).items():
                stats[metric(ACTIVATIONS, name, stat)] = v
        self._sums = {}
        publish(trainer, pl_module, stats)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()
