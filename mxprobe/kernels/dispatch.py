"""Which backend computes a quantization or an elementwise rounding, and the call into it.

``mxprobe.quantize`` checks the arguments and calls :func:`quantize` or :func:`round_cast`,
``mxprobe.quantize_nvfp4`` calls :func:`quantize_nvfp4`; nothing else chooses a backend. CPU
tensors go to the native C kernel outside ``torch.compile`` (under compile the torch path is
traced and fused into the graph), CUDA tensors to the Triton kernel, the rest to the torch path
(``mx_blocks``, compiled per variant for large CPU tensors by ``compile_cache``). NVFP4 takes
the same routes outside autograd (``native_nvfp4`` on CPU, ``triton_nvfp4`` on CUDA when triton
is installed); its stochastic rounding and Transformer Engine variant run on the torch path
(``mxprobe.nvfp4``) only. All of them agree to the bit with the torch path on the same device.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from mxprobe.formats import ElementFormat
from mxprobe.kernels import native, native_nvfp4
from mxprobe.kernels.compile_cache import compiled_call
from mxprobe.mx_blocks import from_blocks, quantize_blocks, stochastic_noise, to_blocks

BACKENDS = ("auto", "torch", "native", "triton")
NVFP4_BACKENDS = ("auto", "torch", "native", "triton")


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The backend that computes ``quantize_mx(x, backend=backend)``.

    Raises:
        RuntimeError: ``backend="native"`` for a tensor off the CPU or without a built kernel.
    """
    if backend == "auto":
        if x.is_cuda:
            return "triton"
        # Under torch.compile the torch block numerics are traced and fused into the graph.
        if x.device.type == "cpu" and not torch.compiler.is_compiling() and native.available():
            return "native"
        return "torch"
    if backend == "native" and (x.device.type != "cpu" or not native.available()):
        raise RuntimeError(
            f"backend='native' needs a CPU tensor and a built native quantizer; got a tensor on "
            f"{x.device} ({native.unavailable_reason() or 'native quantizer available'}); use "
            "backend='auto' or 'torch'"
        )
    return backend


