"""The MX quantizer: one exact function that every part of mxprobe calls.

``quantize_mx`` fake-quantizes a tensor (same shape and dtype out) following docs/numerics.md:
blocks of ``block_size`` elements along ``axis`` share an E8M0 power-of-two scale, elements are
rounded to the element format, saturating. This module checks the arguments, picks the backend
(the torch block numerics of ``mx_blocks``, compiled for large CPU tensors by
``compile_cache``, or the Triton kernel) and makes the gradient pass straight through; all
backends agree to the bit. ``round_to`` emulates elementwise bf16/fp16 rounding.

The packed form (``mx_encode`` / ``mx_decode``, from ``packing``), ``block_scale_exponent`` and
``set_compile`` are importable from here too.
"""

from __future__ import annotations

import functools

import torch

from mxprobe import native
from mxprobe.checks import check_choice
from mxprobe.compile_cache import compiled_call, set_compile
from mxprobe.formats import ElementFormat
from mxprobe.mx_blocks import (
    ROUNDINGS,
    SCALE_MODES,
    block_scale_exponent,
    check_args,
    from_blocks,
    quantize_blocks,
    stochastic_noise,
    to_blocks,
)
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
    "set_compile",
]

BACKENDS = ("auto", "torch", "native", "triton")


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend == "auto":
        if x.is_cuda:
            return "triton"
        # Under torch.compile the torch block numerics are traced and fused into the graph.
        if x.device.type == "cpu" and not torch.compiler.is_compiling() and native.available():
            return "native"
        return "torch"
    if backend == "native" and (x.device.type != "cpu" or not native.available()):
        raise RuntimeError(
            f"backend='native' needs a CPU tensor and a built native quantizer; got a tensor on "
            f"{x.device} ({native.unavailable_reason() or 'native quantizer available'}); use "
            "backend='auto' or 'torch'"
        )
    return backend


def _quantize_impl(x, fmt, block_size, axis, scale_mode, rounding, backend, generator):
    """The dequantized tensor, in ``x``'s dtype and shape."""
    resolved = _resolve_backend(backend, x)
    if resolved == "native":
        return native.quantize(x, fmt, block_size, axis, scale_mode, rounding, generator)
    if resolved == "triton":
        from mxprobe.triton_kernels import quantize_mx_triton

        return quantize_mx_triton(x, fmt, block_size, axis, scale_mode, rounding, generator)
    xb, layout = to_blocks(x, axis, block_size)
    noise = stochastic_noise(xb, generator) if rounding == "stochastic" else None
    out = compiled_call(
        quantize_blocks,
        xb,
        fmt=fmt,
        scale_mode=scale_mode,
        rounding=rounding,
        noise=noise,
        out_dtype=x.dtype,
    )
    return from_blocks(out, layout)


class _StraightThrough(torch.autograd.Function):
    """Quantize in the forward pass; pass the gradient through unchanged (STE)."""

    @staticmethod
    def forward(ctx, x, fmt, block_size, axis, scale_mode, rounding, backend, generator):
        return _quantize_impl(x, fmt, block_size, axis, scale_mode, rounding, backend, generator)

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

    A block holding a NaN or ±Inf comes out all NaN; other values saturate at the element's
    max normal (and at the dtype's largest finite value), never Inf; -0 stays -0. When ``x``
    requires grad the gradient passes straight through.

    Raises:
        TypeError: non-tensor input or a dtype other than fp32/bf16/fp16.
        ValueError: unknown format, scale mode, rounding or backend; ``block_size < 1``.
        IndexError: ``axis`` out of range.
    """
    fmt, axis = check_args(x, fmt, block_size, axis, scale_mode, rounding)
    check_choice(backend, BACKENDS, "backend")
    if x.numel() == 0:
        return x.clone()
    if torch.is_grad_enabled() and x.requires_grad:
        return _StraightThrough.apply(
            x, fmt, block_size, axis, scale_mode, rounding, backend, generator
        )
    return _quantize_impl(x, fmt, block_size, axis, scale_mode, rounding, backend, generator)


def quantize_operand(
    x: torch.Tensor,
    fmt: str,
    *,
    slot: int,
    block_size: int = 32,
    axis: int = -1,
    scale_mode: str = "floor",
    rounding: str = "even",
) -> torch.Tensor:
    """``quantize_mx`` of a GEMM operand that the caller consumes at once and never keeps
    (an MX module's forward or backward body): on the native CPU path the result lives in
    scratch buffer ``slot`` of this thread (``native.scratch``), reused by the next operand of
    that slot, so the two operands of one product take different slots. Elsewhere, and when
    autograd would keep the result, exactly ``quantize_mx``."""
    if (
        x.numel()
        and not (torch.is_grad_enabled() and x.requires_grad)
        and _resolve_backend("auto", x) == "native"
    ):
        fmt, axis = check_args(x, fmt, block_size, axis, scale_mode, rounding)
        return native.quantize(x, fmt, block_size, axis, scale_mode, rounding, None, slot=slot)
    return quantize_mx(
        x, fmt, block_size=block_size, axis=axis, scale_mode=scale_mode, rounding=rounding
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


def _round_cast(x: torch.Tensor, target: torch.dtype, top: float) -> torch.Tensor:
    # Saturating: a finite value past the range becomes ``top``, the largest value both dtypes
    # hold (65504 for fp16), never Inf; ±Inf and NaN inputs stay what they are.
    clamped = torch.where(x.isinf(), x, x.clamp(-top, top))
    return clamped.to(target).to(x.dtype)


@torch.library.custom_op("mxprobe::round_to", mutates_args=())
def _round_op(x: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    return compiled_call(_round_cast, x, target=target, top=_saturation_limit(target, x.dtype))


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
    top = _saturation_limit(target, x.dtype)
    if _native_round_applies(x):
        return native.round_cast(x, target, top, inplace=False)
    return compiled_call(_round_cast, x, target=target, top=top)


def _native_round_applies(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and native.available()


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
    if fmt in ("bf16", "fp16") and x.is_contiguous() and not x.requires_grad:
        # is_compiling first: Dynamo must not trace into the library's build and ctypes calls.
        if not torch.compiler.is_compiling() and _native_round_applies(x):
            target = torch.bfloat16 if fmt == "bf16" else torch.float16
            return native.round_cast(x, target, _saturation_limit(target, x.dtype), inplace=True)
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
