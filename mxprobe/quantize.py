"""The MX quantizer: one exact function that every part of mxprobe calls.

``quantize_mx`` fake-quantizes a tensor (same shape and dtype out) following docs/numerics.md:
blocks of ``block_size`` elements along ``axis`` share an E8M0 power-of-two scale, elements are
rounded to the element format, saturating. This module checks the arguments and makes the
gradient pass straight through; ``mxprobe.kernels`` picks the backend (the native C kernel, the
torch block numerics of ``mx_blocks``, compiled for large CPU tensors, or the Triton kernel),
and all backends agree to the bit. ``round_to`` emulates elementwise bf16/fp16 rounding.

The packed form (``mx_encode`` / ``mx_decode``, from ``packing``) and ``block_scale_exponent``
are importable from here too.
"""

from __future__ import annotations

import functools

import torch

from mxprobe import kernels
from mxprobe.checks import check_choice
from mxprobe.formats import ElementFormat
from mxprobe.kernels import BACKENDS
from mxprobe.mx_blocks import ROUNDINGS, SCALE_MODES, block_scale_exponent, check_args
from mxprobe.packing import mx_decode, mx_encode

__all__ = [
    "BACKENDS",
    "ROUNDINGS",
    "SCALE_MODES",
    "block_scale_exponent",
    "mx_decode",
    "mx_encode",
    "quantize_mx",
    "round_to",
]


class _StraightThrough(torch.autograd.Function):
    """Quantize in the forward pass; pass the gradient through unchanged (STE)."""

    @staticmethod
    def forward(ctx, x, fmt, block_size, axis, scale_mode, rounding, backend, generator):
        return kernels.quantize(x, fmt, block_size, axis, scale_mode, rounding, backend, generator)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None, None, None


