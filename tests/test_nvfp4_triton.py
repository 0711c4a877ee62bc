"""NVFP4 on the Triton kernel (``mxprobe.kernels.triton_nvfp4``) against the torch path of
``mxprobe.nvfp4``, bit for bit (NaN == NaN, the sign of zero counts): adversarial blocks, every
axis with tails, 16 x 16 tiles with tails, bf16, the three per-tensor scalings, dense and
strided layouts; the division ``amax_b / 6`` as the torch path computes it on each device; which
calls dispatch takes to the kernel; and the PTX a GPU would run.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` before anything imports triton), which is slow: tensors stay at a few
hundred elements. With CUDA the same tests compare against the torch path on CUDA.
"""

from unittest import mock

import pytest
import torch

pytest.importorskip("triton")

from mxprobe import kernels, nvfp4, quantize_nvfp4  # noqa: E402
from mxprobe.kernels import dispatch, triton_kernels, triton_nvfp4  # noqa: E402
from mxprobe.mx_blocks import fp32  # noqa: E402
from tests.helpers_numerics import bits_equal  # noqa: E402
from tests.helpers_triton import run_outside_the_interpreter  # noqa: E402
from tests.test_nvfp4_native import adversarial, e2m1_tie_rows, wide  # noqa: E402

if not triton_kernels.MODES_AGREE:
    pytest.skip(
        "triton was imported (by an earlier test module) before TRITON_INTERPRET=1 was set; "
        "set it in the environment or in tests/conftest.py",
        allow_module_level=True,
    )

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
SCALES = [None, "amax", 0.0123, 1e30, 1e-45]  # 1e-45: 1 / pts is Inf
# amax / 6 and amax * fp32(1/6) fall on either side of an E4M3 tie for these block maxima
STRADDLE = [0.1113281175494194, 1.7812498807907104]


