"""MX modules against the formulas of docs/numerics.md, written out with explicit quantizer calls.

Every comparison is exact (``torch.equal``): the modules promise to compute precisely these
GEMMs on precisely these quantized operands, so any difference is a wrong role, axis or order.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mxprobe import (
    PrecisionScheme,
    convert,
    full_precision,
    mx_matmul,
    quantize_mx,
    quantize_nvfp4,
    round_to,
)
from mxprobe.modules import (
    MxGELU,
    MxLayerNorm,
    MxLinear,
    MxMatmul,
    MxNorm,
    MxReLU,
    MxRMSNorm,
    MxSiLU,
)

DISTINCT = "w=e4m3,a=e2m1,w_bp=e5m2,a_bp=int8,g_wgrad=e3m2,g_dgrad=e2m3"
GEMM_SCHEMES = (
    "mxfp8_e4m3",
    "mx_mix",
    DISTINCT,  # every GEMM role in its own format: a swapped role or axis cannot go unnoticed
    "bf16",
    "w_e4m3_a_bf16",
    "mxfp8_e4m3,block=16,scale=rceil,round=nearest",
    "mxfp8_e4m3,backprop=false",  # backward roles set but ignored
    "mxfp8_e4m3_fwd_only",
)
# Feature, token and output counts that are not multiples of 32 (or 16): tail blocks everywhere.
BATCH, SEQ, IN, OUT = 2, 7, 40, 24


def q(t: torch.Tensor, fmt: str, axis: int, s: PrecisionScheme) -> torch.Tensor:
    """``t`` in format ``fmt``, spelled out with the quantizer's public functions."""
    if fmt == "fp32":
        return t
    if fmt in ("bf16", "fp16"):
        return round_to(t, fmt)
    if fmt == "nvfp4":  # a norm's γ/β or an activation: 1 x 16 blocks along axis
        return quantize_nvfp4(
            t, axis=axis, tensor_scale="amax" if s.nvfp4_scale == "amax" else None
        )
    return quantize_mx(
        t, fmt, block_size=s.block_size, axis=axis, scale_mode=s.scale_mode, rounding=s.rounding
    )


def heavy_tailed(*shape: int, seed: int) -> torch.Tensor:
    """Values spread over many binades, so MX scales and saturation both matter."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.exp(1.5 * torch.randn(*shape, generator=g))


def mx_linear_module(bias: bool, scheme: str) -> MxLinear:
    torch.manual_seed(0)
    return convert(nn.Linear(IN, OUT, bias=bias), scheme)


def linear_formulas(x2d, w, b, dy, s: PrecisionScheme):
    """(Y, dX, dW, dB) of docs/numerics.md for 2-D ``x2d`` and ``dy``."""
    e = s.elementwise
    y = round_to(q(x2d, s.act, -1, s) @ q(w, s.weight, -1, s).t(), e)
    if b is not None:
        y = round_to(y + round_to(b, e), e)
    if not s.quantize_backprop:
        return y, dy @ w, dy.t() @ x2d, None if b is None else dy.sum(0)
    dx = round_to(q(dy, s.grad_dgrad, -1, s) @ q(w, s.weight_bp, 0, s), e)
    dw = round_to(q(dy, s.grad_wgrad, 0, s).t() @ q(x2d, s.act_bp, 0, s), e)
    db = None if b is None else round_to(dy.sum(0), e)
    return y, dx, dw, db


@pytest.mark.parametrize("scheme", GEMM_SCHEMES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_mx_linear_forward_and_gradients_match_formulas(scheme, bias):
    lin = mx_linear_module(bias, scheme)
    s = lin.mx_scheme
    x = heavy_tailed(BATCH, SEQ, IN, seed=1).requires_grad_()
    dy = heavy_tailed(BATCH, SEQ, OUT, seed=2)
    y = lin(x)
    y.backward(dy)

    with torch.no_grad():
        b = None if not bias else lin.bias.detach()
        want = linear_formulas(
            x.detach().reshape(-1, IN), lin.weight.detach(), b, dy.reshape(-1, OUT), s
        )
    y_want, dx_want, dw_want, db_want = want
    assert y.shape == (BATCH, SEQ, OUT)
    assert torch.equal(y.detach(), y_want.reshape(BATCH, SEQ, OUT))
    assert torch.equal(x.grad, dx_want.reshape(BATCH, SEQ, IN))
    assert torch.equal(lin.weight.grad, dw_want)
    if bias:
        assert torch.equal(lin.bias.grad, db_want)
    else:
        assert lin.bias is None

    # Not vacuous: the emulated forward really differs from full precision.
    plain = F.linear(x.detach(), lin.weight.detach(), None if not bias else lin.bias.detach())
    assert not torch.equal(y.detach(), plain)


def test_distinct_scheme_tells_backward_roles_apart():
    """With one format per role, swapping grad_wgrad/grad_dgrad or act_bp's axis changes dW."""
    s = PrecisionScheme.parse(DISTINCT)
    x2d = heavy_tailed(BATCH * SEQ, IN, seed=3)
    dy = heavy_tailed(BATCH * SEQ, OUT, seed=4)
    right = q(dy, s.grad_wgrad, 0, s).t() @ q(x2d, s.act_bp, 0, s)
    swapped_role = q(dy, s.grad_dgrad, 0, s).t() @ q(x2d, s.act_bp, 0, s)
    wrong_axis = q(dy, s.grad_wgrad, 0, s).t() @ q(x2d, s.act_bp, -1, s)
    assert not torch.equal(right, swapped_role)
    assert not torch.equal(right, wrong_axis)


