"""The Triton kernel against the torch path: bit for bit, on adversarial and random inputs.

Without CUDA the kernel runs in Triton's interpreter, which must be switched on before
``triton.jit`` decorates the kernel, i.e. before ``mxprobe.kernels.triton_kernels`` is imported:
tests/conftest.py sets ``TRITON_INTERPRET=1`` before anything imports triton. The interpreter is
slow, so tensors here stay at a few thousand elements.
"""

from collections import Counter
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from mxprobe.formats import MX_FORMAT_NAMES  # noqa: E402
from mxprobe.kernels import triton_kernels  # noqa: E402
from mxprobe.quantize import SCALE_MODES, quantize_mx  # noqa: E402
from tests.helpers_numerics import (  # noqa: E402
    DETERMINISTIC,
    DTYPES,
    adversarial,
    bits_equal,
    heavy_tailed,
)
from tests.helpers_triton import run_outside_the_interpreter  # noqa: E402
from tests.mx_reference import reference_quantize  # noqa: E402

if not triton_kernels.MODES_AGREE:
    pytest.skip(
        "triton was imported (by an earlier test module) before TRITON_INTERPRET=1 was set; "
        "set it in the environment or in tests/conftest.py",
        allow_module_level=True,
    )

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def both(x: torch.Tensor, fmt: str, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_mx(x, fmt, backend="triton", **kw), quantize_mx(x, fmt, backend="torch", **kw)


def assert_same(x: torch.Tensor, fmt: str, **kw) -> None:
    got, want = both(x, fmt, **kw)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert bits_equal(got, want), f"{fmt} {kw} {x.dtype}: {(got != want).sum()} differ"


def adversarial_1d(fmt: str) -> torch.Tensor:
    """The adversarial blocks flattened, then a short tail (a partial last block)."""
    return torch.cat([adversarial(fmt).flatten(), heavy_tailed(13, seed=2)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rounding", DETERMINISTIC)
@pytest.mark.parametrize("scale_mode", SCALE_MODES)
@pytest.mark.parametrize("fmt", MX_FORMAT_NAMES)
def test_matches_torch_bit_for_bit(fmt, scale_mode, rounding, dtype):
    x = torch.cat([adversarial_1d(fmt), heavy_tailed(256, seed=3)]).to(dtype).to(DEVICE)
    assert_same(x, fmt, scale_mode=scale_mode, rounding=rounding)


@pytest.mark.parametrize("length", [1, 31, 33, 100])
@pytest.mark.parametrize("block_size", [1, 7, 32, 64])
def test_block_sizes_and_tails(block_size, length):
    x = heavy_tailed(3, length, seed=length).to(DEVICE)
    for fmt, dtype in (("fp8_e4m3", torch.bfloat16), ("int8", torch.float32)):
        assert_same(x.to(dtype), fmt, block_size=block_size, scale_mode="rceil")
        assert_same(x.to(dtype), "fp4_e2m1", block_size=block_size, rounding="nearest")


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_every_axis_of_a_3d_tensor(axis):
    x = heavy_tailed(6, 5, 9, seed=4).to(DEVICE)
    x[1, 2, 3] = float("nan")
    assert_same(x, "fp6_e3m2", block_size=4, axis=axis)
    assert_same(x.to(torch.float16), "fp8_e5m2", block_size=4, axis=axis, scale_mode="even")


def leading_axis_blocks(fmt: str) -> torch.Tensor:
    """The adversarial blocks laid along axis 0 of a contiguous tensor (one column each, fewer
    columns than a tile holds), then a 13-row tail: a partial last block in every column."""
    blocks = adversarial(fmt).t()
    return torch.cat([blocks, heavy_tailed(13, blocks.shape[1], seed=8)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rounding", DETERMINISTIC)
@pytest.mark.parametrize("scale_mode", SCALE_MODES)
@pytest.mark.parametrize("fmt", MX_FORMAT_NAMES)
def test_leading_axis_matches_torch_bit_for_bit(fmt, scale_mode, rounding, dtype):
    x = leading_axis_blocks(fmt).to(dtype).to(DEVICE)
    assert_same(x, fmt, axis=0, scale_mode=scale_mode, rounding=rounding)


@pytest.mark.parametrize(
    "shape, axis, block_size",
    [
        ((3, 45, 130), 1, 32),  # inner 130: a full 128-column tile and a 2-column one
        ((5, 33, 260), 1, 16),  # 256-column tiles
        ((37, 2, 3), 0, 8),  # inner 6 in a tile of 8
        ((2, 70, 5, 3), 1, 32),
        ((9, 4, 7), 1, 1),
        ((300, 3), 0, 100),  # block padded to 128 lanes, tail of 0
        ((2, 200, 3), 1, 64),
    ],
)
def test_leading_and_middle_axes_with_tails(shape, axis, block_size):
    x = heavy_tailed(*shape, seed=len(shape) + block_size).to(DEVICE)
    x.view(-1)[7] = float("nan")
    for fmt, dtype, kw in (
        ("fp8_e4m3", torch.bfloat16, {"scale_mode": "rceil"}),
        ("int8", torch.float32, {"rounding": "nearest"}),
        ("fp4_e2m1", torch.float16, {"scale_mode": "even", "rounding": "floor"}),
        ("fp6_e3m2", torch.float32, {"scale_mode": "ceil"}),
    ):
        assert_same(x.to(dtype), fmt, block_size=block_size, axis=axis, **kw)


class _OpCount(TorchDispatchMode):
    """Counts the aten ops run inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))


def _ops_of(x: torch.Tensor, axis: int) -> tuple[Counter, torch.Tensor]:
    with _OpCount() as count:
        out = quantize_mx(x, "fp8_e4m3", block_size=16, axis=axis, backend="triton")
    return count.ops, out


@pytest.mark.parametrize("axis", [0, 1])
def test_any_block_axis_makes_no_copy(axis):
    """A leading- or middle-axis call runs exactly the aten ops of a last-axis call, which is in
    place by construction: no clone, no transposing copy (the interpreter's own copies to and
    from the "device" appear in both). The output keeps x's strides."""
    x = heavy_tailed(40, 3, 24, seed=9).to(DEVICE)
    last_axis_ops, _ = _ops_of(x, -1)
    ops, out = _ops_of(x, axis)
    assert ops == last_axis_ops
    assert out.stride() == x.stride()
    weight_t = heavy_tailed(24, 40, seed=10).to(DEVICE).t()  # a transposed weight: dense
    ops, out = _ops_of(weight_t, axis=0)
    assert ops == _ops_of(weight_t.contiguous(), -1)[0]
    assert out.stride() == weight_t.stride()


def test_non_contiguous_input():
    base = heavy_tailed(40, 70, seed=5).to(DEVICE)
    for x in (base.t(), base[::3, 1::2], base.to(torch.bfloat16).t()[5:, :]):
        assert not x.is_contiguous()
        assert_same(x, "fp8_e4m3", block_size=32)
        assert_same(x, "fp6_e2m3", block_size=7, axis=0, scale_mode="ceil")


@settings(max_examples=30, derandomize=True, deadline=None)
@given(
    bits=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=300),
    fmt=st.sampled_from(MX_FORMAT_NAMES),
    scale_mode=st.sampled_from(SCALE_MODES),
    rounding=st.sampled_from(DETERMINISTIC),
    block_size=st.sampled_from([1, 5, 32]),
    dtype=st.sampled_from(DTYPES),
)
def test_random_bit_patterns(bits, fmt, scale_mode, rounding, block_size, dtype):
    x = torch.tensor(bits, dtype=torch.int32).view(torch.float32).to(dtype).to(DEVICE)
    assert_same(x, fmt, block_size=block_size, scale_mode=scale_mode, rounding=rounding)


def _stochastic(x, fmt="fp8_e4m3", seed=None, **kw):
    if seed is not None:
        kw["generator"] = torch.Generator(device=x.device).manual_seed(seed)
    return quantize_mx(x, fmt, rounding="stochastic", backend="triton", **kw)


@pytest.mark.parametrize("axis", [-1, 0])
def test_stochastic_is_reproducible_per_seed(axis):
    x = heavy_tailed(8, 64, seed=6).to(DEVICE)
    assert bits_equal(_stochastic(x, seed=1, axis=axis), _stochastic(x, seed=1, axis=axis))
    assert not bits_equal(_stochastic(x, seed=1, axis=axis), _stochastic(x, seed=2, axis=axis))
    torch.manual_seed(3)
    first = _stochastic(x)
    torch.manual_seed(3)
    assert bits_equal(first, _stochastic(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stochastic_keeps_grid_values_and_poisoned_blocks(dtype):
    x = torch.cat([adversarial_1d("fp8_e4m3"), heavy_tailed(64, seed=7)]).to(dtype).to(DEVICE)
    on_grid = quantize_mx(x, "fp8_e4m3", backend="torch")
    assert bits_equal(_stochastic(on_grid, seed=0), on_grid)
    down = quantize_mx(x, "fp8_e4m3", rounding="floor", backend="torch").float()
    sr = _stochastic(x, seed=0).float()
    assert torch.equal(torch.isnan(down), torch.isnan(sr))
    up = (sr != down) & ~torch.isnan(sr)  # rounded up: past x, away from zero, same sign
    assert up.any() and (sr[up].abs() >= x.float()[up].abs()).all()
    assert (sr[up].abs() > down[up].abs()).all()
    assert torch.equal(torch.signbit(sr[up]), torch.signbit(down[up]))


def bits_equal_each(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bitwise equality of two fp32 tensors, NaN equal to NaN."""
    return (a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())


@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("fmt", ["fp8_e5m2", "fp6_e2m3", "int8"])
def test_stochastic_picks_one_of_the_two_grid_neighbours(fmt, axis):
    blocks = leading_axis_blocks(fmt)
    x = torch.cat([blocks, heavy_tailed(64, blocks.shape[1], seed=11)])
    x = (x if axis == 0 else x.t().contiguous()).to(DEVICE)
    sr = _stochastic(x, fmt, seed=4, axis=axis).cpu()
    down = quantize_mx(x, fmt, rounding="floor", axis=axis, backend="torch").cpu()
    up = reference_quantize(x.cpu(), fmt, axis=axis, rounding="up")
    picked_down, picked_up = bits_equal_each(sr, down), bits_equal_each(sr, up)
    assert (picked_down | picked_up).all()
    assert (picked_up & ~picked_down).any() and (picked_down & ~picked_up).any()


def test_stochastic_makes_no_host_sync():
    """The seed stays on the device: nothing reads a tensor back to the host (on CUDA that is a
    sync per call, and it breaks CUDA-graph capture)."""
    x = heavy_tailed(8, 64, seed=12).to(DEVICE)
    g = torch.Generator(device=x.device).manual_seed(5)

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read back to the host")

    reads = dict.fromkeys(("item", "tolist", "__int__", "__float__", "__bool__"), host_read)
    with mock.patch.multiple(torch.Tensor, **reads):
        for axis in (-1, 0):
            quantize_mx(
                x, "fp8_e4m3", rounding="stochastic", axis=axis, backend="triton", generator=g
            )


@pytest.mark.parametrize("fmt, lo, hi", [("fp8_e4m3", 1.0, 1.125), ("fp4_e2m1", 1.0, 1.5)])
def test_stochastic_is_unbiased(fmt, lo, hi):
    n = 1 << 15
    value = torch.tensor(1.1, dtype=torch.float32)
    out = _stochastic(value.repeat(n).to(DEVICE), fmt, seed=0).cpu()
    assert set(out.unique().tolist()) == {lo, hi}
    p = (value.item() - lo) / (hi - lo)
    sigma = (hi - lo) * (p * (1 - p) / n) ** 0.5
    assert abs(out.double().mean().item() - value.item()) < 5 * sigma


def test_block_size_beyond_a_tile_is_refused():
    with pytest.raises(ValueError, match="too large for the Triton backend"):
        quantize_mx(
            torch.ones(4, device=DEVICE), "fp8_e4m3", block_size=2**17 + 1, backend="triton"
        )


_ERRORS_SCRIPT = """
import sys
import torch
saved = sys.modules.pop("triton", None)
sys.modules["triton"] = None
try:
    import mxprobe.kernels.triton_kernels
except ImportError as err:
    assert "pip install triton" in str(err), err
else:
    raise AssertionError("no ImportError without triton")
del sys.modules["triton"]
if saved is not None:
    sys.modules["triton"] = saved
from mxprobe.quantize import quantize_mx
try:
    quantize_mx(torch.ones(4), "fp8_e4m3", backend="triton")
except RuntimeError as err:
    assert "CUDA tensor" in str(err) and "TRITON_INTERPRET=1" in str(err), err
else:
    raise AssertionError("no RuntimeError for a CPU tensor outside the interpreter")
"""


def test_clear_errors_without_triton_or_outside_the_interpreter():
    done = run_outside_the_interpreter(_ERRORS_SCRIPT)
    assert done.returncode == 0, done.stderr


_HOPPER_COMPILE_SCRIPT = """
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mxprobe.kernels import triton_kernels
from mxprobe.formats import mx_format
from mxprobe.mx_blocks import fp32

def ptx(fmt, rounding, block_axis, inner_tile, rows, bf16):
    f = mx_format(fmt)
    ptr = "*bf16" if bf16 else "*fp32"
    signature = {"x_ptr": ptr, "out_ptr": ptr, "seed_ptr": "*i64", "n_blocks": "i32",
                 "length": "i32", "inner": "i32"}
    constants = dict(
        BLOCK_SIZE=32, BLOCK_POW2=32, ROWS=rows, INNER_TILE=inner_tile, BLOCK_AXIS=block_axis,
        EVEN_ROWS=False, EMAX=f.emax, MBITS=f.mbits, EMIN=f.emin, MAX_NORM=f.max_norm,
        INV_MAX_NORM=fp32(1.0 / f.max_norm), OUT_MAX=float(torch.finfo(torch.float32).max),
        IS_BF16=bf16, SCALE_MODE="rceil", ROUNDING=rounding,
    )
    signature.update(dict.fromkeys(constants, "constexpr"))
    # Pointers, `length` and `inner` 16-aligned, as Triton specializes them at launch.
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 4, 5)}
    source = ASTSource(triton_kernels._quantize_kernel, signature, constants, aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})

strided = ptx("fp8_e5m2", "stochastic", 0, 128, 1, True).asm["ptx"]
rows = ptx("fp8_e4m3", "even", 1, 1, 128, False).asm["ptx"]
# 16-byte loads and stores: the strided tile is read along its contiguous axis.
assert "ld.global.v4" in strided and "st.global.v4" in strided, strided
assert "ld.global.v4" in rows and "st.global.v4" in rows, rows
"""


@pytest.mark.slow  # a fresh interpreter compiling PTX (about 4 s)
def test_kernel_compiles_for_hopper_without_a_gpu(tmp_path):
    """The interpreter runs the kernel as Python; this compiles it as a GPU would (static
    branches, expand_dims, the seed load) down to sm_90 PTX, no GPU needed, and checks that both
    layouts read and write x with coalesced 16-byte accesses."""
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend here")
    done = run_outside_the_interpreter(_HOPPER_COMPILE_SCRIPT, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