def both(x: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(Triton kernel, torch path) of ``quantize_nvfp4(x, **kw)``."""
    return quantize_nvfp4(x, backend="triton", **kw), quantize_nvfp4(x, backend="torch", **kw)


def assert_same(x: torch.Tensor, **kw) -> None:
    got, want = both(x, **kw)
    assert got.shape == x.shape and got.dtype == x.dtype
    differ = (got.float() != want.float()) & ~(got.isnan() & want.isnan())
    assert bits_equal(got, want), f"{x.dtype} {tuple(x.shape)} {kw}: {int(differ.sum())} differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tensor_scale", SCALES)
def test_adversarial_blocks(dtype, tensor_scale):
    # E2M1 ties after scaling, E4M3 ties of the block scale and the straddling maxima, scale
    # underflow, all-zero and -0 blocks, saturation past 2688, fp32 subnormals, huge values,
    # blocks holding NaN, Inf or -Inf (under "amax": NaN throughout; the finite rows too)
    x = adversarial().to(dtype).to(DEVICE)
    finite = x[torch.isfinite(x).all(1) & (x.abs() < 1e30).all(1)]
    for t in (x, finite):
        assert_same(t, axis=1, tensor_scale=tensor_scale)
        assert_same(t.t().contiguous(), axis=0, tensor_scale=tensor_scale)


def test_adversarial_rows_come_out_as_documented():
    # the reference's behaviour on the cases the kernel is tested on, checked outright
    rows = torch.tensor(
        [[2.0**-8] * 16, [3000.0, -2700.0, 2688.0, 1.0] * 4, [-0.0] * 16, [0.25, 0.75] * 8],
        device=DEVICE,
    )
    got = quantize_nvfp4(rows, backend="triton")
    assert bits_equal(got[0], torch.zeros(16, device=DEVICE))  # scale underflow: 0
    assert got[1].tolist() == [2688.0, -2688.0, 2688.0, 0.0] * 4  # saturation; 1 -> 0
    assert torch.signbit(got[2]).all() and (got[2] == 0).all()  # -0 stays -0
    # amax 0.75: s = e4m3(0.125) exactly, 0.25 / s = 2 and 0.75 / s = 6 on the grid
    assert got[3].tolist() == [0.25, 0.75] * 8


def torch_path_on_cuda(x, axis=-1, tensor_scale=None, tile=(1, 16)):
    """The torch path as CUDA evaluates it, computed here on CPU: ``amax_b / 6`` is
    ``amax_b * fp32(1/6)`` there (a tensor divided by a Python number). The per-tensor scale
    is passed in, as the Triton wrapper computes it with torch on x's device."""
    x = x.cpu()
    blocks, how = nvfp4._blocks(x, axis % x.dim(), tile)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    v = amax * fp32(1.0 / 6.0)
    if tensor_scale is None:
        pts = None
        s = nvfp4._e4m3(v.clamp(nvfp4.E4M3_TINY, nvfp4.E4M3_MAX))
        y = blocks * (1.0 / s)
    else:
        pts = torch.tensor(tensor_scale, dtype=torch.float32)
        s = nvfp4._e4m3((v / pts).clamp(nvfp4.E4M3_TINY, nvfp4.E4M3_MAX))
        y = blocks * ((1.0 / pts) / s)
    q = nvfp4._e2m1(y, "even", None)
    return nvfp4._unblock(nvfp4._dequantized(q, s, pts, amax), how).to(x.dtype)


@pytest.mark.parametrize("tensor_scale", [None, 1.0])
def test_the_block_scale_division_is_the_torch_paths_on_each_device(tensor_scale):
    rows = [[a, 0.05, -a / 3, 0.0] * 4 for a in STRADDLE] + [[6.375] + [1.0] * 15]
    x = torch.tensor(rows)
    true_division = quantize_nvfp4(x, tensor_scale=tensor_scale, backend="torch")
    reciprocal = torch_path_on_cuda(x, tensor_scale=tensor_scale)
    # the inputs tell the two apart (the straddling rows), and agree elsewhere
    same_row = [bits_equal(a, b) for a, b in zip(true_division, reciprocal, strict=True)]
    assert same_row == [False, False, True]
    x = x.to(DEVICE)
    scale = None if tensor_scale is None else torch.tensor(tensor_scale, device=DEVICE)
    for division, want in (("true", true_division), ("reciprocal", reciprocal)):
        got = triton_nvfp4.quantize_nvfp4_triton(x, 1, scale, (1, 16), scale_division=division)
        assert bits_equal(got.cpu(), want), division
    # by default the kernel divides as the torch path does on x's device
    assert_same(x, tensor_scale=tensor_scale)
    with pytest.raises(ValueError, match="unknown scale_division 'fast'"):
        triton_nvfp4.quantize_nvfp4_triton(x, 1, None, (1, 16), scale_division="fast")


def e2m1(y: torch.Tensor) -> torch.Tensor:
    return nvfp4._e2m1(y, "even", None)


def test_the_element_factor_is_one_over_pts_then_over_s():
    # x · ((1/pts)/s) puts each of these on an E2M1 tie; x · (1/(pts·s)) is an ulp off and
    # rounds some of them the other way (amax 0.675: s = 1.125 at pts 0.1)
    ties = [0.02812499925494194, 0.08437499403953552, 0.140625, 0.19687499105930328, 0.28125]
    ties += [0.39374998211860657, 0.5625]
    x = torch.tensor([[0.675, *ties, *[-t for t in ties], 0.0]])
    pts, s = torch.tensor(0.1), torch.tensor(1.125)
    assert not torch.equal(e2m1(x * ((1.0 / pts) / s)), e2m1(x * (1.0 / (pts * s))))
    for t, axis in ((x, 1), (x.t().contiguous(), 0)):
        assert_same(t.to(DEVICE), axis=axis, tensor_scale=0.1)


@pytest.mark.parametrize("count", [40, pytest.param(300, marks=pytest.mark.slow)])
def test_elements_on_e2m1_ties_at_many_per_tensor_scales(count):
    discriminating = 0
    for pts, row, s in e2m1_tie_rows(count):
        f = (1.0 / pts) / s
        discriminating += not torch.equal(e2m1(row * f), e2m1(row * (1.0 / (pts * s))))
        assert_same(row.reshape(1, 16).to(DEVICE), tensor_scale=float(pts))
    assert discriminating > count // 4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tensor_scale", SCALES[:3])
def test_every_axis_of_a_3d_tensor_with_tails(dtype, tensor_scale):
    # 21 and 19 are no multiples of 16: every direction has a zero-padded tail block
    x = wide(3, 21, 19, seed=1).to(dtype).to(DEVICE)
    x[1, 3:9, 7] = float("nan")
    x[2, 20, 18] = float("-inf")
    finite = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    # one binade of magnitudes: every tail block's maximum decides its scale
    normal = torch.randn(3, 21, 19, generator=torch.Generator().manual_seed(1)).to(dtype)
    for t in (x, finite, normal.to(DEVICE)):
        for axis in (0, 1, 2, -1):
            assert_same(t, axis=axis, tensor_scale=tensor_scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tensor_scale", SCALES)
def test_16x16_tiles_with_tails(dtype, tensor_scale):
    tiles = adversarial()[:14].repeat(2, 3)  # adversarial rows inside 16 x 16 tiles
    normal = torch.randn(2, 20, 35, generator=torch.Generator().manual_seed(2))
    for t in (wide(2, 20, 35, seed=2), normal, tiles, wide(16, 16, seed=3), wide(7, 5, seed=4)):
        assert_same(t.to(dtype).to(DEVICE), tile=(16, 16), tensor_scale=tensor_scale)


@pytest.mark.parametrize("tensor_scale", [None, "amax", 0.5])
def test_bf16_bit_patterns(tensor_scale):
    # NaN payloads, Inf, subnormals, -0 (one in 16 bf16 patterns here, every one in the slow
    # test), each among finite values and all finite ones in one tensor
    every = torch.arange(0, 65536, 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for x in (every.reshape(-1, 16), every[every.isfinite()]):
        assert_same(x.to(DEVICE), tensor_scale=tensor_scale)


@pytest.mark.slow
@pytest.mark.parametrize("tensor_scale", [None, "amax", 0.5])
def test_every_bf16_bit_pattern(tensor_scale):
    every = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    shuffled = every[torch.randperm(65536, generator=torch.Generator().manual_seed(5))]
    for x in (every.reshape(-1, 16), shuffled.reshape(256, 256), every[every.isfinite()]):
        assert_same(x.to(DEVICE), tensor_scale=tensor_scale)
        assert_same(x.reshape(-1, 16).t().contiguous().to(DEVICE), axis=0)


def test_dense_layouts_are_read_in_place_and_strided_ones_copied():
    base = wide(40, 24, seed=7).to(DEVICE)
    batch = wide(2, 3, 20, 18, seed=8).to(DEVICE)
    for t in (base.t(), base[::2, 3:], batch.permute(1, 0, 3, 2), batch.permute(2, 3, 0, 1)):
        for kw in ({"axis": 0}, {"axis": -1, "tensor_scale": 0.25}, {"tile": (16, 16)}):
            got, want = both(t, **kw)
            assert bits_equal(got.contiguous(), want.contiguous()), (t.stride(), kw)
    assert quantize_nvfp4(base.t(), axis=0, backend="triton").stride() == base.t().stride()


def test_zero_and_empty_tensors():
    zeros = torch.tensor([[0.0, -0.0] * 8], device=DEVICE)
    tiny = torch.full((2, 16), 1e-45, device=DEVICE)  # amax / 2688 underflows to 0
    for t in (zeros, tiny, zeros.bfloat16()):
        got = quantize_nvfp4(t, tensor_scale="amax", backend="triton")
        assert bits_equal(got, t)  # all zero two-level: returned unchanged
        assert_same(t)
    for empty in (torch.empty(0, 16), torch.empty(3, 0)):
        for tensor_scale in (None, "amax"):
            got, want = both(empty.to(DEVICE), tensor_scale=tensor_scale)
            assert got.shape == want.shape == empty.shape
    got, want = both(torch.tensor(2.7, device=DEVICE), axis=0)  # 0-dim: one block of one
    assert bits_equal(got, want) and got.shape == () and float(got) == 2.625


@pytest.mark.parametrize("seed", range(2))
def test_random_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    shape = tuple(int(n) for n in torch.randint(1, 24, (3,), generator=g))
    for dtype in DTYPES:
        x = wide(*shape, seed=seed).to(dtype).to(DEVICE)
        for axis in range(3):
            for tensor_scale in (None, "amax", float(torch.rand(1, generator=g)) * 10):
                assert_same(x, axis=axis, tensor_scale=tensor_scale)
        assert_same(x, tile=(16, 16), tensor_scale="amax")


@pytest.fixture
def on_cuda():
    """Tensors report ``is_cuda``: dispatch decides as it would for CUDA tensors."""
    with mock.patch.object(torch.Tensor, "is_cuda", new_callable=mock.PropertyMock) as prop:
        prop.return_value = True
        yield


def test_auto_takes_the_triton_kernel_for_cuda_tensors(on_cuda, monkeypatch):
    x = wide(4, 64, seed=9)
    resolve = kernels.resolve_nvfp4_backend
    assert resolve("auto", x) == "triton"
    assert resolve("auto", x.bfloat16()) == "triton"
    assert resolve("auto", x, rounding="stochastic") == "torch"
    assert resolve("auto", x, variant="te") == "torch"
    assert resolve("auto", x.half()) == "torch"
    assert resolve("auto", x.clone().requires_grad_()) == "torch"  # keeps the graph
    with torch.no_grad():
        assert resolve("auto", x.clone().requires_grad_()) == "triton"
    assert resolve("torch", x) == "torch"
    monkeypatch.setattr(dispatch, "_triton_installed", lambda: False)
    assert resolve("auto", x) != "triton"  # (the CPU tensor behind the mock: native)


def test_auto_keeps_cpu_tensors_off_the_triton_kernel(monkeypatch):
    calls = []
    real = triton_nvfp4.quantize_nvfp4_triton
    monkeypatch.setattr(
        triton_nvfp4, "quantize_nvfp4_triton", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    x = wide(4, 64, seed=10)
    quantize_nvfp4(x)
    quantize_nvfp4(x, tensor_scale="amax", tile=(16, 16))
    assert calls == []
    quantize_nvfp4(x, backend="triton")
    assert calls == [1]
    assert kernels.resolve_nvfp4_backend("auto", x) in ("native", "torch")


def test_backend_triton_refuses_what_it_does_not_compute():
    x = wide(4, 64, seed=11)
    with pytest.raises(RuntimeError, match="rounding='stochastic'"):
        quantize_nvfp4(x, rounding="stochastic", backend="triton")
    with pytest.raises(RuntimeError, match="variant='te'"):
        quantize_nvfp4(x, tensor_scale="amax", variant="te", backend="triton")
    with pytest.raises(RuntimeError, match="outside autograd"):
        quantize_nvfp4(x.requires_grad_(), backend="triton")
    assert "triton" in kernels.NVFP4_BACKENDS


def test_status_says_the_triton_kernels_run_here():
    status = kernels.status()
    assert status.triton and status.triton_reason is None


_OUTSIDE_THE_INTERPRETER = """
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mxprobe import quantize_nvfp4
from mxprobe.kernels import triton_nvfp4

try:
    quantize_nvfp4(torch.ones(4, 16), backend="triton")
except RuntimeError as err:
    assert "CUDA tensor" in str(err) and "TRITON_INTERPRET=1" in str(err), err
else:
    raise AssertionError("no RuntimeError for a CPU tensor outside the interpreter")

if "nvidia" in triton.backends.backends:
    def ptx(layout, bf16, two_level, true_division, rows=1, inner_tile=1, tiles=1):
        ptr = "*bf16" if bf16 else "*fp32"
        signature = {"x_ptr": ptr, "out_ptr": ptr, "scale_ptr": "*fp32", "n_blocks": "i32",
                     "length": "i32", "inner": "i32"}
        constants = dict(LAYOUT=layout, ROWS=rows, INNER_TILE=inner_tile, TILES=tiles,
                         EVEN_ROWS=False, IS_BF16=bf16, TWO_LEVEL=two_level,
                         TRUE_DIVISION=true_division)
        signature.update(dict.fromkeys(constants, "constexpr"))
        aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 4, 5)}
        source = ASTSource(triton_nvfp4._nvfp4_kernel, signature, constants, aligned)
        options = {"num_warps": 8, "enable_fp_fusion": False}  # as the launch
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

    for code in (
        ptx("rows", False, True, True, rows=256),
        ptx("cols", True, True, False, inner_tile=256),
        ptx("tiles", False, False, True, tiles=16),
    ):
        # IEEE division, products and sums each rounded once, subnormals kept; 16-byte accesses
        assert "div.rn.f32" in code and "mul.rn.f32" in code and "add.rn.f32" in code, code
        for op in ("div.full", "div.approx", "fma.", ".ftz", "rcp."):
            assert op not in code, op
        assert "ld.global.v4" in code and "st.global.v4" in code, code
    signature = {"x_ptr": "*bf16", "amax_ptr": "*i32", "numel": "i32", "SPAN": "constexpr",
                 "IS_BF16": "constexpr"}
    source = ASTSource(triton_nvfp4._amax_kernel, signature, {"SPAN": 4096, "IS_BF16": True})
    code = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    assert "atom.global" in code and ".max" in code, code
    print("ptx checked")
"""


@pytest.mark.slow  # a fresh interpreter compiling PTX (about 4 s)
def test_outside_the_interpreter_errors_and_the_ptx_a_gpu_runs(tmp_path):
    """A CPU tensor without the interpreter is refused clearly; compiled for sm_90 (no GPU
    needed), the kernel divides with div.rn, rounds every product and sum on its own (no FMA
    contraction, no flush to zero) and reads and writes with 16-byte accesses."""
    done = run_outside_the_interpreter(_OUTSIDE_THE_INTERPRETER, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    import triton

    assert ("ptx checked" in done.stdout) == ("nvidia" in triton.backends.backends)