def test_mx_linear_input_without_grad_still_trains_weight():
    lin = mx_linear_module(True, "mxfp8_e4m3")
    x = heavy_tailed(BATCH, SEQ, IN, seed=5)
    dy = heavy_tailed(BATCH, SEQ, OUT, seed=6)
    lin(x).backward(dy)
    _, _, dw, db = linear_formulas(
        x.reshape(-1, IN),
        lin.weight.detach(),
        lin.bias.detach(),
        dy.reshape(-1, OUT),
        lin.mx_scheme,
    )
    assert torch.equal(lin.weight.grad, dw)
    assert torch.equal(lin.bias.grad, db)


NORM_SCHEMES = (
    "mxfp8_e4m3",  # γ/β in e4m3, internals bf16
    "norm=bf16",  # elementwise γ/β, fp32 internals
    "mxfp8_e4m3,block=16,scale=rceil,round=nearest",
    "norm=e2m1,elem=fp16",
    "nvfp4",  # γ/β in NVFP4 (two-level), internals bf16
)
NORM_DIM = 48


def norm_params(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gamma = 1.0 + 0.3 * torch.randn(NORM_DIM, generator=g)
    beta = 0.2 * torch.randn(NORM_DIM, generator=g)
    return gamma, beta


@pytest.mark.parametrize("scheme", NORM_SCHEMES)
@pytest.mark.parametrize("kind", ["layernorm", "layernorm-no-bias", "rmsnorm"])
def test_norm_quantizes_affine_with_straight_through_gradients(scheme, kind):
    """A converted nn.LayerNorm (with and without β) / nn.RMSNorm runs through the one norm
    mechanism (MxNorm: the class's own forward with γ/β substituted) and gives exactly the
    output and the x, γ and β gradients of the formula written out: the input and output
    rounded by the scheme's elementwise, γ/β quantized as leaves (straight-through)."""
    gamma, beta = norm_params(seed=7)
    norm = (
        nn.RMSNorm(NORM_DIM)
        if kind == "rmsnorm"
        else nn.LayerNorm(NORM_DIM, bias=kind == "layernorm")
    )
    with torch.no_grad():
        norm.weight.copy_(gamma)
        if kind == "layernorm":
            norm.bias.copy_(beta)
    convert(norm, scheme)
    assert type(norm) is (MxRMSNorm if kind == "rmsnorm" else MxLayerNorm)
    assert type(norm).forward is MxNorm.forward  # no forward of its own
    s = norm.mx_scheme
    x = heavy_tailed(BATCH, SEQ, NORM_DIM, seed=8).requires_grad_()
    dy = heavy_tailed(BATCH, SEQ, NORM_DIM, seed=9)
    y = norm(x)
    y.backward(dy)

    # Explicit: quantized γ/β as leaves, so their grads are the straight-through grads.
    gq = q(gamma, s.norm_affine, -1, s).clone().requires_grad_()
    bq = q(beta, s.norm_affine, -1, s).clone().requires_grad_() if kind == "layernorm" else None
    assert not torch.equal(gq.detach(), gamma), "γ must actually be quantized"
    xe = x.detach().clone().requires_grad_()
    e = s.elementwise
    if kind == "rmsnorm":
        want = round_to(F.rms_norm(round_to(xe, e), (NORM_DIM,), gq, norm.eps), e)
    else:
        want = round_to(F.layer_norm(round_to(xe, e), (NORM_DIM,), gq, bq, norm.eps), e)
    want.backward(dy)

    assert torch.equal(y.detach(), want.detach())
    assert torch.equal(x.grad, xe.grad)
    assert torch.equal(norm.weight.grad, gq.grad)
    if kind == "layernorm":
        assert not torch.equal(bq.detach(), beta), "β must actually be quantized"
        # The paper's released LayerNorm returned no β gradient, so β never trained.
        assert norm.bias.grad is not None
        assert torch.count_nonzero(norm.bias.grad) > 0
        assert torch.equal(norm.bias.grad, bq.grad)
    else:
        assert getattr(norm, "bias", None) is None


def test_library_norms_share_the_torch_norms_mechanism():
    """One mechanism: a registered norm class gets the very mixin torch's norms are built on."""

    class MyNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(NORM_DIM))

        def forward(self, x):
            return F.rms_norm(x, (NORM_DIM,), self.weight, 1e-6)

    from mxprobe.adapters import Adapter, twin_class

    assert issubclass(twin_class(MyNorm, Adapter("norm")), MxNorm)
    assert issubclass(MxLayerNorm, MxNorm) and issubclass(MxRMSNorm, MxNorm)


