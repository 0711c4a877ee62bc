"""torch.compile for MX-emulated models, without losing the emulated roundings.

Inductor by default keeps a value in fp32 across a ``.to(bfloat16).to(float32)`` pair inside a
fused kernel, which silently drops the elementwise bf16 rounding that MX emulation relies on
(measured on the proxy: forward outputs off by 7e-2, gradients by 1-3 %). With
``emulate_precision_casts`` it rounds as eager does; the proxy's compiled forward is then bitwise
equal to eager and its gradients equal up to reduction order (tests/test_compiled.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

INDUCTOR_OPTIONS = {"emulate_precision_casts": True}


def compile_model(fn: Callable, **kwargs) -> Callable:
    """``torch.compile(fn)`` with the Inductor options exact MX emulation needs.

    ``fn`` is a module or a function; keyword arguments go to ``torch.compile``. A precision
    switch (a module's ``mx_scheme`` changing) fails Dynamo's guards and recompiles once per
    distinct scheme; switching back reuses the earlier compilation.
    """
    options = {**INDUCTOR_OPTIONS, **kwargs.pop("options", {})}
    return torch.compile(fn, options=options, **kwargs)
