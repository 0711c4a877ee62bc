"""Mixture-of-experts layers emulated per expert: the expert layout transformers ships (3-D
``gate_up_proj``/``up_proj`` and ``down_proj`` parameters, optional per-expert biases, a gate
function of the model's own such as gpt-oss's clamped SwiGLU) behind its experts interface.

Each expert's two projections are MX linears over the tokens routed to that expert, exactly as
if the expert were an ``nn.Linear``: forward ``act`` along features and ``weight`` along
in-features (blocks never cross experts), backward ``weight_bp``, ``grad_dgrad``, and
``act_bp``/``grad_wgrad`` along that expert's tokens, in blocks that start at its first token.
Biases are rounded by ``elementwise``. Routing, the gate function, the weighting by router
scores and the sum over the top-k follow transformers' grouped implementation; while the
experts are in full precision the model's own implementation runs untouched.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from mxprobe.modules import LINEAR_ROLES, MxModule, NotEmulatedError, mx_linear

_PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


_LAYOUT = ("has_gate", "has_bias", "is_transposed", "num_experts", "_apply_gate")


def has_experts_layout(module: nn.Module) -> bool:
    """Whether ``module`` has the attributes and 3-D ``down_proj`` of transformers' experts."""
    down = module._parameters.get("down_proj")
    return (
        all(hasattr(module, a) for a in _LAYOUT)
        and isinstance(down, torch.Tensor)
        and down.dim() == 3
    )


def is_hf_experts(module: nn.Module) -> bool:
    """A transformers experts module (``@use_experts_implementation``) with 3-D expert weights."""
    return type(module).__module__.startswith("transformers.") and has_experts_layout(module)


class MxExpertsAdapter(MxModule):
    """Mixin for a transformers experts module: every expert GEMM MX-emulated (module docstring)."""

    mx_roles = LINEAR_ROLES

    @property
    def mx_param_roles(self) -> dict[str, tuple[str, int]]:
        # Stored (experts, out, in), or (experts, in, out) when transposed: blocks of the
        # forward weight run along in-features.
        axis = -2 if self.is_transposed else -1
        roles = {}
        for name in _PROJECTIONS:
            if isinstance(self._parameters.get(name), torch.Tensor):
                roles[name] = ("weight", axis)
                if isinstance(self._parameters.get(name + "_bias"), torch.Tensor):
                    roles[name + "_bias"] = ("elementwise", -1)
        return roles

    def forward(self, hidden_states, *args, **kwargs):
        scheme = self.active_scheme()
        if scheme is None:
            return super().forward(hidden_states, *args, **kwargs)
        if getattr(self, "_is_expert_parallel", False):
            raise NotEmulatedError(
                f"{type(self).__name__}: expert parallelism is not emulated by mxprobe"
            )
        top_k_index, top_k_weights = _routing(super().forward, hidden_states, args, kwargs)
        return _experts_forward(self, scheme, hidden_states, top_k_index, top_k_weights)


def _routing(forward, hidden_states, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert indices, routing weights) as the module's own forward names them."""
    bound = inspect.signature(forward).bind(hidden_states, *args, **kwargs).arguments
    _, index, weights = list(bound.values())[:3]
    return index, weights


def _expert_linear(module, name, expert, x, scheme):
    weight = getattr(module, name)[expert]
    if module.is_transposed:  # stored (in, out): the (out, in) view of the same values
        weight = weight.t()
    bias = getattr(module, name + "_bias")[expert] if module.has_bias else None
    return mx_linear(x, weight, bias, scheme)


def _per_expert(module, name, x, counts, scheme) -> torch.Tensor:
    """Rows of ``x`` grouped by expert (``counts`` rows each, in expert order), each group
    through its own expert's projection ``name``."""
    outputs, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            rows = x[start : start + count]
            outputs.append(_expert_linear(module, name, expert, rows, scheme))
            start += count
    return torch.cat(outputs)


def _experts_forward(module, scheme, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    num_tokens, hidden_dim = hidden_states.shape[0], hidden_states.shape[-1]
    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    if bool((expert_ids >= module.num_experts).any()):
        raise NotEmulatedError(
            f"{type(module).__name__}: routing to experts this rank does not hold (expert "
            "parallelism) is not emulated by mxprobe"
        )
    sorted_ids, order = torch.sort(expert_ids, stable=True)
    grouped = hidden_states[order // top_k]
    counts = torch.bincount(sorted_ids, minlength=module.num_experts).tolist()
    first = "gate_up_proj" if module.has_gate else "up_proj"
    out = _per_expert(module, first, grouped, counts, scheme)
    out = module._apply_gate(out) if module.has_gate else module.act_fn(out)
    out = _per_expert(module, "down_proj", out, counts, scheme)
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    restored = torch.empty_like(out)
    restored[order] = out
    return restored.view(num_tokens, top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)
