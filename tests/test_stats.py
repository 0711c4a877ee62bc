"""mxprobe.stats against hand computations."""

import math

import pytest
import torch

from mxprobe import mx_format
from mxprobe.quantize import block_scale_exponent, quantize_mx
from mxprobe.stats import (
    compare_gradients,
    floor_overflow_fraction,
    gradient_comparison,
    gradient_sums,
    quantization_stats,
    quantization_sums,
    relative_bias,
    relative_error,
    saturation_count,
    saturation_fraction,
    sqnr_db,
    underflow_fraction,
)
from tests.helpers_numerics import adversarial


def _block(*head: float, size: int = 32, fill: float = 1.0) -> torch.Tensor:
    x = torch.full((size,), fill)
    x[: len(head)] = torch.tensor(head)
    return x


def test_saturation_by_hand():
    # amax 1.9: floor scale 2^(0-8); e4m3 max_norm 448 = 1.75 * 2^8, so |x| > 1.75 clips.
    x = _block(1.9, -1.8, 1.75, 1.7)
    assert saturation_fraction(x, "e4m3").item() == 2 / 32
    q = quantize_mx(x, "e4m3")
    assert q[:3].tolist() == [1.75, -1.75, 1.75]
    # e5m2: max_norm 57344 = 1.75 * 2^15, same mantissa limit.
    assert saturation_fraction(x, "e5m2").item() == 2 / 32
    # rceil picks a scale with amax <= max_norm: nothing clips.
    assert saturation_fraction(x, "e4m3", scale_mode="rceil").item() == 0.0


def test_saturation_matches_quantizer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * torch.rand(64, 96, generator=g).pow(-2)
    q = quantize_mx(x, "e4m3", axis=0)
    blocks = x.t().reshape(-1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    limit = 448.0 * torch.exp2(block_scale_exponent(amax, mx_format("e4m3"), "floor").float())
    flagged = blocks.abs() > limit
    qb = q.t().reshape(-1, 32)
    assert torch.equal(qb.abs()[flagged], limit.expand_as(qb)[flagged])
    assert (qb.abs() <= limit).all()
    assert saturation_fraction(x, "e4m3", axis=0).item() == flagged.sum().item() / x.numel()


def test_floor_overflow_by_hand():
    x = torch.cat([_block(1.9), _block(1.5), _block(-3.6), torch.zeros(32)])
    # Mantissas of the block maxima: 1.9, 1.5, 1.8 (3.6 = 1.8 * 2), none (zero block).
    assert floor_overflow_fraction(x, "e4m3").item() == 2 / 4
    # int8: max 127/64 = 1.984375, emax 0; fp4 e2m1: 6 = 1.5 * 2^2.
    assert floor_overflow_fraction(x, "int8").item() == 0.0
    assert floor_overflow_fraction(x, "e2m1").item() == 2 / 4
    # Subnormal fp32 maxima are read exactly: 1.9 * 2^-130.
    tiny = _block(1.875 * 2.0**-130, fill=0.0)
    assert floor_overflow_fraction(tiny, "e4m3").item() == 1.0
    # A tail block is zero-padded: 40 elements make two blocks.
    assert floor_overflow_fraction(torch.full((40,), 1.9), "e4m3").item() == 1.0


def test_underflow_by_hand():
    # Scale 2^-8 from amax 1; 2^-20 / 2^-8 = 2^-12 is below e4m3's smallest subnormal 2^-9.
    x = _block(1.0, 2.0**-20, 2.0**-16, fill=0.0)
    q = quantize_mx(x, "e4m3")
    assert q[1].item() == 0.0 and q[2].item() == 2.0**-16
    assert underflow_fraction(x, q).item() == 1 / 3  # zeros of x do not count


def test_sqnr_and_relative_errors_by_hand():
    x = torch.tensor([2.0, -4.0])
    q = torch.tensor([1.5, -4.5])
    assert sqnr_db(x, q).item() == pytest.approx(10 * math.log10(20 / 0.5))
    assert sqnr_db(x, x).item() == math.inf
    assert relative_bias(x, q).item() == pytest.approx((-0.25 + 0.125) / 2)
    assert relative_error(x, q).item() == pytest.approx(math.sqrt(0.5 / 20))
    zeros = torch.zeros(3)
    assert relative_error(zeros, zeros).item() == 0.0
    assert relative_bias(zeros, zeros).item() == 0.0


def test_quantization_sums_add_up():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 64, generator=g) * 10
    x[0, :5] = 1e-9
    whole = quantization_sums(x, "e4m3")
    halves = quantization_sums(x[:4], "e4m3") + quantization_sums(x[4:], "e4m3")
    assert torch.allclose(whole, halves, rtol=1e-12)
    stats = quantization_stats(whole)
    q = quantize_mx(x, "e4m3")
    assert stats["saturation"].item() == saturation_fraction(x, "e4m3").item()
    assert stats["underflow"].item() == underflow_fraction(x, q).item()
    assert stats["sqnr_db"].item() == pytest.approx(sqnr_db(x, q).item(), rel=1e-6)


