"""NVFP4 fake quantization: E2M1 elements, an E4M3 scale per 16-element block and, optionally, an
FP32 per-tensor scale (two-level), as NVIDIA's FP4 training recipe uses them.

Two computations exist and do not agree bit for bit; both are offered, by ``variant``:

- ``"torchao"`` (default), bit-exact with torchao's ``nvfp4_quantize`` where it defines the
  result. Block scale ``s = e4m3(clamp(amax_b / 6, 2^-6, 448))`` (a true fp32 division; 2^-6 is
  E4M3's smallest normal, so no subnormal scale: a single-level block with amax <= 2^-8 becomes
  0, and values past 6 * 448 = 2688 saturate); elements ``x * (1 / s)``. Two-level, with the
  per-tensor scale ``pts`` (``tensor_scale="amax"``: ``amax / 2688``; or a given one):
  ``s = e4m3(clamp((amax_b / 6) / pts, 2^-6, 448))`` and elements ``x * ((1 / pts) / s)``.
- ``"te"``, Transformer Engine's formulas: encode scale ``S_enc = 2688 / amax`` (1 when amax is
  0 or not finite), block scale ``s = e4m3(min(amax_b * (S_enc * (1/6)), 448))`` with subnormal
  scales allowed, elements ``x * (1 / (s * (1 / S_enc)))`` (0 for a block whose scale is 0).
  ``tensor_scale`` must be ``"amax"``: the variant is two-level by construction.

Then every element is clamped to ±6 and rounded to E2M1 (``rounding="even"``: nearest, ties to
even; ``"stochastic"``: up with probability equal to the fraction of the step, unbiased, from
``generator``). The value returned is the correctly rounded dequantization ``(q · s) · pts``
(``q · s`` single-level: exact) in the input's dtype. (torchao's own ``NVFP4Tensor.dequantize``
computes ``q · (pts · s)``, one fp32 ulp off in some two-level elements.)

Blocks run along ``axis`` (``tile=(1, 16)``) or are 16 x 16 tiles of the last two dimensions
(``tile=(16, 16)``: forward and backward then see the same quantized weight); a tail shorter
than a block is zero-padded, which changes no block maximum. A block holding NaN or Inf comes out
NaN, like an MX block; two-level scaling of a tensor with a non-finite maximum is NaN throughout,
and of an all-zero tensor is that tensor.

``nvfp4_encode`` gives the packed form (two E2M1 codes per byte, low nibble first; E4M3 scale
bytes; the per-tensor scale) and ``nvfp4_decode`` reads it back to the same values.

This module's torch path is the reference; ``quantize_nvfp4`` runs fp32/bf16 tensors with
``rounding="even"`` and variant ``"torchao"`` on the native C kernel (CPU) or a Triton kernel
(CUDA) instead, which give the same bits (``mxprobe.kernels.resolve_nvfp4_backend`` says which
backend a call takes). On CUDA, torch computes ``amax_b / 6`` and ``amax / 2688`` (a tensor
divided by a Python number) as products with the fp32 reciprocals, and the Triton kernel does
the same there: a few block maxima straddle an E4M3 tie and get another scale than on CPU.
"""

from __future__ import annotations

import dataclasses

import torch

from mxprobe import kernels
from mxprobe.checks import check_choice
from mxprobe.formats import mx_format
from mxprobe.mx_blocks import _round_even_float, _round_magnitude, exponent, pow2

BLOCK = 16
TILES = ((1, BLOCK), (BLOCK, BLOCK))
VARIANTS = ("torchao", "te")
ROUNDINGS = ("even", "stochastic")
E2M1 = mx_format("fp4_e2m1")
E4M3 = mx_format("fp8_e4m3")
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_TINY = 2.0**-6
TENSOR_MAX = E4M3_MAX * E2M1_MAX  # 2688: the largest value a two-level tensor holds


