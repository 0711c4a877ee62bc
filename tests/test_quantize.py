"""The quantizer against the independent float64 reference, on adversarial and random inputs."""

import math

import pytest
import torch
from hypothesis import given, settings

from mxprobe.formats import MX_FORMAT_NAMES, mx_format
from mxprobe.quantize import ROUNDINGS, SCALE_MODES, mx_decode, mx_encode, quantize_mx, round_to
from tests.helpers_numerics import DETERMINISTIC, DTYPES, REFERENCE_CASES, adversarial, bits_equal
from tests.mx_reference import reference_format, reference_quantize


def q(x, fmt, **kw):
    return quantize_mx(x, fmt, backend="torch", **kw)


def test_bits_equal_counts_the_sign_of_zero_and_matches_nans():
    nan = float("nan")
    assert bits_equal(torch.tensor([nan, -0.0, 1.0]), torch.tensor([-nan, -0.0, 1.0]))
    assert not bits_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not bits_equal(torch.tensor([nan]), torch.tensor([1.0]))
    assert not bits_equal(torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.bfloat16))
    assert not bits_equal(torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 2.0]]))


@pytest.mark.parametrize("fmt", MX_FORMAT_NAMES)
@pytest.mark.parametrize("scale_mode", SCALE_MODES)
@pytest.mark.parametrize("rounding", DETERMINISTIC)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adversarial_matches_reference(fmt, scale_mode, rounding, dtype):
    x = adversarial(fmt).to(dtype)
    got = q(x, fmt, scale_mode=scale_mode, rounding=rounding)
    want = reference_quantize(x, fmt, 32, -1, scale_mode, rounding)
    assert bits_equal(got, want)


