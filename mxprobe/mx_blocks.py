"""The exact MX block numerics (docs/numerics.md): the one internal block API of mxprobe.

A tensor is viewed as blocks of ``block_size`` elements along ``axis`` (``to_blocks``, shaped
(outer, nblocks, block_size, inner)); ``block_scale_exponent`` gives each block its E8M0 scale
exponent S; ``quantize_blocks`` rounds the elements and applies the scale. All arithmetic is
done on fp32 bit patterns (``pow2``, ``exponent``) or by exact power-of-two scalings, so a
result is defined to the bit. The quantizer (``quantize.py``), the packed form (``packing.py``)
and the statistics (``stats.py``) all build on these functions; the Triton kernel mirrors them.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from mxprobe.checks import check_choice
from mxprobe.formats import MX_FORMAT_NAMES, ElementFormat, mx_format

SCALE_MODES = ("floor", "rceil", "ceil", "even")
ROUNDINGS = ("even", "nearest", "floor", "stochastic")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_dtype(dtype: torch.dtype) -> None:
    """Raise TypeError unless ``dtype`` is one the quantizer computes with (fp32/bf16/fp16)."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"unsupported dtype {dtype}; expected one of float32, bfloat16, float16")


def check_args(
    x: torch.Tensor,
    fmt: str | ElementFormat,
    block_size: int,
    axis: int,
    scale_mode: str,
    rounding: str,
) -> tuple[ElementFormat, int]:
    """Validate the arguments every blocked MX operation takes: (the format, ``axis`` >= 0)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"expected a dense tensor, got layout {x.layout}; call .to_dense() first")
    check_dtype(x.dtype)
    fmt = mx_format(fmt)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if x.dim() == 0:
        raise ValueError("cannot quantize a 0-d tensor along an axis; reshape it to 1-d")
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if not -x.dim() <= axis < x.dim():
        raise IndexError(f"axis {axis} is out of range for a {x.dim()}-d tensor")
    check_choice(scale_mode, SCALE_MODES, "scale_mode")
    check_choice(rounding, ROUNDINGS, "rounding")
    _check_padding(x, block_size, axis % x.dim())
    return fmt, axis % x.dim()


# A short tail block is zero-padded to a whole block. Blocks up to this size are taken as asked
# (a 3-long axis in 32-blocks is normal); a longer block may not pad a tensor to more than twice
# its size (plus PADDING_SLACK elements).
MAX_PADDED_BLOCK = 1 << 16
PADDING_SLACK = 1 << 20


def _check_padding(x: torch.Tensor, block_size: int, axis: int) -> None:
    """A ValueError, before anything is allocated, for a block longer than ``MAX_PADDED_BLOCK``
    whose zero padding would more than double the tensor (a 2^40 block on a 32-vector)."""
    if block_size <= MAX_PADDED_BLOCK:
        return
    length = x.shape[axis]
    rows = x.numel() // length if length else 0
    padded = rows * -(-length // block_size) * block_size
    if padded > 2 * x.numel() + PADDING_SLACK:
        limit = max(MAX_PADDED_BLOCK, length)
        raise ValueError(
            f"block_size {block_size} is far longer than the axis it blocks (length {length}): "
            f"padding would allocate {padded} elements for {x.numel()}; expected a block_size "
            f"<= {limit}"
        )


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as fp32 for integer e in [-127, 127], built from bits (2^-127 is subnormal)."""
    bits = torch.where(e >= -126, (e + 127) << 23, torch.full_like(e, 0x00400000))
    return bits.view(torch.float32)


def exponent(x: torch.Tensor) -> torch.Tensor:
    """floor(log2|x|) of fp32 values read from their bits; zero and subnormals give -127."""
    return ((x.view(torch.int32) >> 23) & 0xFF) - 127


def fp32(v: float) -> float:
    """``v`` rounded to the nearest fp32 (kept as a Python float)."""
    return struct.unpack("f", struct.pack("f", v))[0]


# Formats torch can cast to natively (see quantize_blocks).
_NATIVE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}

