"""The native CPU quantizer: ``native_quantize.c``, built with the C compiler at first use.

It computes ``mx_blocks.quantize_blocks`` bit for bit in one pass over memory, with no padding
or reshaping copies and a few microseconds of call overhead, so that the quantizer runs near
``clone()`` speed on large tensors and small models do not pay the ~15 dispatches of the torch
path per quantized tensor. ``quantize_mx(backend="auto")`` uses it for CPU tensors outside
``torch.compile``; the torch path stays the reference (``backend="torch"``).

The build (``cc -O3 -march=native -ffp-contract=off``, ~1 s) is cached under
``$MXPROBE_CACHE_DIR`` (default ``~/.cache/mxprobe``), keyed by the source, the compiler and the
CPU. Before first use the built library is checked against the torch path on adversarial
values; a library that disagrees, a missing compiler or a failed build each warn once, naming
the cause, and quantization falls back to the torch path. ``MXPROBE_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mxprobe.formats import ElementFormat, mx_format
from mxprobe.mx_blocks import fp32, from_blocks, quantize_blocks, to_blocks

SOURCE = Path(__file__).with_name("native_quantize.c")
ABI_VERSION = 2
# Below this many elements one thread is faster than handing work to the pool.
PARALLEL_MIN_NUMEL = 1 << 17
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=gnu11", "-shared", "-fPIC"]
# Tried in order, the first that builds wins: 512-bit vectors measured 5-12% faster on AVX-512
# CPUs; other targets reject that x86 flag, some compilers -march=native.
_ARCH_FLAGS = (["-march=native", "-mprefer-vector-width=512"], ["-march=native"], [])
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_SCALE_CODES = {"floor": 0, "ceil": 1, "even": 2, "rceil": 3}
_ROUNDING_CODES = {"even": 0, "nearest": 1, "floor": 2, "stochastic": 3}


class _Args(ctypes.Structure):
    """Mirror of ``mx_args`` in native_quantize.c."""

    _fields_ = [
        *[(n, ctypes.c_int64) for n in ("outer", "length", "inner", "block_size")],
        *[
            (n, ctypes.c_int32)
            for n in ("dtype", "emax", "mbits", "emin", "is_int", "scale_mode", "rounding")
        ],
        ("clamp_out", ctypes.c_int32),
        *[(n, ctypes.c_float) for n in ("max_norm", "inv_max_norm", "out_max")],
    ]


_lock = threading.Lock()
_state: dict = {"lib": None, "tried": False, "error": None}
_pool: ThreadPoolExecutor | None = None


def enabled_by_env() -> bool:
    return os.environ.get("MXPROBE_NATIVE", "1") not in ("0", "false", "False", "")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    # -march=native code must not be loaded on another CPU sharing the cache (e.g. over NFS).
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("MXPROBE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mxprobe"
    )
    return Path(root) / "native"


def _build(cc: str) -> Path:
    """Compile the source (or find the cached build); the library's path."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            x.encode() if isinstance(x, str) else x
            for x in (
                source,
                cc,
                version,
                repr((_FLAGS, _ARCH_FLAGS)),
                platform.machine(),
                _cpu_signature(),
            )
        )
    ).hexdigest()[:20]
    target = _cache_dir() / f"mxquant-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for arch in _ARCH_FLAGS:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [cc, *_FLAGS, *arch, str(SOURCE), "-o", tmp, "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            os.replace(tmp, target)  # atomic: concurrent builders never see half a file
            return target
        os.unlink(tmp)
        errors.append(f"{' '.join(cmd)}: {done.stderr.strip()[-400:]}")
    raise RuntimeError("; ".join(errors))


