"""``mxprobe bench``: quantizer throughput per format next to ``x.clone()`` and torchao, one run.

    mxprobe bench [--size 4096] [--threads 2] [--reps 5]   (make bench)

Prints Melem/s for each (dtype, format) on a size x size tensor along the last axis, the ratio
to the same-dtype ``clone()`` measured in the same run (issue 18's goals on 2 CPU threads: fp32
e4m3 >= 0.8, every format and dtype >= 0.6), the same ratio for blocks along axis 0 (the
weight_bp / act_bp / grad_wgrad operands), ``reused``: the same ratio with the output memory
already mapped on both sides (``out.copy_(x)`` against the native kernel writing into an
``out=`` buffer, as MX layers' GEMM operands do; CPU only), and, when torchao is installed, its
eager ``MXTensor.to_mx(...).dequantize()`` throughput. ``clone`` and ``quantize_mx`` both fault in
fresh pages for a large tensor when the allocator maps new memory, which can hide up to 3x of
the kernel's own cost: read ``ratio`` and ``reused`` together. The first call of each variant
(the native kernel's build, or torch.compile of the torch path) is timed separately as warm-up.

Then NVFP4 (``quantize_nvfp4``, round to nearest) for fp32 and bf16: single-level 1 x 16 blocks,
two-level (``tensor_scale="amax"``) and 16 x 16 two-level tiles, with the same ratio to
``clone()``, the ratio along axis 0, and the torch path's Melem/s (``backend="torch"``, what ran
before the native kernel) next to the default backend's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mxprobe import kernels
from mxprobe.app.cli.errors import ArgumentParser, positive_int
from mxprobe.formats import MX_FORMAT_NAMES
from mxprobe.nvfp4 import quantize_nvfp4
from mxprobe.quantize import quantize_mx

# NVFP4 rows: (name, quantize_nvfp4 arguments); "1x16" rows are timed along axis 0 too
NVFP4_ROWS = (
    ("1x16", {}),
    ("1x16 amax", {"tensor_scale": "amax"}),
    ("16x16 amax", {"tile": (16, 16), "tensor_scale": "amax"}),
)


def _median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _torchao_fn(x: torch.Tensor, fmt: str):
    try:
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
    except ImportError:
        return None
    dtypes = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
    if fmt not in dtypes or x.dtype not in (torch.float32, torch.bfloat16):
        return None  # torchao 0.18's to_mx takes fp32 and bf16 only
    return lambda: MXTensor.to_mx(x, dtypes[fmt], 32).dequantize(x.dtype)


def _reused_ratio(x: torch.Tensor, fmt: str, reps: int) -> str:
    """``out.copy_(x)`` time / quantize time into memory that is already mapped (an ``out=``
    buffer), interleaved; "-" where the native kernel does not apply."""
    if x.is_cuda or not kernels.status().native:
        return "-"
    out, quantized = torch.empty_like(x), torch.empty_like(x)
    quantize_mx(x, fmt, out=quantized)
    t_copy, t_q = [], []
    for _ in range(reps):
        t_copy.append(_median_seconds(lambda: out.copy_(x), 1))
        t_q.append(_median_seconds(lambda: quantize_mx(x, fmt, out=quantized), 1))
    return f"{statistics.median(t_copy) / statistics.median(t_q):.2f}"


def _backend_label(device: str) -> str:
    if device.startswith("cuda"):
        return "triton"
    return kernels.status().summary()


def _device(text: str) -> str:
    """argparse type: ``cpu``, or ``cuda[:N]`` when this machine has that GPU."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    return text


