"""Statistics of MX quantization and of gradient bias (pure torch, no Lightning).

Quantization statistics compare a tensor ``x`` with its MX fake-quantized twin ``q``:

- ``saturation_fraction``: elements whose magnitude exceeds the block's largest representable
  value, ``|x| / 2^S > max_norm``, so that ``q`` is clipped to ``±max_norm * 2^S``.
- ``floor_overflow_fraction``: blocks whose maximum has a mantissa above the element format's
  largest mantissa, ``amax / 2^floor(log2 amax) > max_norm / 2^emax`` (e4m3: 1.75). Under
  ``floor`` scaling (OCP) such a block's maximum always saturates; whatever the scale mode
  this is a property of the data alone.
- ``underflow_fraction``: of the nonzero elements of ``x``, the fraction that became zero.
- ``sqnr_db``: ``10 log10(sum x^2 / sum (x - q)^2)``; +inf when ``q == x``.
- ``relative_bias``: mean over nonzero elements of ``q / x - 1``: negative when quantization
  shrinks magnitudes (saturation does), positive when it inflates them.
- ``relative_error``: ``||q - x|| / ||x||`` (0 for an all-zero ``x``).

Under NVFP4 (``nvfp4_quantization_sums``) an element *saturates* when, scaled by its block, it
lands above 6 and is clipped: its block's E4M3 scale was rounded down
(:func:`mxprobe.nvfp4.nvfp4_clip_counts`). ``block_dynamic_range``: the largest, over blocks,
of ``log2(max |x| / min nonzero |x|)``, in binades (what one block scale must cover).

Gradient comparison of a quantized gradient ``g_q`` with the full-precision gradient ``g_fp``
at the same weights and batch (``compare_gradients``):

- ``cosine``: ``<g_q, g_fp> / (||g_q|| ||g_fp||)``.
- ``zeta``: ``||g_q - g_fp||^2 / ||g_fp||^2`` (the paper's relative gradient error).
- ``bias``: the multiplicative bias ``<g_q, g_fp> / ||g_fp||^2 - 1``: the component of
  ``g_q`` along ``g_fp`` is ``(1 + bias) g_fp``.
- ``mean_diff``: ``mean(g_q - g_fp)``.
- ``norm_ratio``: ``||g_q|| / ||g_fp||``.

Sums are taken in float64 and kept as a 7-vector (``gradient_sums``) so that per-module
statistics combine exactly into totals and across ranks by adding vectors. Identical inputs
give ``zeta == 0``, ``bias == 0``, ``mean_diff == 0`` and ``norm_ratio == 1`` exactly.
"""

from __future__ import annotations

import torch

from mxprobe.formats import ElementFormat, mx_format
from mxprobe.kernels import compiled_call
from mxprobe.mx_blocks import (
    block_scale_exponent,
    check_args,
    exponent,
    pow2,
    quantize_blocks,
    stochastic_noise,
    to_blocks,
)
from mxprobe.names import GRAD_BIAS_STATS
from mxprobe.nvfp4 import nvfp4_clip_counts, quantize_nvfp4


def _fp32_blocks(x: torch.Tensor, block_size: int, axis: int) -> torch.Tensor:
    """fp32 blocks of ``x`` along ``axis``, shaped (outer, nblocks, block_size, inner) as the
    quantizer forms them; a short tail block is zero-padded."""
    if not -x.dim() <= axis < x.dim():
        raise IndexError(f"axis {axis} is out of range for a {x.dim()}-d tensor")
    return to_blocks(x.detach().float(), axis % x.dim(), block_size)[0]


def _saturated(blocks: torch.Tensor, fmt: ElementFormat, scale_mode: str) -> torch.Tensor:
    """Mask of the elements of fp32 ``blocks`` (block along dim 2) that the element format
    clips: ``|x| / 2^S > max_norm``."""
    s = block_scale_exponent(blocks.abs().amax(dim=2, keepdim=True), fmt, scale_mode)
    return (blocks * pow2(-s)).abs() > fmt.max_norm


def saturation_count(
    x: torch.Tensor,
    fmt: str | ElementFormat,
    *,
    block_size: int = 32,
    axis: int = -1,
    scale_mode: str = "floor",
) -> torch.Tensor:
    """Number of elements of ``x`` clipped by the saturating element format (int64 tensor)."""
    return _saturated(_fp32_blocks(x, block_size, axis), mx_format(fmt), scale_mode).sum()


def saturation_fraction(
    x: torch.Tensor,
    fmt: str | ElementFormat,
    *,
    block_size: int = 32,
    axis: int = -1,
    scale_mode: str = "floor",
) -> torch.Tensor:
    """Fraction of the elements of ``x`` whose MX value is clipped: ``|x| / 2^S > max_norm``."""
    count = saturation_count(x, fmt, block_size=block_size, axis=axis, scale_mode=scale_mode)
    return count.double() / max(x.numel(), 1)


