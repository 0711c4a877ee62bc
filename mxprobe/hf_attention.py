"""MX attention products (QKᵀ and PV) in transformers models, through the library's own
attention-function interface (``AttentionInterface`` / ``AttentionMaskInterface``).

``install(model)`` (called by ``convert`` for a transformers ``PreTrainedModel``) gives every
attention module two :class:`~mxprobe.modules.MxMatmul` children, ``mx_qk`` and ``mx_pv``, and
switches the model to the implementation ``mxprobe_<base>`` (``base`` = the model's own
``sdpa`` or ``eager``), which uses ``base``'s mask function. While both products are in full
precision (``mx_scheme`` None, or inside ``full_precision``) it calls ``base``'s own function,
so the model computes exactly what it did unconverted. Otherwise it computes
``softmax(Q Kᵀ · scaling + mask) V`` with both products MX-emulated (operands blocked along the
contraction axis, docs/numerics.md: Q along head_dim, Kᵀ along head_dim, P along keys, V along
keys), the softmax in fp32 and cast back to the query dtype, as transformers' eager path does.
transformers is imported only here, and only for a transformers model.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from mxprobe.modules import MxMatmul, mx_matmul

PREFIX = "mxprobe_"
BASES = ("sdpa", "eager")
# kwargs that change the attention math in ways the MX path does not reproduce.
_UNSUPPORTED = ("softcap", "s_aux", "sinks")


def is_transformers_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(
        model, "set_attn_implementation"
    )


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m).__name__.endswith("Attention") and hasattr(m, "config")
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


def _base_function(base: str, module: nn.Module):
    if base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    # The eager function is each model's own (transformers passes it as the default).
    return sys.modules[type(module).__module__].eager_attention_forward


def _mx_attention(
    base,
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    is_causal=None,
    **kwargs,
):
    qk, pv = getattr(module, "mx_qk", None), getattr(module, "mx_pv", None)
    if qk is None or pv is None:
        raise RuntimeError(
            f"{type(module).__name__} runs mxprobe attention but has no mx_qk/mx_pv products: "
            "call mxprobe.convert on the whole model"
        )
    qk_scheme, pv_scheme = qk.active_scheme(), pv.active_scheme()
    if qk_scheme is None and pv_scheme is None:
        return _base_function(base, module)(
            module,
            query,
            key,
            value,
            attention_mask,
            scaling=scaling,
            dropout=dropout,
            **({"is_causal": is_causal} if base == "sdpa" else {}),
            **kwargs,
        )
    bad = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
    if bad:
        raise NotImplementedError(
            f"{type(module).__name__}: MX attention products do not support {bad}; leave this "
            "model's attention in full precision"
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = mx_matmul(query, key.transpose(-1, -2), qk_scheme) * scaling
    scores = _masked(scores, attention_mask, module, is_causal)
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = mx_matmul(probs, value, pv_scheme)
    return out.transpose(1, 2).contiguous(), probs


def _masked(scores, attention_mask, module, is_causal) -> torch.Tensor:
    """``scores`` with the mask applied as the base implementation would: an additive float
    mask, a boolean mask (True = attend), or none with sdpa's causal rule."""
    lowest = torch.finfo(scores.dtype).min
    if attention_mask is not None:
        mask = attention_mask[..., : scores.shape[-1]]
        if mask.dtype == torch.bool:
            return scores.masked_fill(~mask, lowest)
        return scores + mask
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if causal and scores.shape[-2] > 1:
        q_len, k_len = scores.shape[-2:]
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril()
        return scores.masked_fill(~keep, lowest)
    return scores


def _sdpa(*args, **kwargs):
    return _mx_attention("sdpa", *args, **kwargs)


def _eager(*args, **kwargs):
    return _mx_attention("eager", *args, **kwargs)


_FUNCTIONS = {"sdpa": _sdpa, "eager": _eager}
