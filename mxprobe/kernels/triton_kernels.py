"""The Triton twin of ``mx_blocks.quantize_blocks``: the same function, bit for bit.

The per-block part (block max, scale exponent S) mirrors the torch path step by step. The
per-element part is rewritten to be cheap, because at bf16 the kernel has a budget of only
~20 instructions per element before it stops being memory-bound, yet it computes the same
exact values:

- The exponent of y = x / 2^S is kept in place in the fp32 exponent field, so the element steps
  2^(p - mbits) and 2^(mbits - p) cost one integer op each.
- Ties-to-even uses (r + 2^23) - 2^23: for 0 <= r < 2^23 the add rounds exactly once, to an
  integer, ties to even (rint is not portable to the interpreter). A contracted FMA in front of
  it (r is a product) only removes an already-exact rounding.
- bf16 is read and written as the top half of an fp32 bit pattern (Triton's interpreter
  truncates fp32 -> bf16 and mangles bf16 subnormals). Truncation is exact: an output has at
  most 7 significant bits, and below 2^-126 it lies on the element grid, whose step is either
  >= 2^-133 (bf16's subnormal step) or finer, and then the output is x itself or the
  saturation value max_norm * 2^S, a multiple of 2^(emax - mbits - 127) >= 2^-133.

The kernel reads and writes ``x`` in its own layout (contiguous, or permuted: a transposed
weight), seen as (outer, length, inner) with ``length`` the block axis, so blocks along a
leading axis (3 of the 6 GEMM operands of a linear layer) cost no transposing copy. With
``inner == 1`` a program owns ``ROWS`` consecutive blocks as rows of a tile; otherwise it owns
one block position along ``length`` for ``INNER_TILE`` neighbouring columns, so its loads run
along the contiguous ``inner`` axis and the block max reduces over the tile's first axis.
Blocks are padded to a power of two and masked (masked lanes count as 0 for the block max).

On a CPU tensor the kernel runs only under Triton's interpreter: ``TRITON_INTERPRET=1`` must be
set before triton is first imported (``triton.jit`` picks its mode when it decorates, and
triton's own ``tl.max`` is decorated at ``import triton``).
"""

from __future__ import annotations

import contextlib
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # quantize.py imports this module only for backend="triton"
    raise ImportError(
        "backend='triton' needs the `triton` package (Linux only): pip install triton; "
        "or use backend='torch'"
    ) from err

from mxprobe.formats import ElementFormat
from mxprobe.mx_blocks import fp32

# Elements per program: 16 per thread at 8 warps, enough bytes in flight to saturate HBM.
_TILE = 4096
_NUM_WARPS = 8


@triton.jit
def _pow2(e):
    """2^e as fp32 for integer e in [-127, 127], built from bits (2^-127 is subnormal)."""
    return tl.where(e >= -126, (e + 127) << 23, 0x00400000).to(tl.float32, bitcast=True)


@triton.jit
def _exponent(bits):
    """floor(log2|x|) of the fp32 bit pattern ``bits``; zero and subnormals give -127."""
    return ((bits >> 23) & 0xFF) - 127


@triton.jit
def _normalized(bits):
    """(bits of v scaled into the fp32 normal range, log2 of that scaling) for v >= 0.

    As in the torch path: fp32 subnormals times 2^64 (exact) so every log2 reads from bits.
    """
    shift = (bits < 0x00800000).to(tl.int32) * 64
    return (bits.to(tl.float32, bitcast=True) * _pow2(shift)).to(tl.int32, bitcast=True), shift


@triton.jit
def _ceil_log2(bits):
    n, shift = _normalized(bits)
    return _exponent(n) + ((n & 0x7FFFFF) != 0).to(tl.int32) - shift


