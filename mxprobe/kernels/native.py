"""The native CPU quantizer: ``native_quantize.c`` (MX) and ``nvfp4_quantize.c`` (NVFP4, its
wrapper in :mod:`.native_nvfp4`), built into one library with the C compiler at first use.

It computes ``mx_blocks.quantize_blocks`` bit for bit in one pass over memory, with no padding
or reshaping copies and a few microseconds of call overhead, so that the quantizer runs near
``clone()`` speed on large tensors and small models do not pay the ~15 dispatches of the torch
path per quantized tensor. ``quantize_mx(backend="auto")`` uses it for CPU tensors outside
``torch.compile``; the torch path stays the reference (``backend="torch"``).

The build (``cc -O3 -march=native -ffp-contract=off``, ~1 s) is cached under
``$MXPROBE_CACHE_DIR`` (default ``~/.cache/mxprobe``), keyed by the source, the compiler and the
CPU; a cached library is loaded only if this user built it (:mod:`.native_cache`: a
private directory, the SHA-256 recorded at build time), else it is rebuilt, saying why once.
Where torch ships GNU libgomp (its Linux wheels) the build adds ``-fopenmp`` and so
runs its threads on torch's own OpenMP team, awake right after torch's GEMMs; elsewhere,
and in a forked child (libgomp has no fork handler), a Python thread pool splits the work.
Before first use the built library is checked against the torch path on adversarial
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
from mxprobe.kernels import native_cache
from mxprobe.mx_blocks import fp32, from_blocks, quantize_blocks, to_blocks

SOURCES = tuple(
    Path(__file__).with_name(name) for name in ("native_quantize.c", "nvfp4_quantize.c")
)
ABI_VERSION = 4
# Below this many elements one thread is faster than handing work to other threads: the
# OpenMP team (awake after torch's own operators) or, without OpenMP, the Python pool.
PARALLEL_MIN_NUMEL = {"openmp": 1 << 15, "pool": 1 << 17}
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=gnu11", "-shared", "-fPIC"]
# Tried in order, the first that builds wins: 512-bit vectors measured 5-12% faster on AVX-512
# CPUs; other targets reject that x86 flag, some compilers -march=native.
_ARCH_FLAGS = (["-march=native", "-mprefer-vector-width=512"], ["-march=native"], [])
# Measured on 2 cores right after a GEMM: 2.2-3x faster than the pool on 1-16 MiB tensors.
_OPENMP_FLAGS = ["-fopenmp"]
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
_state: dict = {
    "lib": None,
    "path": None,
    "tried": False,
    "error": None,
    "forked": False,
    "openmp": False,
}
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


def _gomp_paths() -> set[str]:
    """The GNU libgomp files mapped into this process (torch's OpenMP runtime in Linux wheels)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return {line.split()[-1] for line in maps.splitlines() if "/libgomp" in line}


def _gomp_loaded() -> bool:
    """True when the process holds a libgomp under its plain soname: a -fopenmp build then binds
    to that same runtime and team instead of loading a second one (a renamed copy, as some
    wheels ship, would not match, so no OpenMP build is tried)."""
    return any(Path(path).name == "libgomp.so.1" for path in _gomp_paths())


def _flag_sets() -> list[list[str]]:
    """Compiler flag sets to try, best first."""
    plain = [[*_FLAGS, *arch] for arch in _ARCH_FLAGS]
    if not _gomp_loaded():
        return plain
    return [[*flags, *_OPENMP_FLAGS] for flags in plain] + plain


def _build(cc: str) -> Path:
    """Compile the source (or find the cached build); the library's path."""
    flag_sets = _flag_sets()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    source = b"\0".join(path.read_bytes() for path in SOURCES)
    key = hashlib.sha256(
        b"\0".join(
            x.encode() if isinstance(x, str) else x
            for x in (
                source,
                cc,
                version,
                repr(flag_sets),
                platform.machine(),
                _cpu_signature(),
            )
        )
    ).hexdigest()[:20]
    target = native_cache.ensure_private_directory(native_cache.cache_dir()) / f"mxquant-{key}.so"
    data, distrust = native_cache.trusted_bytes(target)
    if data is not None:
        return target
    if distrust:
        warnings.warn(
            f"mxprobe's native kernel cache: not loading {target} ({distrust}); rebuilding it",
            RuntimeWarning,
            stacklevel=4,
        )
    errors = []
    for flags in flag_sets:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [cc, *flags, *map(str, SOURCES), "-o", tmp, "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            os.chmod(tmp, 0o700)
            native_cache.record_build(target, Path(tmp).read_bytes())
            os.replace(tmp, target)  # atomic: concurrent builders never see half a file
            return target
        os.unlink(tmp)
        errors.append(f"{' '.join(cmd)}: {done.stderr.strip()[-400:]}")
    raise RuntimeError("; ".join(errors))


def _load() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (looked for $CC, cc, gcc, clang)")
    runtimes = _gomp_paths()
    target = _build(cc)
    data, distrust = native_cache.trusted_bytes(target)
    if data is None:  # changed since it was built or checked a moment ago
        raise RuntimeError(f"not loading {target}: {distrust or 'it disappeared'}")
    lib = native_cache.load_bytes(data, target.parent)
    _state["path"] = str(target)
    if lib.mx_abi_version() != ABI_VERSION:
        raise RuntimeError(f"library ABI {lib.mx_abi_version()} != {ABI_VERSION}")
    # Two OpenMP runtimes would each keep a team spinning on the same cores: if loading brought
    # in a libgomp of its own, its team is never entered (threads then come from the pool).
    _state["openmp"] = bool(lib.mx_openmp()) and _gomp_paths() == runtimes
    lib.mx_quantize.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int32,
        ctypes.POINTER(_Args),
    ]
    lib.mx_quantize.restype = None
    lib.mx_round.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int32,
        ctypes.c_int32,
        ctypes.c_float,
    ]
    lib.mx_round.restype = None
    lib.nv_quantize.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int32]
    lib.nv_quantize.argtypes += [ctypes.c_void_p]
    lib.nv_quantize.restype = None
    lib.nv_amax_bits.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_int32] * 2
    lib.nv_amax_bits.restype = ctypes.c_uint32
    lib.mx_openmp.restype = ctypes.c_int
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
    (fast-math, FMA contraction, flushed subnormals): ties, subnormals, saturation, NaN; MX
    here, NVFP4 in :func:`.native_nvfp4.self_check`."""
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
    from mxprobe.kernels import native_nvfp4  # it imports this module

    native_nvfp4.self_check(_state["lib"])


def uses_openmp() -> bool:
    """True when the kernels run their threads on torch's OpenMP team (else a Python pool)."""
    return library() is not None and _openmp_now()