def run(argv: list[str] | None = None, prog: str = "mxprobe bench") -> int:
    parser = ArgumentParser(
        prog=prog,
        description="Time the quantizer per element format and dtype against x.clone() of the "
        "same tensor (the ratio, goal >= 0.8 for fp32 e4m3 on CPU), along both axes, into "
        "reused memory, and against torchao when it is installed.",
    )
    parser.add_argument(
        "--size", type=positive_int, default=4096, help="tensor side: size x size (default 4096)"
    )
    parser.add_argument(
        "--threads", type=positive_int, default=2, help="torch CPU threads (default 2)"
    )
    parser.add_argument(
        "--reps", type=positive_int, default=5, help="timed repetitions, median kept (default 5)"
    )
    parser.add_argument(
        "--device",
        type=_device,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when available)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.size * args.size
    print(
        f"{args.size}x{args.size}, {args.device}, {args.threads} threads, torch {torch.__version__}"
    )
    print(f"quantizer backend for these tensors: {_backend_label(args.device)}")
    header = ("dtype", "format", "warmup_s", "Melem/s", "clone", "ratio", "axis0", "reused")
    header += ("torchao",)
    print(f"{header[0]:9} {header[1]:9} " + " ".join(f"{h:>9}" for h in header[2:]))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(args.size, args.size, device=args.device).to(dtype)
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        for fmt in MX_FORMAT_NAMES:
            t0 = time.perf_counter()
            quantize_mx(x, fmt)
            sync()
            warm = time.perf_counter() - t0
            # clone and quantize alternate so both see the same machine state
            quantize_mx(x, fmt, axis=0)
            t_clone, t_q, t_q0 = [], [], []
            for _ in range(args.reps):
                t_clone.append(_median_seconds(lambda x=x, s=sync: (x.clone(), s()), 1))
                t_q.append(_median_seconds(lambda x=x, f=fmt, s=sync: (quantize_mx(x, f), s()), 1))
                t_q0.append(
                    _median_seconds(lambda x=x, f=fmt, s=sync: (quantize_mx(x, f, axis=0), s()), 1)
                )
            clone_rate = n / statistics.median(t_clone) / 1e6
            q_rate = n / statistics.median(t_q) / 1e6
            axis0_ratio = statistics.median(t_clone) / statistics.median(t_q0)
            reused = _reused_ratio(x, fmt, args.reps)
            ao = _torchao_fn(x, fmt)
            ao_text = "-"
            if ao is not None:
                ao()
                seconds = _median_seconds(lambda ao=ao, s=sync: (ao(), s()), args.reps)
                ao_text = f"{n / seconds / 1e6:9.0f}"
            print(
                f"{str(dtype).replace('torch.', ''):9} {fmt:9} {warm:9.1f} {q_rate:9.0f} "
                f"{clone_rate:9.0f} {q_rate / clone_rate:9.2f} {axis0_ratio:9.2f} {reused:>9} "
                f"{ao_text:>9}"
            )
    _nvfp4_rows(args, n)
    return 0


def _nvfp4_rows(args: argparse.Namespace, n: int) -> None:
    """The NVFP4 table: the default backend against ``clone()`` and the torch path."""
    print(f"NVFP4 (quantize_nvfp4, rounding='even'), {args.reps} reps")
    header = ("dtype", "scaling", "backend", "warmup_s", "Melem/s", "clone", "ratio", "axis0")
    print(
        f"{header[0]:9} {header[1]:11} {header[2]:7} " + " ".join(f"{h:>9}" for h in header[3:]),
        end="",
    )
    print(f" {'torch':>9}")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(args.size, args.size, device=args.device).to(dtype)
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        backend = kernels.resolve_nvfp4_backend("auto", x)
        for name, kw in NVFP4_ROWS:
            t0 = time.perf_counter()
            quantize_nvfp4(x, **kw)
            sync()
            warm = time.perf_counter() - t0
            t_clone, t_q, t_q0 = [], [], []
            for _ in range(args.reps):  # interleaved, as the MX rows
                t_clone.append(_median_seconds(lambda x=x, s=sync: (x.clone(), s()), 1))
                t_q.append(
                    _median_seconds(lambda x=x, k=kw, s=sync: (quantize_nvfp4(x, **k), s()), 1)
                )
                if "tile" not in kw:
                    t_q0.append(
                        _median_seconds(
                            lambda x=x, k=kw, s=sync: (quantize_nvfp4(x, axis=0, **k), s()), 1
                        )
                    )
            clone = statistics.median(t_clone)
            axis0 = f"{clone / statistics.median(t_q0):9.2f}" if t_q0 else f"{'-':>9}"
            torch_s = _median_seconds(
                lambda x=x, k=kw, s=sync: (quantize_nvfp4(x, backend="torch", **k), s()), args.reps
            )
            print(
                f"{str(dtype).replace('torch.', ''):9} {name:11} {backend:7} {warm:9.1f} "
                f"{n / statistics.median(t_q) / 1e6:9.0f} {n / clone / 1e6:9.0f} "
                f"{clone / statistics.median(t_q):9.2f} {axis0} {n / torch_s / 1e6:9.0f}"
            )
