"""An independent float64 reference of the MX quantizer, written only for the tests.

It shares no code with ``mxprobe``: the element formats are its own table, copied from the OCP
MX v1.0 values (docs/numerics.md); each format's representable magnitudes are listed by decoding
every bit pattern; scale exponents come from ``math.frexp``; elements are rounded by searching
that list (no step formula, no bit tricks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ReferenceFormat:
    """One element format as the OCP MX v1.0 spec gives it.

    ``emin`` is the exponent of the smallest normal (1 - bias); for int8, whose elements are
    k * 2^-6 with |k| <= 127, ``mbits`` is the 6 fraction bits and ``ebits``, ``emin`` are 0.
    """

    ebits: int
    mbits: int
    emax: int
    max_norm: float
    emin: int
    is_int: bool = False

    def magnitudes(self) -> list[float]:
        """Every non-negative finite value, ascending, by decoding each sign-less code."""
        if self.is_int:
            return [k * 2.0**-self.mbits for k in range(128)]
        bias = 2 ** (self.ebits - 1) - 1
        values = []
        for biased_exponent in range(2**self.ebits):
            for mantissa in range(2**self.mbits):
                fraction = mantissa / 2**self.mbits
                if biased_exponent == 0:  # subnormal: 0.m * 2^(1 - bias)
                    value = fraction * 2.0 ** (1 - bias)
                else:
                    value = (1 + fraction) * 2.0 ** (biased_exponent - bias)
                if value <= self.max_norm:  # codes above it are NaN/Inf (e4m3, e5m2)
                    values.append(value)
        return values


# OCP MX v1.0, section 5.3 (docs/numerics.md): ebits, mbits, emax, max_norm, emin.
REFERENCE_FORMATS = {
    "fp8_e4m3": ReferenceFormat(4, 3, 8, 448.0, -6),
    "fp8_e5m2": ReferenceFormat(5, 2, 15, 57344.0, -14),
    "fp6_e2m3": ReferenceFormat(2, 3, 2, 7.5, 0),
    "fp6_e3m2": ReferenceFormat(3, 2, 4, 28.0, -2),
    "fp4_e2m1": ReferenceFormat(2, 1, 2, 6.0, 0),
    "int8": ReferenceFormat(0, 6, 0, 127.0 / 64.0, 0, is_int=True),
}


def reference_format(name: str) -> ReferenceFormat:
    """The reference table's format by canonical name (``fp8_e4m3``) or short one (``e4m3``)."""
    for canonical, fmt in REFERENCE_FORMATS.items():
        if name.lower() in (canonical, canonical.split("_")[-1]):
            return fmt
    raise KeyError(f"no reference format {name!r}; expected one of {list(REFERENCE_FORMATS)}")


def _ceil_log2(v: float) -> int:
    m, e = math.frexp(v)  # v = m * 2^e, m in [0.5, 1)
    return e - 1 if m == 0.5 else e


def _scale_exponent(amax: float, fmt: ReferenceFormat, scale_mode: str) -> int:
    if amax == 0.0:
        return -127
    m, e = math.frexp(amax)
    floor_e = e - 1
    if scale_mode == "floor":
        s = floor_e - fmt.emax
    elif scale_mode == "ceil":
        s = _ceil_log2(amax) - fmt.emax
    elif scale_mode == "even":
        mant = 2 * m  # in [1, 2)
        rounded = math.floor(mant * 2**fmt.mbits + 0.5)
        s = floor_e + (1 if rounded == 2 ** (fmt.mbits + 1) else 0) - fmt.emax
    elif scale_mode == "rceil":
        t = float(np.float32(amax) * np.float32(1.0 / fmt.max_norm))
        s = -127 if t == 0.0 else _ceil_log2(t)
    else:
        raise AssertionError(scale_mode)
    return max(-127, min(127, s))


def _round_to_grid(mag: np.ndarray, grid: np.ndarray, rounding: str) -> np.ndarray:
    """Round non-negative magnitudes onto ``grid`` (ascending), saturating at its top."""
    top = grid[-1]
    hi_idx = np.searchsorted(grid, mag, side="left")  # first grid >= mag
    hi_idx = np.minimum(hi_idx, len(grid) - 1)
    exact = grid[hi_idx] == mag
    lo_idx = np.where(exact, hi_idx, np.maximum(hi_idx - 1, 0))
    lo, hi = grid[lo_idx], grid[hi_idx]
    over = mag >= top
    if rounding == "floor":
        out = lo
    elif rounding == "up":  # away from zero: the other neighbour stochastic rounding may pick
        out = hi
    else:
        d_lo, d_hi = mag - lo, hi - mag
        if rounding == "nearest":
            out = np.where(d_hi <= d_lo, hi, lo)
        else:  # even: ties go to the even code index
            tie_pick = np.where(hi_idx % 2 == 0, hi, lo)
            out = np.where(d_hi < d_lo, hi, np.where(d_lo < d_hi, lo, tie_pick))
        out = np.where(exact, mag, out)
    return np.where(over, top, out)


def reference_quantize(
    x: torch.Tensor,
    fmt: str,
    block_size: int = 32,
    axis: int = -1,
    scale_mode: str = "floor",
    rounding: str = "even",
) -> torch.Tensor:
    """float64 reference of ``quantize_mx`` for deterministic roundings (and ``"up"``, away from
    zero, which bounds stochastic rounding from above)."""
    f = reference_format(fmt)
    grid = np.array(f.magnitudes(), dtype=np.float64)
    dtype = x.dtype
    moved = x.movedim(axis, -1)
    data = moved.to(torch.float64).numpy().reshape(-1, moved.shape[-1]) if moved.numel() else None
    if data is None:
        return x.clone()
    out = np.empty_like(data)
    length = data.shape[1]
    for r in range(data.shape[0]):
        for start in range(0, length, block_size):
            blk = data[r, start : start + block_size]
            if not np.all(np.isfinite(blk)):
                out[r, start : start + block_size] = np.nan
                continue
            s = _scale_exponent(float(np.max(np.abs(blk))), f, scale_mode)
            y = blk / 2.0**s
            mag = _round_to_grid(np.abs(y), grid, rounding)
            out[r, start : start + block_size] = np.copysign(mag, y) * 2.0**s
    finite_max = float(torch.finfo(dtype).max)
    with np.errstate(over="ignore"):  # a value past fp32's range saturates below
        as32 = out.astype(np.float32)  # the quantizer computes in fp32: one rounding here
    as32 = np.where(np.isnan(as32), as32, np.clip(as32, -finite_max, finite_max))
    res = torch.from_numpy(as32.astype(np.float32)).reshape(moved.shape).to(dtype)
    return res.movedim(-1, axis)