def library_path() -> str | None:
    """Where the loaded library was built (in the cache), or None when none is loaded."""
    return _state["path"] if library() is not None else None


def set_openmp(enabled: bool) -> bool:
    """Split work over torch's OpenMP team (True; only where the build has it) or the Python
    pool (False); returns the previous setting. For side-by-side timings of the two.

    Raises:
        RuntimeError: ``enabled`` where the library was built without OpenMP.
    """
    previous = uses_openmp()
    if enabled and not (library() is not None and bool(_state["lib"].mx_openmp())):
        raise RuntimeError(f"the native kernel has no OpenMP build here ({_build_note()})")
    _state["openmp"] = bool(enabled)
    return previous


def _build_note() -> str:
    return unavailable_reason() or "built without -fopenmp: no libgomp.so.1 in the process"


def _openmp_now() -> bool:
    return _state["openmp"] and not _state["forked"]


def split_work(entry, n: int, numel: int) -> None:
    """Run ``entry(begin, end, threads)`` over [0, n) on up to ``torch.get_num_threads()``
    threads: inside the call on the OpenMP build, else over the Python pool (ctypes releases
    the GIL); one thread when ``numel`` elements is little work."""
    kind = "openmp" if _openmp_now() else "pool"
    threads = min(torch.get_num_threads(), n) if numel >= PARALLEL_MIN_NUMEL[kind] else 1
    if threads <= 1 or kind == "openmp":
        entry(0, n, max(threads, 1))
        return
    bounds = [n * t // threads for t in range(threads + 1)]
    jobs = [
        _thread_pool().submit(entry, lo, hi, 1) for lo, hi in zip(bounds, bounds[1:], strict=False)
    ]
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
    split_work(lambda lo, hi, t: lib.mx_round(src, dst, lo, hi, t, code, top), x.numel(), x.numel())
    return out


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))
    return _pool


def _forget_pool_after_fork() -> None:
    # A forked child inherits the pool object but not its threads: work submitted to it would
    # wait forever (DataLoader workers, multiprocessing jobs). GNU libgomp's team has the same
    # problem and no fork handler, so the child splits work over a fresh Python pool instead.
    global _pool
    _pool = None
    _state["forked"] = True


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def quantize(
    x: torch.Tensor,
    fmt: ElementFormat,
    block_size: int,
    axis: int,
    scale_mode: str,
    rounding: str,
    generator: torch.Generator | None,
    out: torch.Tensor | None = None,
    _lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """``quantize_mx`` of a CPU tensor on the native kernel (arguments already validated,
    ``axis`` non-negative, ``out`` checked: contiguous, ``x``'s shape and dtype). Stochastic
    rounding draws the same noise as the torch path. The result is ``out`` when given, else a
    new tensor."""
    lib = _lib or library()
    x = x.detach().contiguous()
    shape = x.shape
    outer, length, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])
    nblocks = -(-length // block_size)
    noise = None
    if rounding == "stochastic":
        noise = torch.rand((outer, nblocks, block_size, inner), generator=generator)
    out = torch.empty_like(x) if out is None else out
    out_max = torch.finfo(x.dtype).max
    # Only the non-floor scale modes need the saturating pass (clamp_out): a floor-scaled value
    # is at most max_norm * 2^(floor(log2 amax) - emax) <= 1.984 * 2^floor(log2 amax) (int8; the
    # float formats 1.5-1.875), below the largest fp16 (65504 >= 1.984 * 2^15) and bf16
    # (1.992 * 2^127) for any amax they hold, and it rounds to no more than that.
    args = _Args(
        outer, length, inner, block_size,
        _DTYPE_CODES[x.dtype], fmt.emax, fmt.mbits, fmt.emin, int(fmt.is_int),
        _SCALE_CODES[scale_mode], _ROUNDING_CODES[rounding],
        int(scale_mode != "floor"),
        fmt.max_norm, fp32(1.0 / fmt.max_norm), out_max,
    )  # fmt: skip
    ptrs = (x.data_ptr(), out.data_ptr(), noise.data_ptr() if noise is not None else None)
    ref = ctypes.byref(args)
    split_work(lambda lo, hi, t: lib.mx_quantize(*ptrs, lo, hi, t, ref), outer * nblocks, x.numel())
    return out