@pytest.mark.parametrize("fmt", MX_FORMAT_NAMES)
@pytest.mark.parametrize("scale_mode", SCALE_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_heavy_tailed_axes_and_tails(fmt, scale_mode, dtype):
    g = torch.Generator().manual_seed(hash((fmt, scale_mode)) % 2**31)
    x = torch.randn(3, 37, 45, generator=g) * torch.exp(3 * torch.randn(3, 37, 45, generator=g))
    x = x.to(dtype)
    for axis in (0, 1, 2, -1):
        for bs in (32, 7):
            for rounding in DETERMINISTIC:
                got = q(x, fmt, block_size=bs, axis=axis, scale_mode=scale_mode, rounding=rounding)
                want = reference_quantize(x, fmt, bs, axis, scale_mode, rounding)
                assert bits_equal(got, want), (axis, bs, rounding)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(**REFERENCE_CASES)
def test_property_matches_reference(values, fmt, scale_mode, rounding, block_size, dtype):
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    got = q(x, fmt, block_size=block_size, scale_mode=scale_mode, rounding=rounding)
    want = reference_quantize(x, fmt, block_size, -1, scale_mode, rounding)
    assert bits_equal(got, want)


def test_hand_derived_vectors():
    x = torch.tensor([509.44] + [1.0] * 31)
    assert q(x, "e4m3")[0].item() == 448.0  # floor scale saturates the block max
    assert q(x, "e4m3", scale_mode="rceil")[0].item() == 512.0
    # ties: 1 + 1/16 lies halfway between e4m3 codes 1.0 and 1.125 (scale 2^0 with amax 256)
    t = torch.tensor([256.0, 1.0625, 1.1875, -1.0625] + [0.0] * 28)
    assert q(t, "e4m3")[1:4].tolist() == [1.0, 1.25, -1.0]
    assert q(t, "e4m3", rounding="nearest")[1:4].tolist() == [1.125, 1.25, -1.125]
    assert q(t, "e4m3", rounding="floor")[1:4].tolist() == [1.0, 1.125, -1.0]
    # int8: step 2^-6 after scaling; 1.5/64 ties to 2/64 under even, 0.5/64 to 0
    i = torch.tensor([1.0, 1.5 / 64, 0.5 / 64, 2.5 / 64])
    assert (q(i, "int8") * 64).tolist() == [64.0, 2.0, 0.0, 2.0]
    assert (q(i, "int8", rounding="nearest") * 64).tolist() == [64.0, 2.0, 1.0, 3.0]
    # bf16 input with amax 1020: floor scale 2^1, 510 saturates to 448 -> 896
    b = torch.tensor([1020.0, 1.0], dtype=torch.bfloat16)
    assert q(b, "e4m3")[0].item() == 896.0


def test_nan_and_inf_poison_only_their_block():
    x = torch.ones(4, 64)
    x[0, 3] = float("nan")
    x[1, 40] = float("inf")
    x[2, 0] = -float("inf")
    y = q(x, "e4m3")
    assert torch.isnan(y[0, :32]).all() and not torch.isnan(y[0, 32:]).any()
    assert torch.isnan(y[1, 32:]).all() and not torch.isnan(y[1, :32]).any()
    assert torch.isnan(y[2, :32]).all()
    assert torch.equal(y[3], x[3])


def test_negative_zero_survives():
    y = q(torch.tensor([-0.0, 1.0, -1e-30]), "e4m3")
    assert torch.signbit(y).tolist() == [True, False, True]
    assert y[2].item() == 0.0


def test_idempotent_and_never_inf():
    x = torch.randn(64, 96) * 1e3
    for fmt in MX_FORMAT_NAMES:
        once = q(x, fmt)
        assert bits_equal(q(once, fmt), once)
    big = torch.tensor([65504.0, 1.0], dtype=torch.float16)
    for fmt in MX_FORMAT_NAMES:
        for mode in SCALE_MODES:
            assert torch.isfinite(q(big, fmt, scale_mode=mode)).all()


def test_non_contiguous_and_empty():
    x = torch.randn(40, 70)
    assert bits_equal(q(x.t(), "e5m2"), q(x.t().contiguous(), "e5m2"))
    assert bits_equal(q(x[:, ::3], "e2m1", axis=0), q(x[:, ::3].contiguous(), "e2m1", axis=0))
    e = torch.empty(0, 5)
    assert q(e, "e4m3").shape == (0, 5)


@pytest.mark.parametrize("fmt", MX_FORMAT_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_decode_round_trip(fmt, dtype):
    x = torch.cat([adversarial(fmt), torch.randn(8, 32) * 50]).to(dtype)
    for axis, mode in ((-1, "floor"), (0, "rceil")):
        codes, scales = mx_encode(x, fmt, axis=axis, scale_mode=mode)
        assert codes.dtype == scales.dtype == torch.uint8
        assert scales.shape[axis] == -(-x.shape[axis] // 32)
        back = mx_decode(codes, scales, fmt, axis=axis, dtype=dtype)
        want = q(x, fmt, axis=axis, scale_mode=mode)
        if mx_format(fmt).is_int:  # int8 codes have no -0
            assert torch.equal(back.nan_to_num(7.0), want.nan_to_num(7.0))
        else:
            assert bits_equal(back, want)


def test_encode_codes_are_ocp_bit_patterns():
    x = torch.tensor([448.0, -448.0, 2.0**-9, 1.0, -0.0] + [0.0] * 27)
    codes, scales = mx_encode(x, "e4m3")
    assert scales.tolist() == [127]
    assert codes[:5].tolist() == [0x7E, 0xFE, 0x01, 0x38, 0x80]
    codes, _ = mx_encode(torch.tensor([6.0, -0.5, 1.5]), "e2m1")
    assert codes.tolist() == [0x7, 0x9, 0x3]
    codes, scales = mx_encode(torch.tensor([float("nan"), 1.0]), "e5m2")
    assert scales.tolist() == [255]
    tiny = torch.tensor([1e-45])  # amax subnormal: scale byte 0 is 2^-127
    codes, scales = mx_encode(tiny, "e4m3")
    assert scales.tolist() == [0]
    assert mx_decode(codes, scales, "e4m3").item() == q(tiny, "e4m3").item()


def test_stochastic_is_reproducible_and_unbiased():
    x = torch.full((200_000,), 1.0 + 1 / 32)  # a quarter of the way from 1.0 to 1.125
    x[0] = 2.0
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = q(x, "e4m3", rounding="stochastic", generator=g1)
    b = q(x, "e4m3", rounding="stochastic", generator=g2)
    assert torch.equal(a, b)
    vals = a[1:].double()
    assert set(vals.unique().tolist()) == {1.0, 1.125}
    se = 0.125 * math.sqrt(0.25 * 0.75 / vals.numel())
    assert abs(vals.mean().item() - (1 + 1 / 32)) < 5 * se


def test_straight_through_gradient():
    x = torch.randn(4, 32, requires_grad=True)
    y = quantize_mx(x, "e4m3")
    (y * torch.arange(32.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(32.0).expand(4, 32))


def test_round_to():
    x = torch.tensor([1.0 + 2**-9, 1.0 + 3 * 2**-9, 70000.0])
    assert round_to(x, "bf16").tolist() == [1.0, 1.0 + 2**-7, 70144.0]
    assert round_to(x, "fp16")[0].item() == 1.0 + 2**-9
    assert round_to(x, "fp32") is x
    with pytest.raises(ValueError, match="fp8"):
        round_to(x, "fp8")


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"fmt": "e4m4"}, ValueError, ["e4m4", "fp8_e4m3"]),
        ({"scale_mode": "up"}, ValueError, ["'up'", "rceil"]),
        ({"rounding": "odd"}, ValueError, ["'odd'", "stochastic"]),
        ({"backend": "cuda"}, ValueError, ["'cuda'", "triton"]),
        ({"block_size": 0}, ValueError, ["block_size", "0"]),
        ({"axis": 2}, IndexError, ["axis 2"]),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, exc, words):
    args = {"fmt": "e4m3", **kwargs}
    fmt = args.pop("fmt")
    with pytest.raises(exc) as info:
        quantize_mx(torch.ones(2, 3), fmt, **args)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64, torch.float64])