@triton.jit
def _scale_exponent(
    amax_bits,
    SCALE_MODE: tl.constexpr,
    EMAX: tl.constexpr,
    MBITS: tl.constexpr,
    INV_MAX_NORM: tl.constexpr,
):
    """The E8M0 scale exponent S of ``mx_blocks.block_scale_exponent``, clamped to [-127, 127]."""
    if SCALE_MODE == "floor":
        n, shift = _normalized(amax_bits)
        s = _exponent(n) - shift - EMAX
    elif SCALE_MODE == "ceil":
        s = _ceil_log2(amax_bits) - EMAX
    elif SCALE_MODE == "even":
        n, shift = _normalized(amax_bits)
        s = _exponent((n + (1 << (22 - MBITS))) & 0x7F800000) - shift - EMAX
    else:  # rceil: ceil(log2(fp32(amax * fp32(1/max_norm))))
        t = amax_bits.to(tl.float32, bitcast=True) * INV_MAX_NORM
        s = _ceil_log2(t.to(tl.int32, bitcast=True))
    return tl.minimum(tl.maximum(s, -127), 127)


@triton.jit
def _round_magnitude(r, seed_ptr, offsets, ROUNDING: tl.constexpr):
    """Round non-negative fp32 ``r`` (< 2^24) to an integer-valued fp32; every branch is exact."""
    if ROUNDING == "even":
        q = (r + 8388608.0) - 8388608.0  # one rounding at 2^23, where the ulp is 1
    else:
        q = tl.floor(r)
        if ROUNDING == "nearest":
            q += tl.where(r - q >= 0.5, 1.0, 0.0)  # r - q is exact (Sterbenz)
        elif ROUNDING == "stochastic":
            # The seed is read on the device: drawing it needs no device -> host sync.
            draw = tl.rand(tl.load(seed_ptr), offsets)
            q += tl.where(draw < r - q, 1.0, 0.0)  # P(up) = frac: unbiased
    return q


