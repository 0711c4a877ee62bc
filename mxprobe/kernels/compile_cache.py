"""The torch.compile'd CPU path: one compiled twin per variant of a block function.

A *variant* is a function together with its non-tensor arguments (element format, scale mode,
rounding, dtypes) and the input's dtype. Those arguments are baked into the compiled twin, so
the generated kernel holds them as constants; tensors (and None) stay call arguments, with
dynamic shapes. ``compiled_call`` routes large CPU tensors through the twin and everything else
through the eager function. It is on unless ``MXPROBE_COMPILE=0`` (see ``set_compile``).

Dynamo caches compilations per code object and, past ``torch._dynamo.config.recompile_limit``
(8) entries for one code object, silently runs it eagerly; a compiled ``functools.partial`` is
traced through one wrapper that every partial in the process shares. So each variant is a new
function with its own copy of the code object: its cache holds only its own compilations, and
no process-wide dynamo setting is touched. A variant whose compiled call raises (a broken C++
toolchain, an Inductor bug) runs eagerly from then on, after one warning that names it and the
error; the other variants keep their compiled twins.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from mxprobe.compiled import compile_model

# Below this many elements the compiled path is not worth its dispatch overhead.
MIN_NUMEL = 1 << 16

_enabled = os.environ.get("MXPROBE_COMPILE", "1") not in ("0", "false", "False", "")
_compiled: dict[tuple, Callable] = {}
_failed: dict[tuple, str] = {}
_names: dict[tuple, str] = {}


def set_compile(enabled: bool) -> bool:
    """Turn the torch.compile'd CPU path on or off (default: on unless ``MXPROBE_COMPILE=0``).

    Returns the previous setting. Compiling costs 10-30 s per variant (format, scale mode,
    rounding, dtype) the first time on a machine (Inductor caches it on disk), then runs several
    times faster than eager torch on large tensors; one-shot tools turn it off.
    """
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def compile_enabled() -> bool:
    """Whether large CPU tensors take the compiled twins (see :func:`set_compile`)."""
    return _enabled


def compiled_variants() -> list[str]:
    """Names of the variants that have a compiled twin in use."""
    return [_names[key] for key in _compiled]


def failed_variants() -> dict[str, str]:
    """{variant name: the error its compiled call raised} for the variants now run eagerly."""
    return {_names[key]: error for key, error in _failed.items()}


def _label(value) -> str:
    # An ElementFormat by its name, not its full dataclass repr.
    return getattr(value, "name", None) or str(value)


def _variant(fn: Callable, baked: dict) -> Callable:
    """``fn`` with ``baked`` bound, as a new function with a code object of its own."""

    def variant(x, **dynamic):
        return fn(x, **baked, **dynamic)

    # A copy is a distinct code object, hence a distinct dynamo cache (see the module docstring).
    variant.__code__ = variant.__code__.replace()
    return variant


def compiled_call(fn: Callable, x: torch.Tensor, **static):
    """``fn(x, **static)``, through the compiled twin of its variant for a large CPU ``x``.

    Non-tensor ``static`` arguments (other than None) and ``x.dtype`` select the variant.
    """
    use_compiled = (
        _enabled
        and x.device.type == "cpu"
        and x.numel() >= MIN_NUMEL
        and not torch.compiler.is_compiling()
    )
    if not use_compiled:
        return fn(x, **static)
    dynamic = {k: v for k, v in static.items() if isinstance(v, torch.Tensor) or v is None}
    baked = {k: v for k, v in static.items() if k not in dynamic}
    key = (fn, x.dtype, *sorted(baked.items()))
    if key in _failed:
        return fn(x, **static)
    twin = _compiled.get(key)
    if twin is None:
        args = ", ".join(f"{k}={_label(v)}" for k, v in sorted(baked.items()))
        _names[key] = f"{fn.__name__}({args}; {x.dtype} input)"
        twin = _compiled[key] = compile_model(_variant(fn, baked), dynamic=True)
    try:
        # Detached: a requires_grad flip would otherwise cost a recompile.
        return twin(x.detach(), **dynamic)
    except Exception as err:  # a broken C++ toolchain must cost speed, not correctness
        del _compiled[key]
        _failed[key] = f"{type(err).__name__}: {err}"
        warnings.warn(
            f"torch.compile of {_names[key]} failed ({_failed[key]}); running this variant "
            "eagerly from now on",
            RuntimeWarning,
            stacklevel=3,
        )
        return fn(x, **static)
