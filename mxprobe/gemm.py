"""Products of MX-quantized operands, on bf16 tensor cores where that is exact (DESIGN.md §3).

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
"""

from __future__ import annotations

import contextlib

import torch


def _low_bits_clear(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Elementwise: the low ``bits`` bits of each fp32 pattern are zero (NaN counts as clear:
    it stays NaN in any format)."""
    return ((x.view(torch.int32) & ((1 << bits) - 1)) == 0) | x.isnan()


def bf16_exact(x: torch.Tensor) -> torch.Tensor:
    """Elementwise: each value of fp32 ``x`` is exactly a bf16 (see the module docstring for
    where MX values are not). A bool tensor on ``x``'s device; reading it back is the caller's
    choice."""
    return _low_bits_clear(_check_fp32(x), 16)


def tf32_exact(x: torch.Tensor) -> torch.Tensor:
    """Elementwise: each value of fp32 ``x`` is exactly a TF32 (10 explicit mantissa bits,
    subnormals down to 2^-136)."""
    return _low_bits_clear(_check_fp32(x), 13)


def _check_fp32(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32:
        raise TypeError(f"expected an fp32 tensor of MX-quantized values, got dtype {x.dtype}")
    return x


def mx_gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` (plus ``bias``, fused as ``F.linear`` fuses it) for MX-quantized operands.

    On CUDA, with fp32 operands of two or more dims whose every value is exactly a bf16, the
    product runs on bf16 tensor cores with fp32 accumulation and fp32 output: the same products
    as the fp32 GEMM. Otherwise, and always on CPU, it is the plain fp32 ``a @ b`` (with a 2-D
    ``a`` and a bias: ``torch.addmm``, which is what ``F.linear`` runs), bit for bit.

    Deciding exactness reads one flag back from the GPU: one host sync per call on CUDA.
    """
    if _bf16_is_exact(a, b):
        y = _bf16_product(a, b)
        return y if bias is None else y + bias
    if bias is None:
        return a @ b
    return torch.addmm(bias, a, b) if a.dim() == 2 else a @ b + bias


def _bf16_is_exact(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not (a.is_cuda and a.dtype == b.dtype == torch.float32 and min(a.dim(), b.dim()) >= 2):
        return False
    return bool(bf16_exact(a).all() & bf16_exact(b).all())


@contextlib.contextmanager
def _full_precision_reduction():
    """cuBLAS may otherwise reduce split-K partial sums of a bf16 GEMM in bf16 (torch allows
    it by default), which would round the exact products' sums twice."""
    flags = torch.backends.cuda.matmul
    saved = flags.allow_bf16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        flags.allow_bf16_reduced_precision_reduction = saved


def _bf16_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` from bf16 copies of the operands, fp32 accumulation and output (CUDA only:
    the ``out_dtype`` overloads of mm/bmm have no CPU kernel in torch 2.13)."""
    a16, b16 = a.bfloat16(), b.bfloat16()
    with _full_precision_reduction():
        if a.dim() == b.dim() == 2:
            return torch.mm(a16, b16, out_dtype=torch.float32)
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a3 = a16.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
        b3 = b16.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
        y = torch.bmm(a3, b3, out_dtype=torch.float32)
    return y.reshape(*batch, a.shape[-2], b.shape[-1])
