"""The Triton twin of ``quantize._quantize_blocks``: the same function, bit for bit.

Every step works on fp32 bit patterns or is an exact power-of-two scaling, exactly as in the
torch path (DESIGN.md §3), so the kernel equals ``backend="torch"`` to the bit for the
deterministic roundings. A program owns a ``[ROWS, BLOCK_POW2]`` tile: ``ROWS`` MX blocks, each
padded to a power of two and masked (masked lanes count as 0 for the block max).

bf16 is converted to and from fp32 on its bit pattern (it is the top half of an fp32): Triton's
interpreter truncates fp32 -> bf16 and mangles bf16 subnormals, while the bit form is exact on
every backend and costs a few integer ops in a memory-bound kernel.

On a CPU tensor the kernel runs only under Triton's interpreter: ``TRITON_INTERPRET=1`` must be
set before this module is first imported (``triton.jit`` picks its mode when it decorates).
"""

from __future__ import annotations

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

# Elements per program: 16 per thread at 8 warps, enough in flight to saturate HBM.
_TILE = 4096
_NUM_WARPS = 8
# fp32 bit patterns of the largest finite value of each output dtype (saturation, never Inf).
_OUT_MAX_BITS = {torch.float32: 0x7F7FFFFF, torch.bfloat16: 0x7F7F0000, torch.float16: 0x477FE000}


def _fp32_bits(value: float) -> int:
    return torch.tensor(value, dtype=torch.float32).view(torch.int32).item()


@triton.jit
def _pow2(e):
    """2^e as fp32 for integer e in [-127, 127], built from bits (2^-127 is subnormal)."""
    return tl.where(e >= -126, (e + 127) << 23, 0x00400000).to(tl.float32, bitcast=True)


@triton.jit
def _exponent(bits):
    """floor(log2|x|) of the fp32 bit pattern ``bits``; zero and subnormals give -127."""
    return ((bits >> 23) & 0xFF) - 127


@triton.jit
def _scale_exponent(amax_bits, SCALE_MODE: tl.constexpr, EMAX: tl.constexpr,
                    MBITS: tl.constexpr, INV_MAX_NORM: tl.constexpr):
    """The E8M0 scale exponent S of ``quantize.block_scale_exponent``, clamped to [-127, 127]."""
    if SCALE_MODE == "floor":
        s = _exponent(amax_bits) - EMAX
    elif SCALE_MODE == "ceil":
        s = _exponent(amax_bits) + ((amax_bits & 0x7FFFFF) != 0).to(tl.int32) - EMAX
    elif SCALE_MODE == "even":
        s = _exponent((amax_bits + (1 << (22 - MBITS))) & 0x7F800000) - EMAX
    else:  # rceil: ceil(log2(fp32(amax * fp32(1/max_norm)))) read from bits
        t = (amax_bits.to(tl.float32, bitcast=True) * INV_MAX_NORM).to(tl.int32, bitcast=True)
        texp = (t >> 23) & 0xFF
        mant = t & 0x7FFFFF
        s = tl.where(texp == 0, (mant > 0x400000).to(tl.int32) - 127,
                     texp - 127 + (mant != 0).to(tl.int32))
    return tl.minimum(tl.maximum(s, -127), 127)


@triton.jit
def _round_magnitude(r, seed, offsets, ROUNDING: tl.constexpr):
    """Round non-negative fp32 ``r`` (< 2^24) to an int32; every branch is exact.

    Ties are decided on the exact fraction r - floor(r), not with rint, which the interpreter
    and the GPU do not share.
    """
    q = r.to(tl.int32)  # truncation is floor for r >= 0
    if ROUNDING != "floor":
        frac = r - q.to(tl.float32)
        if ROUNDING == "even":
            up = (frac > 0.5) | ((frac == 0.5) & ((q & 1) == 1))
        elif ROUNDING == "nearest":
            up = frac >= 0.5
        else:  # stochastic: P(up) = frac, unbiased
            up = tl.rand(seed, offsets) < frac
        q += up.to(tl.int32)
    return q


