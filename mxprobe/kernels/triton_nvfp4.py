"""NVFP4 fake quantization on a Triton kernel: the torch path of ``mxprobe.nvfp4`` (variant
``"torchao"``, ``rounding="even"``) bit for bit, for fp32 and bf16 tensors on CUDA (and on CPU
under Triton's interpreter, for tests).

Single-level, two-level with ``"amax"`` or a given per-tensor scale ``pts``; 1 x 16 blocks along
any axis and 16 x 16 tiles of the last two dimensions (a tail block is simply smaller: the torch
path's zero padding changes no block maximum). Every operation rounds once, in the torch path's
order, as in ``nvfp4_quantize.c``::

    s      = e4m3(clamp((amax_b / 6) / pts, 2^-6, 448))      (e4m3: ties to even)
    y      = x * ((1 / pts) / s)                             (single-level: x * (1 / s))
    q      = e2m1(clamp(y, -6, 6))                            (ties to even)
    result = (q * s) * pts, NaN for a block holding NaN or Inf

- The divisions are ``tl.div_rn`` (IEEE, round to nearest): Triton's ``/`` on fp32 is an
  approximate division on GPUs. The kernel is launched with ``enable_fp_fusion=False`` (PTX
  ``mul.rn`` / ``add.rn``, which neither Triton nor ptxas contracts into an FMA; no product
  feeds an addition anyway). The roundings to E4M3 and E2M1 are one fp32 addition each,
  ``(v + c) - c`` with ``c = 2^(binade + 23 - mbits)`` (as ``mx_blocks._round_even_float``).
- ``amax_b / 6``: the torch path divides by the Python number 6, which torch computes as a true
  division on CPU but, on CUDA, as ``amax_b * fp32(1/6)`` (``div_true_kernel_cuda`` multiplies
  by the reciprocal of a CPU scalar), and the two straddle an E4M3 tie for a few block maxima.
  ``scale_division`` picks one; the default is the torch path's on ``x``'s device, so the
  kernel agrees with ``backend="torch"`` on the same tensor. ``pts`` and ``1 / pts`` are
  computed by torch on ``x``'s device with the torch path's own expressions, so they inherit
  the same device behaviour (``amax / 2688`` too).
- Block maxima are taken on the fp32 bit patterns (|x| as int32): NaN orders above Inf, so a
  poisoned block's maximum is non-finite and its dequantization factor NaN, as the torch
  path's ``s + amax * 0``.
- Two-level scaling reads ``pts`` and ``1 / pts`` from device memory: no host sync (with
  ``"amax"``, a first kernel takes the tensor's maximum on the bits, as the blocks'). A zero
  ``pts`` (an all-zero tensor, or one whose amax / 2688 underflows) returns ``x`` unchanged, as
  the torch path does; a non-finite one makes every element NaN through the arithmetic.
- bf16 is read and written as the top half of an fp32 bit pattern (Triton's interpreter
  truncates fp32 -> bf16 and mangles bf16 subnormals); the write rounds to nearest even on the
  bits, as torch's cast does (a two-level result is a general fp32 value).

The kernel reads and writes ``x`` in its own layout when that is dense (contiguous, transposed
or permuted), seen as (outer, length, inner): a program owns ``ROWS`` blocks of 16 consecutive
elements (blocks along the innermost axis), or one 16-position block row for ``INNER_TILE``
neighbouring columns (blocks along another axis: loads run along the contiguous axis), or a
16-row band of ``TILES`` 16 x 16 tiles.

Stochastic rounding and Transformer Engine's variant run on the torch path only
(:func:`~mxprobe.kernels.dispatch.resolve_nvfp4_backend`). On a CPU tensor the kernel runs only
under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is first imported), as
``triton_kernels``' does.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:  # dispatch imports this module only for the Triton backend
    raise ImportError(
        "the Triton NVFP4 kernel needs the `triton` package (Linux only): pip install triton; "
        "or use backend='torch'"
    ) from err

from mxprobe.kernels.triton_kernels import _dense_order, _float_errors_ignored, check_can_run

BLOCK = 16
TENSOR_MAX = 448.0 * 6.0  # two-level "amax": pts = amax / 2688, as mxprobe.nvfp4.TENSOR_MAX
SCALE_DIVISIONS = ("true", "reciprocal")
# Elements per program: as the MX kernel, enough bytes in flight to saturate HBM.
_TILE = 4096
_NUM_WARPS = 8


@triton.jit
def _block_factors(
    amax_bits,
    pts,
    inv_pts,
    TWO_LEVEL: tl.constexpr,
    TRUE_DIVISION: tl.constexpr,
):
    """(factor = (1 / pts) / s, dequant = s, NaN for a poisoned block) from the blocks' |x|
    maxima as fp32 bits."""
    amax = amax_bits.to(tl.float32, bitcast=True)
    if TRUE_DIVISION:
        v = tl.div_rn(amax, 6.0)
    else:  # torch's CUDA division by a Python number: times its fp32 reciprocal
        v = amax * 0.1666666716337204  # fp32(1 / 6)
    if TWO_LEVEL:
        v = tl.div_rn(v, pts)
    # clamp by selects: a NaN passes through, as through torch's clamp
    v = tl.where(v < 0.015625, 0.015625, tl.where(v > 448.0, 448.0, v))
    # E4M3 (v >= 2^-6: a normal): c = 2^(binade + 20) keeps 3 bits after the leading one
    binade = tl.where(v == v, v, 1.0).to(tl.int32, bitcast=True) & 0x7F800000
    c = (binade + (20 << 23)).to(tl.float32, bitcast=True)
    s = (v + c) - c
    s = tl.where(s > 448.0, 448.0, s)
    if TWO_LEVEL:
        factor = tl.div_rn(inv_pts, s)
    else:
        factor = tl.div_rn(1.0, s)
    dequant = tl.where(amax_bits < 0x7F800000, s, float("nan"))
    return factor, dequant


@triton.jit
def _element(x, factor, dequant, pts, TWO_LEVEL: tl.constexpr):
    """x scaled, clamped to ±6, rounded to E2M1 (ties to even), dequantized; fp32 bits."""
    y = x * factor
    y = tl.where(y < -6.0, -6.0, tl.where(y > 6.0, 6.0, y))
    ay = tl.abs(y)
    # c = 2^(max(binade, 0) + 22): one bit after the leading one, steps of 0.5 below 1
    binade = tl.where(ay >= 1.0, ay, 1.0).to(tl.int32, bitcast=True) & 0x7F800000
    c = (binade + (22 << 23)).to(tl.float32, bitcast=True)
    r = (ay + c) - c  # at most 6: |y| <= 6 and 6 is on the grid
    q_bits = r.to(tl.int32, bitcast=True) | (y.to(tl.int32, bitcast=True) & -0x80000000)
    out = q_bits.to(tl.float32, bitcast=True) * dequant  # exact, -0 kept
    if TWO_LEVEL:
        out = out * pts
    return out.to(tl.int32, bitcast=True)


@triton.jit
def _nvfp4_kernel(
    x_ptr,
    out_ptr,
    scale_ptr,  # fp32 [pts, 1 / pts], read only two-level
    n_blocks,
    length,
    inner,
    LAYOUT: tl.constexpr,  # "rows", "cols" or "tiles"
    ROWS: tl.constexpr,
    INNER_TILE: tl.constexpr,
    TILES: tl.constexpr,
    EVEN_ROWS: tl.constexpr,
    IS_BF16: tl.constexpr,  # x and out share their dtype
    TWO_LEVEL: tl.constexpr,
    TRUE_DIVISION: tl.constexpr,
):
    per_row = tl.cdiv(length, 16)
    pid = tl.program_id(0).to(tl.int64)
    if LAYOUT == "rows":  # x is (n_rows, length); ROWS blocks of 16 consecutive elements
        blocks = pid * ROWS + tl.arange(0, ROWS)
        lanes = tl.arange(0, 16)
        mask = (blocks < n_blocks)[:, None] & (lanes < 16)[None, :]
        if EVEN_ROWS:  # no tail block: blocks tile the flat tensor
            offsets = blocks[:, None] * 16 + lanes[None, :]
        else:
            row = blocks // per_row
            cols = (blocks - row * per_row)[:, None] * 16 + lanes[None, :]
            mask &= cols < length
            offsets = row[:, None] * length + cols
    elif LAYOUT == "cols":  # x is (outer, length, inner); a block is 16 positions of length
        inner_tiles = tl.cdiv(inner, INNER_TILE)
        block_row = pid // inner_tiles  # (outer, block index along length), flattened
        outer = block_row // per_row
        pos = (block_row - outer * per_row) * 16 + tl.arange(0, 16)
        col = (pid - block_row * inner_tiles) * INNER_TILE + tl.arange(0, INNER_TILE)
        mask = (pos < length)[:, None] & (col < inner)[None, :]
        offsets = (outer * length + pos)[:, None] * inner + col[None, :]
    else:  # "tiles": x is (outer, length rows, inner columns); 16 x 16 tiles
        groups = tl.cdiv(inner, 16 * TILES)
        band = pid // groups  # (outer, 16-row band), flattened
        outer = band // per_row
        row = (band - outer * per_row) * 16 + tl.arange(0, 16)
        tile = (pid - band * groups) * TILES + tl.arange(0, TILES)
        col = tile[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]
        mask = (row < length)[:, None, None] & (col < inner)
        offsets = (outer * length + row)[:, None, None] * inner + col

    raw = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if IS_BF16:
        x_bits = raw.to(tl.int16, bitcast=True).to(tl.int32) << 16
    else:
        x_bits = raw.to(tl.float32).to(tl.int32, bitcast=True)
    magnitude = x_bits & 0x7FFFFFFF  # NaN > Inf > every finite |x|, as int32
    if LAYOUT == "rows":
        amax = tl.expand_dims(tl.max(magnitude, axis=1), 1)
    elif LAYOUT == "cols":
        amax = tl.expand_dims(tl.max(magnitude, axis=0), 0)
    else:
        amax = tl.max(tl.max(magnitude, axis=2), axis=0)
        amax = tl.expand_dims(tl.expand_dims(amax, 1), 0)

    pts = 1.0
    inv_pts = 1.0
    if TWO_LEVEL:
        pts = tl.load(scale_ptr)
        inv_pts = tl.load(scale_ptr + 1)
    factor, dequant = _block_factors(amax, pts, inv_pts, TWO_LEVEL, TRUE_DIVISION)
    out_bits = _element(x_bits.to(tl.float32, bitcast=True), factor, dequant, pts, TWO_LEVEL)
    if TWO_LEVEL:  # pts 0: x unchanged
        out_bits = tl.where(pts == 0.0, x_bits, out_bits)

    if IS_BF16:
        # round to nearest even on the bits; a NaN becomes the quiet NaN 0x7FC0 first (its
        # payload would carry into the exponent)
        u = tl.where((out_bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC00000, out_bits)
        u = u + (0x7FFF + ((u >> 16) & 1))
        result = (u >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        result = out_bits.to(tl.float32, bitcast=True)
    tl.store(out_ptr + offsets, result, mask=mask)


@triton.jit
def _amax_kernel(x_ptr, amax_ptr, numel, SPAN: tl.constexpr, IS_BF16: tl.constexpr):
    """amax_ptr[0] = max(amax_ptr[0], the largest |x| bits of this program's span)."""
    offsets = tl.program_id(0).to(tl.int64) * SPAN + tl.arange(0, SPAN)
    raw = tl.load(x_ptr + offsets, mask=offsets < numel, other=0.0)
    if IS_BF16:
        bits = raw.to(tl.int16, bitcast=True).to(tl.int32) << 16
    else:
        bits = raw.to(tl.float32).to(tl.int32, bitcast=True)
    tl.atomic_max(amax_ptr, tl.max(bits & 0x7FFFFFFF, axis=0))


def _scales(x: torch.Tensor, tensor_scale: str | torch.Tensor | None) -> torch.Tensor | None:
    """fp32 [pts, 1 / pts] on the device of ``x`` (contiguous), None single-level; without a
    host sync. ``"amax"``: the largest |x| in one pass over memory (on the bits: a NaN orders
    above Inf, and the torch path's NaN maximum gives the same NaN scale), then the torch
    path's own expressions on x's device."""
    if tensor_scale is None:
        return None
    if isinstance(tensor_scale, str):
        amax_bits = torch.zeros(1, dtype=torch.int32, device=x.device)
        with _float_errors_ignored():
            _amax_kernel[(triton.cdiv(x.numel(), _TILE),)](
                x,
                amax_bits,
                x.numel(),
                SPAN=_TILE,
                IS_BF16=x.dtype == torch.bfloat16,
                num_warps=_NUM_WARPS,
                enable_fp_fusion=False,  # (no float arithmetic: as the main launch)
            )
        pts = amax_bits.view(torch.float32).reshape(()) / TENSOR_MAX
    else:
        pts = tensor_scale.to(device=x.device, dtype=torch.float32).reshape(())
    return torch.stack([pts, 1.0 / pts])


def quantize_nvfp4_triton(
    x: torch.Tensor,
    axis: int,
    tensor_scale: str | torch.Tensor | None,
    tile: tuple[int, int],
    scale_division: str | None = None,
) -> torch.Tensor:
    """``quantize_nvfp4(x, ...)`` (``rounding="even"``, variant ``"torchao"``) on the Triton
    kernel: arguments checked by ``quantize_nvfp4`` (``axis`` non-negative, ``tile`` a tuple,
    ``tensor_scale`` None, ``"amax"`` or a 0-dim fp32 tensor), ``x`` fp32 or bf16 of at least
    one dimension. A new tensor, with ``x``'s strides where ``x`` is dense.

    ``scale_division``: how ``amax_b / 6`` is computed, ``"true"`` (a true fp32 division: the
    torch path on CPU, and the documented formula) or ``"reciprocal"`` (``amax_b * fp32(1/6)``:
    the torch path on CUDA); None takes the torch path's on ``x``'s device.

    Stochastic rounding and variant ``"te"`` run on the torch path only.

    Raises:
        RuntimeError: ``x`` is not a CUDA tensor and Triton is not in interpreter mode, or
            ``TRITON_INTERPRET`` was set after triton was imported.
        ValueError: an unknown ``scale_division``.
    """
    check_can_run(x, "the Triton NVFP4 kernel", "backend='auto' or 'torch'")
    if scale_division is None:
        scale_division = "reciprocal" if x.is_cuda else "true"
    if scale_division not in SCALE_DIVISIONS:
        raise ValueError(
            f"unknown scale_division {scale_division!r}; expected one of {SCALE_DIVISIONS}"
        )
    if x.numel() == 0:
        return x.clone()
    x = x.detach()
    order = _dense_order(x)
    if tile == (BLOCK, BLOCK) and order is not None and max(order[:-2], default=-1) > x.dim() - 3:
        order = None  # the tiles' two dimensions must be the innermost two in memory
    if order is None:  # gaps or overlaps in memory (a slice), or tiles across the layout
        x, order = x.contiguous(), list(range(x.dim()))
    out = torch.empty_like(x)  # x's strides, since x is dense
    # The same memory seen as contiguous tensors: no transposing copy.
    x_dense, out_dense = x.permute(order), out.permute(order)
    scales = _scales(x_dense, tensor_scale)
    if tile == (BLOCK, BLOCK):  # a 16 x 16 tile is the same set of elements either way round
        length, inner = x_dense.shape[-2], x_dense.shape[-1]
        layout, rows, inner_tile = "tiles", 1, 1
        tiles = min(_TILE // (BLOCK * BLOCK), triton.next_power_of_2(triton.cdiv(inner, BLOCK)))
        n_blocks = x.numel() // (length * inner) * triton.cdiv(length, BLOCK)  # 16-row bands
        programs = n_blocks * triton.cdiv(inner, BLOCK * tiles)
        elements = BLOCK * BLOCK * tiles
    else:
        axis = order.index(axis)
        length = x_dense.shape[axis]
        inner = math.prod(x_dense.shape[axis + 1 :])
        per_row = triton.cdiv(length, BLOCK)
        tiles = 1
        if inner == 1:
            layout, inner_tile = "rows", 1
            n_blocks = x.numel() // length * per_row
            rows = _TILE // BLOCK
            programs = triton.cdiv(n_blocks, rows)
            elements = rows * BLOCK
        else:
            layout, rows = "cols", 1
            n_blocks = x.numel() // (length * inner) * per_row  # (outer, length-block) pairs
            inner_tile = min(_TILE // BLOCK, triton.next_power_of_2(inner))
            programs = n_blocks * triton.cdiv(inner, inner_tile)
            elements = BLOCK * inner_tile
    with _float_errors_ignored():
        _nvfp4_kernel[(programs,)](
            x_dense,
            out_dense,
            x_dense if scales is None else scales,  # single-level never reads it
            n_blocks,
            length,
            inner,
            LAYOUT=layout,
            ROWS=rows,
            INNER_TILE=inner_tile,
            TILES=tiles,
            EVEN_ROWS=layout == "rows" and length % BLOCK == 0,
            IS_BF16=x.dtype == torch.bfloat16,
            TWO_LEVEL=scales is not None,
            TRUE_DIVISION=scale_division == "true",
            # 16 elements per thread, as on a full tile; small tiles get fewer warps
            num_warps=min(_NUM_WARPS, max(1, elements // 512)),
            enable_fp_fusion=False,  # every product and sum rounds on its own
        )
    return out
