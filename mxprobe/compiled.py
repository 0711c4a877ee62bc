"""torch.compile for MX-emulated models, without losing the emulated roundings or hooks.

Inductor by default keeps a value in fp32 across a ``.to(bfloat16).to(float32)`` pair inside a
fused kernel, which silently drops the elementwise bf16 rounding that MX emulation relies on
(measured on the proxy: forward outputs off by 7e-2, gradients by 1-3 %). mxprobe's own
roundings are therefore opaque custom ops under compile (``mxprobe::round_to``), and
``compile_model`` also sets ``emulate_precision_casts`` for the model's other casts; the proxy's
compiled forward is bitwise equal to eager and its gradients equal up to reduction order
(tests/test_compiled.py).

Dynamo also does not guard on module hooks (``skip_nnmodule_hook_guards``): a forward hook
registered after the first compiled call would silently never run, which would blind
``mxprobe.callbacks.ActivationMonitor``. So a compiled module runs eagerly whenever one of its
modules has a forward hook (monitors attach theirs only on measured steps).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

INDUCTOR_OPTIONS = {"emulate_precision_casts": True}


def _has_forward_hooks(module: nn.Module) -> bool:
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


class _HookAwareCompiled:
    """Calls the compiled function, or the eager one while ``module`` carries forward hooks."""

    def __init__(self, eager: Callable, compiled: Callable, module: nn.Module) -> None:
        self.eager, self.compiled, self.module = eager, compiled, module

    def __call__(self, *args, **kwargs):
        fn = self.eager if _has_forward_hooks(self.module) else self.compiled
        return fn(*args, **kwargs)


def compile_model(fn: Callable, **kwargs) -> Callable:
    """``torch.compile`` with what exact MX emulation needs; returns a module for a module.

    ``fn`` is a module, a module's bound method (e.g. ``model.forward``) or a function; keyword
    arguments go to ``torch.compile``. A module is compiled in place and returned (so
    ``self.net = compile_model(net)`` keeps the same object, parameters, names and
    ``state_dict``); a bound method or function gives a compiled callable. For a module or a
    bound method the compiled code is bypassed (eager) while any of the module's submodules has
    a forward hook (see the module docstring). A precision switch (a module's ``mx_scheme``
    changing) fails Dynamo's guards and recompiles once per distinct scheme; switching back
    reuses the earlier compilation.

    Plain ``torch.compile(model)`` is exact too (mxprobe's roundings are opaque custom ops
    under compile), but returns a wrapper whose hooks Dynamo does not watch.
    """
    options = {**INDUCTOR_OPTIONS, **kwargs.pop("options", {})}
    if isinstance(fn, nn.Module):
        eager = fn.forward
        compiled = torch.compile(eager, options=options, **kwargs)
        fn.forward = _HookAwareCompiled(eager, compiled, fn)
        return fn
    compiled = torch.compile(fn, options=options, **kwargs)
    module = getattr(fn, "__self__", None)
    if isinstance(module, nn.Module):
        return _HookAwareCompiled(fn, compiled, module)
    return compiled
