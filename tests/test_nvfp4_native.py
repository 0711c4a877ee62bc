"""NVFP4 on the native CPU kernel (``nvfp4_quantize.c``) against the torch path of
``mxprobe.nvfp4``, bit for bit (NaN == NaN): adversarial blocks, every axis with tails, 16 x 16
tiles, bf16's every bit pattern, given per-tensor scales, threads; and which calls fall back."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from mxprobe import kernels, quantize_nvfp4
from mxprobe.kernels import native, native_nvfp4
from tests.helpers_numerics import bits_equal

HAS_COMPILER = any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang"))
pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")

DTYPES = [torch.float32, torch.bfloat16]
SCALES = [None, "amax", 0.0123, 1e30, 1e-45]  # 1e-45: 1 / pts is Inf


def both(x, **kw):
    """(native, torch path) of ``quantize_nvfp4(x, **kw)``."""
    return quantize_nvfp4(x, backend="native", **kw), quantize_nvfp4(x, backend="torch", **kw)


def adversarial() -> torch.Tensor:
    """Blocks of 16: every E2M1 tie after scaling (at scales 1 and 2^-3), block maxima whose
    amax / 6 is an E4M3 tie (and where amax / 6 and amax · fp32(1/6) straddle one), scale
    underflow, all-zero and -0 blocks, saturation past 2688, fp32 subnormals, huge values, and
    blocks holding NaN, Inf or -Inf."""
    ties = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    ties += [-t for t in ties[1:]] + [-0.0]
    nan, inf = float("nan"), float("inf")
    rows = [
        ties,
        [t * 2.0**-3 for t in ties],
        [6.375] + [1.0] * 15,
        [7.125] + [-3.0] * 15,
        [0.1113281175494194, 0.05] * 8,
        [1.7812498807907104, -1.0] * 8,
        [2.0**-8] * 16,
        [2.0**-9, -(2.0**-8)] * 8,
        [0.0] * 16,
        [-0.0] * 16,
        [3000.0, -2700.0, 2688.0, 1.0] * 4,
        [1e-30, -1e-35, 1e-38, 3e-39] * 4,
        [1e-45, -(2.0**-149), 2.0**-130, 0.0] * 4,
        [3.0e38, -1.0] * 8,
        [nan] + [1.0] * 15,
        [-inf, 0.5] * 8,
        [inf] + [-0.0] * 15,
    ]
    return torch.tensor(rows, dtype=torch.float32)


def wide(*shape: int, seed: int) -> torch.Tensor:
    """Normal values times 2^N(0, 8): 20-odd binades, so blocks have every scale."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.exp2(torch.randn(*shape, generator=g) * 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tensor_scale", SCALES)
def test_adversarial_blocks(dtype, tensor_scale):
    x = adversarial().to(dtype)
    finite = x[torch.isfinite(x).all(1) & (x.abs() < 1e30).all(1)]
    # a NaN/Inf tensor under "amax" is NaN throughout; the finite rows test the scales
    for t in (x, finite, x.t().contiguous()):
        for axis in range(2):
            got, want = both(t, axis=axis, tensor_scale=tensor_scale)
            assert bits_equal(got, want), (axis, t.shape)


def test_the_element_factor_is_one_over_pts_then_over_s():
    # x · ((1/pts)/s) puts each of these on an E2M1 tie; x · (1/(pts·s)) or x · (1/(s/(1/pts)))
    # is an ulp off and rounds it the other way (amax 0.675: s = 1.125 at pts 0.1)
    ties = [0.02812499925494194, 0.08437499403953552, 0.140625, 0.19687499105930328, 0.28125]
    ties += [0.39374998211860657, 0.5625]
    x = torch.tensor([[0.675, *ties, *[-t for t in ties], 0.0]])
    for t in (x, x.t().contiguous()):
        got, want = both(t, axis=1 if t is x else 0, tensor_scale=0.1)
        assert bits_equal(got, want)


