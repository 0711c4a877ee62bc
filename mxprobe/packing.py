"""The packed MX form: one element code per byte and one E8M0 scale byte per block.

``mx_encode`` quantizes with the block numerics of ``mx_blocks`` and packs the result;
``mx_decode`` unpacks it. Decoding an encoding equals ``quantize_mx`` bit for bit (int8 aside:
it has no code for -0). Both are exported as ``mxprobe.mx_encode`` / ``mxprobe.mx_decode``.
"""

from __future__ import annotations

import torch

from mxprobe.formats import ElementFormat, mx_format
from mxprobe.mx_blocks import (
    Layout,
    check_args,
    check_dtype,
    exponent,
    from_blocks,
    pow2,
    quantize_blocks,
    stochastic_noise,
    to_blocks,
)

_NAN_SCALE_BYTE = 255


def _element_codes(v: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """uint8 codes of element values ``v`` (already on the element grid, fp32)."""
    neg = torch.signbit(v)
    m = v.abs()
    if fmt.is_int:
        k = torch.round(m * 64).to(torch.int32)
        return torch.where(neg, -k, k).to(torch.int8).view(torch.uint8)
    e = exponent(m).clamp_min(fmt.emin)
    is_normal = m >= 2.0**fmt.emin
    mant = torch.round(m * pow2(fmt.mbits - e)).to(torch.int32)  # in [0, 2^(mbits+1))
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
    normal = (mfield + (1 << fmt.mbits)).to(torch.float32) * pow2(efield + fmt.emin - 1 - fmt.mbits)
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
    fmt, axis = check_args(x, fmt, block_size, axis, scale_mode, rounding)
    x = x.detach()
    if x.numel() == 0:
        scales = torch.zeros(Layout(tuple(x.shape), axis, block_size).scale_shape)
        return torch.zeros_like(x, dtype=torch.uint8), scales.to(torch.uint8)
    xb, layout = to_blocks(x, axis, block_size)
    noise = stochastic_noise(xb, generator) if rounding == "stochastic" else None
    elems, s = quantize_blocks(xb, fmt, scale_mode, rounding, noise, x.dtype, elements=True)
    codes = _element_codes(torch.nan_to_num(elems, nan=0.0), fmt)
    scales = torch.where(s == 128, _NAN_SCALE_BYTE, s + 127).to(torch.uint8)
    return from_blocks(codes, layout), scales.reshape(layout.scale_shape)


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
    check_dtype(dtype)
    axis = axis % codes.dim()
    if codes.numel() == 0:
        return torch.zeros(codes.shape, dtype=dtype)
    vb, layout = to_blocks(_element_values(codes, fmt), axis, block_size)
    if tuple(scales.shape) != layout.scale_shape:
        raise ValueError(
            f"scales have shape {tuple(scales.shape)} but codes of shape {tuple(codes.shape)} "
            f"need {layout.scale_shape} (block_size={block_size}, axis={axis})"
        )
    sbytes = scales.reshape(layout.outer, layout.nblocks, 1, layout.inner).to(torch.int32)
    out = vb * pow2((sbytes - 127).clamp(-127, 127))
    out_max = float(torch.finfo(dtype).max)
    out = out.clamp(-out_max, out_max)
    out = torch.where(sbytes == _NAN_SCALE_BYTE, float("nan"), out)
    return from_blocks(out, layout).to(dtype)
