"""NVFP4 fake quantization on the native CPU kernel (``nvfp4_quantize.c``, in the library that
:mod:`.native` builds, checks and threads).

It computes the torch path of ``mxprobe.nvfp4`` (variant ``"torchao"``, ``rounding="even"``) bit
for bit for fp32 and bf16 CPU tensors of at least one dimension: single-level, two-level with
``"amax"`` or a given per-tensor scale, 1 x 16 blocks along any axis and 16 x 16 tiles of the
last two dimensions, in one pass over memory (two with ``"amax"``: the tensor's maximum first).
Stochastic rounding and Transformer Engine's variant run on the torch path only
(:func:`~mxprobe.kernels.dispatch.resolve_nvfp4_backend`).
"""

from __future__ import annotations

import ctypes
import math

import torch

from mxprobe.kernels import native

BLOCK = 16
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
TENSOR_MAX = 448.0 * 6.0  # two-level "amax": pts = amax / 2688, as mxprobe.nvfp4.TENSOR_MAX


class _Args(ctypes.Structure):
    """Mirror of ``nv_args`` in nvfp4_quantize.c."""

    _fields_ = [
        *[(n, ctypes.c_int64) for n in ("outer", "rows", "width")],
        *[(n, ctypes.c_int32) for n in ("tile_rows", "tile_cols", "dtype")],
        *[(n, ctypes.c_float) for n in ("pts", "inv_pts")],
    ]


def supports(x: torch.Tensor, rounding: str, variant: str) -> bool:
    """True when the kernel computes ``quantize_nvfp4(x, rounding=..., variant=...)``
    (whether it is built aside)."""
    return (
        x.device.type == "cpu"
        and x.dtype in _DTYPE_CODES
        and x.dim() >= 1
        and rounding == "even"
        and variant == "torchao"
    )


def _layout(shape: torch.Size, axis: int, tile: tuple[int, int]) -> tuple[int, ...]:
    """(outer, rows, width, tile_rows, tile_cols) of ``x`` seen by the kernel."""
    if tile == (BLOCK, BLOCK):
        return math.prod(shape[:-2]), shape[-2], shape[-1], BLOCK, BLOCK
    outer, length, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])
    if inner == 1:  # blocks along the last non-trivial axis: contiguous runs of 16
        return 1, outer, length, 1, BLOCK
    return outer, length, inner, BLOCK, 1


def tensor_amax(x: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``x.float().abs().amax()`` of a contiguous CPU fp32/bf16 ``x`` (NaN when it holds one)."""
    lib = lib or native.library()
    found = []
    code, ptr = _DTYPE_CODES[x.dtype], x.data_ptr()
    native.split_work(
        lambda lo, hi, t: found.append(lib.nv_amax_bits(ptr, lo, hi, t, code)), x.numel(), x.numel()
    )
    return torch.tensor(max(found), dtype=torch.int64).to(torch.int32).view(torch.float32)


def quantize(
    x: torch.Tensor,
    axis: int,
    tensor_scale: str | torch.Tensor | None,
    tile: tuple[int, int],
    _lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """``quantize_nvfp4(x, ...)`` on the kernel: arguments checked by ``quantize_nvfp4`` (``axis``
    non-negative, ``tile`` a tuple, ``tensor_scale`` None, ``"amax"`` or a 0-dim fp32 tensor),
    ``supports(x, "even", "torchao")``. A new tensor."""
    if x.numel() == 0:
        return x.clone()
    lib = _lib or native.library()
    contiguous = x.detach().contiguous()
    pts = inv_pts = 1.0  # single-level: dividing and multiplying by 1 is exact
    if tensor_scale is not None:
        scale = (
            tensor_amax(contiguous, lib) / TENSOR_MAX if tensor_scale == "amax" else tensor_scale
        )
        if float(scale) == 0:  # an all-zero tensor (or one whose amax / 2688 underflows)
            return x.clone()
        pts, inv_pts = float(scale), float(1.0 / scale)  # the torch path's fp32 reciprocal
    x = contiguous
    out = torch.empty_like(x)
    outer, rows, width, tile_rows, tile_cols = _layout(x.shape, axis, tile)
    args = _Args(outer, rows, width, tile_rows, tile_cols, _DTYPE_CODES[x.dtype], pts, inv_pts)
    ptrs, ref = (x.data_ptr(), out.data_ptr()), ctypes.byref(args)
    bands = outer * -(-rows // tile_rows)
    native.split_work(lambda lo, hi, t: lib.nv_quantize(*ptrs, lo, hi, t, ref), bands, x.numel())
    return out


def _adversarial() -> torch.Tensor:
    """Rows of 16 that catch a miscompilation or a wrong order: E2M1 ties after scaling, an E4M3
    tie of the block scale, scale underflow, -0, saturation, subnormals, NaN and Inf."""
    ties = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5]
    rows = [
        [*ties, -3.5, -5.0, -0.0],
        [6.375] + [1.0] * 15,
        [2.0**-8, -(2.0**-9)] * 8,
        [3000.0, -2700.0, 1e-40, 0.1113281175494194] * 4,
        [float("nan")] + [1.0] * 15,
        [float("-inf")] + [0.5] * 15,
        [1.7812498807907104, -1.0, 0.3, 2.0**-130] * 4,
        # at pts 0.1 these are E2M1 ties of x · ((1/pts)/s), not of x · (1/(pts·s))
        [0.675, 0.02812499925494194, 0.08437499403953552, 0.140625, 0.19687499105930328] * 3
        + [0.5625],
    ]
    return torch.tensor(rows, dtype=torch.float32)


def self_check(lib: ctypes.CDLL) -> None:
    """Compare the fresh library with the torch path of ``mxprobe.nvfp4`` (single- and two-level,
    fp32 and bf16, both block directions and 16 x 16 tiles).

    Raises:
        RuntimeError: naming the case where the library disagrees.
    """
    # mxprobe.nvfp4 imports the kernels' room, so its torch path is imported at call time
    from mxprobe.nvfp4 import quantize_nvfp4_torch

    x = _adversarial()
    finite = x[:4]
    long = torch.cat([x.reshape(-1), x.reshape(-1) * -3.0]).reshape(1, -1)  # 16 blocks a row
    cases = (
        (x, 1, None, (1, BLOCK)),
        (long, 1, None, (1, BLOCK)),
        (x.to(torch.bfloat16), 0, None, (1, BLOCK)),
        (finite, 1, "amax", (1, BLOCK)),
        (x[-1:], 1, torch.tensor(0.1), (1, BLOCK)),
        (finite.repeat(5, 2).to(torch.bfloat16), 1, torch.tensor(0.0123), (BLOCK, BLOCK)),
    )
    for t, axis, scale, tile in cases:
        got = quantize(t, axis, scale, tile, _lib=lib)
        want = quantize_nvfp4_torch(t, axis, scale, tile, "even", None, "torchao")
        int_type = torch.int32 if t.dtype == torch.float32 else torch.int16
        same = torch.equal(got.isnan(), want.isnan()) and torch.equal(
            got.nan_to_num(0).view(int_type), want.nan_to_num(0).view(int_type)
        )
        if not same:
            raise RuntimeError(
                f"self-check failed (NVFP4 {t.dtype}, axis {axis}, tensor_scale {scale!r}, tile "
                f"{tile}): the compiled library disagrees with the torch path (a compiler "
                "applying fast-math?)"
            )