def _load() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (looked for $CC, cc, gcc, clang)")
    lib = ctypes.CDLL(str(_build(cc)))
    if lib.mx_abi_version() != ABI_VERSION:
        raise RuntimeError(f"library ABI {lib.mx_abi_version()} != {ABI_VERSION}")
    lib.mx_quantize.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.POINTER(_Args),
    ]
    lib.mx_quantize.restype = None
    lib.mx_round.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int32,
        ctypes.c_float,
    ]
    lib.mx_round.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded, self-checked library, or None (after one warning saying why)."""
    if _state["tried"]:
        return _state["lib"]
    if torch.compiler.is_compiling():
        # Dynamo tracing into the build would fail and wrongly mark the kernel unavailable;
        # compiled code uses the torch path anyway.
        return None
    with _lock:
        if _state["tried"]:
            return _state["lib"]
        try:
            _state["lib"] = _load()
            _self_check()
        except Exception as err:  # any failure must cost speed, never correctness
            _state["lib"] = None
            _state["error"] = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"mxprobe's native CPU quantizer is unavailable ({_state['error']}); "
                "quantizing with the slower torch path",
                RuntimeWarning,
                stacklevel=3,
            )
        _state["tried"] = True
        return _state["lib"]


def available() -> bool:
    """True when the native quantizer is built, checked and not turned off."""
    return enabled_by_env() and library() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    if not enabled_by_env():
        return "turned off by MXPROBE_NATIVE=0"
    library()
    return _state["error"]


def _self_check() -> None:
    """Compare the fresh library with the torch path on values that catch a miscompilation
    (fast-math, FMA contraction, flushed subnormals): ties, subnormals, saturation, NaN."""
    vals = [0.5 + k / 64 for k in range(32)] + [448 * 1.07, 3.0, -2.5, 1e-40, -0.0, 0.3]
    vals += [2.0**-130, 7.0, 1.75, -1.625] + [float("nan")] + [1.0] * 29
    x = torch.tensor(vals, dtype=torch.float32).reshape(2, 36)
    for fmt, scale_mode, rounding, dtype, axis in (
        ("fp8_e4m3", "floor", "even", torch.float32, -1),
        ("fp4_e2m1", "rceil", "nearest", torch.bfloat16, 0),
        ("int8", "even", "floor", torch.float16, -1),
    ):
        xt = x.to(dtype)
        f = mx_format(fmt)
        xb, layout = to_blocks(xt, axis % 2, 32)
        want = from_blocks(quantize_blocks(xb, f, scale_mode, rounding, None, dtype), layout)
        got = quantize(xt, f, 32, axis % 2, scale_mode, rounding, None, _lib=_state["lib"])
        same = torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(
            got.nan_to_num(0).view(torch.int16 if dtype != torch.float32 else torch.int32),
            want.nan_to_num(0).view(torch.int16 if dtype != torch.float32 else torch.int32),
        )
        if not same:
            raise RuntimeError(
                f"self-check failed ({fmt}, {scale_mode}, {rounding}, {dtype}): the compiled "
                "library disagrees with the torch path (a compiler applying fast-math?)"
            )


def _split(fn, n: int, numel: int) -> None:
    """Run ``fn(lo, hi)`` over ranges covering [0, n) on up to ``torch.get_num_threads()``
    threads (ctypes releases the GIL); one thread when ``numel`` elements is little work."""
    threads = min(torch.get_num_threads(), n) if numel >= PARALLEL_MIN_NUMEL else 1
    if threads <= 1:
        fn(0, n)
        return
    bounds = [n * t // threads for t in range(threads + 1)]
    jobs = [_thread_pool().submit(fn, lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False)]
    for job in jobs:
        job.result()


def round_cast(x: torch.Tensor, target: torch.dtype, top: float, inplace: bool) -> torch.Tensor:
    """fp32 CPU ``x`` rounded to ``target`` (bf16 or fp16) and back, saturating at ``top``;
    into ``x`` itself with ``inplace`` (``x`` contiguous), else into a new tensor."""
    lib = library()
    x = x if inplace else x.contiguous()
    out = x if inplace else torch.empty_like(x)
    code = _DTYPE_CODES[target]
    src, dst = x.data_ptr(), out.data_ptr()
    _split(lambda lo, hi: lib.mx_round(src, dst, lo, hi, code, top), x.numel(), x.numel())
    return out


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))
    return _pool


def _forget_pool_after_fork() -> None:
    # A forked child inherits the pool object but not its threads: work submitted to it would
    # wait forever (DataLoader workers, multiprocessing jobs).
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def quantize(
    x: torch.Tensor,
    fmt: ElementFormat,
    block_size: int,
    axis: int,
    scale_mode: str,
    rounding: str,
    generator: torch.Generator | None,
    _lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """``quantize_mx`` of a CPU tensor on the native kernel (arguments already validated,
    ``axis`` non-negative). Stochastic rounding draws the same noise as the torch path."""
    lib = _lib or library()
    x = x.detach().contiguous()
    shape = x.shape
    outer, length, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])
    nblocks = -(-length // block_size)
    noise = None
    if rounding == "stochastic":
        noise = torch.rand((outer, nblocks, block_size, inner), generator=generator)
    out = torch.empty_like(x)
    out_max = torch.finfo(x.dtype).max
    args = _Args(
        outer, length, inner, block_size,
        _DTYPE_CODES[x.dtype], fmt.emax, fmt.mbits, fmt.emin, int(fmt.is_int),
        _SCALE_CODES[scale_mode], _ROUNDING_CODES[rounding],
        int(scale_mode != "floor" or x.dtype != torch.float32),
        fmt.max_norm, fp32(1.0 / fmt.max_norm), out_max,
    )  # fmt: skip
    ptrs = (x.data_ptr(), out.data_ptr(), noise.data_ptr() if noise is not None else None)
    ref = ctypes.byref(args)
    _split(lambda lo, hi: lib.mx_quantize(*ptrs, lo, hi, ref), outer * nblocks, x.numel())
    return out