def e2m1_tie_rows(count: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``count`` random (pts, block of 16, s) where the block holds its amax and elements x with
    x · ((1/pts)/s) exactly on an E2M1 tie, so that any other order of the factor's two
    roundings lands an ulp away from the tie (``s``: the block's E4M3 scale)."""
    g = torch.Generator().manual_seed(11)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    rows = []
    for pts in torch.exp2(torch.rand(count, generator=g) * 40 - 20):
        amax = pts * 6 * torch.exp2(torch.rand((), generator=g) * 14 - 5)
        s = ((amax / 6) / pts).clamp(2.0**-6, 448).to(torch.float8_e4m3fn).float()
        f = (1.0 / pts) / s
        x = ties / f
        x = x[(x * f == ties) & (x <= amax)]
        rows.append((pts, torch.cat([amax.reshape(1), x, -x, torch.zeros(15 - 2 * len(x))]), s))
    return rows


def test_elements_on_e2m1_ties_at_many_per_tensor_scales():
    for pts, row, _ in e2m1_tie_rows(300):
        got, want = both(row.reshape(1, 16), tensor_scale=pts)
        assert bits_equal(got, want), (float(pts), float(row[0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tensor_scale", SCALES[:3])
def test_every_axis_of_a_3d_tensor_with_tails(dtype, tensor_scale):
    # 37 and 45 are no multiples of 16: every direction has a zero-padded tail block
    x = wide(5, 37, 45, seed=1).to(dtype)
    x[1, 3:9, 7] = float("nan")
    x[2, 30, 40] = float("-inf")
    finite = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    for t in (x, finite):
        for axis in (0, 1, 2, -1):
            got, want = both(t, axis=axis, tensor_scale=tensor_scale)
            assert bits_equal(got, want), axis


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tensor_scale", SCALES)
def test_16x16_tiles_with_tails(dtype, tensor_scale):
    x = wide(3, 40, 50, seed=2).to(dtype)
    tiles = adversarial()[:14].repeat(2, 3)  # adversarial rows inside 16 x 16 tiles
    for t in (x, tiles.to(dtype), wide(16, 16, seed=3).to(dtype), wide(7, 5, seed=4).to(dtype)):
        got, want = both(t, tile=(16, 16), tensor_scale=tensor_scale)
        assert bits_equal(got, want), t.shape


@pytest.mark.parametrize("tensor_scale", [None, "amax", 0.5])
def test_every_bf16_bit_pattern(tensor_scale):
    # NaN payloads, Inf, subnormals, -0: each alone among finite values, and all in one tensor
    every = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    shuffled = every[torch.randperm(65536, generator=torch.Generator().manual_seed(5))]
    for x in (every.reshape(-1, 16), shuffled.reshape(256, 256), every[every.isfinite()]):
        got, want = both(x, tensor_scale=tensor_scale)
        assert bits_equal(got, want)


@pytest.mark.parametrize("seed", range(4))
def test_random_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    shape = tuple(int(n) for n in torch.randint(1, 70, (3,), generator=g))
    for dtype in DTYPES:
        x = wide(*shape, seed=seed).to(dtype)
        for axis in range(3):
            for tensor_scale in (None, "amax", float(torch.rand(1, generator=g)) * 10):
                got, want = both(x, axis=axis, tensor_scale=tensor_scale)
                assert bits_equal(got, want), (dtype, axis, tensor_scale)
        got, want = both(x, tile=(16, 16), tensor_scale="amax")
        assert bits_equal(got, want)


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_split_the_work_and_the_tensor_maximum(threads):
    # Above PARALLEL_MIN_NUMEL the bands (and the "amax" pass) are split between threads.
    x = wide(300, 520, seed=6)
    assert x.numel() >= max(native.PARALLEL_MIN_NUMEL.values())
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for t in (x, x.to(torch.bfloat16), x.reshape(-1)[:150_001]):
            for axis, tile in ((-1, (1, 16)), (0, (1, 16)), (-1, (16, 16))):
                if tile == (16, 16) and t.dim() < 2:
                    continue
                got, want = both(t, axis=axis, tile=tile, tensor_scale="amax")
                assert bits_equal(got, want), (t.dtype, axis, tile)
        big = x.clone()
        big[299, 519] = float("nan")  # the maximum pass meets it in the last thread's range
        got = quantize_nvfp4(big, tensor_scale="amax", backend="native")
        assert got.isnan().all()
    finally:
        torch.set_num_threads(old)


def test_zero_tensors_empty_tensors_and_non_contiguous_input():
    zeros = torch.tensor([[0.0, -0.0] * 8])
    got = quantize_nvfp4(zeros, tensor_scale="amax", backend="native")
    assert bits_equal(got, zeros)  # all zero two-level: returned unchanged
    tiny = torch.full((2, 16), 1e-45)  # amax / 2688 underflows to 0: unchanged as well
    assert bits_equal(quantize_nvfp4(tiny, tensor_scale="amax", backend="native"), tiny)
    for empty in (torch.empty(0, 16), torch.empty(3, 0)):
        for tensor_scale in (None, "amax"):
            got, want = both(empty, tensor_scale=tensor_scale)
            assert got.shape == want.shape == empty.shape
    x = wide(40, 24, seed=7)
    for t in (x.t(), x[::2, 3:]):
        got, want = both(t, tensor_scale=0.25)
        assert bits_equal(got, want)


def test_auto_takes_the_kernel_on_cpu_and_the_torch_path_elsewhere(monkeypatch):
    assert kernels.status().native, kernels.status().native_reason
    calls = []
    real = native_nvfp4.quantize
    monkeypatch.setattr(native_nvfp4, "quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = wide(4, 64, seed=8)
    quantize_nvfp4(x)
    quantize_nvfp4(x.bfloat16(), tensor_scale="amax", tile=(16, 16), axis=0)
    assert calls == [1, 1]
    g = torch.Generator().manual_seed(0)
    quantize_nvfp4(x, rounding="stochastic", generator=g)
    quantize_nvfp4(x, tensor_scale="amax", variant="te")
    quantize_nvfp4(x.requires_grad_())  # the torch path's graph is kept
    assert calls == [1, 1]
    got, want = both(torch.tensor(2.7), axis=0)  # 0-dim: a block of one element
    assert bits_equal(got, want) and got.shape == () and float(got) == 2.625  # e4m3(0.45) · 6
    assert calls == [1, 1, 1]
    resolve = kernels.resolve_nvfp4_backend
    assert resolve("auto", x.detach()) == "native"
    assert resolve("auto", x.detach(), rounding="stochastic") == "torch"
    assert resolve("auto", x.detach(), variant="te") == "torch"


def test_backend_native_refuses_what_it_does_not_compute():
    x = wide(4, 64, seed=9)
    with pytest.raises(RuntimeError, match="rounding='stochastic'"):
        quantize_nvfp4(x, rounding="stochastic", backend="native")
    with pytest.raises(RuntimeError, match="variant='te'"):
        quantize_nvfp4(x, tensor_scale="amax", variant="te", backend="native")
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'; expected one of"):
        quantize_nvfp4(x, backend="cuda")


def test_under_torch_compile_the_torch_path_is_traced():
    x = wide(8, 64, seed=10)
    compiled = torch.compile(lambda t: quantize_nvfp4(t, tensor_scale="amax"), backend="eager")
    assert bits_equal(compiled(x), quantize_nvfp4(x, tensor_scale="amax", backend="torch"))


def test_the_portable_build_without_avx512_agrees(tmp_path):
    # Built for the baseline target (no -march=native: no AVX-512 block maxima), in a
    # subprocess with a cache of its own: the self-check passes and wide rows still agree.
    code = """
import torch
from mxprobe import quantize_nvfp4
from mxprobe.kernels import native
native._ARCH_FLAGS = ([],)
assert native.available(), native.unavailable_reason()
g = torch.Generator().manual_seed(12)
x = torch.randn(64, 1000, generator=g) * torch.exp2(torch.randn(64, 1000, generator=g) * 8)
for kw in ({}, {"tensor_scale": "amax"}, {"tile": (16, 16)}, {"axis": 0}):
    a = quantize_nvfp4(x, backend="native", **kw)
    b = quantize_nvfp4(x, backend="torch", **kw)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32)), kw
print("ok")
"""
    env = {**os.environ, "MXPROBE_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