# fp32(1 / max_norm) per format, computed here once: torch.compile cannot trace struct.
_INV_MAX_FP32 = {name: fp32(1.0 / mx_format(name).max_norm) for name in MX_FORMAT_NAMES}


@dataclass(frozen=True)
class Layout:
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


def to_blocks(x: torch.Tensor, axis: int, block_size: int) -> tuple[torch.Tensor, Layout]:
    """A (outer, nblocks, block_size, inner) view of ``x``: no transposition, so a block along
    axis 0 is as cheap as one along the last axis; the tail is zero-padded (a copy)."""
    layout = Layout(tuple(x.shape), axis, block_size)
    v = x.reshape(layout.outer, layout.length, layout.inner)
    pad = layout.nblocks * block_size - layout.length
    if pad:
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    return v.reshape(layout.outer, layout.nblocks, block_size, layout.inner), layout


def from_blocks(blocks: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The inverse of ``to_blocks``: ``x``'s shape again, the tail padding dropped."""
    v = blocks.reshape(layout.outer, layout.nblocks * layout.block_size, layout.inner)
    return v[:, : layout.length].reshape(layout.shape)


def stochastic_noise(xb: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) fp32 draws, one per element of ``xb``, for stochastic rounding."""
    return torch.rand(xb.shape, generator=generator, device=xb.device, dtype=torch.float32)


def _normalized(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v scaled into the fp32 normal range, the log2 of that scaling) for v >= 0.

    Scaling fp32 subnormals by 2^64 is exact and lets every log2 below be read from bits.
    """
    small = v < 2.0**-126
    return torch.where(small, v * 2.0**64, v), small.to(torch.int32) * 64


def _ceil_log2(v: torch.Tensor) -> torch.Tensor:
    n, shift = _normalized(v)
    return exponent(n) + ((n.view(torch.int32) & 0x7FFFFF) != 0).to(torch.int32) - shift


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
        s = exponent(amax) - fmt.emax
    elif scale_mode == "ceil":
        s = _ceil_log2(amax) - fmt.emax
    elif scale_mode == "even":
        n, shift = _normalized(amax)
        bumped = ((n.view(torch.int32) + (1 << (22 - fmt.mbits))) & 0x7F800000).view(torch.float32)
        s = exponent(bumped) - shift - fmt.emax
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


def quantize_blocks(
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
    y = xb * pow2(-s)  # exact: multiplying by a power of two
    native = _NATIVE_DTYPES.get(fmt.name)
    if rounding == "even" and native is not None and torch.compiler.is_compiling():
        # Inductor vectorizes fp8 casts, which round to nearest-even with subnormals exactly as
        # the element step does (clamping first makes them saturate); eager fp8 casts are slow
        # (~85 us per 16k elements back to fp32), hence the bit-mask form below outside compile.
        v = y.clamp(-fmt.max_norm, fmt.max_norm).to(native).float()
    elif rounding == "even" and not fmt.is_int:
        v = _round_even_float(y, fmt)
    else:
        p = exponent(y).clamp_min(fmt.emin)
        step_exp = p - fmt.mbits
        q = _round_magnitude(y.abs() * pow2(-step_exp), rounding, noise)
        v = torch.copysign(torch.clamp_max(q * pow2(step_exp), fmt.max_norm), y)
    if elements:
        return v, s.masked_fill(~torch.isfinite(amax), 128).squeeze(2)
    # amax * 0 is +0 for a finite block and NaN for a NaN/Inf one: the scale carries the NaN to
    # every element of the block without a select.
    out = v * (pow2(s) + amax * 0.0)
    if scale_mode != "floor" or out_dtype != torch.float32:
        # Past the dtype's range: saturate, never Inf. A floor-scaled value is at most
        # max_norm * 2^(floor(log2 amax) - emax) < 2^128 and exact in fp32: no pass needed.
        out_max = torch.finfo(out_dtype).max
        out = out.clamp(-out_max, out_max)
    return out.to(out_dtype)
