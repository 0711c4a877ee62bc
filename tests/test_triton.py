"""The Triton kernel against the torch path: bit for bit, on adversarial and random inputs.

Without CUDA the kernel runs in Triton's interpreter, which must be switched on before
``triton.jit`` decorates the kernel, i.e. before ``mxprobe.triton_kernels`` is imported:
tests/conftest.py sets ``TRITON_INTERPRET=1`` before anything imports triton. The interpreter is
slow, so tensors here stay at a few thousand elements.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from mxprobe import triton_kernels  # noqa: E402
from mxprobe.formats import MX_FORMAT_NAMES  # noqa: E402
from mxprobe.quantize import SCALE_MODES, quantize_mx  # noqa: E402
from tests.helpers_numerics import (  # noqa: E402
    DETERMINISTIC,
    DTYPES,
    adversarial,
    bits_equal,
    heavy_tailed,
)

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
    g = None if seed is None else torch.Generator(device=x.device).manual_seed(seed)
    return quantize_mx(x, fmt, rounding="stochastic", backend="triton", generator=g, **kw)


def test_stochastic_is_reproducible_per_seed():
    x = heavy_tailed(8, 64, seed=6).to(DEVICE)
    assert bits_equal(_stochastic(x, seed=1), _stochastic(x, seed=1))
    assert not bits_equal(_stochastic(x, seed=1), _stochastic(x, seed=2))
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
    import mxprobe.triton_kernels
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
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", _ERRORS_SCRIPT], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
