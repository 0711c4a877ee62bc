"""Products of MX-quantized operands, on TF32 tensor cores where that is exact (docs/numerics.md).

An MX value is an element with at most 8 significant bits (int8 7; e4m3 and e2m3 4; e5m2 and
e3m2 3; e2m1 2) times an E8M0 scale 2^S, S in [-127, 127], stored in fp32. bf16 is the top half
of an fp32 bit pattern, so such a value is exactly a bf16 iff the low 16 bits of its fp32
pattern are zero; TF32 (10 explicit mantissa bits, fp32's exponent range) keeps the top 19 bits,
so the low 13 must be zero. Eight significant bits always fit; what can fail is range:

- Bottom: bf16's smallest subnormal is 2^-133 (TF32's 2^-136), while a block's smallest
  nonzero value is its element's smallest subnormal times 2^S, 2^(emin - mbits + S): e4m3
  2^(S-9), e5m2 2^(S-16), e2m3 2^(S-3), e3m2 2^(S-4), e2m1 2^(S-1), int8 2^(S-6). Every value
  of a block is exact in bf16 iff S >= -124 (e4m3) or S >= -117 (e5m2); e2m3, e3m2, e2m1 and
  int8 blocks always are (their steps stay >= 2^-133 down to S = -127, e.g. int8 2^-133). In
  TF32 only e5m2 can fail (S >= -120 needed); e4m3 reaches exactly 2^-136. Such scales come
  only from nearly vanishing blocks: largest magnitude below about 2^-116 (e4m3) or 2^-102
  (e5m2).
- Top: no MX value exceeds fp32, and below 2^128 eight significant bits fit both. But an fp32
  output saturates at fp32's largest value (24 significant bits) when rounding carries past
  2^128, which a block with amax near 2^128 can reach under the ceil, even and rceil scale
  modes; that value is neither bf16 nor TF32.

Each product of two exact bf16 operands has at most 16 significant bits and enters the fp32
accumulator exactly; the sum is rounded as any fp32 GEMM rounds it (in its own order).

So the choice is made from the formats alone, never from the data (reading a flag back from the
GPU would cost a host sync per GEMM and break CUDA-graph capture): under the floor scale mode,
e4m3, e2m3, e3m2, e2m1 and int8 values, and bf16/fp16-rounded values, are TF32-exact over the
whole E8M0 range; e5m2 (tiny blocks), plain fp32 operands and the other scale modes (fp32
saturation) keep the fp32 GEMM. TF32 needs tensor cores that keep fp32 subnormal inputs (e4m3
reaches 2^-136): tests/test_gemm.py checks that on the first CUDA machine.
"""

from __future__ import annotations

import contextlib

import torch

# Element formats whose values times any E8M0 scale (floor mode) are TF32-exact; bf16/fp16
# rounded values are too (8 and 11 significant bits, fp32's range).
TF32_EXACT_FORMATS = frozenset(
    {"fp8_e4m3", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1", "int8", "bf16", "fp16"}
)


def _low_bits_clear(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Elementwise: the low ``bits`` bits of each fp32 pattern are zero (NaN counts as clear:
    it stays NaN in any format)."""
    return ((x.view(torch.int32) & ((1 << bits) - 1)) == 0) | x.isnan()


def bf16_exact(x: torch.Tensor) -> torch.Tensor:
    """Elementwise: each value of fp32 ``x`` is exactly a bf16 (see the module docstring for
    where MX values are not). A bool tensor on ``x``'s device."""
    return _low_bits_clear(_check_fp32(x), 16)


def tf32_exact(x: torch.Tensor) -> torch.Tensor:
    """Elementwise: each value of fp32 ``x`` is exactly a TF32 (10 explicit mantissa bits,
    subnormals down to 2^-136)."""
    return _low_bits_clear(_check_fp32(x), 13)


def _check_fp32(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32:
        raise TypeError(f"expected an fp32 tensor of MX-quantized values, got dtype {x.dtype}")
    return x


def tensor_core_exact(fmt: str, scale_mode: str) -> bool:
    """True when every value a role of format ``fmt`` produces under ``scale_mode`` is exactly a
    TF32, whatever the data (see the module docstring)."""
    if fmt in ("bf16", "fp16"):
        return True
    return scale_mode == "floor" and fmt in TF32_EXACT_FORMATS


@contextlib.contextmanager
def _tf32_matmul():
    flags = torch.backends.cuda.matmul
    saved = flags.fp32_precision
    flags.fp32_precision = "tf32"
    try:
        yield
    finally:
        flags.fp32_precision = saved


def mx_gemm(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, exact_tf32: bool = False
) -> torch.Tensor:
    """``a @ b`` (plus ``bias``, fused as ``F.linear`` fuses it) for quantized operands.

    ``exact_tf32`` (from :func:`tensor_core_exact` of both operands' formats) lets a CUDA fp32
    product run on TF32 tensor cores: the same products as the fp32 GEMM, summed in fp32 in
    the kernel's own order. Otherwise, and always on CPU, it is the plain fp32 ``a @ b`` (with a
    2-D ``a`` and a bias: ``torch.addmm``, which is what ``F.linear`` runs), bit for bit. No
    data is read back: no host sync.
    """
    use_tf32 = exact_tf32 and a.is_cuda and a.dtype == b.dtype == torch.float32
    with _tf32_matmul() if use_tf32 else contextlib.nullcontext():
        if bias is None:
            return a @ b
        return torch.addmm(bias, a, b) if a.dim() == 2 else a @ b + bias