@triton.jit(do_not_specialize=["seed"])
def _quantize_kernel(
    x_ptr, out_ptr, n_blocks, length, seed,
    BLOCK_SIZE: tl.constexpr, BLOCK_POW2: tl.constexpr, ROWS: tl.constexpr,
    EVEN_ROWS: tl.constexpr, EMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
    MAX_NORM_BITS: tl.constexpr, INV_MAX_NORM: tl.constexpr, OUT_MAX_BITS: tl.constexpr,
    SCALE_MODE: tl.constexpr, ROUNDING: tl.constexpr,
):
    # x is (rows, length) contiguous; block b covers columns [j*BLOCK_SIZE, ...) of one row.
    blocks = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    lanes = tl.arange(0, BLOCK_POW2)
    mask = (blocks < n_blocks)[:, None] & (lanes < BLOCK_SIZE)[None, :]
    if EVEN_ROWS:  # no tail block: blocks tile the flat tensor
        offsets = blocks[:, None] * BLOCK_SIZE + lanes[None, :]
    else:
        per_row = tl.cdiv(length, BLOCK_SIZE)
        row = blocks // per_row
        cols = (blocks - row * per_row)[:, None] * BLOCK_SIZE + lanes[None, :]
        mask &= cols < length
        offsets = row[:, None] * length + cols

    raw = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if x_ptr.dtype.element_ty == tl.bfloat16:
        bits = raw.to(tl.int16, bitcast=True).to(tl.int32) << 16
    else:
        bits = raw.to(tl.float32).to(tl.int32, bitcast=True)

    # Non-negative floats order like their bits: an integer max needs no NaN rule, and
    # min(|bits|, Inf) turns NaN into Inf so one test finds both poisons of a block.
    amax_bits = tl.max(tl.minimum(bits & 0x7FFFFFFF, 0x7F800000), axis=1)
    bad = amax_bits == 0x7F800000
    bits = tl.where(bad[:, None], 0, bits)  # poisoned blocks compute on zeros, output NaN
    s = _scale_exponent(tl.where(bad, 0, amax_bits), SCALE_MODE, EMAX, MBITS, INV_MAX_NORM)

    y = bits.to(tl.float32, bitcast=True) * _pow2(-s)[:, None]  # as torch: may round below 2^-126
    y_bits = y.to(tl.int32, bitcast=True)
    p = tl.maximum(_exponent(y_bits), EMIN)
    r = (y_bits & 0x7FFFFFFF).to(tl.float32, bitcast=True) * _pow2(MBITS - p)
    q = _round_magnitude(r, seed, offsets, ROUNDING)
    v_bits = (q.to(tl.float32) * _pow2(p - MBITS)).to(tl.int32, bitcast=True)
    v_bits = tl.minimum(v_bits, MAX_NORM_BITS) | (y_bits & -0x80000000)  # saturate; copysign
    out_bits = (v_bits.to(tl.float32, bitcast=True) * _pow2(s)[:, None]).to(tl.int32, bitcast=True)
    # Saturate at the output dtype's finite max (an Inf product included), keeping the sign.
    out_bits = tl.minimum(out_bits & 0x7FFFFFFF, OUT_MAX_BITS) | (out_bits & -0x80000000)

    if out_ptr.dtype.element_ty == tl.bfloat16:
        # fp32 -> bf16 round-to-nearest-even on the bit pattern (exact for subnormals too).
        half = (out_bits + 0x7FFF + ((out_bits >> 16) & 1)) >> 16
        half = tl.where(bad[:, None], 0x7FC0, half)
        out = half.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        out = tl.where(bad[:, None], float("nan"), out_bits.to(tl.float32, bitcast=True))
        out = out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, out, mask=mask)


# triton.jit chose interpreter or compiler mode when it decorated the kernel above.
_INTERPRETED = not isinstance(_quantize_kernel, triton.runtime.JITFunction)


def _stochastic_seed(generator: torch.Generator | None) -> int:
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device).item())


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
    Stochastic rounding draws one seed from ``generator`` (or torch's global RNG), so results
    repeat for a given seed, but differ from the torch backend's draws.

    Raises:
        RuntimeError: ``x`` is not a CUDA tensor and Triton is not in interpreter mode.
        ValueError: ``block_size`` larger than a Triton tile can hold.
    """
    if not x.is_cuda and not _INTERPRETED:
        raise RuntimeError(
            f"backend='triton' needs a CUDA tensor, got one on {x.device}; for CPU tensors set "
            "TRITON_INTERPRET=1 before importing mxprobe (slow, meant for tests) or use "
            "backend='torch'"
        )
    block_pow2 = triton.next_power_of_2(block_size)
    if block_pow2 > _TILE * 16:
        raise ValueError(
            f"block_size {block_size} is too large for the Triton backend (at most "
            f"{_TILE * 16}); use backend='torch'"
        )
    # The common case (blocks along a contiguous last axis) is already in place: no copy.
    rows = x.movedim(axis, -1).contiguous()
    out = torch.empty_like(rows)
    length = rows.shape[-1]
    n_blocks = rows.numel() // length * triton.cdiv(length, block_size)
    tile_rows = max(1, _TILE // block_pow2)
    seed = _stochastic_seed(generator) if rounding == "stochastic" else 0
    _quantize_kernel[(triton.cdiv(n_blocks, tile_rows),)](
        rows, out, n_blocks, length, seed,
        BLOCK_SIZE=block_size, BLOCK_POW2=block_pow2, ROWS=tile_rows,
        EVEN_ROWS=length % block_size == 0, EMAX=fmt.emax, MBITS=fmt.mbits, EMIN=fmt.emin,
        MAX_NORM_BITS=_fp32_bits(fmt.max_norm),
        INV_MAX_NORM=torch.tensor(1.0 / fmt.max_norm, dtype=torch.float32).item(),
        OUT_MAX_BITS=_OUT_MAX_BITS[x.dtype], SCALE_MODE=scale_mode, ROUNDING=rounding,
        num_warps=_NUM_WARPS,
    )
    return out.movedim(-1, axis)
