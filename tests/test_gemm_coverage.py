"""Every GEMM FLOP of real third-party models on MX operands, checked independently of mxprobe's
own bookkeeping: a dispatch-level watcher sees each matrix product torch runs in the MX forward
and tests whether both operands are fixed points of the float64 reference quantizer
(tests/mx_reference.py) along the contraction axis. MoE routers, kept in full precision by
default, are the only GEMMs excepted; with an override they are on MX operands too."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mxprobe
from tests.helpers_hf import MODELS, MORE_MODELS, pair, tokens
from tests.mx_reference import reference_quantize

aten = torch.ops.aten
# (index of the left operand, index of the right operand) of each product op.
PRODUCTS = {aten.mm: (0, 1), aten.bmm: (0, 1), aten.addmm: (1, 2), aten.baddbmm: (1, 2)}
# Ops that multiply matrices in a way the check cannot see operand by operand: any is a failure.
OPAQUE = ("_grouped_mm", "scaled_dot_product", "addbmm", "addmv", "mv", "dot", "convolution")
ROUTER_NAMES = {"mixtral": "gate", "qwen3_moe": "gate", "olmoe": "gate", "deepseek_v3": "gate"}


class GemmWatch(TorchDispatchMode):
    """Records (left, right) operands of every product and the names of opaque ones."""

    def __init__(self):
        super().__init__()
        self.products: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.opaque: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in PRODUCTS:
            i, j = PRODUCTS[packet]
            self.products.append((args[i].detach().clone(), args[j].detach().clone()))
        elif any(name in packet.__name__ for name in OPAQUE):
            self.opaque.append(packet.__name__)
        return func(*args, **(kwargs or {}))


def _on_grid(t: torch.Tensor, axis: int) -> bool:
    return torch.equal(reference_quantize(t, "e4m3", axis=axis), t)


def _flops(a: torch.Tensor, b: torch.Tensor) -> int:
    return 2 * a.numel() * b.shape[-1]


def _inputs(name: str) -> dict:
    if name == "t5":
        return {"input_ids": tokens(), "decoder_input_ids": tokens(1)}
    return {"input_ids": tokens()}


def _outputs(model, name: str) -> list[torch.Tensor]:
    out = model(**_inputs(name))
    if hasattr(out, "logits"):
        return [out.logits]
    return [out.last_hidden_state, out.pooler_output]


def _convert(model, overrides=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mxprobe.convert(model, "mxfp8_e4m3", overrides)


def _router_weights(model) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if getattr(m, "mx_full_precision_by_default", False)]


def _is_router(b: torch.Tensor, routers: list[torch.Tensor]) -> bool:
    """Whether the right operand is a router's weight (by value: DeepSeek-V3 copies it)."""
    return any(b.shape == w.t().shape and torch.equal(b, w.t()) for w in routers)


ALL = sorted({**MODELS, **MORE_MODELS})


@pytest.mark.parametrize("name", ALL)
def test_every_non_router_gemm_flop_is_on_mx_operands(name):
    model, _ = pair(name)
    _convert(model)
    routers = _router_weights(model)
    watch = GemmWatch()
    with torch.no_grad(), watch:
        _outputs(model, name)
    assert watch.opaque == []
    on = off = 0
    for a, b in watch.products:
        flops = _flops(a, b)
        if _is_router(b, routers):
            continue
        if _on_grid(a, -1) and _on_grid(b, -2):
            on += flops
        else:
            off += flops
    assert on > 0 and off == 0, f"{name}: {off / (on + off):.1%} of GEMM FLOPs off the MX grid"
    assert bool(routers) == (name in ROUTER_NAMES or name == "gpt_oss")


@pytest.mark.parametrize("name", sorted(ROUTER_NAMES) + ["gpt_oss"])
def test_a_router_override_puts_the_router_gemm_on_mx_operands_too(name):
    model, _ = pair(name)
    _convert(model, {f"*.{ROUTER_NAMES.get(name, 'router')}": "mxfp8_e4m3"})
    watch = GemmWatch()
    with torch.no_grad(), watch:
        _outputs(model, name)
    assert watch.products
    assert all(_on_grid(a, -1) and _on_grid(b, -2) for a, b in watch.products)


@pytest.mark.parametrize("name", ALL)
def test_fp32_scheme_is_the_model_and_full_precision_is_bit_for_bit(name):
    model, reference = pair(name)
    _convert(model)
    with torch.no_grad():
        want = _outputs(reference, name)
        with mxprobe.full_precision(model):
            assert all(map(torch.equal, _outputs(model, name), want))
        mxprobe.set_scheme(model, "fp32")
        got = _outputs(model, name)
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max() <= 1e-5 * w.abs().max()


class Wrapper(torch.nn.Module):
    """A user's module holding a transformers model (as a LightningModule does)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **inputs):
        return self.inner(**inputs)


@pytest.mark.parametrize("name", ["mixtral", "t5"])
def test_a_transformers_model_inside_a_users_module_is_covered_the_same(name):
    model, _ = pair(name)
    wrapper = Wrapper(model)
    _convert(wrapper)
    assert mxprobe.describe(wrapper).attention_left == []
    watch = GemmWatch()
    with torch.no_grad(), watch:
        _outputs(wrapper, name)
    routers = _router_weights(wrapper)
    off = [(a, b) for a, b in watch.products if not _is_router(b, routers)]
    assert off and all(_on_grid(a, -1) and _on_grid(b, -2) for a, b in off)


def test_litgpt_attention_products_are_on_mx_operands_where_litgpt_is_installed():
    """litgpt is not a dev dependency (its pins conflict with transformers 5): checked where a
    user has it (here: litgpt 0.5.13 installed with --no-deps)."""
    model_module = pytest.importorskip("litgpt.model")
    from litgpt.config import Config

    config = Config(
        block_size=32, vocab_size=96, padded_vocab_size=96, n_layer=2, n_head=4,
        n_query_groups=2, n_embd=64, rotary_percentage=1.0, bias=False,
        norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = model_module.GPT(config).eval()
    _convert(model)
    assert mxprobe.describe(model).attention_left == []
    watch = GemmWatch()
    with torch.no_grad(), watch:
        model(tokens())
    assert watch.opaque == [] and watch.products
    assert all(_on_grid(a, -1) and _on_grid(b, -2) for a, b in watch.products)
