"""An independent float64 reference of the MX quantizer, written only for the tests.

It shares no code with ``mxprobe.quantize``: scale exponents come from ``math.frexp``, and
elements are rounded by searching the format's explicit list of representable magnitudes
(no step formula, no bit tricks).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mxprobe.formats import mx_format


def _ceil_log2(v: float) -> int:
    m, e = math.frexp(v)  # v = m * 2^e, m in [0.5, 1)
    return e - 1 if m == 0.5 else e


def _scale_exponent(amax: float, fmt, scale_mode: str) -> int:
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
    """float64 reference of ``quantize_mx`` for deterministic roundings."""
    f = mx_format(fmt)
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