def _blocks(x: torch.Tensor, axis: int, tile: tuple[int, int]) -> tuple[torch.Tensor, tuple]:
    """fp32 blocks with the 16 (or 16 x 16) elements of each on the last axis, zero-padded, and
    what ``_unblock`` needs to undo it."""
    if tile == (1, BLOCK):
        moved = x.movedim(axis, -1)
        length = moved.shape[-1]
        pad = -length % BLOCK
        v = torch.nn.functional.pad(moved.float(), (0, pad))
        return v.reshape(*v.shape[:-1], -1, BLOCK), (tile, axis, moved.shape)
    rows, cols = x.shape[-2:]
    v = torch.nn.functional.pad(x.float(), (0, -cols % BLOCK, 0, -rows % BLOCK))
    v = v.reshape(*v.shape[:-2], v.shape[-2] // BLOCK, BLOCK, v.shape[-1] // BLOCK, BLOCK)
    v = v.transpose(-3, -2)  # (..., row tiles, col tiles, 16, 16)
    return v.reshape(*v.shape[:-2], BLOCK * BLOCK), (tile, axis, x.shape)


def _unblock(blocks: torch.Tensor, how: tuple) -> torch.Tensor:
    tile, axis, shape = how
    if tile == (1, BLOCK):
        v = blocks.reshape(*blocks.shape[:-2], -1)[..., : shape[-1]]
        return v.movedim(-1, axis)
    v = blocks.reshape(*blocks.shape[:-1], BLOCK, BLOCK).transpose(-3, -2)
    v = v.reshape(*v.shape[:-4], v.shape[-4] * BLOCK, v.shape[-2] * BLOCK)
    return v[..., : shape[-2], : shape[-1]]


def _e4m3(v: torch.Tensor) -> torch.Tensor:
    """``v`` (fp32, >= 0, <= 448 after the callers' clamps) rounded to E4M3, ties to even."""
    return _round_even_float(v, E4M3)


def _e2m1(y: torch.Tensor, rounding: str, generator: torch.Generator | None) -> torch.Tensor:
    """``y`` clamped to ±6 and rounded to E2M1."""
    y = y.clamp(-E2M1_MAX, E2M1_MAX)
    if rounding == "even":
        return _round_even_float(y, E2M1)
    step = exponent(y).clamp_min(E2M1.emin) - E2M1.mbits
    noise = torch.rand(y.shape, generator=generator, device=y.device, dtype=torch.float32)
    q = _round_magnitude(y.abs() * pow2(-step), "stochastic", noise)
    return torch.copysign(torch.clamp_max(q * pow2(step), E2M1_MAX), y)


def _checked_scale(x: torch.Tensor, tensor_scale) -> str | torch.Tensor | None:
    """None, ``"amax"``, or a given scale as a 0-dim fp32 tensor on ``x``'s device."""
    if tensor_scale is None:
        return None
    if isinstance(tensor_scale, str):
        check_choice(tensor_scale, ("amax",), "tensor_scale")
        return tensor_scale
    scale = torch.as_tensor(tensor_scale, dtype=torch.float32, device=x.device)
    if scale.numel() != 1 or not bool(torch.isfinite(scale)) or float(scale) <= 0:
        raise ValueError(
            f"tensor_scale must be None, 'amax' or a finite number > 0, got {tensor_scale!r}"
        )
    return scale.reshape(())


def _tensor_scale(x: torch.Tensor, tensor_scale: str | torch.Tensor | None) -> torch.Tensor | None:
    """The per-tensor scale of a checked ``tensor_scale`` (None single-level)."""
    if isinstance(tensor_scale, str):
        return x.float().abs().amax() / TENSOR_MAX
    return tensor_scale


def _check(
    x, axis, tile, rounding, variant, tensor_scale
) -> tuple[int, tuple[int, int], str | torch.Tensor | None]:
    """(axis made non-negative, tile as a tuple, ``_checked_scale``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"NVFP4 fake quantization takes float32 or bfloat16, got {x.dtype}")
    if (
        isinstance(axis, bool)
        or not isinstance(axis, int)
        or not -x.dim() <= axis < max(x.dim(), 1)
    ):
        raise ValueError(f"axis {axis!r} is out of range for a tensor of {x.dim()} dimension(s)")
    tile = tuple(tile)
    check_choice(tile, TILES, "tile")
    if tile == (BLOCK, BLOCK) and x.dim() < 2:
        raise ValueError(f"tile=(16, 16) needs a tensor of at least 2 dimensions, got {x.dim()}")
    check_choice(rounding, ROUNDINGS, "rounding")
    check_choice(variant, VARIANTS, "variant")
    if variant == "te" and not (isinstance(tensor_scale, str) and tensor_scale == "amax"):
        raise ValueError("variant 'te' is two-level by construction: pass tensor_scale='amax'")
    return axis % max(x.dim(), 1), tile, _checked_scale(x, tensor_scale)


def _scaled(x, axis, pts, tile, variant):
    """(blocks scaled onto the E2M1 range, before its ±6 clamp; fp32 block scales s; per-tensor
    factor to multiply by or None; block maxima; the blocking)."""
    blocks, how = _blocks(x, axis, tile)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    if variant == "te":
        tensor_amax = blocks.abs().amax()
        finite = bool(torch.isfinite(tensor_amax)) and float(tensor_amax) > 0
        s_enc = TENSOR_MAX / tensor_amax if finite else torch.tensor(1.0, device=x.device)
        s = _e4m3((amax * (s_enc * (1.0 / 6.0))).clamp_max(E4M3_MAX))
        factor = torch.where(s == 0, 0.0, 1.0 / (s * (1.0 / s_enc)))
        return blocks * factor, s, 1.0 / s_enc, amax, how
    if pts is None:
        s = _e4m3((amax / E2M1_MAX).clamp(E4M3_TINY, E4M3_MAX))
        return blocks * (1.0 / s), s, None, amax, how
    s = _e4m3(((amax / E2M1_MAX) / pts).clamp(E4M3_TINY, E4M3_MAX))
    return blocks * ((1.0 / pts) / s), s, pts, amax, how


def _codes_and_scales(x, axis, pts, tile, rounding, generator, variant):
    """(E2M1 values q, fp32 block scales s, per-tensor factor to multiply by or None, block
    maxima, the blocking)."""
    y, s, pts, amax, how = _scaled(x, axis, pts, tile, variant)
    return _e2m1(y, rounding, generator), s, pts, amax, how


def _quantized(x, axis, tensor_scale, tile, rounding, generator, variant):
    """``_codes_and_scales`` (arguments checked), or None for an empty or all-zero two-level
    x."""
    if x.numel() == 0:
        return None
    pts = None if variant == "te" else _tensor_scale(x, tensor_scale)
    if pts is not None and float(pts) == 0:
        return None
    return _codes_and_scales(x, axis, pts, tile, rounding, generator, variant)


def _dequantized(q, s, pts, amax) -> torch.Tensor:
    out = q * (s + amax * 0.0)  # exact (-0 stays -0); + amax * 0 makes a NaN/Inf block NaN
    return out if pts is None else out * pts


def quantize_nvfp4(
    x: torch.Tensor,
    *,
    axis: int = -1,
    tensor_scale: str | float | torch.Tensor | None = None,
    tile: tuple[int, int] = (1, BLOCK),
    rounding: str = "even",
    generator: torch.Generator | None = None,
    variant: str = "torchao",
    backend: str = "auto",
) -> torch.Tensor:
    """NVFP4 fake quantization of ``x`` (fp32 or bf16): same shape and dtype (module docstring).

    ``backend``: ``"auto"`` takes the native CPU kernel or, for CUDA tensors, the Triton
    kernel where it computes the call (fp32/bf16 tensors outside autograd and
    ``torch.compile``, ``rounding="even"``, variant ``"torchao"``:
    ``mxprobe.kernels.resolve_nvfp4_backend``), else the torch path; ``"torch"`` the torch path
    (the reference); ``"native"`` or ``"triton"`` that kernel or an error. All agree to the bit
    on the same device.

    Raises:
        TypeError: ``x`` not a float32/bfloat16 tensor.
        ValueError: an axis out of range, an unknown tile, rounding, variant or backend, a
            tensor_scale that is not None, ``"amax"`` or a finite number > 0.
        RuntimeError: ``backend="native"`` or ``"triton"`` where that kernel does not compute
            the call.
    """
    axis, tile, tensor_scale = _check(x, axis, tile, rounding, variant, tensor_scale)
    flat = x.reshape(1) if x.dim() == 0 else x  # a 0-dim tensor is a block of one element
    found = kernels.quantize_nvfp4(
        flat, axis, tensor_scale, tile, rounding, generator, variant, backend=backend
    )
    return found.reshape(x.shape)


def quantize_nvfp4_torch(x, axis, tensor_scale, tile, rounding, generator, variant):
    """The torch path of :func:`quantize_nvfp4` (the reference), arguments checked (``axis``
    non-negative, ``tile`` a tuple, ``tensor_scale`` None, ``"amax"`` or a 0-dim fp32
    tensor)."""
    found = _quantized(x, axis, tensor_scale, tile, rounding, generator, variant)
    if found is None:
        return x.clone()
    q, s, pts, amax, how = found
    return _unblock(_dequantized(q, s, pts, amax), how).to(x.dtype)


def nvfp4_clip_counts(
    x: torch.Tensor,
    *,
    axis: int = -1,
    tensor_scale: str | float | torch.Tensor | None = None,
    tile: tuple[int, int] = (1, BLOCK),
    variant: str = "torchao",
) -> torch.Tensor:
    """What NVFP4's saturation is (float64: elements clipped, blocks holding one, blocks): an
    element is clipped when, scaled by its block, it lands above 6 — its block's scale was
    rounded down by the E4M3 cast (or hit the cast's clamp), so the block max no longer maps to
    6 or below. Same arguments as :func:`quantize_nvfp4`."""
    axis, tile, tensor_scale = _check(x, axis, tile, "even", variant, tensor_scale)
    if x.numel() == 0:
        return torch.zeros(3, dtype=torch.float64, device=x.device)
    pts = None if variant == "te" else _tensor_scale(x, tensor_scale)
    if pts is not None and float(pts) == 0:
        return torch.zeros(3, dtype=torch.float64, device=x.device)
    y, *_ = _scaled(x.detach(), axis, pts, tile, variant)
    clipped = y.abs() > E2M1_MAX
    return torch.stack(
        [
            clipped.sum(dtype=torch.float64),
            clipped.any(dim=-1).sum(dtype=torch.float64),
            torch.tensor(float(clipped[..., 0].numel()), dtype=torch.float64, device=x.device),
        ]
    )


_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


@dataclasses.dataclass(frozen=True)
class NVFP4Packed:
    """NVFP4 in its stored form: ``codes`` (uint8, two E2M1 codes per byte, the even element in
    the low nibble; sign in each code's bit 3), ``scales`` (``torch.float8_e4m3fn``, one per
    block; NaN for a block that held NaN or Inf), ``tensor_scale`` (fp32 factor, or None), and
    how to put the values back into ``x``'s shape."""

    codes: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor | None
    how: tuple
    dtype: torch.dtype


def nvfp4_encode(
    x: torch.Tensor,
    *,
    axis: int = -1,
    tensor_scale: str | float | torch.Tensor | None = None,
    tile: tuple[int, int] = (1, BLOCK),
    rounding: str = "even",
    generator: torch.Generator | None = None,
    variant: str = "torchao",
) -> NVFP4Packed:
    """The packed form of ``quantize_nvfp4(x, ...)``; ``nvfp4_decode`` of it equals that.
    Computed on the torch path, whose codes and scales it keeps."""
    axis, tile, tensor_scale = _check(x, axis, tile, rounding, variant, tensor_scale)
    found = _quantized(x, axis, tensor_scale, tile, rounding, generator, variant)
    if found is None:  # empty or all zero: zero codes and (smallest) scales decode to x
        zeros = torch.zeros_like(x, dtype=torch.float32)
        found = _codes_and_scales(zeros, axis, None, tile, "even", None, "torchao")
        found = (found[0], found[1], None, found[3], found[4])
    q, s, pts, amax, how = found
    magnitude = torch.bucketize(q.abs(), _GRID.to(q.device)).to(torch.uint8)
    codes = magnitude | (torch.signbit(q).to(torch.uint8) << 3)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    s = torch.where(torch.isfinite(amax), s, torch.nan).squeeze(-1)
    return NVFP4Packed(packed, s.to(torch.float8_e4m3fn), pts, how, x.dtype)


def nvfp4_decode(packed: NVFP4Packed) -> torch.Tensor:
    """The values ``packed`` holds, in the shape and dtype of the tensor it was made from."""
    codes = torch.stack((packed.codes & 0x0F, packed.codes >> 4), dim=-1).flatten(-2)
    q = _GRID.to(codes.device)[(codes & 0x07).long()]
    q = torch.where((codes & 0x08).bool(), -q, q)
    s = packed.scales.float().unsqueeze(-1)
    out = q * s
    if packed.tensor_scale is not None:
        out = out * packed.tensor_scale
    return _unblock(out, packed.how).to(packed.dtype)