def unfused_quantization_sums(x, fmt, **kw):
    """quantization_sums spelled out from quantize_mx and saturation_count (the reference)."""
    q = quantize_mx(x, fmt, **kw).float()
    sat_kw = {k: v for k, v in kw.items() if k in ("block_size", "axis", "scale_mode")}
    x = x.float()
    nonzero = x != 0
    return torch.stack(
        [
            torch.tensor(float(x.numel()), dtype=torch.float64),
            saturation_count(x, fmt, **sat_kw).double(),
            nonzero.sum().double(),
            ((q == 0) & nonzero).sum().double(),
            x.square().sum(dtype=torch.float64),
            (x - q).square().sum(dtype=torch.float64),
        ]
    )


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e3m2", "e2m1", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantization_sums_equal_the_unfused_formula_on_adversarial_inputs(fmt, dtype):
    g = torch.Generator().manual_seed(6)
    wide = torch.randn(40, 70, generator=g) * torch.logspace(-30, 30, 70)  # tail blocks padded
    wide[3, 7], wide[5, 1] = float("nan"), -float("inf")
    for x in (adversarial(fmt).to(dtype), wide.to(dtype)):
        for scale_mode, rounding, axis, block_size in [
            ("floor", "even", -1, 32),
            ("rceil", "nearest", 0, 32),
            ("even", "floor", -1, 16),
            ("floor", "stochastic", 0, 8),
        ]:
            kw = {"block_size": block_size, "axis": axis, "scale_mode": scale_mode}
            kw["rounding"] = rounding
            got = quantization_sums(x, fmt, generator=torch.Generator().manual_seed(1), **kw)
            want = unfused_quantization_sums(
                x, fmt, generator=torch.Generator().manual_seed(1), **kw
            )
            assert torch.equal(got[:4], want[:4]), (scale_mode, rounding, axis)
            assert torch.allclose(got[4:], want[4:], rtol=1e-12, equal_nan=True)


def test_gradient_comparison_by_hand():
    stats = compare_gradients(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0]))
    assert stats["cosine"].item() == pytest.approx(2 / math.sqrt(5))
    assert stats["zeta"].item() == pytest.approx(2.0)
    assert stats["bias"].item() == pytest.approx(1.0)
    assert stats["mean_diff"].item() == pytest.approx(1.0)
    assert stats["norm_ratio"].item() == pytest.approx(math.sqrt(5))
    # A pure rescaling: cosine 1, bias = scale - 1, zeta = (scale - 1)^2.
    g = torch.randn(100, generator=torch.Generator().manual_seed(2))
    scaled = compare_gradients(0.5 * g, g)
    assert scaled["bias"].item() == pytest.approx(-0.5)
    assert scaled["zeta"].item() == pytest.approx(0.25)
    assert scaled["cosine"].item() == pytest.approx(1.0)


def test_identical_gradients_are_exact():
    g = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    stats = compare_gradients(g, g.clone())
    assert stats["zeta"].item() == 0.0
    assert stats["bias"].item() == 0.0
    assert stats["mean_diff"].item() == 0.0
    assert stats["norm_ratio"].item() == 1.0
    assert stats["cosine"].item() == pytest.approx(1.0, abs=1e-15)


def test_gradient_sums_combine_over_parts():
    gen = torch.Generator().manual_seed(4)
    q, f = torch.randn(2, 50, generator=gen)
    parts = gradient_sums(q[:20], f[:20]) + gradient_sums(q[20:], f[20:])
    whole = compare_gradients(q, f)
    for name, value in gradient_comparison(parts).items():
        assert value.item() == pytest.approx(whole[name].item(), rel=1e-12, abs=1e-15)


def test_quantization_sums_square_in_float64_at_the_fp32_range_edges():
    """An fp32 square overflows above ~1.8e19 and underflows below ~1e-23: the energies (and
    the SQNR the activation monitor reports) must not."""
    from mxprobe.stats import quantization_stats, sqnr_db

    for scale in (1e20, 1e-24):
        x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)) * scale
        got = quantization_stats(quantization_sums(x, "e4m3"))["sqnr_db"].item()
        want = sqnr_db(x, quantize_mx(x, "e4m3")).item()
        assert math.isfinite(got) and abs(got - want) < 1e-6, (scale, got, want)


def test_block_max_exponents_and_binade_shares_follow_frexp():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(32, generator=g) * scale for scale in (0.3, 0.9, 1.0, 1.9, 7.0)])
    x[40] = 1.0  # a block whose max is exactly a power of two
    want = [math.frexp(float(b.abs().max()))[1] - 1 for b in x.split(32)]
    from mxprobe.stats import binade_shares, block_max_exponents

    exponents = block_max_exponents(x)
    assert exponents.tolist() == want
    shares = {k: v.item() for k, v in binade_shares(exponents).items()}
    counts = {
        "amax_lt_half": sum(e <= -2 for e in want),
        "amax_half_to_1": want.count(-1),
        "amax_1_to_2": want.count(0),
        "amax_ge_2": sum(e >= 1 for e in want),
    }
    assert shares == {k: c / len(want) for k, c in counts.items()}
    assert block_max_exponents(torch.zeros(64)).tolist() == [-127, -127]
