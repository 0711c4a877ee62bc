"""mx_gemm and the exactness predicates, proven on CPU.

The predicates are checked against two independent facts: torch's own fp32 -> bf16 round trip,
and a float64 count of significant bits and of the lowest representable bit. The per-format
edges below are the ones the ``mxprobe.kernels.gemm`` docstring derives.
"""

import pytest
import torch
import torch.nn.functional as F

from mxprobe.formats import MX_FORMAT_NAMES
from mxprobe.kernels import bf16_exact, mx_gemm, tensor_core_exact, tf32_exact
from mxprobe.quantize import quantize_mx
from tests.helpers_numerics import bits_equal, heavy_tailed
from tests.mx_reference import reference_format

# The smallest scale exponent S at which every value of a block is exact.
BF16_SMALLEST_EXACT_SCALE = {"fp8_e4m3": -124, "fp8_e5m2": -117}
TF32_SMALLEST_EXACT_SCALE = {"fp8_e5m2": -120}
SCALES = range(-127, 128)


def representable(v: torch.Tensor, mantissa_bits: int, smallest_bit: int) -> torch.Tensor:
    """Elementwise, in float64: ``v`` has at most ``mantissa_bits + 1`` significant bits and no
    bit below 2^smallest_bit (fp32's exponent range otherwise)."""
    v = v.double()
    _, e = torch.frexp(v)  # |v| in [2^(e-1), 2^e)
    lowest = torch.clamp(e - 1 - mantissa_bits, min=smallest_bit)
    scaled = torch.ldexp(v, -lowest)
    return (scaled == scaled.round()) & (v.abs() < 2.0**128)


def every_block_value(fmt: str, scale: int) -> torch.Tensor:
    """Every grid value of ``fmt`` (both signs) times 2^scale, as quantize_mx outputs it."""
    grid = torch.tensor(reference_format(fmt).magnitudes(), dtype=torch.float64)
    x = (torch.cat([grid, -grid]) * 2.0**scale).float()
    q = quantize_mx(x, fmt, block_size=x.numel())
    assert torch.equal(q, x), "the block's scale exponent is not `scale`"
    return q


@pytest.mark.parametrize("fmt", MX_FORMAT_NAMES)
def test_predicates_match_round_trips_over_the_whole_e8m0_range(fmt):
    emax = reference_format(fmt).emax
    for scale in SCALES:
        if scale > 127 - emax:  # max_norm * 2^scale would pass fp32's largest value
            break
        q = every_block_value(fmt, scale)
        assert torch.equal(
            bf16_exact(q), q.bfloat16().float().view(torch.int32) == q.view(torch.int32)
        )
        assert torch.equal(bf16_exact(q), representable(q, 7, -133))
        assert torch.equal(tf32_exact(q), representable(q, 10, -136))
        assert bool(bf16_exact(q).all()) == (scale >= BF16_SMALLEST_EXACT_SCALE.get(fmt, -127))
        assert bool(tf32_exact(q).all()) == (scale >= TF32_SMALLEST_EXACT_SCALE.get(fmt, -127))


@pytest.mark.parametrize("fmt", MX_FORMAT_NAMES)
def test_inexact_values_are_exactly_those_below_bf16_subnormals(fmt):
    q = every_block_value(fmt, -127)
    off_bf16_grid = (q.double() * 2.0**133).frac() != 0  # not a multiple of 2^-133
    tiny = (q.abs() < 2.0**-126) & off_bf16_grid
    assert torch.equal(~bf16_exact(q), tiny)
    assert bool(bf16_exact(q).all()) == (fmt not in BF16_SMALLEST_EXACT_SCALE)


def test_fp32_saturation_is_the_top_edge():
    # rceil: S = 120 and fp32max / 2^120 rounds up to 256, past 2^128: the output saturates at
    # fp32's largest value, 24 significant bits.
    x = torch.tensor([torch.finfo(torch.float32).max, 1.0])
    q = quantize_mx(x, "fp8_e4m3", scale_mode="rceil")
    assert q[0] == torch.finfo(torch.float32).max
    assert bf16_exact(q).tolist() == [False, True]
    assert tf32_exact(q).tolist() == [False, True]
    assert torch.isinf(q.bfloat16()[0])


