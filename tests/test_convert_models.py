"""convert on real third-party models (tiny random-init transformers configs) and on user
classes: every GEMM, norm and attention product emulated, nothing skipped silently."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mxprobe
from mxprobe import hf_attention
from mxprobe.modules import MxMatmul, MxModule
from tests.helpers_hf import MODELS, move_norm_weights_off_grid, pair, tokens

# Every parameter-holding module of these models that is not an embedding table is emulated.
EXPECTED = {
    # model: (GEMM-like modules, norms, attention modules)
    "llama": (15, 5, 2),
    "gpt2": (9, 5, 2),
    "qwen3": (15, 9, 2),
}


def _convert(model, scheme="mxfp8_e4m3"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mxprobe.convert(model, scheme)
    return [str(w.message) for w in caught if "mxprobe.convert left" in str(w.message)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_gemm_norm_and_attention_product_is_emulated(name):
    model, reference = pair(name)
    messages = _convert(model)
    gemms = [m for m in model.modules() if isinstance(m, MxModule) and "weight" in m.mx_roles]
    norms = [m for m in model.modules() if isinstance(m, MxModule) and "norm_affine" in m.mx_roles]
    products = [m for m in model.modules() if isinstance(m, MxMatmul)]
    n_gemm, n_norm, n_attention = EXPECTED[name]
    assert (len(gemms), len(norms), len(products)) == (n_gemm, n_norm, 2 * n_attention)
    desc = mxprobe.describe(model)
    assert {kind for _, kind, _ in desc.left} == {"Embedding"}
    assert desc.attention_left == []
    # The only warning names the embeddings, and says why.
    assert len(messages) == 1 and "embedding lookup" in messages[0]
    unconverted = [m for m in model.modules() if type(m) in (nn.Linear, nn.LayerNorm)]
    assert unconverted == []
    assert sum(p.numel() for p in reference.parameters()) == desc.total_parameters


@pytest.mark.parametrize("name", sorted(MODELS))
def test_full_precision_is_the_unconverted_model_bit_for_bit(name):
    model, reference = pair(name)
    move_norm_weights_off_grid(model)
    move_norm_weights_off_grid(reference)
    _convert(model)
    x = tokens()
    with torch.no_grad():
        want = reference(x).logits
        with mxprobe.full_precision(model):
            got = model(x).logits
        mx = model(x).logits
    assert torch.equal(got, want)
    assert (mx - want).abs().max() > 1e-3  # and MX really changes the output


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_module_computes_differently_in_mx(name):
    """Run every emulated module on its own recorded input, in MX and in full precision."""
    model, _ = pair(name)
    move_norm_weights_off_grid(model)
    _convert(model)
    inputs: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args, output):
            inputs.setdefault(name, args[0].detach())

        return hook

    handles = [
        m.register_forward_hook(record(n))
        for n, m in model.named_modules()
        if isinstance(m, MxModule) and not isinstance(m, MxMatmul)
    ]
    with torch.no_grad(), mxprobe.full_precision(model):
        model(tokens())
    for h in handles:
        h.remove()
    modules = dict(model.named_modules())
    assert len(inputs) == sum(
        isinstance(m, MxModule) and not isinstance(m, MxMatmul) for m in model.modules()
    )
    for n, x in inputs.items():
        with torch.no_grad():
            mx = modules[n](x)
            with mxprobe.full_precision(modules[n]):
                fp = modules[n](x)
        assert not torch.equal(mx, fp), f"{n} ({type(modules[n]).__name__}) is not emulated"


def test_conv1d_matches_the_explicit_formula_forward_and_backward():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(48, 64)  # nf=48 out, nx=64 in; weight stored (64, 48)
    with torch.no_grad():
        layer.bias.normal_()
    mxprobe.convert(layer, "w=e4m3,a=e4m3,bp=e5m2")
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    q4 = lambda t, axis: mxprobe.quantize_mx(t, "e4m3", axis=axis)  # noqa: E731
    q5 = lambda t, axis: mxprobe.quantize_mx(t, "e5m2", axis=axis)  # noqa: E731
    w = layer.weight.detach()  # (in, out): forward blocks run along in = axis 0
    x2, dy2 = x.detach().reshape(-1, 64), dy.reshape(-1, 48)
    want_y = q4(x2, -1) @ q4(w, 0) + layer.bias.detach()
    want_dx = q5(dy2, -1) @ q5(w, 1).t()  # grad-input GEMM: W blocked along out features
    want_dw = q5(x2, 0).t() @ q5(dy2, 0)  # stored layout (in, out)
    torch.testing.assert_close(y.detach().reshape(-1, 48), want_y, rtol=0, atol=1e-5)
    torch.testing.assert_close(x.grad.reshape(-1, 64), want_dx, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, want_dw, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, dy2.sum(0), rtol=0, atol=1e-5)


def test_mx_attention_products_match_the_explicit_formula():
    model, _ = pair("llama")
    mxprobe.convert(model, "a=e4m3")  # only the products' operands are quantized
    attention = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 6, 16, generator=g)  # 4 query heads
    k = torch.randn(2, 2, 6, 16, generator=g)  # 2 key/value heads (grouped-query)
    v = torch.randn(2, 2, 6, 16, generator=g)
    out, probs = hf_attention._mx_attention("sdpa", attention, q, k, v, None, scaling=0.25)

    qe = lambda t, axis: mxprobe.quantize_mx(t, "e4m3", axis=axis)  # noqa: E731
    k4, v4 = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = qe(q, -1) @ qe(k4, -1).transpose(-1, -2) * 0.25
    scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    want_p = torch.softmax(scores, dim=-1)
    want = (qe(want_p, -1) @ qe(v4, -2)).transpose(1, 2)
    torch.testing.assert_close(probs, want_p, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    # Under full precision it is transformers' own sdpa function.
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with mxprobe.full_precision(model):
        fp, _ = hf_attention._mx_attention("sdpa", attention, q, k, v, None, scaling=0.25)
    assert torch.equal(fp, sdpa_attention_forward(attention, q, k, v, None, scaling=0.25)[0])


def test_attention_products_are_reachable_by_name():
    model, _ = pair("qwen3")
    mxprobe.convert(model, "mxfp8_e4m3")
    changed = mxprobe.amend_scheme(model, "a=fp32", "*.mx_qk")
    assert sorted(changed) == [f"model.layers.{i}.self_attn.mx_qk" for i in range(2)]


class OffsetRMSNorm(nn.Module):
    """A user's norm that scales by 1 + w (as Gemma's does), in its own order of operations."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class NotANorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x + self.weight