def quantize_mx(
    x: torch.Tensor,
    fmt: str | ElementFormat,
    *,
    block_size: int = 32,
    axis: int = -1,
    scale_mode: str = "floor",
    rounding: str = "even",
    backend: str = "auto",
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` to an MX format: same shape and dtype, values on the MX grid.

    Args:
        x: fp32, bf16 or fp16 tensor, any shape, contiguous or not (computed in fp32).
        fmt: element format name or alias (``"fp8_e4m3"``, ``"e4m3"``, ... ``"int8"``).
        block_size: elements per shared scale along ``axis``; a short tail block is zero-padded.
        axis: the axis along which blocks are formed.
        scale_mode: ``floor`` (OCP), ``rceil`` (NVIDIA), ``ceil`` or ``even`` (torchao).
        rounding: ``even`` (ties to even), ``nearest`` (ties away from zero), ``floor``
            (toward zero) or ``stochastic`` (unbiased; reproducible with ``generator``).
        backend: ``auto`` (Triton for CUDA tensors; for CPU tensors the native C kernel,
            built at first use, or the torch path under ``torch.compile`` and where no C
            compiler is found), ``native``, ``torch`` (the reference) or ``triton``.
        generator: random source for stochastic rounding.
        out: where to write the result (returned): a contiguous tensor of ``x``'s shape, dtype
            and device that shares no memory with ``x``; the caller owns it, so it is
            overwritten only when the caller passes it again (e.g. an
            ``mxprobe.kernels.OperandBuffers`` buffer). Not for an input autograd tracks.

    A block holding a NaN or ±Inf comes out all NaN; other values saturate at the element's
    max normal (and at the dtype's largest finite value), never Inf; -0 stays -0. When ``x``
    requires grad the gradient passes straight through.

    Raises:
        TypeError: non-tensor input or a dtype other than fp32/bf16/fp16.
        ValueError: unknown format, scale mode, rounding or backend; ``block_size < 1``; an
            ``out`` of another shape, dtype or device, not contiguous, or sharing ``x``'s memory.
        IndexError: ``axis`` out of range.
        RuntimeError: ``out`` with an input autograd tracks, as torch's own ``out=``.
    """
    fmt, axis = check_args(x, fmt, block_size, axis, scale_mode, rounding)
    check_choice(backend, BACKENDS, "backend")
    tracked = torch.is_grad_enabled() and x.requires_grad
    if out is not None:
        _check_out(out, x, tracked)
    if x.numel() == 0:
        return x.clone() if out is None else out
    if tracked:
        return _StraightThrough.apply(
            x, fmt, block_size, axis, scale_mode, rounding, backend, generator
        )
    return kernels.quantize(x, fmt, block_size, axis, scale_mode, rounding, backend, generator, out)


def _check_out(out: torch.Tensor, x: torch.Tensor, tracked: bool) -> None:
    if tracked:
        raise RuntimeError(
            "quantize_mx(out=...) does not support automatic differentiation: x requires grad; "
            "call it under torch.no_grad() or leave out out="
        )
    if x.numel() and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        raise ValueError("out shares memory with x; pass a buffer of its own")
    if (out.shape, out.dtype, out.device) != (x.shape, x.dtype, x.device) or not (
        out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous tensor of x's shape {tuple(x.shape)}, dtype {x.dtype} "
            f"and device {x.device}; got shape {tuple(out.shape)}, dtype {out.dtype}, device "
            f"{out.device}, {'' if out.is_contiguous() else 'not '}contiguous"
        )


@functools.cache
def _saturation_limit(target: torch.dtype, dtype: torch.dtype) -> float:
    """The largest finite value of ``target`` that ``dtype`` also holds (fp32 -> fp16: 65504;
    fp16 -> bf16 and back: 65280, since bf16 rounds 65504 up to 65536, past fp16)."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16}[target]
    top = min(torch.finfo(target).max, torch.finfo(dtype).max)
    v = torch.tensor(top, dtype=torch.float64).to(target)
    while float(v) > top or float(v.to(dtype)) != float(v):
        v = (v.view(bits) - 1).view(target)  # the next smaller positive value of target
    return float(v)


@torch.library.custom_op("mxprobe::round_to", mutates_args=())
def _round_op(x: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    return kernels.round_cast(x, target, _saturation_limit(target, x.dtype))


@_round_op.register_fake
def _(x: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    return torch.empty_like(x)


def _round(x: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    """Round ``x`` to ``target`` and back.

    Under ``torch.compile`` an opaque custom op: Inductor otherwise keeps the value in fp32
    across a ``.to(bfloat16).to(float32)`` pair and silently drops the rounding (it moved a
    compiled MX model's output by 5e-2). Eager calls skip the op's dispatch cost.
    """
    if torch.compiler.is_compiling():
        return _round_op(x, target)
    return kernels.round_cast(x, target, _saturation_limit(target, x.dtype))


class _RoundStraightThrough(torch.autograd.Function):
    """Elementwise rounding in the forward pass, identity gradient (one op, no add/sub)."""

    @staticmethod
    def forward(ctx, x, target):
        return _round(x, target)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def round_to_owned(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """``round_to`` for a tensor the caller owns outright (e.g. a GEMM output it just made):
    rounded in place on the native CPU path, saving an allocation and a pass over memory."""
    owned = x.dtype == torch.float32 and x.is_contiguous() and not x.requires_grad
    if fmt in ("bf16", "fp16") and owned and not torch.compiler.is_compiling():
        target = torch.bfloat16 if fmt == "bf16" else torch.float16
        return kernels.round_cast(x, target, _saturation_limit(target, x.dtype), reuse_input=True)
    return round_to(x, fmt)


def round_to(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Elementwise round-to-nearest-even to ``"bf16"`` / ``"fp16"`` (returned in ``x``'s dtype),
    saturating: finite values beyond the format's largest (fp16: 65504) become that value,
    never Inf; ±Inf and NaN pass through.

    ``"fp32"`` returns ``x`` unchanged. The gradient passes straight through.
    """
    if fmt == "fp32":
        return x
    if fmt not in ("bf16", "fp16"):
        raise ValueError(f"unknown elementwise format {fmt!r}; expected one of bf16, fp16, fp32")
    target = torch.bfloat16 if fmt == "bf16" else torch.float16
    if x.dtype == target:
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _RoundStraightThrough.apply(x, target)
    return _round(x, target)
