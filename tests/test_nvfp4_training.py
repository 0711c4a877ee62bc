"""NVFP4 as a scheme format: every GEMM operand of a converted model is an NVFP4 value (the
reference computed here from quantize_nvfp4, which tests/test_nvfp4.py checks against torchao),
16x16 weight tiles give the forward and the grad-input GEMM the same weight, snapping away from
NVFP4 keeps the function, the monitors measure NVFP4 roles as NVFP4, and a tiny
transformers model trains 50 steps under the recipe with a norm rule and resumes bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from mxprobe.callbacks import (
    ActivationMonitor,
    NormAffineMonitor,
    PrecisionIntervention,
    read_record,
)

import mxprobe
from mxprobe.modules import quantize_role
from tests.helpers_hf import move_norm_weights_off_grid, pair, tokens
from tests.helpers_lightning import trainer
from tests.test_callbacks_hf import CausalLM


def _convert(model, scheme):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mxprobe.convert(model, scheme)
    return model


def test_a_linear_is_the_explicit_nvfp4_formula_forward_and_backward():
    torch.manual_seed(0)
    layer = _convert(torch.nn.Linear(48, 32), "nvfp4,elem=fp32")
    x = torch.randn(40, 48, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    def q(t, axis):
        return mxprobe.quantize_nvfp4(t, axis=axis, tensor_scale="amax")

    w = layer.weight.detach()
    torch.testing.assert_close(
        y, q(x.detach(), -1) @ q(w, -1).t() + layer.bias, rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(x.grad, q(dy, -1) @ q(w, 0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        layer.weight.grad, q(dy, 0).t() @ q(x.detach(), 0), rtol=1e-6, atol=1e-6
    )


def test_16x16_tiles_give_forward_and_backward_the_same_weight():
    scheme = mxprobe.PRESETS["nvfp4_recipe"]
    w = torch.randn(64, 80)
    forward, backward = (
        quantize_role(w, scheme, "weight", -1),
        quantize_role(w, scheme, "weight_bp", 0),
    )
    assert torch.equal(forward, backward)
    one_by_16 = scheme.amend("nvtile=1x16")
    assert not torch.equal(
        quantize_role(w, one_by_16, "weight", -1), quantize_role(w, one_by_16, "weight_bp", 0)
    )


def test_switching_norms_away_from_nvfp4_with_snap_keeps_the_function():
    model, _ = pair("llama")
    move_norm_weights_off_grid(model)
    _convert(model, "nvfp4")
    x = tokens()
    with torch.no_grad():
        before = model(x).logits
        changed = mxprobe.amend_scheme(model, "norm=fp32", "*", snap=True)
        after = model(x).logits
    assert len(changed) == 5 and torch.equal(before, after)


def test_the_monitors_measure_nvfp4_roles_as_nvfp4(tmp_path):
    model, _ = pair("llama")
    model.train()
    move_norm_weights_off_grid(model)
    _convert(model, "nvfp4")
    monitors = [NormAffineMonitor(1), ActivationMonitor(1)]
    trainer(tmp_path, 1, monitors).fit(CausalLM(model))
    series = read_record(tmp_path).readings
    readings = {name: values[0] for name, (_, values) in series.items()}
    prefix = "mx/norm_affine/model.model.norm/"
    assert readings[prefix + "in_force"] == 1.0
    assert f"{prefix}weight_floor_overflow" not in readings
    for stat in (
        "weight_saturation",
        "weight_blocks_clipped",
        "weight_dynamic_range",
        "weight_rel_bias",
    ):
        assert prefix + stat in readings  # fmt: skip
    assert 0 <= readings[prefix + "weight_saturation"] <= readings[prefix + "weight_blocks_clipped"]
    sqnr = [v for k, v in readings.items() if k.startswith("mx/activations/") and "sqnr" in k]
    assert sqnr and all(5 < v < 40 for v in sqnr)  # E2M1 with block scales: about 20 dB


def test_nvfp4_norm_readings_are_the_formulas():
    gamma = 1 + 0.05 * torch.rand(64, generator=torch.Generator().manual_seed(0))
    counts = mxprobe.nvfp4.nvfp4_clip_counts(gamma, tensor_scale="amax")
    q = mxprobe.quantize_nvfp4(gamma, tensor_scale="amax")
    # γ in [1, 1.05]: each block's max maps to 6; smaller elements round on the E2M1 grid, none
    # is clipped unless a scale rounds down, and the quantized γ is biased up (docs/nvfp4.md)
    blocks = gamma.reshape(4, 16)
    pts = gamma.max() / 2688
    scale = (blocks.amax(1) / 6 / pts).to(torch.float8_e4m3fn).float()
    scaled = blocks / pts / scale[:, None]
    assert counts[0] == (scaled.abs() > 6).sum() and counts[2] == 4
    assert counts[1] == (scaled.abs() > 6).any(1).sum()
    assert (q / gamma - 1).mean() > 0


def _module():
    model, _ = pair("llama")
    model.train()
    move_norm_weights_off_grid(model)
    # NVIDIA's recipe in full (16x16 weight tiles, stochastic rounding of gradients, the random
    # Hadamard transform), norms in NVFP4 so that the rule has something to switch.
    return CausalLM(_convert(model, "nvfp4_recipe,norm=nvfp4"))


def _callbacks():
    rule = {
        "name": "norms-bf16",
        "trigger": {"kind": "step", "at": 20},
        "action": {"kind": "set_scheme", "scheme": "norm=bf16", "snap": True},
    }
    return [PrecisionIntervention(rules=[rule], snapshot_every=10, checkpoint_snapshots=True)]


def _weights(module):
    return torch.cat([t.detach().reshape(-1).float() for t in module.state_dict().values()])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_nvfp4_trains_50_steps_with_a_norm_rule_and_resumes_bitwise(tmp_path):
    full = _module()
    # Saved at an epoch boundary (4 batches an epoch): the plain DataLoader restarts its epoch.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=24, save_top_k=-1)
    trainer(tmp_path / "full", 50, [*_callbacks(), checkpoint], enable_checkpointing=True).fit(full)
    record = read_record(tmp_path / "full")
    steps, losses = record.losses
    assert steps == list(range(50)) and torch.isfinite(torch.tensor(losses)).all()
    assert losses[-1] < losses[0]
    assert [(e["step"], e["kind"]) for e in record.events] == [(20, "set_scheme")]
    assert full.model.model.norm.mx_scheme.norm_affine == "bf16"

    resumed = _module()
    trainer(tmp_path / "resumed", 50, _callbacks()).fit(
        resumed, ckpt_path=next((tmp_path / "ckpt").glob("*step=24.ckpt"))
    )
    assert torch.equal(_weights(resumed), _weights(full))
