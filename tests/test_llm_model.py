"""mxprobe.models.llm: the OLMo-style decoder, its sizes, parameter counts and FLOPs helper."""

import pytest
import torch
from mxprobe.models.llm import (
    LLM,
    SIZES,
    LLMConfig,
    count_parameters,
    size_table,
    steps_for_flops,
)
from torch import nn

import mxprobe
from mxprobe.modules import MxGELU, MxLayerNorm, MxLinear, MxMatmul, MxSiLU


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return LLM(LLMConfig(**kw))


def test_config_fills_shape_from_size_and_keeps_explicit_fields():
    c = LLMConfig(size="L4")
    assert (c.n_layer, c.d_model, c.n_head, c.context, c.head_size) == (4, 256, 4, 512, 64)
    c = LLMConfig(size="L7", context=128)  # any L<n>
    assert (c.n_layer, c.d_model, c.context) == (7, 448, 128)
    assert LLMConfig(size="tiny").n_layer == SIZES["tiny"][0]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"size": "huge"}, "unknown size 'huge'"),
        ({"d_model": 60, "n_head": 7}, "not a multiple"),
        ({"mlp": "relu"}, "unknown mlp 'relu'; expected one of gelu, swiglu"),
        ({"n_layer": 0}, "n_layer must be >= 1"),
    ],
)
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        LLMConfig(**kw)


@pytest.mark.parametrize(
    "kw",
    [{}, {"mlp": "swiglu"}, {"norm_bias": True, "qk_norm": False}, {"mx_attention": True}],
)
def test_count_parameters_matches_the_instantiated_model(kw):
    config = LLMConfig(**kw)
    model = LLM(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())
    assert count_parameters(config, embedding=False) == count_parameters(config) - 256 * 64


def test_paper_sizes_follow_the_olmo_formula():
    # Per block 12 d^2 (qkv, proj, 4x MLP) + 4 d (ln_1, ln_2, q_norm, k_norm); untied embeddings.
    for n in (4, 12):
        d = 64 * n
        expected = n * (12 * d * d + 4 * d) + 2 * 256 * d + d
        assert count_parameters(LLMConfig(size=f"L{n}")) == expected


def test_steps_for_flops_is_6nd_with_512x512_batches():
    config = LLMConfig(size="L4")
    n = count_parameters(config, embedding=False)
    assert steps_for_flops(6 * n * 512 * 512 * 1000, config) == 1000
    assert steps_for_flops(1.0, config) == 1
    assert steps_for_flops(6 * n * 8 * 64 * 10, config, batch_size=8, context=64) == 10
    table = size_table(["tiny", "L12"], flops=1e18)
    assert "L12" in table and "85,365,504" in table and "steps @ 1e+18" in table


def test_architecture_is_olmo_style():
    model = _model(size="tiny")
    assert all(m.bias is None for m in model.modules() if isinstance(m, (nn.Linear, nn.LayerNorm)))
    assert model.lm_head.weight.data_ptr() != model.wte.weight.data_ptr()  # untied
    attn = model.blocks[0].attn
    assert isinstance(attn.q_norm, nn.LayerNorm) and isinstance(model.blocks[0].mlp.act, nn.GELU)
    assert not hasattr(attn, "scores")
    swiglu = _model(size="tiny", mlp="swiglu", norm_bias=True, qk_norm=False).blocks[0]
    assert isinstance(swiglu.mlp.act, nn.SiLU) and swiglu.mlp.gate is not None
    assert swiglu.ln_1.bias is not None and swiglu.attn.q_norm is None


@pytest.mark.parametrize("mx_attention", [False, True])
def test_causal_future_tokens_do_not_change_past_logits(mx_attention):
    model = _model(size="tiny", mx_attention=mx_attention)
    x = torch.randint(0, 256, (2, 32))
    y = x.clone()
    y[:, 20:] = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 32, 256)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_mx_attention_path_equals_sdpa_when_unconverted():
    x = torch.randint(0, 256, (2, 64))
    a = _model(size="tiny", mlp="swiglu")
    b = _model(size="tiny", mlp="swiglu", mx_attention=True)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def test_convert_reaches_every_linear_norm_activation_and_attention_product():
    model = _model(size="tiny", mx_attention=True, mlp="swiglu")
    keys = list(model.state_dict())
    mxprobe.convert(model, "mxfp8_e4m3")
    assert list(model.state_dict()) == keys
    plain = (nn.Linear, nn.LayerNorm, nn.GELU, nn.SiLU)
    assert not [n for n, m in model.named_modules() if type(m) in plain]
    kinds = {type(m) for m in model.modules()}
    assert {MxLinear, MxLayerNorm, MxSiLU, MxMatmul} <= kinds
    assert len([m for m in model.modules() if isinstance(m, MxMatmul)]) == 2 * 2
    assert isinstance(_model(size="tiny").blocks[0].mlp.act, nn.GELU)
    assert MxGELU in {type(m) for m in mxprobe.convert(_model(size="tiny"), "bf16").modules()}


def test_mx_emulation_changes_the_output_and_trains():
    x = torch.randint(0, 256, (2, 64))
    ref = _model(size="tiny", mx_attention=True)
    model = mxprobe.convert(_model(size="tiny", mx_attention=True), "mxfp8_e4m3")
    out = model(x)
    assert not torch.allclose(out, ref(x))
    torch.testing.assert_close(out, ref(x), rtol=0.2, atol=0.2)
    torch.nn.functional.cross_entropy(out.flatten(0, 1), x.flatten()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with mxprobe.full_precision(model):
        torch.testing.assert_close(model(x), ref(x))


def test_longer_sequence_than_context_is_rejected():
    with pytest.raises(ValueError, match="exceeds the context 64"):
        _model(size="tiny")(torch.zeros(1, 65, dtype=torch.long))
