"""The MX quantizer: one exact function that every part of mxprobe calls.

``quantize_mx`` fake-quantizes a tensor (same shape and dtype out) following DESIGN.md §3:
blocks of ``block_size`` elements along ``axis`` share an E8M0 power-of-two scale, elements are
rounded to the element format, saturating. All arithmetic is done on fp32 bit patterns or by
exact power-of-two scalings, so the result is defined to the bit and identical across the
eager torch path, the compiled torch path and the Triton kernel.

``mx_encode`` / ``mx_decode`` give the real packed form (one element code per byte, one E8M0
scale byte per block). ``round_to`` emulates elementwise bf16/fp16 rounding.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import warnings
from dataclasses import dataclass

import torch

from mxprobe.compiled import compile_model
from mxprobe.formats import MX_FORMAT_NAMES, ElementFormat, mx_format

SCALE_MODES = ("floor", "rceil", "ceil", "even")
ROUNDINGS = ("even", "nearest", "floor", "stochastic")
BACKENDS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NAN_SCALE_BYTE = 255

# Below this many elements the compiled CPU path is not worth its dispatch overhead.
_COMPILE_MIN_NUMEL = 1 << 16


def _check_choice(value: str, valid: tuple[str, ...], what: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(valid)}")
    return value


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as fp32 for integer e in [-127, 127], built from bits (2^-127 is subnormal)."""
    bits = torch.where(e >= -126, (e + 127) << 23, torch.full_like(e, 0x00400000))
    return bits.view(torch.float32)


def _exponent(x: torch.Tensor) -> torch.Tensor:
    """floor(log2|x|) of fp32 values read from their bits; zero and subnormals give -127."""
    return ((x.view(torch.int32) >> 23) & 0xFF) - 127


def _fp32(v: float) -> float:
    """``v`` rounded to the nearest fp32 (kept as a Python float)."""
    return struct.unpack("f", struct.pack("f", v))[0]


# Formats torch can cast to natively (see _quantize_blocks).
_NATIVE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}

# fp32(1 / max_norm) per format, computed here once: torch.compile cannot trace struct.
_INV_MAX_FP32 = {name: _fp32(1.0 / mx_format(name).max_norm) for name in MX_FORMAT_NAMES}


