"""MX attention products (QKᵀ and PV) in transformers models, through the library's own
attention-function interface (``AttentionInterface`` / ``AttentionMaskInterface``).

``install(model)`` (called by ``convert`` for a transformers ``PreTrainedModel``) gives every
attention module two :class:`~mxprobe.modules.MxMatmul` children, ``mx_qk`` and ``mx_pv``, and
switches the model to the implementation ``mxprobe_<base>`` (``base`` = the model's own
``sdpa`` or ``eager``), which uses ``base``'s mask function. While both products are in full
precision (``mx_scheme`` None, or inside ``full_precision``) it calls ``base``'s own function,
so the model computes exactly what it did unconverted. Otherwise it runs the model's own eager
attention function (its scaling, position bias, sink logits, soft-capping, grouped heads) with
its two matmuls routed through the MX products by :class:`mxprobe.products.ProductScope`
(operands blocked along the contraction axis, docs/numerics.md: Q along head_dim, Kᵀ along
head_dim, P along keys, V along keys); a boolean or missing mask becomes the additive mask that
function expects, with sdpa's causal rule.
transformers is imported only here, and only for a transformers model.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from mxprobe.modules import MxMatmul
from mxprobe.products import ProductScope

PREFIX = "mxprobe_"
BASES = ("sdpa", "eager")


def is_transformers_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(
        model, "set_attn_implementation"
    )


def named_like_attention(module: nn.Module) -> bool:
    """The one heuristic for "an attention module": its class name ends in ``Attention``."""
    return type(module).__name__.endswith("Attention")


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if named_like_attention(m) and hasattr(m, "config")
    ]


def install(model: nn.Module) -> list[str]:
    """Route ``model``'s attention through MX products; returns the attention modules' names.

    Raises ``ValueError`` for an attention implementation other than sdpa/eager (flash and
    flex kernels cannot be emulated operand by operand).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    implementation = model.config._attn_implementation or "eager"
    base = implementation.removeprefix(PREFIX)
    if base not in BASES:
        raise ValueError(
            f"{type(model).__name__} uses attn_implementation={implementation!r}; mxprobe "
            f"emulates attention products on {BASES} only: build the model with "
            "attn_implementation='sdpa' (or convert with overrides leaving attention fp32)"
        )
    name = PREFIX + base
    AttentionInterface.register(name, _FUNCTIONS[base])
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.set_attn_implementation(name)
    modules = _attention_modules(model)
    for _, module in modules:
        if not isinstance(getattr(module, "mx_qk", None), MxMatmul):
            module.mx_qk = MxMatmul()
            module.mx_pv = MxMatmul()
    return [n for n, _ in modules]


def _eager_function(module: nn.Module):
    """The model's own eager attention function (what its attention module calls by default)."""
    function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if function is None:
        raise ValueError(
            f"{type(module).__name__} ({type(module).__module__}) defines no "
            "eager_attention_forward, so mxprobe cannot run its attention math with MX products; "
            "convert with overrides that leave this attention in full precision"
        )
    return function


def _base_function(base: str, module: nn.Module):
    if base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    return _eager_function(module)


def _mx_attention(base, module, query, key, value, attention_mask, is_causal=None, **kwargs):
    qk, pv = getattr(module, "mx_qk", None), getattr(module, "mx_pv", None)
    if qk is None or pv is None:
        raise RuntimeError(
            f"{type(module).__name__} runs mxprobe attention but has no mx_qk/mx_pv products: "
            "call mxprobe.convert on the whole model"
        )
    if qk.active_scheme() is None and pv.active_scheme() is None:
        extra = {"is_causal": is_causal} if base == "sdpa" else {}
        return _base_function(base, module)(
            module, query, key, value, attention_mask, **extra, **kwargs
        )
    # The model's own eager math (its scaling, position bias, sinks, soft-capping, grouped
    # heads), with its two matmuls routed through mx_qk and mx_pv.
    mask = _additive_mask(attention_mask, query, key, module, is_causal)
    with ProductScope(module, [qk, pv]):
        return _eager_function(module)(module, query, key, value, mask, **kwargs)


def _additive_mask(attention_mask, query, key, module, is_causal) -> torch.Tensor | None:
    """The mask the eager function expects (additive, float) for what the base was given: a
    boolean mask (True = attend), a float mask, or none with sdpa's causal rule."""
    lowest = torch.finfo(query.dtype).min
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        if mask.dtype == torch.bool:
            return torch.zeros((), dtype=query.dtype, device=mask.device).masked_fill(~mask, lowest)
        return mask
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    q_len, k_len = query.shape[-2], key.shape[-2]
    if not (causal and q_len > 1):
        return None
    keep = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()
    return torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(~keep, lowest)


def _sdpa(*args, **kwargs):
    return _mx_attention("sdpa", *args, **kwargs)


def _eager(*args, **kwargs):
    return _mx_attention("eager", *args, **kwargs)


_FUNCTIONS = {"sdpa": _sdpa, "eager": _eager}
