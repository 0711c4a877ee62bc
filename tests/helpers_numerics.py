"""Helpers shared by the quantizer tests: bitwise comparison and the adversarial inputs.

The adversarial grid values come from the tests' own element table (``tests.mx_reference``),
not from ``mxprobe.formats``, so a wrong format table cannot hide its own traps.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from mxprobe.formats import MX_FORMAT_NAMES
from mxprobe.quantize import SCALE_MODES
from tests.mx_reference import reference_format

DETERMINISTIC = ("even", "nearest", "floor")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality with every NaN equal to every NaN (the sign of zero counts)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return False
    ia = a.masked_fill(nan_a, 0).contiguous().view(_INT_OF[a.dtype])
    ib = b.masked_fill(nan_b, 0).contiguous().view(_INT_OF[b.dtype])
    return torch.equal(ia, ib)


def heavy_tailed(*shape: int, seed: int = 0) -> torch.Tensor:
    """Normal values times a log-normal factor: many binades in every block."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp(3 * torch.randn(shape, generator=g))


def _below(v: float) -> float:
    return math.nextafter(v, 0.0)


def _full_rows(fmt: str) -> list[list[float]]:
    """Blocks of exactly 32 values, each one trap."""
    f = reference_format(fmt)
    grid = f.magnitudes()
    step_min = grid[1]
    rows = []
    # amax with mantissa above the element max (floor-scale overflow), and its neighbours.
    rows.append([1.99 * 2.0**f.emax, 1.0, -0.5, 0.25] + [0.1] * 28)
    rows.append([509.44, 3.0] + [1.0] * 30)
    # ties between neighbouring grid values at the top binade and among the subnormals
    mids = [(a + b) / 2 for a, b in zip(grid[1:-1], grid[2:], strict=True)][-12:]
    rows.append([f.max_norm] + mids + [-m for m in mids] + [0.0] * (31 - 2 * len(mids)))
    sub_mids = [(k + 0.5) * step_min for k in range(8)]
    rows.append([2.0**f.emax] + sub_mids + [-m for m in sub_mids] + [0.0] * 15)
    # just below half the smallest step, exactly half, just above
    half = step_min / 2
    rows.append(
        [2.0**f.emax, math.nextafter(half, 0), half, math.nextafter(half, 1), -half] + [0.0] * 27
    )
    rows.append([0.0] * 32)  # all-zero block
    rows.append([1e-40, -3e-42, 1e-45, 0.0] + [0.0] * 28)  # fp32-subnormal-only block
    rows.append([-0.0, 0.0, -1.0, 2.0] + [-0.0] * 28)
    # amax = nextafter(2^k, 0): torch.log2 rounds it up to k
    for k in (0, 3, 8, 20, -20, 127, -126):
        rows.append([_below(2.0**k)] + [2.0 ** (k - 1)] * 31)
    rows.append([3.4e38, -3.3e38, 1.0] + [1e38] * 29)  # near fp32 max
    rows.append([1020.0, 1.0] + [7.0] * 30)  # the bf16 trap
    return rows


def _short_blocks(fmt: str) -> list[list[float]]:
    """Traps that take a few values of a block; the rest is filled with small random values."""
    f = reference_format(fmt)
    grid = f.magnitudes()
    ties = [(a + b) / 2 * (-1) ** i for i, (a, b) in enumerate(zip(grid, grid[1:], strict=False))]
    inf, nan = float("inf"), float("nan")
    blocks = [
        [509.44, 1.0, -3.0],  # e4m3: rounds past 448, must saturate
        [1020.0, -1.0, 3.0],  # a bf16 amax just below a power of two
        [-0.0, 0.0, -0.0, 1.0, -(2.0**-12)],
        [1e-40, -3e-41, 2.0**-149, -(2.0**-149), 2.0**-127],  # fp32 subnormals only
        [1.0, nan, 2.0],  # each poison reaches only its own block
        [inf, -1.0],
        [-inf, 5.0],
        [65504.0, 65519.0, 65520.0, -60000.0, 1.0],  # around fp16's max
        [3.4028234663852886e38, -1.7e38, 1.0],
        [f.max_norm, -f.max_norm / 3],  # rceil boundaries
        [f.max_norm * 2.0**-5, _below(f.max_norm * 2.0**-5)],
        [f.max_norm * (1 + 2.0**-20), 0.1],
    ]
    blocks += [[_below(2.0**k), 2.0 ** (k - 9)] for k in (-126, -20, -1, 0, 3, 8, 9, 16, 127)]
    # Ties of every rounding, subnormals included, next to an amax that gives S = 0 (floor), then
    # shifted far down so that S clamps at -127.
    for shift in (1.0, 2.0**-3, 2.0**-140):
        for i in range(0, len(ties), 31):
            blocks.append([2.0**f.emax * shift] + [t * shift for t in ties[i : i + 31]])
    return blocks


def adversarial(fmt: str) -> torch.Tensor:
    """fp32 rows of 32 (one block each) built around the traps of docs/numerics.md."""
    short = _short_blocks(fmt)
    filler = heavy_tailed(len(short), 32, seed=1) * 1e-3
    for row, values in zip(filler, short, strict=True):
        row[: len(values)] = torch.tensor(values)
    full = torch.tensor(_full_rows(fmt), dtype=torch.float64).to(torch.float32)
    return torch.cat([full, filler])


# The property tests' cases: fp32 values (specials included), any format, scale mode,
# deterministic rounding, block size and dtype; used as ``@given(**REFERENCE_CASES)``.
_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45]),
)
REFERENCE_CASES = dict(
    values=st.lists(_values, min_size=1, max_size=80),
    fmt=st.sampled_from(MX_FORMAT_NAMES),
    scale_mode=st.sampled_from(SCALE_MODES),
    rounding=st.sampled_from(DETERMINISTIC),
    block_size=st.sampled_from([1, 2, 5, 32]),
    dtype=st.sampled_from(DTYPES),
)
