"""Mixture-of-experts layers, routers, registration misuse and all-or-nothing conversion: each
expert GEMM against the explicit per-expert formula (forward and both gradients), nothing
accepted that then breaks, and a failed convert leaves the model as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mxprobe
from mxprobe.modules import MxModule
from tests.helpers_hf import pair, tokens

SCHEME = "w=e4m3,a=e4m3,bp=e4m3"  # every GEMM operand e4m3, outputs unrounded


def qe(t: torch.Tensor, axis: int) -> torch.Tensor:
    return mxprobe.quantize_mx(t, "e4m3", axis=axis)


def _quiet_convert(model, scheme=SCHEME, overrides=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mxprobe.convert(model, scheme, overrides)


def _routing(tokens_: int, experts: int, top_k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens_)])
    weights = torch.softmax(torch.randn(tokens_, top_k, generator=g), dim=-1)
    return index, weights


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_each_expert_gemm_is_the_explicit_formula_forward_and_backward(name):
    model, _ = pair(name)
    _quiet_convert(model)
    experts = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 64, generator=g, requires_grad=True)
    index, weights = _routing(40, experts.num_experts, 2, seed=4)
    out = experts(hidden, index, weights)
    grad_out = torch.randn(out.shape, generator=g)
    out.backward(grad_out)

    # The explicit formula, expert by expert (tokens of expert e in token order, blocks of the
    # backward's token axis starting at that expert's first token).
    transposed = experts.is_transposed

    def w(name, e):  # (out, in)
        t = getattr(experts, name)[e].detach()
        return t.t() if transposed else t

    def b(name, e):
        return getattr(experts, name + "_bias")[e].detach() if experts.has_bias else 0

    want = torch.zeros_like(out)
    want_dx = torch.zeros_like(hidden)
    for e in range(experts.num_experts):
        token, slot = torch.where(index == e)
        if not len(token):
            continue
        x = hidden.detach()[token]
        h = (qe(x, -1) @ qe(w("gate_up_proj", e), -1).t() + b("gate_up_proj", e)).requires_grad_()
        act = experts._apply_gate(h)
        y = qe(act.detach(), -1) @ qe(w("down_proj", e), -1).t() + b("down_proj", e)
        want.index_add_(0, token, y * weights[token, slot, None])
        dy = grad_out[token] * weights[token, slot, None]
        d_act = qe(dy, -1) @ qe(w("down_proj", e), 0)
        d_down = qe(dy, 0).t() @ qe(act.detach(), 0)
        (dh,) = torch.autograd.grad(act, h, d_act)
        d_gate_up = qe(dh, 0).t() @ qe(x, 0)
        want_dx.index_add_(0, token, qe(dh, -1) @ qe(w("gate_up_proj", e), 0))
        for param, dw in (("down_proj", d_down), ("gate_up_proj", d_gate_up)):
            got = getattr(experts, param).grad[e]
            torch.testing.assert_close(got.t() if transposed else got, dw, rtol=1e-5, atol=1e-6)
        if experts.has_bias:
            torch.testing.assert_close(experts.down_proj_bias.grad[e], dy.sum(0))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, want_dx, rtol=1e-5, atol=1e-6)


class ListExperts(nn.Module):
    """An older / user MoE layout: nn.ModuleList of plain Linear experts and a Linear router."""

    def __init__(self, d=32, experts=4):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))

    def forward(self, x):
        choice = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = torch.where(choice == e)[0]
            out = out.index_add(0, rows, expert(x[rows]))
        return out


def test_modulelist_experts_of_plain_linears_are_each_an_mx_linear():
    torch.manual_seed(0)
    layer = _quiet_convert(ListExperts())
    x = torch.randn(64, 32)
    choice = F.linear(qe(x, -1), qe(layer.router.weight, -1)).argmax(-1)
    want = torch.zeros_like(x)
    for e, expert in enumerate(layer.experts):
        rows = torch.where(choice == e)[0]
        y = qe(x[rows], -1) @ qe(expert.weight, -1).t() + expert.bias
        want.index_add_(0, rows, y)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


def test_routers_are_full_precision_by_default_and_said_so_and_an_override_emulates_them():
    model, _ = pair("mixtral")
    with pytest.warns(UserWarning, match=r"MoE routers: kept in full precision.*'\*\.gate'"):
        mxprobe.convert(model, "mxfp8_e4m3")
    text = str(mxprobe.describe(model))
    assert "MoE routers in full precision" in text and "model.layers.0.mlp.gate" in text
    router = model.model.layers[0].mlp.gate
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(router(x)[0], F.linear(x, router.weight))
        mxprobe.set_scheme(model, "mxfp8_e4m3", {"*.gate": "elem=fp32"})
        assert "MoE routers in full precision" not in str(mxprobe.describe(model))
        logits = router(x)[0]
    assert torch.equal(logits, F.linear(qe(x, -1), qe(router.weight, -1)))


def test_monitors_and_snapping_reach_the_expert_weights():
    model, _ = pair("qwen3_moe")
    _quiet_convert(model, "mxfp8_e4m3")
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, MxModule)
    assert set(experts.mx_param_roles) == {"gate_up_proj", "down_proj"}
    before = experts.down_proj.detach().clone()
    changed = mxprobe.amend_scheme(model, "w=bf16", "*.experts", snap=True)
    assert "model.layers.0.mlp.experts" in changed
    assert torch.equal(experts.down_proj, qe(before, -1))


def test_experts_or_a_router_registered_as_linear_are_refused_and_the_model_is_unchanged(
    registry,
):
    from transformers.models.mixtral import modeling_mixtral as mixtral

    for cls in (mixtral.MixtralExperts, mixtral.MixtralTopKRouter):
        model, _ = pair("mixtral")
        registry.register_adapter(cls, "linear")
        classes = [type(m) for m in model.modules()]
        implementation = model.config._attn_implementation
        with pytest.raises(ValueError, match=f"{cls.__name__} is registered as a linear"):
            _quiet_convert(model)
        registry.undo()
        assert [type(m) for m in model.modules()] == classes
        assert model.config._attn_implementation == implementation
        assert not any(isinstance(m, MxModule) for m in model.modules())


def test_a_convert_that_fails_late_leaves_no_module_converted():
    model, reference = pair("llama")
    with pytest.raises(ValueError, match="matches no MX module"):
        mxprobe.convert(model, "mxfp8_e4m3", {"*.no_such_module": "fp32"})
    assert not any(isinstance(m, MxModule) for m in model.modules())
    assert model.config._attn_implementation == reference.config._attn_implementation
    with torch.no_grad():
        assert torch.equal(model(tokens()).logits, reference(tokens()).logits)


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_a_leading_star_dot_glob_matches_the_top_level_lm_head_everywhere(name):
    model, _ = pair(name)
    _quiet_convert(model, "mxfp8_e4m3", {"*.lm_head": "fp32"})
    assert model.lm_head.mx_scheme == mxprobe.PrecisionScheme()
    assert list(mxprobe.amend_scheme(model, "w=bf16", "*.lm_head")) == ["lm_head"]


def test_the_lm_head_glob_works_on_the_shipped_llm_too():
    from mxprobe.models.llm import LLM, LLMConfig

    model = LLM(LLMConfig(vocab_size=64, d_model=32, n_layer=1, n_head=2, context=16))
    _quiet_convert(model, "mxfp8_e4m3", {"*.lm_head": "fp32"})
    assert model.lm_head.mx_scheme == mxprobe.PrecisionScheme()


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


def test_parameter_free_activations_are_converted_or_named():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), Swish())
    with pytest.warns(UserWarning, match=r"3: unknown class .*Swish"):
        mxprobe.convert(model, "mxfp8_e4m3")
    assert isinstance(model[1], MxModule)
    assert "Swish" in str(mxprobe.describe(model))


class SdpaAttention(nn.Module):
    """timm/litgpt-style attention: qkv Linear, F.scaled_dot_product_attention, proj Linear."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x, mask=None):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