def test_layernorm_beta_trains_under_mx():
    torch.manual_seed(0)
    norm = convert(nn.LayerNorm(NORM_DIM), "mxfp8_e4m3")
    beta_before = norm.bias.detach().clone()
    opt = torch.optim.SGD(norm.parameters(), lr=0.1)
    x = heavy_tailed(4, NORM_DIM, seed=10)
    target = heavy_tailed(4, NORM_DIM, seed=11)
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(norm(x), target).backward()
        opt.step()
    assert not torch.equal(norm.bias.detach(), beta_before)


def test_layernorm_without_affine_and_bias():
    x = heavy_tailed(BATCH, SEQ, NORM_DIM, seed=12)
    bare = nn.LayerNorm(NORM_DIM, elementwise_affine=False)
    want = round_to(F.layer_norm(round_to(x, "bf16"), (NORM_DIM,), None, None, bare.eps), "bf16")
    assert torch.equal(convert(bare, "mxfp8_e4m3")(x), want)

    no_bias = nn.LayerNorm(NORM_DIM, bias=False)
    convert(no_bias, "mxfp8_e4m3")
    x = x.requires_grad_()
    no_bias(x).sum().backward()
    assert no_bias.bias is None and no_bias.weight.grad is not None


ACTIVATIONS = [(nn.GELU, MxGELU, F.gelu), (nn.ReLU, MxReLU, F.relu), (nn.SiLU, MxSiLU, F.silu)]


@pytest.mark.parametrize("torch_cls,mx_cls,fn", ACTIVATIONS, ids=["gelu", "relu", "silu"])
@pytest.mark.parametrize("elem", ["bf16", "fp16", "fp32"])
def test_activation_rounds_input_and_output(torch_cls, mx_cls, fn, elem):
    act = convert(torch_cls(), f"mxfp8_e4m3,elem={elem}")
    assert type(act) is mx_cls
    x = (0.5 * heavy_tailed(BATCH, SEQ, IN, seed=13)).requires_grad_()
    dy = heavy_tailed(BATCH, SEQ, IN, seed=14)
    y = act(x)
    y.backward(dy)

    xe = x.detach().clone().requires_grad_()
    want = round_to(fn(round_to(xe, elem)), elem)
    want.backward(dy)
    assert torch.equal(y.detach(), want.detach())
    assert torch.equal(x.grad, xe.grad)
    if elem != "fp32":
        assert not torch.equal(y.detach(), fn(x.detach()))


MATMUL_SCHEMES = (
    "mxfp8_e4m3",
    "mx_mix",
    "w=fp32,a=e4m3,a_bp=int8,g_wgrad=e3m2,g_dgrad=e2m3,elem=bf16",
    "bf16",
    "mxfp8_e4m3,block=16,scale=rceil,round=nearest",
    "mxfp8_e4m3_fwd_only",
)


