"""The torch.compile'd CPU path (used for large tensors) equals the eager path bit for bit."""

import pytest
import torch

import mxprobe.quantize as quantize
from mxprobe.stats import quantization_sums
from tests.conftest import bits_equal
from tests.test_quantize import adversarial


@pytest.fixture
def compiled():
    previous = quantize.set_compile(True)
    yield
    quantize.set_compile(previous)


@pytest.mark.parametrize(
    "fmt, mode, rounding, dtype",
    [
        ("fp8_e4m3", "floor", "even", torch.float32),
        ("fp4_e2m1", "rceil", "nearest", torch.bfloat16),
        ("fp6_e3m2", "floor", "even", torch.float16),
        ("fp8_e5m2", "even", "even", torch.bfloat16),
    ],
)
def test_compiled_equals_eager(compiled, fmt, mode, rounding, dtype):
    g = torch.Generator().manual_seed(3)
    rand = torch.randn(2048, 64, generator=g) * torch.exp(3 * torch.randn(2048, 64, generator=g))
    adv = adversarial(fmt)[:16].reshape(-1, 64)
    poison = torch.ones(2, 64)
    poison[0, 5], poison[1, 40] = float("nan"), -float("inf")  # NaN must survive the compiled max
    x = torch.cat([rand, adv, poison]).to(dtype)
    assert x.numel() >= quantize._COMPILE_MIN_NUMEL
    got = quantize.quantize_mx(x, fmt, scale_mode=mode, rounding=rounding, backend="torch")
    assert not quantize._compile_failed, "the compiled path fell back to eager"
    assert (quantize.mx_format(fmt), mode, rounding, dtype) in quantize._compiled
    quantize.set_compile(False)
    want = quantize.quantize_mx(x, fmt, scale_mode=mode, rounding=rounding, backend="torch")
    assert bits_equal(got, want)
    # the transposed axis goes through the same compiled function
    quantize.set_compile(True)
    got0 = quantize.quantize_mx(x, fmt, axis=0, scale_mode=mode, rounding=rounding)
    quantize.set_compile(False)
    assert bits_equal(
        got0, quantize.quantize_mx(x, fmt, axis=0, scale_mode=mode, rounding=rounding)
    )


@pytest.mark.parametrize(
    "fmt, mode, rounding, dtype",
    [
        ("fp8_e4m3", "floor", "even", torch.float32),
        ("fp4_e2m1", "rceil", "stochastic", torch.bfloat16),
    ],
)
def test_compiled_quantization_sums_equal_eager(compiled, fmt, mode, rounding, dtype):
    """ActivationMonitor's sums go through the compiled path as one fused pass."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1024, 96, generator=g) * torch.exp(3 * torch.randn(1024, 96, generator=g))
    x[7, :40] = 0.0
    x = x.to(dtype)
    kw = {"scale_mode": mode, "rounding": rounding}
    got = quantization_sums(x, fmt, generator=torch.Generator().manual_seed(2), **kw)
    assert not quantize._compile_failed, "the compiled path fell back to eager"
    assert any(key[0] == "quantization_sums" for key in quantize._compiled)
    quantize.set_compile(False)
    want = quantization_sums(x, fmt, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(got[:4], want[:4])  # counts: exact
    assert torch.allclose(got[4:], want[4:], rtol=1e-12)  # float64 sums in another order