class MyDense(nn.Module):
    """A user's linear with its weight stored (out, in)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)

    def forward(self, x):
        return x @ self.weight.t()


def test_registered_offset_norm_quantizes_one_plus_w_and_snaps_and_reports_it(registry):
    mxprobe.register_adapter(OffsetRMSNorm, "norm")
    torch.manual_seed(0)
    model = nn.Sequential(OffsetRMSNorm(64))
    with torch.no_grad():
        model[0].weight.copy_(-0.06 + 0.01 * torch.randn(64))  # 1 + w in [0.9, 0.97]
    latent = model[0].weight.detach().clone()
    mxprobe.convert(model, "norm=e4m3")
    norm = model[0]
    assert norm.mx_weight_offset == 1.0
    x = torch.randn(5, 64)
    effective = mxprobe.quantize_mx(1 + latent, "e4m3")  # the floor scale clips to 0.875
    assert torch.equal(effective, torch.full_like(effective, 0.875))
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(model(x), normed * effective, rtol=0, atol=0)
    assert torch.equal(norm.forward_operand("weight"), 1 + latent)
    mxprobe.amend_scheme(model, "norm=fp32", snap=True)
    assert torch.equal(norm.weight.detach(), effective - 1)  # the value the forward used


def test_a_registered_norm_that_is_not_one_is_refused(registry):
    mxprobe.register_adapter(NotANorm, "norm")
    with pytest.raises(ValueError, match="not normalize"):
        mxprobe.convert(nn.Sequential(NotANorm(8)), "mxfp8_e4m3")


def test_user_linear_registered_by_name_is_emulated(registry):
    mxprobe.register_adapter(f"{__name__}.MyDense", "linear")
    torch.manual_seed(0)
    model = nn.Sequential(MyDense(64, 32))
    x = torch.randn(4, 64)
    fp = model(x)
    mxprobe.convert(model, "w=e4m3,a=e4m3")
    assert type(model[0]).__name__ == "MxMyDense"
    want = mxprobe.quantize_mx(x, "e4m3") @ mxprobe.quantize_mx(model[0].weight, "e4m3").t()
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-6)
    with mxprobe.full_precision(model):
        assert torch.equal(model(x), fp)


class MyLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass with its own forward (as timm's is)."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)


def test_layernorm_subclass_keeps_its_forward_and_is_emulated():
    torch.manual_seed(0)
    model = nn.Sequential(MyLayerNorm(64))
    move_norm_weights_off_grid(model)
    with torch.no_grad():
        model[0].weight.copy_(1 + 0.05 * torch.randn(64))
    x = torch.randn(3, 64)
    fp = model(x)
    mxprobe.convert(model, "norm=e4m3")
    assert type(model[0]).__name__ == "MxMyLayerNorm"
    w = mxprobe.quantize_mx(model[0].weight, "e4m3")
    b = mxprobe.quantize_mx(model[0].bias, "e4m3")
    assert torch.equal(model(x), F.layer_norm(x, (64,), w, b, 1e-5))
    with mxprobe.full_precision(model):
        assert torch.equal(model(x), fp)


def test_left_modules_are_named_with_the_reason():
    class Unknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.scale

    model = nn.Sequential(nn.Embedding(10, 4), nn.Conv1d(4, 4, 1), Unknown(), nn.Linear(4, 4))
    with pytest.warns(UserWarning) as record:
        mxprobe.convert(model, "mxfp8_e4m3")
    (message,) = [str(w.message) for w in record if "convert left" in str(w.message)]
    assert "0: embedding lookup" in message
    assert "1: convolution" in message
    assert "2: unknown class" in message and "register_adapter(Unknown" in message
    desc = mxprobe.describe(model)
    assert [name for name, _, _ in desc.left] == ["0", "1", "2"]
    assert desc.emulated_parameters == 4 * 4 + 4
    assert f"({100 * desc.emulated_share:.1f} %)" in str(desc)


def test_role_and_glob_that_match_nothing_raise_with_the_fix():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    mxprobe.convert(model, "mxfp8_e4m3")
    with pytest.raises(ValueError, match=r"sets norm_affine.*no MX module.*register_adapter"):
        mxprobe.amend_scheme(model, "norm=bf16")
    with pytest.raises(ValueError, match=r"sets norm_affine"):
        mxprobe.set_scheme(model, "mxfp8_e4m3,norm=bf16")
    with pytest.raises(ValueError, match=r"override 'lm_hed' matches no MX module.*fix the glob"):
        mxprobe.convert(model, "mxfp8_e4m3", overrides={"lm_hed": "fp32"})
    with pytest.raises(ValueError, match=r"no MX module matches 'decoder\.\*'"):
        mxprobe.amend_scheme(model, "w=bf16", "decoder.*")


def test_amend_reports_only_modules_whose_rounding_changed():
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
    mxprobe.convert(model, "mxfp8_e4m3")
    assert sorted(mxprobe.amend_scheme(model, "norm=bf16")) == ["0"]  # the Linear has no norm
    assert mxprobe.amend_scheme(model, "norm=bf16") == {}  # already in force


def test_snap_under_stochastic_rounding_is_refused():
    model = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32))
    mxprobe.convert(model, "mxfp8_e4m3,round=stochastic")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="snap=True under stochastic rounding"):
        mxprobe.amend_scheme(model, "norm=bf16", snap=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert model[0].mx_scheme.norm_affine == "fp8_e4m3"  # nothing was changed
    mxprobe.amend_scheme(model, "norm=bf16")  # without snap it is allowed
