"""The quantizer backends, in one room: the rest of mxprobe imports only from here.

- ``dispatch``: which backend computes a quantization (:func:`quantize`,
  :func:`quantize_nvfp4`) or an elementwise rounding (:func:`round_cast`); ``mxprobe.quantize``
  and ``mxprobe.nvfp4`` are its callers.
- ``native`` + ``native_quantize.c``: the CPU kernel, built with the machine's C compiler at
  first use, self-checked, threads from torch's OpenMP team (or a Python pool);
  ``native_nvfp4`` + ``nvfp4_quantize.c``: NVFP4's part of it (round to nearest, variant
  torchao); ``native_cache``: which built library may be loaded.
- ``compile_cache``: the torch path (``mxprobe.mx_blocks``, the reference) compiled per variant
  for large CPU tensors; :func:`set_compile` turns it off, :func:`compiled_call` serves other
  block functions (``mxprobe.stats``).
- ``triton_kernels``: the CUDA kernel (or Triton's interpreter); ``triton_nvfp4``: NVFP4's
  (round to nearest, variant torchao).
- ``gemm``: products of quantized operands, on TF32 tensor cores where that is exact.
- ``buffers``: :class:`OperandBuffers`, memory reused for GEMM operands by their owner.
- ``state``: :func:`status`, everything above in one :class:`KernelStatus` value.
"""

from mxprobe.kernels.buffers import OperandBuffers, free_scratch
from mxprobe.kernels.compile_cache import compiled_call, set_compile
from mxprobe.kernels.dispatch import (
    BACKENDS,
    NVFP4_BACKENDS,
    quantize,
    quantize_nvfp4,
    resolve_backend,
    resolve_nvfp4_backend,
    round_cast,
)
from mxprobe.kernels.gemm import bf16_exact, mx_gemm, tensor_core_exact, tf32_exact
from mxprobe.kernels.native import set_openmp
from mxprobe.kernels.state import KernelStatus, status

__all__ = [
    "BACKENDS",
    "KernelStatus",
    "NVFP4_BACKENDS",
    "OperandBuffers",
    "bf16_exact",
    "compiled_call",
    "free_scratch",
    "mx_gemm",
    "quantize",
    "quantize_nvfp4",
    "resolve_backend",
    "resolve_nvfp4_backend",
    "round_cast",
    "set_compile",
    "set_openmp",
    "status",
    "tensor_core_exact",
    "tf32_exact",
]
