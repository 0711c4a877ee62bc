"""The native C quantizer against the independent reference and the torch path, bit for bit.

The kernel is built by ``mxprobe.kernels.native`` with the machine's C compiler; on a machine with a
compiler, an unavailable kernel is a failure (it would silently cost users the fast path).
"""

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings

from mxprobe import kernels, quantize
from mxprobe.formats import MX_FORMAT_NAMES
from mxprobe.kernels import native
from mxprobe.quantize import SCALE_MODES, quantize_mx
from tests.helpers_numerics import (
    DETERMINISTIC,
    DTYPES,
    REFERENCE_CASES,
    adversarial,
    bits_equal,
    heavy_tailed,
)
from tests.mx_reference import reference_quantize

HAS_COMPILER = any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang"))
pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nq(x, fmt, **kw):
    return quantize_mx(x, fmt, backend="native", **kw)


def test_the_kernel_builds_and_is_what_auto_uses_on_cpu(monkeypatch):
    state = kernels.status()
    assert state.native, state.native_reason
    calls = []
    real = native.quantize
    monkeypatch.setattr(native, "quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    quantize_mx(torch.randn(4, 64), "e4m3")
    assert calls == [1]


@pytest.mark.parametrize("fmt", MX_FORMAT_NAMES)
@pytest.mark.parametrize("scale_mode", SCALE_MODES)
@pytest.mark.parametrize("rounding", DETERMINISTIC)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adversarial_matches_reference(fmt, scale_mode, rounding, dtype):
    x = adversarial(fmt).to(dtype)
    for axis in (-1, 0):  # contiguous blocks, and blocks across rows (the strided loops)
        got = nq(x, fmt, axis=axis, scale_mode=scale_mode, rounding=rounding)
        want = reference_quantize(x, fmt, 32, axis, scale_mode, rounding)
        assert bits_equal(got, want), (axis, (got != want).sum())


@pytest.mark.parametrize("fmt", MX_FORMAT_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_axes_tails_and_block_sizes_match_reference(fmt, dtype):
    x = heavy_tailed(3, 37, 45, seed=5).to(dtype)
    # 4100 > the kernel's 4096-element chunk: one block spans several chunks of columns.
    long = heavy_tailed(2, 4100, seed=6).to(dtype)
    for t, axis, bs in [(x, a, b) for a in (0, 1, 2) for b in (32, 7, 1, 64)] + [(long, 1, 4100)]:
        for scale_mode in ("floor", "rceil"):
            got = nq(t, fmt, block_size=bs, axis=axis, scale_mode=scale_mode)
            want = reference_quantize(t, fmt, bs, axis, scale_mode, "even")
            assert bits_equal(got, want), (axis, bs, scale_mode)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(**REFERENCE_CASES)
def test_property_matches_reference(values, fmt, scale_mode, rounding, block_size, dtype):
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    got = nq(x, fmt, block_size=block_size, scale_mode=scale_mode, rounding=rounding)
    assert bits_equal(got, reference_quantize(x, fmt, block_size, -1, scale_mode, rounding))


@pytest.mark.parametrize("axis", [-1, 1, 0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stochastic_draws_the_torch_paths_noise(axis, dtype):
    x = heavy_tailed(3, 70, 5, seed=1).to(dtype)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    got = nq(x, "e2m1", axis=axis, rounding="stochastic", generator=g1)
    want = quantize_mx(x, "e2m1", axis=axis, rounding="stochastic", generator=g2, backend="torch")
    assert bits_equal(got, want)


@pytest.fixture(params=["openmp", "pool"])
def thread_source(request):
    """Both ways the kernel gets threads: torch's OpenMP team (where built) and the pool."""
    if request.param == "openmp" and kernels.status().native_threads != "openmp":
        pytest.skip("the kernel was not built with OpenMP here")
    previous = kernels.set_openmp(request.param == "openmp")
    yield request.param
    kernels.set_openmp(previous)


def _torch_round(x, target, top):
    """Elementwise rounding with torch's own casts, saturating at ``top`` (Inf stays Inf)."""
    return torch.where(x.isinf(), x, x.clamp(-top, top)).to(target).to(x.dtype)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("axis", [-1, 1])
def test_threaded_large_tensors_and_non_contiguous_input(axis, threads, thread_source):
    # Above PARALLEL_MIN_NUMEL the block-rows are split between threads mid-slice. The kernel's
    # threads write disjoint ranges of one output; the process-wide settings changed here (torch's
    # thread count, the thread source) are put back, and no other test runs meanwhile.
    x = heavy_tailed(3, 300, 170, seed=3)
    assert x.numel() >= max(native.PARALLEL_MIN_NUMEL.values())
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for t in (x, x.transpose(0, 2)):
            for fmt in ("e4m3", "int8"):
                got = nq(t, fmt, axis=axis)
                want = quantize_mx(t, fmt, axis=axis, backend="torch")
                assert bits_equal(got, want)
        y = x.reshape(-1)[:150_001]  # an odd length: uneven thread ranges
        top = torch.finfo(torch.bfloat16).max
        want = _torch_round(y, torch.bfloat16, top)
        assert bits_equal(native.round_cast(y, torch.bfloat16, top, inplace=False), want)
    finally:
        torch.set_num_threads(old)


def test_the_openmp_build_shares_torchs_runtime():
    # One OpenMP runtime in the process: the kernel's threads are torch's team, which is awake
    # right after torch's GEMMs (a second runtime's team would spin against it).
    if not native._gomp_loaded():
        pytest.skip("torch holds no plain libgomp.so.1 here (not a Linux GNU OpenMP build)")
    state = kernels.status()
    assert state.native and state.native_threads == "openmp"
    assert len(native._gomp_paths()) == 1
    assert "OpenMP" in state.summary()


def test_status_says_what_runs_here():
    state = kernels.status()
    assert state.native and state.native_reason is None and os.path.exists(state.native_library)
    assert state.native_threads in ("openmp", "pool") and state.threads >= 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.native = False
    previous = kernels.set_compile(not state.compile)
    try:
        assert kernels.status().compile is not state.compile
    finally:
        kernels.set_compile(previous)


def test_straight_through_gradient_on_the_native_path():
    x = torch.randn(4, 64, requires_grad=True)
    nq(x, "e4m3").sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": REPO, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


def test_a_failed_build_warns_once_and_falls_back_to_the_torch_path(tmp_path):
    done = _run(
        """
        import warnings, torch
        warnings.simplefilter("always")
        from mxprobe.quantize import quantize_mx
        x = torch.randn(8, 64)
        with warnings.catch_warnings(record=True) as seen:
            a = quantize_mx(x, "e4m3"); b = quantize_mx(x, "e4m3")
        assert torch.equal(a, quantize_mx(x, "e4m3", backend="torch"))
        print(len(seen), seen[0].message)
        try:
            quantize_mx(x, "e4m3", backend="native")
        except RuntimeError as err:
            print("refused:", err)
        """,
        CC="/bin/false",
        PATH="/nonexistent",
        MXPROBE_CACHE_DIR=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert "1 mxprobe's native CPU quantizer is unavailable (RuntimeError: " in done.stdout
    assert "slower torch path" in done.stdout
    assert "refused: backend='native' needs" in done.stdout


def test_turned_off_by_the_environment():
    done = _run(
        """
        from mxprobe import kernels
        state = kernels.status()
        print(state.native, state.native_reason)
        """,
        MXPROBE_NATIVE="0",
    )
    assert done.stdout.split()[0] == "False" and "MXPROBE_NATIVE=0" in done.stdout


def test_the_self_check_rejects_a_fast_math_build(tmp_path):
    # -ffast-math folds (a + c) - c to a: the element rounding would vanish without a sound.
    # In a subprocess: gcc links crtfastmath into such a library, whose loading turns on
    # flush-to-zero for the whole process.
    done = _run(
        """
        import warnings
        from mxprobe.kernels import native
        native._FLAGS = [*native._FLAGS, "-ffast-math"]
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            lib = native.library()
        print(lib is None, native.available(), seen[0].message)
        """,
        MXPROBE_CACHE_DIR=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("True False ") and "self-check failed" in done.stdout


def test_builds_are_cached_per_source_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("MXPROBE_CACHE_DIR", str(tmp_path))
    first = native._build(native._compiler())
    assert first.exists() and native._build(native._compiler()) == first
    names = sorted(p.name for p in (tmp_path / "native").iterdir())
    assert names == [first.name.replace(".so", ".json"), first.name]  # the library, its digest


@pytest.mark.parametrize("fmt", MX_FORMAT_NAMES)
def test_every_fp16_and_bf16_bit_pattern(fmt):
    # The kernel converts fp16 and bf16 with bit operations of its own: every input pattern
    # (NaN, Inf, subnormals, -0) alone in a block and in blocks of 32, against the torch path.
    every = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        x = every.view(dtype)
        for bs in (1, 32):
            for scale_mode in SCALE_MODES:
                got = nq(x, fmt, block_size=bs, scale_mode=scale_mode)
                want = quantize_mx(x, fmt, block_size=bs, scale_mode=scale_mode, backend="torch")
                assert bits_equal(got, want), (dtype, bs, scale_mode)


@pytest.mark.parametrize("target", [torch.bfloat16, torch.float16], ids=str)
def test_elementwise_rounding_matches_the_torch_cast(target):
    # Random fp32 bit patterns (every exponent, NaN payloads, Inf, subnormals), the ties of
    # each target at every binade, and the saturation edges; in place and out of place.
    g = torch.Generator().manual_seed(4)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 18,), generator=g, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)
    ties = torch.ldexp(torch.full((300,), 1.0 + 2.0**-8), torch.arange(-150, 150))
    ties11 = torch.ldexp(torch.full((60,), 1.0 + 2.0**-11), torch.arange(-30, 30))
    edges = torch.tensor([65504.0, 65519.0, 65520.0, 3.4e38, -3.39e38, float("inf"), -0.0])
    snan = torch.tensor([0x7F800001, 0xFFC00001 - 2**32], dtype=torch.int32).view(torch.float32)
    x = torch.cat([x, ties, -ties, ties11, edges, snan])
    top = torch.finfo(target).max
    want = _torch_round(x, target, top)
    assert bits_equal(native.round_cast(x, target, top, inplace=False), want)
    y = x.clone()
    assert native.round_cast(y, target, top, inplace=True) is y and bits_equal(y, want)
    fmt = "bf16" if target == torch.bfloat16 else "fp16"
    assert bits_equal(quantize.round_to(x, fmt), want)


def test_a_forked_child_quantizes_with_threads_of_its_own():
    # The parent's pool threads do not survive fork; the child must not wait on them.
    done = _run(
        """
        import os, torch
        from mxprobe.quantize import quantize_mx
        torch.set_num_threads(2)
        x = torch.randn(512, 512)
        want = quantize_mx(x, "e4m3")  # large enough to use the thread pool
        pid = os.fork()
        if pid == 0:
            # Compared in numpy: torch's own threaded operators hang in a child forked after
            # the parent used its OpenMP team (GNU libgomp has no fork handler); ours must not.
            ok = quantize_mx(x, "e4m3").numpy().tobytes() == want.numpy().tobytes()
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        """
    )
    assert done.returncode == 0, done.stderr
    assert "child 0" in done.stdout


def test_a_first_call_under_torch_compile_leaves_the_kernel_available():
    # The first quantization of a process may happen while Dynamo traces a compiled model; the
    # build and ctypes calls must not be traced (they failed there and disabled the kernel).
    done = _run(
        """
        import warnings, torch
        warnings.simplefilter("error", RuntimeWarning)
        import mxprobe
        from mxprobe import kernels
        layer = mxprobe.convert(torch.nn.Sequential(torch.nn.Linear(64, 64)), "mxfp8_e4m3")
        torch.compile(layer)(torch.randn(8, 64)).sum()
        print("native", kernels.status().native)
        """
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "native True" in done.stdout
