"""NVFP4 fake quantization: bit-exact with torchao's nvfp4_quantize (codes and scales) on random
and adversarial blocks, 16 x 16 tiles and Transformer Engine's variant against references written
here from the formulas, NaN/Inf blocks, stochastic rounding, and the packed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mxprobe
from mxprobe.nvfp4 import nvfp4_decode, nvfp4_encode, quantize_nvfp4

nvfp4_tensor = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")

GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[t.dtype])


def torchao_values(x: torch.Tensor, tensor_scale) -> torch.Tensor:
    """torchao's quantization of 2-D ``x`` (blocks along the last axis) read back as q·s·pts,
    computed here in the order mxprobe documents: (q·s)·pts."""
    pts = None
    if isinstance(tensor_scale, str):
        pts = nvfp4_tensor.per_tensor_amax_to_scale(x.float().abs().amax())
    elif tensor_scale is not None:
        pts = torch.tensor(tensor_scale, dtype=torch.float32)
    scales, data = nvfp4_tensor.nvfp4_quantize(x.contiguous(), 16, pts)
    q = kernels.f4_unpacked_to_f32(kernels.unpack_uint4(data)).reshape(x.shape[0], -1, 16)
    out = q * scales.float().unsqueeze(-1)
    if pts is not None:
        out = out * pts
    return out.reshape(x.shape).to(x.dtype)


def adversarial() -> torch.Tensor:
    """One 16-element block per row: E2M1 ties after scaling, E4M3 ties of the block scale,
    scale underflow, all-zero and -0 blocks, saturation, tiny and huge values."""
    ties = [
        6.0,
        0.25,
        0.75,
        1.25,
        1.75,
        2.5,
        3.5,
        5.0,
        -0.25,
        -0.75,
        -1.25,
        -1.75,
        -2.5,
        -3.5,
        -5.0,
        0.0,
    ]
    rows = [
        ties,  # amax 6: scale exactly 1, every element a tie of the E2M1 grid
        [v * 2.0**-3 for v in ties],  # the same ties at scale 2^-3
        [6.375] + [1.0] * 15,  # amax / 6 = 1.0625: halfway between E4M3 1.0 and 1.125
        [7.125] + [-3.0] * 15,  # amax / 6 = 1.1875: halfway between 1.125 and 1.25
        [2.0**-8] * 16,  # scale underflows to 2^-6: every element a 0.25 tie, to 0
        [2.0**-9, -(2.0**-8)] * 8,
        [0.0] * 16,
        [-0.0] * 16,
        [3000.0, -2700.0, 2688.0, 1.0] * 4,  # past 6 · 448: saturates
        [1e-30, -1e-35, 1e-38, 3e-39] * 4,  # fp32 subnormals
        [3.0e38, -1.0] * 8,
        [float(np.nextafter(np.float32(6.0), np.float32(0)))] * 16,
        # amax / 6 and amax · fp32(1/6) fall on either side of an E4M3 tie: the division must
        # be a true fp32 division, as torchao's is.
        [0.1113281175494194, 0.05] * 8,
        [1.7812498807907104, -1.0] * 8,
    ]
    return torch.tensor(rows, dtype=torch.float32)


def random_rows(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 96, generator=g) * torch.logspace(-10, 6, 96)


CASES = [None, "amax", 0.0123]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tensor_scale", CASES)
@pytest.mark.parametrize("data", ["random", "adversarial"])
def test_bit_exact_with_torchao(data, tensor_scale, dtype):
    x = (random_rows(0) if data == "random" else adversarial()).to(dtype)
    if data == "adversarial" and tensor_scale == "amax":
        x = x[(x.abs() < 1e30).all(1)]  # torchao's two-level path at amax 3e38 overflows
    mine = quantize_nvfp4(x, tensor_scale=tensor_scale)
    assert torch.equal(bits(mine), bits(torchao_values(x, tensor_scale)))


@pytest.mark.parametrize("axis", [0, 1])
def test_other_axes_are_the_blocks_of_the_moved_tensor(axis):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 32, 16, generator=g)
    mine = quantize_nvfp4(x, axis=axis)
    moved = x.movedim(axis, -1)
    want = torchao_values(moved.reshape(-1, moved.shape[-1]), None).reshape(moved.shape)
    assert torch.equal(bits(mine), bits(want.movedim(-1, axis)))


def _e2m1_reference(y: np.ndarray) -> np.ndarray:
    """Nearest E2M1 value by searching the grid; ties to the even code (0, 1, 2, 3 | 4, 6)."""
    mag = np.minimum(np.abs(y), 6.0)
    d = np.abs(mag[..., None] - GRID)
    best = d.min(-1, keepdims=True)
    candidates = np.where(d == best, np.arange(8), 99)
    lo = candidates.min(-1)
    hi = np.where(candidates == 99, -1, candidates).max(-1)
    code = np.where(lo % 2 == 0, lo, hi)
    return np.copysign(GRID[code], y)


def _e4m3(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32).to(torch.float8_e4m3fn).float())


def test_16x16_tiles_against_the_formulas():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 50, generator=g) * 3
    mine = quantize_nvfp4(x, tile=(16, 16))
    want = np.zeros((40, 50), dtype=np.float32)
    xs = x.numpy()
    for r in range(0, 40, 16):
        for c in range(0, 50, 16):
            tile = xs[r : r + 16, c : c + 16]
            amax = np.float32(np.abs(tile).max())
            s = np.float32(_e4m3(float(np.clip(amax / np.float32(6), 2.0**-6, 448))))
            q = _e2m1_reference((tile * (np.float32(1) / s)).astype(np.float32))
            want[r : r + 16, c : c + 16] = (q * s).astype(np.float32)
    assert np.array_equal(mine.numpy(), want)
    # A tile's quantized values are the same read row-wise or column-wise (forward = backward).
    assert torch.equal(quantize_nvfp4(x.t().contiguous(), tile=(16, 16)), mine.t())


def test_transformer_engine_variant_against_its_formulas():
    x = random_rows(3)[:, :64]
    mine = quantize_nvfp4(x, tensor_scale="amax", variant="te")
    xs = x.numpy()
    s_enc = np.float32(2688) / np.float32(np.abs(xs).max())
    want = np.zeros_like(xs)
    for r in range(xs.shape[0]):
        for c in range(0, xs.shape[1], 16):
            block = xs[r, c : c + 16]
            amax = np.float32(np.abs(block).max())
            s = np.float32(_e4m3(float(min(amax * (s_enc * np.float32(1 / 6)), 448))))
            factor = np.float32(0) if s == 0 else np.float32(1) / (s * (np.float32(1) / s_enc))
            q = _e2m1_reference((block * factor).astype(np.float32))
            want[r, c : c + 16] = ((q * s).astype(np.float32) * (np.float32(1) / s_enc)).astype(
                np.float32
            )
    assert np.array_equal(mine.numpy(), want)
    # Subnormal block scales are allowed there, unlike the torchao variant's 2^-6 floor.
    small = torch.tensor([[1000.0] + [0.0] * 15, [0.02] * 16])
    te = nvfp4_encode(small, tensor_scale="amax", variant="te").scales.float()
    ao = nvfp4_encode(small, tensor_scale="amax").scales.float()
    assert 0 < te[1, 0] < 2.0**-6 and ao[1, 0] == 2.0**-6


def test_a_block_with_nan_or_inf_is_nan_and_the_others_unchanged():
    x = random_rows(4)[:3, :32].clone()
    x[0, 3], x[2, 20] = float("nan"), float("inf")
    out = quantize_nvfp4(x)
    assert out[0, :16].isnan().all() and out[2, 16:].isnan().all()
    clean = [(0, slice(16, 32)), (1, slice(0, 32)), (2, slice(0, 16))]
    for r, cols in clean:
        assert torch.equal(out[r, cols], quantize_nvfp4(x[r : r + 1, cols])[0])
    assert quantize_nvfp4(x, tensor_scale="amax").isnan().all()
    zeros = torch.zeros(2, 32)
    assert torch.equal(quantize_nvfp4(zeros, tensor_scale="amax"), zeros)


def test_stochastic_rounding_is_unbiased_reproducible_and_lands_on_a_neighbour():
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(1, 16, generator=g) * 10 - 5).expand(20000, 16).contiguous()
    x[:, 0] = 6.0  # block max 6: scale 1, so the values are in E2M1 units
    draws = quantize_nvfp4(x, rounding="stochastic", generator=torch.Generator().manual_seed(7))
    again = quantize_nvfp4(x, rounding="stochastic", generator=torch.Generator().manual_seed(7))
    assert torch.equal(draws, again)
    grid = torch.tensor(GRID, dtype=torch.float32)
    v = x[0].abs()
    lower = grid[torch.searchsorted(grid, v, right=True) - 1]
    upper = grid[torch.clamp(torch.searchsorted(grid, v), max=7)]
    assert ((draws.abs() == lower) | (draws.abs() == upper)).all()
    step = (upper - lower).clamp_min(1e-9)
    # Mean of 20000 draws: within 5 standard errors of the value (step / 2 / sqrt(n) bounds it).
    assert ((draws.mean(0) - x[0]).abs() <= 5 * step / 2 / 20000**0.5 + 1e-6).all()


@pytest.mark.parametrize("kwargs", [{}, {"tensor_scale": "amax"}, {"axis": 0}, {"tile": (16, 16)}])
def test_encode_decode_round_trips_bit_for_bit(kwargs):
    x = torch.cat([random_rows(6)[:12, :48], adversarial()[:, :16].repeat(1, 3)])
    x[1, 5] = float("nan")
    packed = nvfp4_encode(x, **kwargs)
    assert packed.codes.dtype == torch.uint8 and packed.scales.dtype == torch.float8_e4m3fn
    decoded, direct = nvfp4_decode(packed), quantize_nvfp4(x, **kwargs)
    nan = direct.isnan()
    assert nan.any() and torch.equal(decoded.isnan(), nan)
    assert torch.equal(bits(decoded)[~nan], bits(direct)[~nan])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x: quantize_nvfp4(x.half()), TypeError, "float32 or bfloat16"),
        (lambda x: quantize_nvfp4(x, tile=(8, 8)), ValueError, "unknown tile"),
        (lambda x: quantize_nvfp4(x, variant="te"), ValueError, "tensor_scale='amax'"),
        (lambda x: quantize_nvfp4(x, tensor_scale=-1.0), ValueError, "finite number > 0"),
        (lambda x: quantize_nvfp4(x, rounding="floor"), ValueError, "unknown rounding"),
        (lambda x: quantize_nvfp4(x, axis=2), ValueError, "axis 2 is out of range"),
        (lambda x: quantize_nvfp4(x[0], tile=(16, 16)), ValueError, "at least 2 dimensions"),
        (lambda x: quantize_nvfp4("x"), TypeError, "torch.Tensor"),
    ],
)
def test_bad_arguments_are_one_line_errors_naming_the_value(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.ones(2, 16))


def test_exported_at_the_top_level():
    assert mxprobe.quantize_nvfp4 is quantize_nvfp4


def test_two_level_elements_scale_by_one_over_pts_then_over_s_as_torchao():
    """x · ((1/pts)/s) and x · (1/(pts·s)) differ by an ulp on these elements, each of which
    (1/pts)/s puts exactly on an E2M1 tie: only the first order matches torchao."""
    ties = [0.02812499925494194, 0.08437499403953552, 0.140625, 0.19687499105930328, 0.28125]
    ties += [0.39374998211860657, 0.5625]
    row = [0.675] + ties + [-t for t in ties] + [0.0]  # amax 0.675: s = 1.125 at pts 0.1
    x = torch.tensor([row], dtype=torch.float32)
    mine = quantize_nvfp4(x, tensor_scale=0.1)
    assert torch.equal(bits(mine), bits(torchao_values(x, 0.1)))