@pytest.mark.parametrize("scheme", MATMUL_SCHEMES)
def test_mx_matmul_forward_and_gradients_match_formulas(scheme):
    s = PrecisionScheme.parse(scheme)
    # (batch, heads, m, k) @ (batch, heads, k, n), every axis a tail.
    a = heavy_tailed(2, 3, 10, 40, seed=15).requires_grad_()
    b = heavy_tailed(2, 3, 40, 12, seed=16).requires_grad_()
    dy = heavy_tailed(2, 3, 10, 12, seed=17)
    y = mx_matmul(a, b, s)
    y.backward(dy)

    A, B, e = a.detach(), b.detach(), s.elementwise
    assert torch.equal(y.detach(), round_to(q(A, s.act, -1, s) @ q(B, s.act, -2, s), e))
    if s.quantize_backprop:
        da = round_to(q(dy, s.grad_dgrad, -1, s) @ q(B, s.act_bp, -1, s).transpose(-1, -2), e)
        db = round_to(q(A, s.act_bp, -2, s).transpose(-1, -2) @ q(dy, s.grad_wgrad, -2, s), e)
    else:
        da, db = dy @ B.transpose(-1, -2), A.transpose(-1, -2) @ dy
    assert torch.equal(a.grad, da)
    assert torch.equal(b.grad, db)
    assert not torch.equal(y.detach(), A @ B)


def test_mx_matmul_module_is_plain_until_given_a_scheme():
    mm = MxMatmul()
    a, b = heavy_tailed(3, 5, 40, seed=18), heavy_tailed(3, 40, 6, seed=19)
    assert torch.equal(mm(a, b), a @ b)
    mm.mx_scheme = PrecisionScheme.parse("mxfp8_e4m3")
    assert torch.equal(mm(a, b), mx_matmul(a, b, mm.mx_scheme))
    assert not torch.equal(mm(a, b), a @ b)


class Mixed(nn.Module):
    """Every convertible module kind plus an attention product."""

    def __init__(self, d: int = IN):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(2 * d, d, bias=False)
        self.relu = nn.ReLU()
        self.rms = nn.RMSNorm(d)
        self.silu = nn.SiLU()
        self.scores = MxMatmul()

    def forward(self, x):
        h = x + self.fc2(self.gelu(self.fc1(self.ln(x))))
        h = self.silu(self.rms(self.relu(h)))
        return self.scores(h, h.transpose(-1, -2))


def test_full_precision_equals_unconverted_model_bit_for_bit():
    torch.manual_seed(0)
    model = Mixed()
    reference = copy.deepcopy(model)
    convert(model, "mxfp8_e4m3")
    model.scores.mx_scheme = model.fc1.mx_scheme
    x = heavy_tailed(BATCH, SEQ, IN, seed=20)

    assert not torch.equal(model(x), reference(x))
    with full_precision(model) as same:
        assert same is model
        out = model(x)
        out.square().mean().backward()
    ref_out = reference(x)
    ref_out.square().mean().backward()
    assert torch.equal(out, ref_out)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, p_ref.grad), name


def test_full_precision_restores_mx_enabled_even_on_exception():
    model = convert(Mixed(), "mxfp8_e4m3")
    model.rms.mx_enabled = False  # switched off by the user before the block: must stay off
    mx_modules = [m for m in model.modules() if isinstance(m, (MxLinear, MxLayerNorm, MxRMSNorm))]
    with pytest.raises(RuntimeError, match="boom"):
        with full_precision(model):
            assert all(m.mx_enabled is False for m in mx_modules)
            assert model.fc1.active_scheme() is None
            raise RuntimeError("boom")
    assert model.rms.mx_enabled is False
    assert all(m.mx_enabled is True for m in mx_modules if m is not model.rms)
    assert model.fc1.active_scheme() == PrecisionScheme.parse("mxfp8_e4m3")


def test_mx_enabled_false_is_full_precision_for_that_module():
    torch.manual_seed(0)
    lin = nn.Linear(IN, OUT)
    reference = copy.deepcopy(lin)
    convert(lin, "mxfp8_e4m3")
    lin.mx_enabled = False
    x = heavy_tailed(BATCH, SEQ, IN, seed=21)
    assert torch.equal(lin(x), reference(x))