def test_bad_dtypes_are_type_errors(dtype):
    with pytest.raises(TypeError, match="dtype"):
        quantize_mx(torch.ones(4, dtype=dtype), "e4m3")


@pytest.mark.parametrize("fmt", MX_FORMAT_NAMES)
def test_grid_values_are_fixed_points_and_midpoints_move(fmt):
    # The grid is the reference's own (decoded from the spec's bit layout), so this checks the
    # quantizer's element set against the spec: every listed value is kept, and the midpoint of
    # two neighbours is not (no value is missing between them either).
    f = reference_format(fmt)
    grid = torch.tensor(f.magnitudes(), dtype=torch.float64)
    mids = (grid[1:] + grid[:-1]) / 2
    for values, on_grid in ((torch.cat([grid, -grid]), True), (torch.cat([mids, -mids]), False)):
        x = torch.stack([values, torch.full_like(values, f.max_norm)], dim=1).float()
        # Each block of 2 has amax = max_norm: the floor scale is 2^0 for every block.
        ref = reference_quantize(x, fmt, 2, -1, "floor", "even")
        got = q(x, fmt, block_size=2)
        assert bits_equal(got, ref)
        moved = got[:, 0] != x[:, 0]
        assert (not moved.any()) if on_grid else moved.all()
        assert bits_equal(got[:, 1], x[:, 1])
    assert len(grid) == mx_format(fmt).num_magnitudes


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_bf16_and_fp16_compute_in_fp32(rounding):
    x = torch.randn(16, 64)
    for dtype in (torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        a = q(xd, "e4m3", rounding=rounding, generator=g1)
        b = q(xd.float(), "e4m3", rounding=rounding, generator=g2).to(dtype)
        assert a.dtype == dtype and bits_equal(a, b)