def test_nan_blocks_count_as_exact():
    q = quantize_mx(torch.tensor([1.0, float("nan"), 3.0]), "fp8_e4m3", block_size=1)
    assert bf16_exact(q).all()


def test_predicates_want_fp32():
    with pytest.raises(TypeError, match="got dtype torch.bfloat16"):
        bf16_exact(torch.ones(2, dtype=torch.bfloat16))


def quantized_operands(fmt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (24, 64) and B (64, 40), blocked along the contraction axis, as the modules do."""
    a = quantize_mx(heavy_tailed(24, 64, seed=seed), fmt, axis=-1)
    b = quantize_mx(heavy_tailed(64, 40, seed=seed + 1), fmt, axis=0)
    return a, b


@pytest.mark.parametrize("fmt", MX_FORMAT_NAMES)
def test_bf16_operands_give_the_fp32_products(fmt):
    a, b = quantized_operands(fmt, seed=20)
    assert bf16_exact(a).all() and bf16_exact(b).all()
    products = a.double()[:, :, None] * b.double()[None, :, :]
    from_bf16 = a.bfloat16().double()[:, :, None] * b.bfloat16().double()[None, :, :]
    assert torch.equal(from_bf16, products)  # every product from bf16 operands: the same value
    fp32_products = a[:, :, None] * b[None, :, :]
    assert torch.equal(fp32_products.double(), products)  # and exact in fp32: nothing rounded
    assert bits_equal(a.bfloat16().float() @ b.bfloat16().float(), a @ b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mx_gemm_on_cpu_is_the_plain_product(dtype):
    a, b = (t.to(dtype) for t in quantized_operands("fp8_e4m3", seed=30))
    bias = heavy_tailed(40, seed=32).to(dtype)
    assert bits_equal(mx_gemm(a, b), a @ b)
    assert bits_equal(mx_gemm(a, b, bias), F.linear(a, b.t(), bias))
    batched_a = a.reshape(2, 3, 4, 64)
    batched_b = quantize_mx(heavy_tailed(3, 64, 5, seed=33), "fp8_e4m3", axis=-2).to(dtype)
    assert bits_equal(mx_gemm(batched_a, batched_b), batched_a @ batched_b)


@pytest.mark.parametrize("fmt", MX_FORMAT_NAMES)
def test_the_static_tensor_core_table_is_exact_over_every_scale(fmt):
    # The choice mx_gemm gets is made from formats alone (no host sync): where it says TF32 is
    # exact, every value of every block at every E8M0 scale must be; where it says not, some
    # scale must break it (else the table gives speed away).
    top = 127 - reference_format(fmt).emax  # the largest scale a finite floor block gets
    exact_everywhere = all(
        bool(tf32_exact(every_block_value(fmt, s)).all()) for s in range(-127, top + 1)
    )
    assert tensor_core_exact(fmt, "floor") == exact_everywhere
    for scale_mode in ("ceil", "even", "rceil"):  # these can saturate at fp32's largest value
        assert not tensor_core_exact(fmt, scale_mode)


def test_rounded_and_plain_roles_in_the_table():
    assert tensor_core_exact("bf16", "rceil") and tensor_core_exact("fp16", "floor")
    assert not tensor_core_exact("fp32", "floor")
    g = torch.Generator().manual_seed(0)
    fp16_values = (torch.randn(10_000, generator=g) * 1e3).half().float()
    assert tf32_exact(fp16_values).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensor_cores_keep_the_products_of_extreme_mx_values():
    # One-term products (K = 1) leave no accumulation order: TF32 tensor cores must give the
    # fp32 product bit for bit, fp32-subnormal MX values (e4m3 at 2^-136) included.
    for fmt in sorted(f for f in MX_FORMAT_NAMES if tensor_core_exact(f, "floor")):
        for s in (-127, -120, 0, 120):
            a = every_block_value(fmt, s).cuda()[:, None]
            b = every_block_value(fmt, -s // 2).cuda()[None, :]
            want = (a.double() * b.double()).float()
            assert bits_equal(mx_gemm(a, b, exact_tf32=True).cpu(), want.cpu()), (fmt, s)
