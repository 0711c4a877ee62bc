"""The random Hadamard transform (RHT) of NVIDIA's NVFP4 recipe: before the weight-gradient GEMM
``dW = dYᵀ X`` quantizes its operands along the token axis, both are multiplied, 16 tokens at a
time, by ``M = H · diag(s)``: ``H`` the 16 x 16 Sylvester Hadamard matrix scaled by 1/4 (entries
±1/4, so ``HᵀH = I``) and ``s`` a vector of 16 random signs. ``M`` is orthogonal, so
``(M dY)ᵀ (M X) = dYᵀ X``: without quantization the gradient is unchanged up to fp32 rounding;
with it, an outlier's weight is spread over its 16-token group before the block scale is taken.

The token axis is zero-padded to a multiple of 16 (zero rows add nothing to the product), and
the transformed operand keeps the padding: both operands of the product must be transformed with
the same ``signs``. :func:`draw_signs` makes a sign vector from a generator; the training path
draws one per iteration (:mod:`mxprobe.nvfp4_random`).
"""

from __future__ import annotations

import torch

SIZE = 16


def hadamard_matrix(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The 16 x 16 Sylvester Hadamard matrix times 1/4 (symmetric and orthogonal)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < SIZE:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / SIZE**0.5).to(dtype=dtype, device=device)


def draw_signs(generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """16 independent fair ±1 signs (fp32) from ``generator``."""
    bits = torch.randint(0, 2, (SIZE,), generator=generator, dtype=torch.int64)
    return (bits * 2 - 1).to(dtype=torch.float32, device=device)


def padded_length(n: int) -> int:
    """``n`` rounded up to a whole number of 16-element groups."""
    return -(-n // SIZE) * SIZE


def random_hadamard(x: torch.Tensor, signs: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """``x`` with each group of 16 consecutive entries along ``axis`` replaced by ``M`` times it
    (``M = H · diag(signs)``), computed in fp32 (fp64 for fp64) and returned in ``x``'s dtype;
    ``axis`` is zero-padded to :func:`padded_length` first, so the result may be longer."""
    if signs.shape != (SIZE,):
        raise ValueError(f"signs must have shape ({SIZE},), got {tuple(signs.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    moved = x.movedim(axis, 0).to(dtype)
    n = moved.shape[0]
    pad = padded_length(n) - n
    if pad:
        moved = torch.cat([moved, moved.new_zeros((pad, *moved.shape[1:]))], 0)
    groups = moved.reshape(-1, SIZE, *moved.shape[1:])
    m = hadamard_matrix(dtype, x.device) * signs.to(device=x.device, dtype=dtype)
    out = torch.einsum("ij,gj...->gi...", m, groups).reshape(moved.shape)
    return out.to(x.dtype).movedim(0, axis)