def quantize(
    x: torch.Tensor,
    fmt: ElementFormat,
    block_size: int,
    axis: int,
    scale_mode: str,
    rounding: str,
    backend: str = "auto",
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` fake-quantized, in its dtype and shape (arguments checked by ``quantize_mx``,
    ``axis`` non-negative). With ``out`` (contiguous, ``x``'s shape, dtype and device) the
    result is written there and ``out`` returned: the native kernel writes into it directly,
    the other backends copy their result in."""
    resolved = resolve_backend(backend, x)
    if resolved == "native":
        return native.quantize(x, fmt, block_size, axis, scale_mode, rounding, generator, out=out)
    if resolved == "triton":
        from mxprobe.kernels.triton_kernels import quantize_mx_triton

        result = quantize_mx_triton(x, fmt, block_size, axis, scale_mode, rounding, generator)
    else:
        xb, layout = to_blocks(x, axis, block_size)
        noise = stochastic_noise(xb, generator) if rounding == "stochastic" else None
        blocks = compiled_call(
            quantize_blocks,
            xb,
            fmt=fmt,
            scale_mode=scale_mode,
            rounding=rounding,
            noise=noise,
            out_dtype=x.dtype,
        )
        result = from_blocks(blocks, layout)
    return result if out is None else out.copy_(result)


def writes_in_place(x: torch.Tensor) -> bool:
    """True when ``quantize(x, ..., out=buf)`` writes into ``buf`` itself rather than copying a
    result of its own into it: the native kernel's case, where reusing a buffer saves
    faulting in fresh pages."""
    return resolve_backend("auto", x) == "native"


def _round_cast_torch(x: torch.Tensor, target: torch.dtype, top: float) -> torch.Tensor:
    # Saturating: a finite value past the range becomes ``top``, the largest value both dtypes
    # hold (65504 for fp16), never Inf; ±Inf and NaN inputs stay what they are.
    clamped = torch.where(x.isinf(), x, x.clamp(-top, top))
    return clamped.to(target).to(x.dtype)


def round_cast(
    x: torch.Tensor, target: torch.dtype, top: float, reuse_input: bool = False
) -> torch.Tensor:
    """``x`` rounded to ``target`` (bf16 or fp16) and back to its dtype, saturating at ``top``.

    fp32 CPU tensors outside ``torch.compile`` take the native kernel, the rest the torch path.
    ``reuse_input`` says ``x`` (contiguous, outside autograd) is the caller's to overwrite:
    the native kernel then rounds it in place and returns it.
    """
    native_applies = (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        # is_compiling first: Dynamo must not trace into the library's build and ctypes calls.
        and not torch.compiler.is_compiling()
        and native.available()
    )
    if native_applies:
        return native.round_cast(x, target, top, inplace=reuse_input)
    return compiled_call(_round_cast_torch, x, target=target, top=top)


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_nvfp4_backend(
    backend: str, x: torch.Tensor, rounding: str = "even", variant: str = "torchao"
) -> str:
    """The backend that computes ``quantize_nvfp4(x, rounding=..., variant=..., backend=...)``.

    The kernels compute fp32/bf16 tensors of >= 1 dimension outside ``torch.compile`` and
    outside autograd, with round-to-nearest and variant ``"torchao"``: ``"auto"`` takes the
    native kernel for such CPU tensors and the Triton kernel (``triton_nvfp4``) for such CUDA
    tensors when triton is installed; the torch path (``mxprobe.nvfp4``, the reference) for
    everything else: stochastic rounding, variant ``"te"``, an input autograd tracks (the
    result keeps the torch path's graph), a compiled graph, another device, no built native
    kernel or no triton. ``"triton"`` forces the Triton kernel (a CPU tensor under
    ``TRITON_INTERPRET=1``: the tests), ``"native"`` the C kernel; ``"torch"`` the torch path.

    Raises:
        ValueError: an unknown ``backend``.
        RuntimeError: ``backend="native"`` or ``"triton"`` where that kernel does not compute
            this call.
    """
    if backend not in NVFP4_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {NVFP4_BACKENDS}")
    if backend == "torch":
        return "torch"
    # is_compiling first: Dynamo must not trace into the library's build and ctypes calls.
    kernel_applies = (
        not torch.compiler.is_compiling()
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.dim() >= 1
        and rounding == "even"
        and variant == "torchao"
        and not (x.requires_grad and torch.is_grad_enabled())
    )
    if backend == "triton":
        if kernel_applies:
            return "triton"
        raise RuntimeError(
            "backend='triton' cannot compute this NVFP4 call: the Triton kernel takes fp32/bf16 "
            "tensors of >= 1 dimension outside autograd and torch.compile, rounding='even', "
            f"variant='torchao'; got {x.dtype}, {x.dim()} dimension(s), rounding={rounding!r}, "
            f"variant={variant!r}; use backend='auto' or 'torch'"
        )
    if backend == "auto" and kernel_applies and x.is_cuda and _triton_installed():
        return "triton"
    applies = kernel_applies and native_nvfp4.supports(x, rounding, variant)
    if applies and native.available():
        return "native"
    if backend == "native":
        why = native.unavailable_reason()
        if not applies:
            why = (
                "it takes fp32/bf16 CPU tensors of >= 1 dimension outside autograd and "
                f"torch.compile, rounding='even', variant='torchao'; got {x.dtype} on {x.device}, "
                f"{x.dim()} dimension(s), rounding={rounding!r}, variant={variant!r}"
            )
        raise RuntimeError(
            f"backend='native' cannot compute this NVFP4 call: {why}; use backend='auto' or 'torch'"
        )
    return "torch"


def quantize_nvfp4(
    x: torch.Tensor,
    axis: int,
    tensor_scale: str | torch.Tensor | None,
    tile: tuple[int, int],
    rounding: str,
    generator: torch.Generator | None,
    variant: str,
    backend: str = "auto",
) -> torch.Tensor:
    """``x`` NVFP4 fake-quantized, in its dtype and shape (arguments checked by
    ``mxprobe.quantize_nvfp4``: ``axis`` non-negative, ``tile`` a tuple, ``tensor_scale`` None,
    ``"amax"`` or a 0-dim fp32 tensor), on :func:`resolve_nvfp4_backend`'s backend."""
    resolved = resolve_nvfp4_backend(backend, x, rounding, variant)
    if resolved == "native":
        return native_nvfp4.quantize(x, axis, tensor_scale, tile)
    if resolved == "triton":
        from mxprobe.kernels.triton_nvfp4 import quantize_nvfp4_triton

        return quantize_nvfp4_triton(x, axis, tensor_scale, tile)
    # mxprobe.nvfp4 holds the torch path and imports this room, so it is imported at call time
    from mxprobe.nvfp4 import quantize_nvfp4_torch

    return quantize_nvfp4_torch(x, axis, tensor_scale, tile, rounding, generator, variant)
