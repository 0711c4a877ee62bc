"""The torch.compile'd CPU path (used for large tensors) equals the eager path bit for bit, and its
cache compiles every variant on its own, without touching dynamo's process-wide settings."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from mxprobe.kernels import compile_cache, set_compile
from mxprobe.quantize import quantize_mx
from mxprobe.stats import quantization_sums
from tests.helpers_numerics import adversarial, bits_equal


@pytest.fixture
def compiled():
    previous = set_compile(True)
    yield
    set_compile(previous)


@pytest.fixture
def empty_cache(monkeypatch):
    """A cache with no variant compiled or failed yet (restored afterwards)."""
    monkeypatch.setattr(compile_cache, "_compiled", {})
    monkeypatch.setattr(compile_cache, "_failed", {})


def _variant_name(fmt, mode, rounding, dtype):
    return (
        f"quantize_blocks(fmt={fmt}, out_dtype={dtype}, rounding={rounding}, scale_mode={mode}; "
        f"{dtype} input)"
    )


def _torch_path(x, fmt, **kwargs):
    # The compile cache serves the torch path; quantize_mx's default on CPU is the native kernel.
    return quantize_mx(x, fmt, backend="torch", **kwargs)


def _eager(x, fmt, **kwargs):
    previous = set_compile(False)
    try:
        return _torch_path(x, fmt, **kwargs)
    finally:
        set_compile(previous)


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
    assert x.numel() >= compile_cache.MIN_NUMEL
    got = _torch_path(x, fmt, scale_mode=mode, rounding=rounding)
    assert not compile_cache.failed_variants(), "the compiled path fell back to eager"
    assert _variant_name(fmt, mode, rounding, dtype) in compile_cache.compiled_variants()
    want = _eager(x, fmt, scale_mode=mode, rounding=rounding)
    assert bits_equal(got, want)
    # the transposed axis goes through the same compiled function
    got0 = _torch_path(x, fmt, axis=0, scale_mode=mode, rounding=rounding)
    assert bits_equal(got0, _eager(x, fmt, axis=0, scale_mode=mode, rounding=rounding))


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
    assert not compile_cache.failed_variants(), "the compiled path fell back to eager"
    assert any(name.startswith("_block_sums(") for name in compile_cache.compiled_variants())
    set_compile(False)
    want = quantization_sums(x, fmt, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(got[:4], want[:4])  # counts: exact
    assert torch.allclose(got[4:], want[4:], rtol=1e-12)  # float64 sums in another order


def _counting_compiler(counter, broken_calls=()):
    """A stand-in for ``compile_model``: dynamo with a graph-counting backend (no Inductor, so
    fast); the compilations numbered in ``broken_calls`` (from 1) get a backend that raises."""
    calls = []

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler")

    def compiler(fn, **kwargs):
        calls.append(fn)
        backend = broken_backend if len(calls) in broken_calls else counter
        return torch.compile(fn, backend=backend, **kwargs)

    return compiler


def test_a_failing_variant_falls_back_alone_and_warns_once(compiled, empty_cache, monkeypatch):
    counter = CompileCounter()
    monkeypatch.setattr(compile_cache, "compile_model", _counting_compiler(counter, {2}))
    x = torch.randn(2048, 32, generator=torch.Generator().manual_seed(5))
    good, bad, later = ("fp8_e4m3", "even"), ("fp4_e2m1", "nearest"), ("fp6_e2m3", "floor")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fmt, rounding in [good, bad, good, bad, later, bad]:
            got = _torch_path(x, fmt, rounding=rounding)
            assert bits_equal(got, _eager(x, fmt, rounding=rounding))
    assert counter.frame_count == 2  # good and later, once each
    bad_name = _variant_name(bad[0], "floor", bad[1], torch.float32)
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == [
        f"torch.compile of {bad_name} failed ({compile_cache.failed_variants()[bad_name]}); "
        "running this variant eagerly from now on"
    ]
    assert "no C++ compiler" in compile_cache.failed_variants()[bad_name]
    assert list(compile_cache.failed_variants()) == [bad_name]
    assert compile_cache.compiled_variants() == [
        _variant_name(good[0], "floor", good[1], torch.float32),
        _variant_name(later[0], "floor", later[1], torch.float32),
    ]


# Ten variants: more than dynamo's default recompile_limit of 8 per code object.
TEN_VARIANTS = [
    (fmt, rounding)
    for fmt in ("fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1")
    for rounding in ("even", "nearest")
]


def test_more_than_eight_variants_all_run_compiled(compiled, empty_cache, monkeypatch):
    """Dynamo runs a code object eagerly, silently, past ``recompile_limit`` (8) compilations:
    each variant must have a code object of its own."""
    assert torch._dynamo.config.recompile_limit == 8
    counter = CompileCounter()
    monkeypatch.setattr(compile_cache, "compile_model", _counting_compiler(counter))
    x = torch.randn(2048, 32, generator=torch.Generator().manual_seed(6))
    for n, (fmt, rounding) in enumerate(TEN_VARIANTS, start=1):
        got = _torch_path(x, fmt, rounding=rounding)
        assert counter.frame_count == n, f"variant {n} ({fmt}, {rounding}) ran eagerly"
        assert bits_equal(got, _eager(x, fmt, rounding=rounding))
    _torch_path(x, "fp8_e4m3")  # compiled once, reused
    assert counter.frame_count == len(TEN_VARIANTS)
    assert not compile_cache.failed_variants()


@pytest.mark.slow
def test_more_than_eight_variants_compile_with_inductor(compiled, empty_cache):
    """The same through Inductor (10-30 s per variant on a cold cache)."""
    frames = torch._dynamo.utils.counters["frames"]
    x = torch.randn(2048, 32, generator=torch.Generator().manual_seed(7))
    for fmt, rounding in TEN_VARIANTS:
        before = frames["ok"]
        got = _torch_path(x, fmt, rounding=rounding)
        assert frames["ok"] == before + 1, f"variant ({fmt}, {rounding}) ran eagerly"
        assert bits_equal(got, _eager(x, fmt, rounding=rounding))
    assert not compile_cache.failed_variants()


def test_the_quantizer_leaves_dynamo_config_alone(tmp_path):
    """Importing and running the compiled quantizer changes no process-wide dynamo setting."""
    code = (
        "import os, torch, torch._dynamo\n"
        "os.environ['MXPROBE_NATIVE'] = '0'  # round_to on the torch path, through the cache\n"
        "before = torch._dynamo.config.get_config_copy()\n"
        "from mxprobe.kernels import set_compile\n"
        "from mxprobe.quantize import quantize_mx, round_to\n"
        "from mxprobe.kernels import compile_cache\n"
        "set_compile(True)\n"
        "x = torch.randn(2048, 32)\n"
        "quantize_mx(x, 'fp8_e4m3', backend='torch')\n"
        "round_to(x, 'bf16')\n"
        "assert len(compile_cache.compiled_variants()) == 2, compile_cache.failed_variants()\n"
        "after = torch._dynamo.config.get_config_copy()\n"
        "print(sorted(k for k in before if before[k] != after[k]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
