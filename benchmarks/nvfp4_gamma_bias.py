"""The multiplicative bias each format imposes on layer-norm affine weights clustered near 1:
gamma drawn uniformly in [0.9, 1.0] (4096 x 4096, seed 0), the mean relative change
mean(Q(gamma) / gamma - 1) under MXFP8 E4M3, MXFP4 E2M1 (32-element blocks, floor E8M0 scale)
and NVFP4 (16-element blocks, E4M3 scale; single-level and two-level, both variants).

    python benchmarks/nvfp4_gamma_bias.py
"""

from __future__ import annotations

import torch

import mxprobe


def relative_change(q: torch.Tensor, g: torch.Tensor) -> float:
    return float((q.double() / g.double() - 1).mean())


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    gamma = 0.9 + 0.1 * torch.rand(4096, 4096, generator=gen)
    rows = {
        "MXFP8 E4M3": mxprobe.quantize_mx(gamma, "e4m3"),
        "MXFP4 E2M1": mxprobe.quantize_mx(gamma, "e2m1"),
        "NVFP4 single-level": mxprobe.quantize_nvfp4(gamma),
        "NVFP4 two-level": mxprobe.quantize_nvfp4(gamma, tensor_scale="amax"),
        "NVFP4 two-level (TE)": mxprobe.quantize_nvfp4(gamma, tensor_scale="amax", variant="te"),
    }
    for name, q in rows.items():
        print(f"{name:22s} mean relative change {100 * relative_change(q, gamma):+6.2f} %")


if __name__ == "__main__":
    main()
