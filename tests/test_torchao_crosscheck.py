"""Cross-check against torchao's MXTensor (when installed) for FLOOR and RCEIL, rounding even.

torchao 0.18 dequantizes blocks whose E8M0 scale is below 2^-126 wrongly (byte 0 is the fp32
subnormal 2^-127, which its ``byte << 23`` turns into 0), so those blocks are left out here
rather than copying the bug. Where a value rounds past the dtype's range torchao returns Inf and
mxprobe saturates at the largest finite value (docs/numerics.md: never Inf).
"""

import pytest
import torch

from mxprobe.formats import mx_format
from mxprobe.quantize import block_scale_exponent, quantize_mx
from tests.helpers_numerics import adversarial, bits_equal

mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
config = pytest.importorskip("torchao.prototype.mx_formats.config")

ELEM_DTYPES = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "fp6_e2m3": "fp6_e2m3",
    "fp6_e3m2": "fp6_e3m2",
    "fp4_e2m1": torch.float4_e2m1fn_x2,
}


def _torchao_elem(fmt):
    dt = ELEM_DTYPES[fmt]
    if isinstance(dt, str):
        from torchao.prototype.mx_formats import constants

        dt = getattr(constants, "DTYPE_" + dt.upper())
    return dt


@pytest.mark.parametrize("fmt", list(ELEM_DTYPES))
@pytest.mark.parametrize("mode", ["floor", "rceil"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torchao(fmt, mode, dtype):
    g = torch.Generator().manual_seed(7)
    rand = torch.randn(64, 64, generator=g) * torch.exp(4 * torch.randn(64, 64, generator=g))
    adv = adversarial(fmt)
    adv = adv[torch.isfinite(adv.to(dtype)).all(dim=1)]  # 3.4e38 is Inf in bf16
    adv = adv[: len(adv) // 2 * 2].reshape(-1, 64)
    x = torch.cat([rand, adv]).to(dtype)
    scaling = getattr(config.ScaleCalculationMode, mode.upper())
    t = mx_tensor.MXTensor.to_mx(x, _torchao_elem(fmt), 32, scaling_mode=scaling)
    theirs = t.dequantize(dtype)
    ours = quantize_mx(x, fmt, scale_mode=mode, rounding="even", backend="torch")
    blocks = x.float().reshape(-1, 32)
    s = block_scale_exponent(blocks.abs().amax(-1, keepdim=True), mx_format(fmt), mode)
    keep = (s > -127).reshape(-1)  # torchao mis-dequantizes the 2^-127 scale
    assert keep.float().mean() > 0.9
    ours, theirs = ours.reshape(-1, 32)[keep], theirs.reshape(-1, 32)[keep]
    # A block max rounding past the dtype's range: torchao returns Inf, we saturate (never Inf).
    overflow = torch.isinf(theirs)
    assert torch.equal(
        ours[overflow].abs(), torch.full_like(ours[overflow], torch.finfo(dtype).max)
    )
    assert bits_equal(ours[~overflow], theirs[~overflow])
