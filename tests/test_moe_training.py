"""A mixture-of-experts model (tiny Mixtral) trained under Lightning with every monitor and a
rule: the experts are reported, the rule switches the norms, and a run resumed from a
checkpoint ends bit for bit where the uninterrupted one does (fp32 and bf16-mixed)."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from mxprobe.callbacks import (
    ActivationMonitor,
    GradientBiasMonitor,
    LossSpikeDetector,
    NormAffineMonitor,
    PrecisionIntervention,
    read_record,
)

import mxprobe
from tests.helpers_hf import move_norm_weights_off_grid, pair
from tests.helpers_lightning import trainer
from tests.test_callbacks_hf import CausalLM

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
]
STEPS = 50
EXPERTS = "model.model.layers.0.mlp.experts"  # under the LightningModule


def _module():
    model, _ = pair("mixtral")
    model.train()
    move_norm_weights_off_grid(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mxprobe.convert(model, "mxfp8_e4m3")
    return CausalLM(model)


def _callbacks():
    rule = {
        "name": "norms-bf16",
        "trigger": {"kind": "step", "at": 20},
        "action": {"kind": "set_scheme", "scheme": "norm=bf16", "snap": True},
    }
    return [
        GradientBiasMonitor(every_n_steps=10),
        NormAffineMonitor(every_n_steps=10),
        ActivationMonitor(every_n_steps=10),
        LossSpikeDetector(),
        PrecisionIntervention(rules=[rule], snapshot_every=10, checkpoint_snapshots=True),
    ]


def _weights(module):
    return torch.cat([t.detach().reshape(-1).float() for t in module.state_dict().values()])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_moe_trains_with_monitors_and_a_rule_and_resumes_bitwise(tmp_path, precision):
    full = _module()
    # Saved at an epoch boundary (4 batches an epoch): the plain DataLoader restarts its epoch.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=24, save_top_k=-1)
    trainer(
        tmp_path / "full",
        STEPS,
        [*_callbacks(), checkpoint],
        enable_checkpointing=True,
        precision=precision,
    ).fit(full)
    record = read_record(tmp_path / "full")
    steps, losses = record.losses
    assert steps == list(range(STEPS)) and torch.isfinite(torch.tensor(losses)).all()
    names = set(record.readings)
    assert f"mx/grad_bias/{EXPERTS}/zeta" in names
    assert f"mx/activations/{EXPERTS}/sqnr_db" in names
    assert any(name.startswith("mx/norm_affine/") for name in names)
    assert [(e["step"], e["kind"]) for e in record.events] == [(20, "set_scheme")]
    experts = full.model.model.layers[0].mlp.experts
    assert experts.mx_scheme.weight == "fp8_e4m3"
    assert full.model.model.norm.mx_scheme.norm_affine == "bf16"

    resumed = _module()
    trainer(tmp_path / "resumed", STEPS, _callbacks(), precision=precision).fit(
        resumed, ckpt_path=next((tmp_path / "ckpt").glob("*step=24.ckpt"))
    )
    assert torch.equal(_weights(resumed), _weights(full))
    assert mxprobe.schemes_of(resumed) == mxprobe.schemes_of(full)