@triton.jit
def _quantize_kernel(
    x_ptr,
    out_ptr,
    seed_ptr,  # one int64 seed, read only for stochastic rounding
    n_blocks,
    length,
    inner,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_POW2: tl.constexpr,
    ROWS: tl.constexpr,
    INNER_TILE: tl.constexpr,
    BLOCK_AXIS: tl.constexpr,  # the tile axis that runs along a block: 1 iff inner == 1
    EVEN_ROWS: tl.constexpr,
    EMAX: tl.constexpr,
    MBITS: tl.constexpr,
    EMIN: tl.constexpr,
    MAX_NORM: tl.constexpr,
    INV_MAX_NORM: tl.constexpr,
    OUT_MAX: tl.constexpr,
    IS_BF16: tl.constexpr,  # x and out share their dtype
    SCALE_MODE: tl.constexpr,
    ROUNDING: tl.constexpr,
):
    # x is (outer, length, inner) contiguous; a block is BLOCK_SIZE consecutive positions along
    # length at one (outer, inner).
    per_row = tl.cdiv(length, BLOCK_SIZE)
    if BLOCK_AXIS == 1:  # tile = ROWS blocks x BLOCK_POW2 lanes
        blocks = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        lanes = tl.arange(0, BLOCK_POW2)
        mask = (blocks < n_blocks)[:, None] & (lanes < BLOCK_SIZE)[None, :]
        if EVEN_ROWS:  # no tail block: blocks tile the flat tensor
            offsets = blocks[:, None] * BLOCK_SIZE + lanes[None, :]
        else:
            row = blocks // per_row
            cols = (blocks - row * per_row)[:, None] * BLOCK_SIZE + lanes[None, :]
            mask &= cols < length
            offsets = row[:, None] * length + cols
    else:  # tile = BLOCK_POW2 positions along length x INNER_TILE neighbours along inner
        pid = tl.program_id(0).to(tl.int64)
        inner_tiles = tl.cdiv(inner, INNER_TILE)
        block_row = pid // inner_tiles  # (outer, block index along length), flattened
        outer = block_row // per_row
        pos = (block_row - outer * per_row) * BLOCK_SIZE + tl.arange(0, BLOCK_POW2)
        col = (pid - block_row * inner_tiles) * INNER_TILE + tl.arange(0, INNER_TILE)
        in_block = (tl.arange(0, BLOCK_POW2) < BLOCK_SIZE) & (pos < length)
        mask = in_block[:, None] & (col < inner)[None, :]
        offsets = (outer * length + pos)[:, None] * inner + col[None, :]

    raw = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if IS_BF16:
        x = (raw.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = raw.to(tl.float32)

    # NaN becomes +Inf before the max so one test finds both poisons of a block.
    amax = tl.max(tl.where(x == x, tl.abs(x), float("inf")), axis=BLOCK_AXIS)
    bad = tl.expand_dims(amax == float("inf"), BLOCK_AXIS)
    s = _scale_exponent(amax.to(tl.int32, bitcast=True), SCALE_MODE, EMAX, MBITS, INV_MAX_NORM)
    s = tl.expand_dims(s, BLOCK_AXIS)

    y = x * _pow2(-s)  # exact, or below 2^-126 where every rounding gives 0
    y_bits = y.to(tl.int32, bitcast=True)
    p_field = tl.maximum(y_bits & 0x7F800000, (EMIN + 127) << 23)  # p = max(exponent(y), emin)
    # 2^(mbits - p); the constant is split because (254 + mbits) << 23 overflows int32.
    inv_step = (((MBITS + 127) << 23) - p_field + (127 << 23)).to(tl.float32, bitcast=True)
    step = (p_field - (MBITS << 23)).to(tl.float32, bitcast=True)  # 2^(p - mbits)
    q = _round_magnitude(tl.abs(y) * inv_step, seed_ptr, offsets, ROUNDING)
    v = tl.minimum(q * step, MAX_NORM)
    # Past the output dtype's range (Inf included): saturate at its largest finite value.
    out = tl.minimum(v * _pow2(s), OUT_MAX)
    out_bits = out.to(tl.int32, bitcast=True) | (y_bits & -0x80000000)  # copysign, -0 kept
    out_bits = tl.where(bad, 0x7FC00000, out_bits)
    if IS_BF16:
        result = (out_bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        result = out_bits.to(tl.float32, bitcast=True).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, result, mask=mask)


# triton.jit picks interpreter or compiler mode when it decorates: triton's own library (tl.max,
# tl.rand) at `import triton`, the kernel above when this module is imported. They must agree.
_INTERPRETED = not isinstance(_quantize_kernel, triton.runtime.JITFunction)
MODES_AGREE = _INTERPRETED != isinstance(tl.standard.max, triton.runtime.JITFunction)


def _float_errors_ignored():
    """The interpreter runs the kernel in numpy, which warns on Inf/NaN arithmetic that the
    kernel performs on purpose (poisoned blocks, saturation past the dtype's range)."""
    if not _INTERPRETED:
        return contextlib.nullcontext()
    import numpy as np

    return np.errstate(over="ignore", invalid="ignore")


def _stochastic_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One seed drawn on ``device``, left there: the kernel reads it, so no device -> host sync
    (and CUDA-graph capture) stands in the way. Like the torch backend's draws, a ``generator``
    must live on ``device``."""
    return torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device)


def check_can_run(x: torch.Tensor, what: str, instead: str) -> None:
    """Raise ``RuntimeError`` unless a Triton kernel (``what``, for the message) can run on ``x``:
    a CUDA tensor, or any tensor in interpreter mode; ``instead`` names the fallback to offer."""
    if not MODES_AGREE:
        raise RuntimeError(
            "TRITON_INTERPRET changed between `import triton` and the import of "
            "mxprobe.kernels.triton_kernels; set it before anything imports triton (Lightning and "
            "torch.compile do)"
        )
    if not x.is_cuda and not _INTERPRETED:
        raise RuntimeError(
            f"{what} needs a CUDA tensor, got one on {x.device}; for CPU tensors set "
            f"TRITON_INTERPRET=1 before importing mxprobe (slow, meant for tests) or use {instead}"
        )


def _dense_order(x: torch.Tensor) -> list[int] | None:
    """The dims of ``x`` by decreasing stride if that permutation of ``x`` is contiguous (a
    contiguous, transposed or permuted tensor), else ``None``."""
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    return order if x.permute(order).is_contiguous() else None


def quantize_mx_triton(
    x: torch.Tensor,
    fmt: ElementFormat,
    block_size: int,
    axis: int,
    scale_mode: str,
    rounding: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``quantize_mx`` on the Triton kernel: ``x`` fake-quantized, in its dtype and shape.

    Arguments are already validated by ``quantize_mx`` (``axis`` non-negative, ``x`` non-empty).
    Stochastic rounding draws one seed on ``x``'s device from ``generator`` (which must live
    there) or torch's global RNG, without a host sync; results repeat for a given seed, but
    differ from the torch backend's draws.

    Raises:
        RuntimeError: ``x`` is not a CUDA tensor and Triton is not in interpreter mode, or
            ``TRITON_INTERPRET`` was set after triton was imported.
        ValueError: ``block_size`` larger than a Triton tile can hold.
    """
    check_can_run(x, "backend='triton'", "backend='torch'")
    block_pow2 = triton.next_power_of_2(block_size)
    if block_pow2 > _TILE * 16:
        raise ValueError(
            f"block_size {block_size} is too large for the Triton backend (at most "
            f"{_TILE * 16}); use backend='torch'"
        )
    order = _dense_order(x)
    if order is None:  # gaps or overlaps in memory (a slice): the kernel needs a dense x
        x, order = x.contiguous(), list(range(x.dim()))
    out = torch.empty_like(x)  # x's strides, since x is dense
    # The same memory seen as contiguous tensors: no transposing copy, whatever ``axis`` is.
    x_dense, out_dense = x.permute(order), out.permute(order)
    axis = order.index(axis)
    length = x_dense.shape[axis]
    inner = math.prod(x_dense.shape[axis + 1 :])
    per_row = triton.cdiv(length, block_size)
    if inner == 1:
        n_blocks = x.numel() // length * per_row
        tile_rows, inner_tile = max(1, _TILE // block_pow2), 1
        programs = triton.cdiv(n_blocks, tile_rows)
    else:
        n_blocks = x.numel() // (length * inner) * per_row  # (outer, length-block) pairs
        tile_rows = 1
        inner_tile = min(max(1, _TILE // block_pow2), triton.next_power_of_2(inner))
        programs = n_blocks * triton.cdiv(inner, inner_tile)
    # Deterministic roundings never read the seed pointer: any tensor will do.
    seed = _stochastic_seed(generator, x.device) if rounding == "stochastic" else x
    with _float_errors_ignored():
        _quantize_kernel[(programs,)](
            x_dense,
            out_dense,
            seed,
            n_blocks,
            length,
            inner,
            BLOCK_SIZE=block_size,
            BLOCK_POW2=block_pow2,
            ROWS=tile_rows,
            INNER_TILE=inner_tile,
            BLOCK_AXIS=1 if inner == 1 else 0,
            EVEN_ROWS=length % block_size == 0,
            EMAX=fmt.emax,
            MBITS=fmt.mbits,
            EMIN=fmt.emin,
            MAX_NORM=fmt.max_norm,
            INV_MAX_NORM=fp32(1.0 / fmt.max_norm),
            OUT_MAX=float(torch.finfo(x.dtype).max),
            IS_BF16=x.dtype == torch.bfloat16,
            SCALE_MODE=scale_mode,
            ROUNDING=rounding,
            # 16 elements per thread, as on a full tile; small tiles (short inner) get fewer warps.
            num_warps=min(_NUM_WARPS, max(1, tile_rows * inner_tile * block_pow2 // 512)),
        )
    return out