def _normalized(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v scaled into the fp32 normal range, the log2 of that scaling) for v >= 0.

    Scaling fp32 subnormals by 2^64 is exact and lets every log2 below be read from bits.
    """
    small = v < 2.0**-126
    return torch.where(small, v * 2.0**64, v), small.to(torch.int32) * 64


def _ceil_log2(v: torch.Tensor) -> torch.Tensor:
    n, shift = _normalized(v)
    return _exponent(n) + ((n.view(torch.int32) & 0x7FFFFF) != 0).to(torch.int32) - shift


def block_scale_exponent(amax: torch.Tensor, fmt: ElementFormat, scale_mode: str) -> torch.Tensor:
    """The shared scale exponent S (int32, clamped to E8M0's [-127, 127]) of blocks of max amax.

    - ``floor`` (OCP v1.0): S = floor(log2 amax) - emax.
    - ``ceil`` (torchao CEIL): S = ceil(log2 amax) - emax, one more than floor unless amax is a
      power of two.
    - ``even`` (torchao EVEN): amax is first rounded half-up to the element's mantissa width
      (``mbits`` bits after the leading one); S = floor(log2 of that) - emax. It differs from
      floor only when amax lies within half an element ulp of the next power of two.
    - ``rceil`` (NVIDIA): the smallest S with amax / 2^S <= max_norm, computed as
      ceil(log2(fp32(amax * fp32(1/max_norm)))).

    Every log2 is exact, fp32 subnormals included (torchao's bit formulas treat a subnormal
    amax as if it were 2^-127 times its mantissa; after the clamp this matters only for int8,
    a format torchao does not have). Zero amax gives S = -127.
    """
    if scale_mode == "floor":
        # A subnormal amax has floor(log2) <= -127, so the clamp below gives -127 whether its
        # log2 is exact or read from the bits as -127: skip the normalization (hot path).
        s = _exponent(amax) - fmt.emax
    elif scale_mode == "ceil":
        s = _ceil_log2(amax) - fmt.emax
    elif scale_mode == "even":
        n, shift = _normalized(amax)
        bumped = ((n.view(torch.int32) + (1 << (22 - fmt.mbits))) & 0x7F800000).view(torch.float32)
        s = _exponent(bumped) - shift - fmt.emax
    else:  # rceil
        s = _ceil_log2(amax * _INV_MAX_FP32[fmt.name])
    return s.clamp(-127, 127)


def _round_even_float(y: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """``y`` (fp32, already divided by the block scale) rounded to the float element format,
    ties to even, saturating at its max normal; -0 stays -0, Inf/NaN come out Inf or NaN.

    One fp32 addition does the rounding: adding c = 2^(p + 23 - mbits), with p = the element's
    binade floor(log2|y|) clamped below at emin, leaves exactly ``mbits`` bits of |y| after its
    leading one (subnormals: a fixed step 2^(emin - mbits)), and the hardware rounds the sum to
    nearest-even; subtracting c again is exact. About ten cheap vectorized passes, no selects,
    no fp8 casts (both are slow on CPU for small tensors).
    """
    a = y.abs()
    binade = a.clamp_min(2.0**fmt.emin).view(torch.int32) & 0x7F800000
    c = (binade + ((23 - fmt.mbits) << 23)).view(torch.float32)
    return torch.copysign(((a + c) - c).clamp_max(fmt.max_norm), y)


def _round_magnitude(r: torch.Tensor, rounding: str, noise: torch.Tensor | None) -> torch.Tensor:
    """Round non-negative fp32 ``r`` (< 2^24) to an integer; every branch is exact."""
    if rounding == "even":
        return torch.round(r)
    q = torch.floor(r)
    if rounding == "floor":
        return q
    frac = r - q  # exact: r and q share an exponent range
    if rounding == "nearest":
        return q + (frac >= 0.5).to(r.dtype)
    return q + (noise < frac).to(r.dtype)  # stochastic: P(up) = frac, unbiased


def _quantize_blocks(
    xb: torch.Tensor,
    fmt: ElementFormat,
    scale_mode: str,
    rounding: str,
    noise: torch.Tensor | None,
    out_dtype: torch.dtype,
    elements: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fake-quantize blocks ``xb`` of shape (outer, nblocks, block_size, inner), computing in fp32.

    Returns the dequantized values in ``out_dtype``; with ``elements``, instead (the signed fp32
    element values before scaling, the scale exponents S as int32 of shape (outer, nblocks,
    inner) with S = 128 marking a NaN/Inf block). The dtype casts live here so that the compiled
    path fuses them.
    """
    xb = xb.float()
    amax = xb.abs().amax(dim=2, keepdim=True)  # torch.amax propagates NaN (Inf stays Inf)
    s = block_scale_exponent(amax, fmt, scale_mode)
    y = xb * _pow2(-s)  # exact: multiplying by a power of two
    native = _NATIVE_DTYPES.get(fmt.name)
    if rounding == "even" and native is not None and torch.compiler.is_compiling():
        # Inductor vectorizes fp8 casts, which round to nearest-even with subnormals exactly as
        # the element step does (clamping first makes them saturate); eager fp8 casts are slow
        # (~85 us per 16k elements back to fp32), hence the bit-mask form below outside compile.
        v = y.clamp(-fmt.max_norm, fmt.max_norm).to(native).float()
    elif rounding == "even" and not fmt.is_int:
        v = _round_even_float(y, fmt)
    else:
        p = _exponent(y).clamp_min(fmt.emin)
        step_exp = p - fmt.mbits
        q = _round_magnitude(y.abs() * _pow2(-step_exp), rounding, noise)
        v = torch.copysign(torch.clamp_max(q * _pow2(step_exp), fmt.max_norm), y)
    if elements:
        return v, s.masked_fill(~torch.isfinite(amax), 128).squeeze(2)
    # amax * 0 is +0 for a finite block and NaN for a NaN/Inf one: the scale carries the NaN to
    # every element of the block without a select.
    out = v * (_pow2(s) + amax * 0.0)
    if scale_mode != "floor" or out_dtype != torch.float32:
        # Past the dtype's range: saturate, never Inf. A floor-scaled value is at most
        # max_norm * 2^(floor(log2 amax) - emax) < 2^128 and exact in fp32: no pass needed.
        out_max = torch.finfo(out_dtype).max
        out = out.clamp(-out_max, out_max)
    return out.to(out_dtype)


_compiled: dict[tuple, object] = {}
_RECOMPILE_LIMIT = 512
_compile_failed = False
_compile_on = os.environ.get("MXPROBE_COMPILE", "1") not in ("0", "false", "False", "")


def set_compile(enabled: bool) -> bool:
    """Turn the torch.compile'd CPU path on or off (default: on unless ``MXPROBE_COMPILE=0``).

    Returns the previous setting. Compiling costs 10-30 s per (format, scale mode, rounding,
    dtype) the first time on a machine (Inductor caches it on disk), then runs several times
    faster than eager torch on large tensors; one-shot tools turn it off. The first compile
    raises ``torch._dynamo.config.recompile_limit`` to at least 512 for the process, so that
    every variant gets compiled.
    """
    global _compile_on
    previous, _compile_on = _compile_on, bool(enabled)
    return previous


def _maybe_compiled(fn, key: tuple, x: torch.Tensor, **static):
    """``fn(x, **static)``, through a compiled twin per ``key`` for large CPU tensors.

    One compiled function per variant, so that the static arguments (format constants, dtypes)
    are baked into the generated kernel.
    """
    global _compile_failed
    use_compiled = (
        _compile_on
        and not _compile_failed
        and x.device.type == "cpu"
        and x.numel() >= _COMPILE_MIN_NUMEL
        and not torch.compiler.is_compiling()
    )
    if not use_compiled:
        return fn(x, **static)
    dynamic = {k: v for k, v in static.items() if isinstance(v, torch.Tensor) or v is None}
    baked = {k: v for k, v in static.items() if k not in dynamic}
    if key not in _compiled:
        # All variants share one code object, and dynamo's recompile limit counts per code
        # object: without a raised limit the ninth variant would silently run eager. Raised
        # once, process-wide (a per-call config.patch costs more than a small quantization).
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, _RECOMPILE_LIMIT)
        _compiled[key] = compile_model(functools.partial(fn, **baked), dynamic=True)
    try:
        # Detached: a requires_grad flip would otherwise cost a recompile per variant.
        return _compiled[key](x.detach(), **dynamic)
    except Exception as err:  # a broken C++ toolchain must cost speed, not correctness
        _compile_failed = True
        warnings.warn(
            f"torch.compile of the MX quantizer failed ({type(err).__name__}: {err}); "
            "falling back to eager torch",
            RuntimeWarning,
            stacklevel=3,
        )
        return fn(x, **static)