def floor_overflow_count(
    x: torch.Tensor, fmt: str | ElementFormat, *, block_size: int = 32, axis: int = -1
) -> tuple[torch.Tensor, int]:
    """(number of blocks whose max mantissa exceeds ``max_norm / 2^emax``, number of blocks)."""
    f = mx_format(fmt)
    amax = _fp32_blocks(x, block_size, axis).abs().amax(dim=2)
    # amax / 2^floor(log2 amax) is 1 + (fp32 mantissa field) / 2^23, read from the bits once
    # subnormals are scaled into the normal range (exact).
    normal = torch.where(amax < 2.0**-126, amax * 2.0**64, amax)
    mantissa = 1 + (normal.view(torch.int32) & 0x7FFFFF).double() / 2.0**23
    over = (amax > 0) & (mantissa > f.max_norm / 2.0**f.emax)
    return over.sum(), amax.numel()


def floor_overflow_fraction(
    x: torch.Tensor, fmt: str | ElementFormat, *, block_size: int = 32, axis: int = -1
) -> torch.Tensor:
    """Fraction of blocks with ``amax / 2^floor(log2 amax) > max_norm / 2^emax``."""
    count, blocks = floor_overflow_count(x, fmt, block_size=block_size, axis=axis)
    return count.double() / max(blocks, 1)


# The scale binades of a block maximum that the layer-norm probes count (floor(log2 amax)).
BINADES = {"amax_lt_half": (None, -2), "amax_half_to_1": (-1, -1), "amax_1_to_2": (0, 0),
           "amax_ge_2": (1, None)}  # fmt: skip


def block_max_exponents(x: torch.Tensor, *, block_size: int = 32, axis: int = -1) -> torch.Tensor:
    """``floor(log2 amax)`` of every block of ``x``, flat (int32, exact from the fp32 bits; an
    all-zero or fp32-subnormal block gives -127): the binade that sets its floor scale."""
    return exponent(_fp32_blocks(x, block_size, axis).abs().amax(dim=2)).reshape(-1)


def binade_shares(exponents: torch.Tensor) -> dict[str, torch.Tensor]:
    """Share of blocks per binade of their maximum (:data:`BINADES`: below 1/2, [1/2, 1),
    [1, 2), 2 and above), from :func:`block_max_exponents`."""
    n = max(exponents.numel(), 1)
    shares = {}
    for name, (low, high) in BINADES.items():
        inside = torch.ones_like(exponents, dtype=torch.bool)
        if low is not None:
            inside &= exponents >= low
        if high is not None:
            inside &= exponents <= high
        shares[name] = inside.sum().double() / n
    return shares


