"""MX products for the GEMMs a module computes in its own code (torch functions called inside its
``forward``), so coverage does not hang on one adapter per library class.

``ProductScope(module)`` is a ``TorchFunctionMode`` active during ``module``'s own forward code,
and only there: calls into submodules run unscoped (``convert`` gives those their own MX
classes). Inside it:

- a product of two activations (``matmul``, ``@``, ``bmm``, ``baddbmm``) is the next of
  ``module.mx_products`` (``mx_qk`` first, then ``mx_pv``): ``MxMatmul`` blocks ``a`` along its
  last axis and ``b`` along its second-to-last, the contraction axis of each operand;
- ``F.scaled_dot_product_attention`` is computed as those two products around an fp32 softmax
  (mask, causal rule, scale, grouped heads and dropout as torch defines them);
- ``F.linear`` (or a product) with one of ``module``'s own parameters as an operand is an MX
  linear under ``module``'s scheme (a router's ``F.linear(x, self.weight)``); ``F.linear`` with
  any other weight raises, its role being unknown;
- any other GEMM-like function (``einsum``, ``mm``, ``addmm``, ``_grouped_mm``...), or more
  activation products than the module has, raises instead of running unemulated.

While every scheme involved is ``None`` (unconverted, ``full_precision``), the module's forward
runs without the scope, exactly as the library wrote it.
"""

from __future__ import annotations

import inspect
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.overrides import TorchFunctionMode

from mxprobe.modules import MxMatmul, NotEmulatedError, mx_linear, mx_matmul
from mxprobe.scheme import PrecisionScheme

PRODUCTS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm)
BIASED_PRODUCTS = (torch.baddbmm, torch.Tensor.baddbmm)
LINEARS = (F.linear,)
ATTENTION = (F.scaled_dot_product_attention,)
# GEMM-like functions the scope does not emulate: refused rather than run in full precision.
REFUSED = (
    torch.einsum,
    torch.mm,
    torch.Tensor.mm,
    torch.addmm,
    torch.Tensor.addmm,
    torch.addbmm,
    torch.Tensor.__rmatmul__,
    *(f for f in (getattr(torch, "_grouped_mm", None),) if f is not None),
)
_BADDBMM = inspect.signature(lambda input, batch1, batch2, *, beta=1, alpha=1: None)


class ProductScope(TorchFunctionMode):
    """Route the GEMMs of ``module``'s own forward code through MX products (module docstring)."""

    def __init__(self, module: nn.Module, products: list[MxMatmul]):
        super().__init__()
        self.module = module
        self.products = products
        self.used = 0
        self.depth = 0  # > 0 while a submodule's forward runs: calls pass through unchanged
        self.thread = threading.get_ident()
        self.own = {_storage(p) for p in module.parameters(recurse=False)}

    def __enter__(self):
        self._hooks = (
            register_module_forward_pre_hook(self._enter_submodule),
            register_module_forward_hook(self._leave_submodule, always_call=True),
        )
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def _enter_submodule(self, module, args):
        if threading.get_ident() == self.thread:
            self.depth += 1

    def _leave_submodule(self, module, args, output):
        if threading.get_ident() == self.thread:
            self.depth -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth:
            return func(*args, **kwargs)
        if func in PRODUCTS:
            return self._product(*args, **kwargs)
        if func in BIASED_PRODUCTS:
            bound = _BADDBMM.bind(*args, **kwargs).arguments
            product = self._product(bound["batch1"], bound["batch2"])
            return bound.get("beta", 1) * bound["input"] + bound.get("alpha", 1) * product
        if func in LINEARS:
            return self._linear(*args, **kwargs)
        if func in ATTENTION:
            return self._attention(*args, **kwargs)
        if func in REFUSED:
            raise NotEmulatedError(
                f"{type(self.module).__name__} calls {getattr(func, '__name__', func)}, which "
                "mxprobe does not emulate inside a module's own code; keep this module in full "
                "precision (an override) or compute the product with torch.matmul"
            )
        return func(*args, **kwargs)

    def _scheme(self) -> PrecisionScheme | None:
        return getattr(self.module, "active_scheme", lambda: None)()

    def _product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if _storage(b) in self.own:  # x @ W with W (in, out): a linear, not an activation product
            return self._linear(a, b.transpose(-1, -2))
        if self.used >= len(self.products):
            raise RuntimeError(
                f"{type(self.module).__name__} computed more activation products in one forward "
                f"than the {len(self.products)} mxprobe gave it; it cannot be emulated as "
                "attention (QKᵀ then PV)"
            )
        product = self.products[self.used]
        self.used += 1
        return mx_matmul(a, b, product.active_scheme())

    def _linear(self, x, weight, bias=None) -> torch.Tensor:
        if _storage(weight) not in self.own:
            raise NotEmulatedError(
                f"{type(self.module).__name__} calls F.linear with a weight that is not one of its "
                "own parameters; mxprobe cannot tell which role it has: keep this module in full "
                "precision (an override) or register the weight's module"
            )
        scheme = self._scheme()
        if scheme is None:
            return F.linear(x, weight, bias)
        return mx_linear(x, weight, bias, scheme)

    def _attention(
        self,
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
    ) -> torch.Tensor:
        """``F.scaled_dot_product_attention`` as its documented math, with MX products."""
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            groups = query.shape[-3] // key.shape[-3]
            key = key.repeat_interleave(groups, dim=-3)
            value = value.repeat_interleave(groups, dim=-3)
        scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
        scores = self._product(query, key.transpose(-2, -1)) * scale
        if is_causal:
            keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        if dropout_p:
            probs = F.dropout(probs, p=dropout_p)
        return self._product(probs, value)


def _storage(t) -> int | None:
    """The address of ``t``'s storage (a parameter's views share it), or None."""
    if not isinstance(t, torch.Tensor) or t.is_meta:
        return None
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without plain storage
        return None


def run_scoped(module: nn.Module, forward, *args, **kwargs):
    """``forward(*args, **kwargs)`` with ``module``'s own GEMMs MX-emulated (unscoped while no
    scheme of the module or its products is in force)."""
    products = [getattr(module, name) for name in ("mx_qk", "mx_pv") if hasattr(module, name)]
    schemes = [module.active_scheme(), *(p.active_scheme() for p in products)]
    if all(s is None for s in schemes):
        return forward(*args, **kwargs)
    return _scoped(module, products, forward, *args, **kwargs)


# Dynamo cannot trace a module's own code under the scope (its hooks and product count run at
# trace time): inside a compiled model the scoped module runs eagerly, a graph break, exact.
@torch.compiler.disable
def _scoped(module: nn.Module, products: list, forward, *args, **kwargs):
    with ProductScope(module, products):
        return forward(*args, **kwargs)