def _run_blocks(xb, fmt, scale_mode, rounding, noise, out_dtype):
    """``_quantize_blocks`` (compiled for large CPU tensors)."""
    return _maybe_compiled(
        _quantize_blocks,
        (fmt, scale_mode, rounding, out_dtype),
        xb,
        fmt=fmt,
        scale_mode=scale_mode,
        rounding=rounding,
        noise=noise,
        out_dtype=out_dtype,
    )


def _check_common(x, fmt, block_size, axis, scale_mode, rounding, backend):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"unsupported dtype {x.dtype}; expected one of float32, bfloat16, float16")
    fmt = mx_format(fmt)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if x.dim() == 0:
        raise ValueError("cannot quantize a 0-d tensor along an axis; reshape it to 1-d")
    if not -x.dim() <= axis < x.dim():
        raise IndexError(f"axis {axis} is out of range for a {x.dim()}-d tensor")
    _check_choice(scale_mode, SCALE_MODES, "scale_mode")
    _check_choice(rounding, ROUNDINGS, "rounding")
    _check_choice(backend, BACKENDS, "backend")
    return fmt, axis % x.dim()


@dataclass(frozen=True)
class _Layout:
    """How ``x`` maps onto (outer, nblocks, block_size, inner) blocks along ``axis``."""

    shape: tuple
    axis: int
    block_size: int

    @property
    def outer(self) -> int:
        return math.prod(self.shape[: self.axis])

    @property
    def length(self) -> int:
        return self.shape[self.axis]

    @property
    def inner(self) -> int:
        return math.prod(self.shape[self.axis + 1 :])

    @property
    def nblocks(self) -> int:
        return -(-self.length // self.block_size)

    @property
    def scale_shape(self) -> tuple:
        return (*self.shape[: self.axis], self.nblocks, *self.shape[self.axis + 1 :])


def _to_blocks(x: torch.Tensor, axis: int, block_size: int) -> tuple[torch.Tensor, _Layout]:
    """A (outer, nblocks, block_size, inner) view of ``x``: no transposition, so a block along
    axis 0 is as cheap as one along the last axis; the tail is zero-padded (a copy)."""
    layout = _Layout(tuple(x.shape), axis, block_size)
    v = x.reshape(layout.outer, layout.length, layout.inner)
    pad = layout.nblocks * block_size - layout.length
    if pad:
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    return v.reshape(layout.outer, layout.nblocks, block_size, layout.inner), layout


def _from_blocks(blocks: torch.Tensor, layout: _Layout) -> torch.Tensor:
    v = blocks.reshape(layout.outer, layout.nblocks * layout.block_size, layout.inner)
    return v[:, : layout.length].reshape(layout.shape)


def _dtype_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _stochastic_noise(xb: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(xb.shape, generator=generator, device=xb.device, dtype=torch.float32)


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    return backend


def _quantize_impl(x, fmt, block_size, axis, scale_mode, rounding, backend, generator):
    """The dequantized tensor, in ``x``'s dtype and shape."""
    if _resolve_backend(backend, x) == "triton":
        from mxprobe.triton_kernels import quantize_mx_triton

        return quantize_mx_triton(x, fmt, block_size, axis, scale_mode, rounding, generator)
    xb, layout = _to_blocks(x, axis, block_size)
    noise = _stochastic_noise(xb, generator) if rounding == "stochastic" else None
    out = _run_blocks(xb, fmt, scale_mode, rounding, noise, x.dtype)
    return _from_blocks(out, layout)


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
        backend: ``torch``, ``triton`` or ``auto`` (Triton for CUDA tensors, torch otherwise).
        generator: random source for stochastic rounding.

    A block holding a NaN or ±Inf comes out all NaN; other values saturate at the element's
    max normal (and at the dtype's largest finite value), never Inf; -0 stays -0. When ``x``
    requires grad the gradient passes straight through.

    Raises:
        TypeError: non-tensor input or a dtype other than fp32/bf16/fp16.
        ValueError: unknown format, scale mode, rounding or backend; ``block_size < 1``.
        IndexError: ``axis`` out of range.
    """
    fmt, axis = _check_common(x, fmt, block_size, axis, scale_mode, rounding, backend)
    if x.numel() == 0:
        return x.clone()
    if torch.is_grad_enabled() and x.requires_grad:
        return _StraightThrough.apply(
            x, fmt, block_size, axis, scale_mode, rounding, backend, generator
        )
    return _quantize_impl(x, fmt, block_size, axis, scale_mode, rounding, backend, generator)


def _element_codes(v: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """uint8 codes of element values ``v`` (already on the element grid, fp32)."""
    neg = torch.signbit(v)
    m = v.abs()
    if fmt.is_int:
        k = torch.round(m * 64).to(torch.int32)
        return torch.where(neg, -k, k).to(torch.int8).view(torch.uint8)
    e = _exponent(m).clamp_min(fmt.emin)
    is_normal = m >= 2.0**fmt.emin
    mant = torch.round(m * _pow2(fmt.mbits - e)).to(torch.int32)  # in [0, 2^(mbits+1))
    efield = torch.where(is_normal, e - fmt.emin + 1, torch.zeros_like(e))
    mfield = torch.where(is_normal, mant - (1 << fmt.mbits), mant)
    code = (efield << fmt.mbits) | mfield
    return (code | (neg.to(torch.int32) << (fmt.ebits + fmt.mbits))).to(torch.uint8)


def _element_values(codes: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """fp32 element values of uint8 ``codes``."""
    if fmt.is_int:
        return codes.view(torch.int8).to(torch.float32) / 64.0
    c = codes.to(torch.int32)
    mfield = c & ((1 << fmt.mbits) - 1)
    efield = (c >> fmt.mbits) & ((1 << fmt.ebits) - 1)
    sign = (c >> (fmt.ebits + fmt.mbits)) & 1
    sub = mfield.to(torch.float32) * 2.0 ** (fmt.emin - fmt.mbits)
    normal = (mfield + (1 << fmt.mbits)).to(torch.float32) * _pow2(
        efield + fmt.emin - 1 - fmt.mbits
    )
    mag = torch.where(efield == 0, sub, normal)
    return torch.where(sign == 1, -mag, mag)


def mx_encode(
    x: torch.Tensor,
    fmt: str | ElementFormat,
    *,
    block_size: int = 32,
    axis: int = -1,
    scale_mode: str = "floor",
    rounding: str = "even",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``x`` into MX: (element codes, E8M0 scale bytes), both ``torch.uint8``.

    ``codes`` has ``x``'s shape, one code per byte (sign, exponent, mantissa bits right-aligned;
    int8 in two's complement). ``scales`` has ``x``'s shape with ``axis`` replaced by the number
    of blocks; byte = S + 127 and 0xFF marks a NaN block. ``mx_decode(codes, scales, ...,
    dtype=x.dtype)`` equals ``quantize_mx`` bit for bit, except that int8 has no code for -0
    (its zeros decode as +0). Runs the torch path on ``x``'s device.
    """
    fmt, axis = _check_common(x, fmt, block_size, axis, scale_mode, rounding, "torch")
    x = x.detach()
    if x.numel() == 0:
        scales = torch.zeros(_Layout(tuple(x.shape), axis, block_size).scale_shape)
        return torch.zeros_like(x, dtype=torch.uint8), scales.to(torch.uint8)
    xb, layout = _to_blocks(x, axis, block_size)
    noise = _stochastic_noise(xb, generator) if rounding == "stochastic" else None
    elems, s = _quantize_blocks(xb, fmt, scale_mode, rounding, noise, x.dtype, elements=True)
    codes = _element_codes(torch.nan_to_num(elems, nan=0.0), fmt)
    scales = torch.where(s == 128, _NAN_SCALE_BYTE, s + 127).to(torch.uint8)
    return _from_blocks(codes, layout), scales.reshape(layout.scale_shape)


def mx_decode(
    codes: torch.Tensor,
    scales: torch.Tensor,
    fmt: str | ElementFormat,
    *,
    block_size: int = 32,
    axis: int = -1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode MX (element codes, E8M0 scale bytes) from ``mx_encode`` back to ``dtype`` values."""
    fmt = mx_format(fmt)
    if codes.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"codes and scales must be uint8, got {codes.dtype} and {scales.dtype}")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"unsupported dtype {dtype}; expected one of float32, bfloat16, float16")
    axis = axis % codes.dim()
    if codes.numel() == 0:
        return torch.zeros(codes.shape, dtype=dtype)
    vb, layout = _to_blocks(_element_values(codes, fmt), axis, block_size)
    if tuple(scales.shape) != layout.scale_shape:
        raise ValueError(
            f"scales have shape {tuple(scales.shape)} but codes of shape {tuple(codes.shape)} "
            f"need {layout.scale_shape} (block_size={block_size}, axis={axis})"
        )
    sbytes = scales.reshape(layout.outer, layout.nblocks, 1, layout.inner).to(torch.int32)
    out = vb * _pow2((sbytes - 127).clamp(-127, 127))
    out = out.clamp(-_dtype_max(dtype), _dtype_max(dtype))
    out = torch.where(sbytes == _NAN_SCALE_BYTE, float("nan"), out)
    return _from_blocks(out, layout).to(dtype)


def _round_cast(x: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    return x.to(target).to(x.dtype)


def _round(x: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    """Round ``x`` to ``target`` and back (one fused pass when compiled)."""
    return _maybe_compiled(_round_cast, ("round", target, x.dtype), x, target=target)


class _RoundStraightThrough(torch.autograd.Function):
    """Elementwise rounding in the forward pass, identity gradient (one op, no add/sub)."""

    @staticmethod
    def forward(ctx, x, target):
        return _round(x, target)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def round_to(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Elementwise round-to-nearest-even to ``"bf16"`` / ``"fp16"`` (returned in ``x``'s dtype).

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