def underflow_fraction(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Of the nonzero elements of ``x``, the fraction whose quantized value ``q`` is zero."""
    nonzero = x != 0
    return ((q == 0) & nonzero).sum().double() / nonzero.sum().clamp_min(1).double()


def sqnr_db(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Signal-to-quantization-noise ratio in dB (float64); +inf when ``q == x``."""
    x64, q64 = x.detach().double(), q.detach().double()
    return 10 * torch.log10(x64.square().sum() / (x64 - q64).square().sum())


def relative_bias(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over the nonzero elements of ``x`` of ``q / x - 1`` (float64); 0 when all are 0."""
    x64, q64 = x.detach().double(), q.detach().double()
    nonzero = x64 != 0
    ratios = q64[nonzero] / x64[nonzero] - 1
    return ratios.mean() if ratios.numel() else torch.zeros((), dtype=torch.float64)


def relative_error(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``||q - x|| / ||x||`` (float64); 0 for an all-zero ``x`` (whose MX value is zero too)."""
    x64, q64 = x.detach().double(), q.detach().double()
    norm = torch.linalg.vector_norm(x64)
    error = torch.linalg.vector_norm(q64 - x64)
    return torch.where(norm > 0, error / norm.clamp_min(torch.finfo(torch.float64).tiny), error)


def _block_sums(xb: torch.Tensor, *, fmt, scale_mode, rounding, noise) -> torch.Tensor:
    """The last five sums of :func:`quantization_sums` over blocks ``xb`` (zero padding adds
    nothing to any of them). One function so that the compiled CPU path fuses it."""
    # q in x's dtype first: the values the model computes with (fp16 may round or clip them).
    q = quantize_blocks(xb, fmt, scale_mode, rounding, noise, xb.dtype).float()
    x = xb.float()
    nonzero = x != 0
    # x - q is exact in fp32 (q is 0 or within a factor 2 of x); squared in float64, since an
    # fp32 square overflows above ~1.8e19 and underflows below ~1e-23.
    return torch.stack(
        [
            _saturated(x, fmt, scale_mode).sum(dtype=torch.float64),
            nonzero.sum(dtype=torch.float64),
            ((q == 0) & nonzero).sum(dtype=torch.float64),
            x.double().square().sum(),
            (x - q).double().square().sum(),
        ]
    )


def quantization_sums(
    x: torch.Tensor,
    fmt: str | ElementFormat,
    *,
    block_size: int = 32,
    axis: int = -1,
    scale_mode: str = "floor",
    rounding: str = "even",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Additive sums of one MX quantization of ``x`` (float64 6-vector): elements, saturated,
    nonzero, underflowed to zero, signal energy ``sum x^2``, noise energy ``sum (x - q)^2``.

    ``q`` is :func:`~mxprobe.quantize_mx` of ``x`` with the same arguments (torch backend; the
    same draws from ``generator``). Sums of several tensors (or ranks) add;
    :func:`quantization_stats` turns them into fractions and SQNR.
    """
    fmt, axis = check_args(x, fmt, block_size, axis, scale_mode, rounding)
    xb, _ = to_blocks(x.detach(), axis, block_size)
    noise = stochastic_noise(xb, generator) if rounding == "stochastic" else None
    sums = compiled_call(
        _block_sums,
        xb,
        fmt=fmt,
        scale_mode=scale_mode,
        rounding=rounding,
        noise=noise,
    )
    numel = torch.tensor([float(x.numel())], dtype=torch.float64, device=x.device)
    return torch.cat([numel, sums])


def nvfp4_quantization_sums(
    x: torch.Tensor,
    *,
    axis: int = -1,
    tensor_scale: str | None = "amax",
    tile: tuple[int, int] = (1, 16),
    rounding: str = "even",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The six sums of :func:`quantization_sums` for one NVFP4 quantization of ``x`` (the
    arguments of :func:`~mxprobe.quantize_nvfp4`); saturated = elements clipped at ±6."""
    x = x.detach()
    q = quantize_nvfp4(
        x, axis=axis, tensor_scale=tensor_scale, tile=tile, rounding=rounding, generator=generator
    ).double()
    x64 = x.double()
    nonzero = x64 != 0
    clipped = nvfp4_clip_counts(x, axis=axis, tensor_scale=tensor_scale, tile=tile)[0]
    return torch.stack(
        [
            torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device),
            clipped,
            nonzero.sum(dtype=torch.float64),
            ((q == 0) & nonzero).sum(dtype=torch.float64),
            x64.square().sum(),
            (x64 - q).square().sum(),
        ]
    )


def block_dynamic_range(x: torch.Tensor, *, block_size: int = 16, axis: int = -1) -> torch.Tensor:
    """The largest, over blocks of ``block_size`` along ``axis``, of ``log2(max |x| / min
    nonzero |x|)`` (float64; 0 when no block holds two distinct nonzero magnitudes)."""
    blocks, _ = to_blocks(x.detach(), axis % max(x.dim(), 1), block_size)
    magnitudes = blocks.double().abs()  # (outer, blocks, block_size, inner)
    largest = magnitudes.amax(dim=2)
    smallest = torch.where(magnitudes > 0, magnitudes, torch.inf).amin(dim=2)
    spans = torch.where(largest > 0, torch.log2(largest / smallest), 0.0)
    return spans.amax() if spans.numel() else torch.zeros((), dtype=torch.float64)


def quantization_stats(sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """``saturation``, ``underflow`` and ``sqnr_db`` from :func:`quantization_sums`."""
    numel, saturated, nonzero, underflow, signal, noise = sums.unbind()
    return {
        "saturation": saturated / numel.clamp_min(1),
        "underflow": underflow / nonzero.clamp_min(1),
        "sqnr_db": 10 * torch.log10(signal / noise),
    }


GRADIENT_STATS = GRAD_BIAS_STATS


def gradient_sums(g_q: torch.Tensor, g_fp: torch.Tensor) -> torch.Tensor:
    """Float64 7-vector ``[n, <q,q>, <f,f>, <q,f>, ||q-f||^2, sum q, sum f]``.

    The difference is summed directly rather than expanded from the dot products, so a small
    ``zeta`` keeps its precision and identical gradients give exactly zero.
    """
    q, f = g_q.detach().reshape(-1).double(), g_fp.detach().reshape(-1).double()
    d = q - f
    return torch.stack(
        [
            torch.tensor(float(q.numel()), dtype=torch.float64, device=q.device),
            torch.dot(q, q),
            torch.dot(f, f),
            torch.dot(q, f),
            torch.dot(d, d),  # one pass, where square().sum() takes two
            q.sum(),
            f.sum(),
        ]
    )


def gradient_comparison(sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics of :data:`GRADIENT_STATS` from (a sum of) :func:`gradient_sums`."""
    n, qq, ff, qf, dd, sq, sf = sums.unbind()
    return {
        "cosine": qf / (qq.sqrt() * ff.sqrt()),
        "zeta": dd / ff,
        "bias": qf / ff - 1,
        "mean_diff": (sq - sf) / n.clamp_min(1),
        "norm_ratio": (qq / ff).sqrt(),
    }


def compare_gradients(g_q: torch.Tensor, g_fp: torch.Tensor) -> dict[str, torch.Tensor]:
    """``cosine``, ``zeta``, ``bias``, ``mean_diff``, ``norm_ratio`` of ``g_q`` against
    ``g_fp`` (see the module docstring)."""
    return gradient_comparison(gradient_sums(g_q, g_fp))