def test_a_registered_attention_class_gets_mx_products_around_its_own_sdpa_call(registry):
    registry.register_adapter(SdpaAttention, "attention")
    torch.manual_seed(0)
    layer = SdpaAttention()
    x = torch.randn(2, 6, 32)
    mask = torch.rand(6, 6) > 0.3
    mask.fill_diagonal_(True)
    with torch.no_grad():
        want = [layer(x), layer(x, mask)]
    _quiet_convert(layer, "a=e4m3")  # only the products' (and linears' input) operands
    assert isinstance(layer.mx_qk, mxprobe.MxMatmul)
    with torch.no_grad():
        with mxprobe.full_precision(layer):
            assert torch.equal(layer(x), want[0]) and torch.equal(layer(x, mask), want[1])
        mxprobe.set_scheme(layer, "fp32")
        torch.testing.assert_close(layer(x), want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(x, mask), want[1], rtol=1e-5, atol=1e-6)
        mxprobe.set_scheme(layer, "a=e4m3")
        got = layer(x, mask)
    q, k, v = layer.qkv(qe(x, -1)).view(2, 6, 3, 4, 8).permute(2, 0, 3, 1, 4)
    scores = (qe(q, -1) @ qe(k.transpose(-2, -1), -2)) / 8**0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    y = (qe(probs, -1) @ qe(v, -2)).transpose(1, 2).reshape(2, 6, 32)
    torch.testing.assert_close(got, layer.proj(qe(y, -1)), rtol=1e-5, atol=1e-6)


def test_a_kept_router_runs_its_own_code_even_on_a_float_copy_of_a_bf16_weight():
    # DeepSeek-V3's router computes F.linear(x.float(), weight.float()): with bf16 parameters that
    # is a copy of its weight, which the product scope refuses. Kept in full precision (the
    # default) it must run as the unconverted model; named by an override, it is refused loudly.
    model, reference = pair("deepseek_v3")
    model, reference = model.to(torch.bfloat16), reference.to(torch.bfloat16)
    _quiet_convert(model, "mxfp8_e4m3")
    router = model.model.layers[-1].mlp.gate
    assert type(router).__name__.endswith("Router") and router.mx_scheme is None
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        got, want = router(x), reference.model.layers[-1].mlp.gate(x)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        mxprobe.set_scheme(model, "mxfp8_e4m3", {"*.gate": "mxfp8_e4m3"})
        with pytest.raises(mxprobe.NotEmulatedError, match="not one of its own parameters"):
            router(x)
