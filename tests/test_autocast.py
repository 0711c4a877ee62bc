"""MX and NVFP4 emulation under autocast (bf16-mixed, 16-mixed): operands cast to the autocast
dtype, then quantized; products, outputs and gradients in that dtype (mxprobe.modules.mx_linear).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

import mxprobe
from tests.helpers_lightning import TinyMx, trainer

SCHEME = "w=e4m3,a=e4m3,bp=e5m2"  # elementwise fp32: the GEMMs are the only roundings


def q(t, fmt, axis):
    return mxprobe.quantize_mx(t, fmt, axis=axis)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_under_autocast_matches_the_explicit_formula(dtype):
    torch.manual_seed(0)
    layer = mxprobe.convert(nn.Sequential(nn.Linear(64, 48)), SCHEME)[0]
    x = torch.randn(6, 64, requires_grad=True)
    dy = torch.randn(6, 48).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x @ torch.eye(64))  # an autocast op first: the layer's input is low precision
    assert y.dtype == dtype
    y.backward(dy)

    xl, wl, bl = (
        x.detach().to(dtype),
        layer.weight.detach().to(dtype),
        layer.bias.detach().to(dtype),
    )
    want_y = F.linear(q(xl, "e4m3", -1), q(wl, "e4m3", -1), bl)
    want_dx = q(dy, "e5m2", -1) @ q(wl, "e5m2", 0)
    want_dw = q(dy, "e5m2", 0).t() @ q(xl, "e5m2", 0)
    assert torch.equal(y.detach(), want_y)
    assert torch.equal(x.grad, want_dx.float())
    assert layer.weight.grad.dtype == torch.float32
    assert torch.equal(layer.weight.grad, want_dw.float())
    assert torch.equal(layer.bias.grad, dy.float().sum(0).to(dtype).float())


def test_attention_product_under_autocast_is_in_the_autocast_dtype():
    product = mxprobe.MxMatmul()
    mxprobe.convert(nn.Sequential(product), "a=e4m3")
    a = torch.randn(2, 5, 32, requires_grad=True)
    b = torch.randn(2, 32, 7, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = product(a, b)
    ab, bb = a.detach().bfloat16(), b.detach().bfloat16()
    assert torch.equal(y, q(ab, "e4m3", -1) @ q(bb, "e4m3", -2))
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()


def _fp16_with_scaler():
    # Lightning turns precision="16-mixed" into bf16 on CPU; this plugin keeps fp16 + GradScaler.
    return {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}


@pytest.mark.parametrize(
    "precision, scheme",
    [
        ("bf16-mixed", "mxfp8_e4m3"),
        ("16-mixed", "mxfp8_e4m3"),
        # NVIDIA's recipe (tiles, stochastic rounding, the Hadamard transform) with NVFP4 norms
        ("bf16-mixed", "nvfp4_recipe,norm=nvfp4"),
    ],
)
def test_lightning_mixed_precision_trains_an_mx_model(tmp_path, precision, scheme):
    module = TinyMx(d=32, scheme=scheme)
    before = [p.detach().clone() for p in module.parameters()]
    losses = []

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    options = {"precision": precision} if precision == "bf16-mixed" else _fp16_with_scaler()
    trainer(tmp_path, 4, [Losses()], **options).fit(module)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    moved = [not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True)]
    assert all(moved)
    assert all(p.dtype == torch.float32 for p in module.parameters())


def nv(t, axis):
    return mxprobe.quantize_nvfp4(t, axis=axis, tensor_scale="amax")


def test_nvfp4_linear_under_bf16_autocast_matches_the_explicit_formula():
    """NVFP4 roles under autocast: the operands cast to bf16, then NVFP4-quantized (two-level,
    1 x 16 blocks along each GEMM's contraction axis) in bf16; gradients as with MX."""
    torch.manual_seed(0)
    layer = mxprobe.convert(nn.Sequential(nn.Linear(64, 48)), "w=nvfp4,a=nvfp4,bp=nvfp4")[0]
    x = torch.randn(6, 64, requires_grad=True)
    dy = torch.randn(6, 48).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x @ torch.eye(64))
    assert y.dtype == torch.bfloat16
    y.backward(dy)
    xl, wl = x.detach().bfloat16(), layer.weight.detach().bfloat16()
    want_y = F.linear(nv(xl, -1), nv(wl, -1), layer.bias.detach().bfloat16())
    assert not torch.equal(nv(xl, -1), xl)  # the quantization is not a no-op here
    assert torch.equal(y.detach(), want_y)
    assert torch.equal(x.grad, (nv(dy, -1) @ nv(wl, 0)).float())
    assert torch.equal(layer.weight.grad, (nv(dy, 0).t() @ nv(xl, 0)).float())
