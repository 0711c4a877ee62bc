"""The state of the quantizer backends, in one value: :func:`status`."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import torch

from mxprobe.kernels import compile_cache, native
from mxprobe.kernels.buffers import scratch_bytes


@dataclasses.dataclass(frozen=True)
class KernelStatus:
    """What the backends can do in this process now, and why not where they cannot."""

    native: bool
    """The native C kernel is built, self-checked and not turned off (``MXPROBE_NATIVE``). It
    computes CPU tensors' MX quantization, bf16/fp16 rounding and NVFP4 (fp32/bf16, variant
    ``"torchao"``, ``rounding="even"``); NVFP4's stochastic rounding and variant ``"te"`` run on
    the torch path (``kernels.resolve_nvfp4_backend`` says which backend a call takes)."""
    native_reason: str | None
    """Why ``native`` is False (None when it is True)."""
    native_library: str | None
    """Where the loaded build lies (in ``$MXPROBE_CACHE_DIR/native``)."""
    native_threads: str | None
    """Where the native kernel's threads come from: ``"openmp"`` (torch's OpenMP team) or
    ``"pool"`` (a Python thread pool; also in a forked child); None without the kernel."""
    threads: int
    """``torch.get_num_threads()``: the most threads one call splits its work over."""
    triton: bool
    """The Triton kernels can run here (triton installed, and CUDA or ``TRITON_INTERPRET=1``):
    they compute CUDA tensors' MX quantization and NVFP4 (fp32/bf16, variant ``"torchao"``,
    ``rounding="even"``, outside autograd and ``torch.compile``)."""
    triton_reason: str | None
    """Why ``triton`` is False (None when it is True)."""
    compile: bool
    """The torch path runs large CPU tensors through compiled twins (``set_compile``)."""
    compile_failures: tuple[str, ...]
    """Variants whose compiled call failed and that run eagerly now: ``"name: error"``."""
    scratch_bytes: int
    """Bytes of GEMM operand buffers held, over every thread (``free_scratch`` drops the
    calling thread's)."""

    def summary(self) -> str:
        """One line for benchmark headers: the CPU kernel and where its threads come from."""
        if not self.native:
            return f"torch path ({self.native_reason})"
        openmp = self.native_threads == "openmp"
        source = "torch's OpenMP team" if openmp else "a Python thread pool"
        return f"native C kernel, threads from {source}"


def _triton_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (on CPU only under TRITON_INTERPRET=1, for tests)"
    return None


def status() -> KernelStatus:
    """The backends' state now. Builds and checks the native kernel if no call has yet."""
    available = native.available()
    triton_reason = _triton_reason()
    return KernelStatus(
        native=available,
        native_reason=native.unavailable_reason(),
        native_library=native.library_path() if available else None,
        native_threads=("openmp" if native.uses_openmp() else "pool") if available else None,
        threads=torch.get_num_threads(),
        triton=triton_reason is None,
        triton_reason=triton_reason,
        compile=compile_cache.compile_enabled(),
        compile_failures=tuple(
            f"{name}: {error}" for name, error in compile_cache.failed_variants().items()
        ),
        scratch_bytes=scratch_bytes(),
    )
