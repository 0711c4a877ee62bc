"""The callbacks on the real proxy (mxprobe.models.lit.ProxyLitModule + ProxyDataModule)."""

import pytest
import torch
from mxprobe.callbacks import (
    ActivationMonitor,
    GradientBiasMonitor,
    LossSpikeDetector,
    NormAffineMonitor,
    PrecisionIntervention,
    read_events,
)

import mxprobe
from tests.helpers_lightning import trainer

lit = pytest.importorskip("mxprobe.models.lit")
data = pytest.importorskip("mxprobe.models.data")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def test_proxy_run_with_every_callback(tmp_path):
    model = lit.ProxyLitModule(depth=2, width=32, lr=1e-2, scheme="mxfp8_e4m3")
    datamodule = data.ProxyDataModule(width=32, depth=2, batch_size=64)
    rule = {
        "name": "norms-to-bf16",
        "trigger": {"kind": "metric", "name": "mx/grad_bias/total/zeta", "op": ">", "value": 0.0},
        "action": {"kind": "set_scheme", "scheme": "norm=bf16", "modules": "*"},
    }
    callbacks = [
        GradientBiasMonitor(every_n_steps=2),
        NormAffineMonitor(every_n_steps=2),
        ActivationMonitor(every_n_steps=2),
        LossSpikeDetector(window=3),
        PrecisionIntervention(rules=[rule]),
    ]
    run = trainer(tmp_path, 4, callbacks, limit_val_batches=0, num_sanity_val_steps=0)
    run.fit(model, datamodule=datamodule)
    metrics = run.callback_metrics
    assert 0 < float(metrics["mx/grad_bias/total/zeta"]) < 1
    assert any(k.startswith("mx/norm_affine/") for k in metrics)
    assert any(k.endswith("/sqnr_db") for k in metrics)
    (event,) = read_events(tmp_path)
    assert (event["step"], event["kind"]) == (1, "set_scheme")
    assert {s.norm_affine for s in mxprobe.schemes_of(model).values() if s is not None} == {"bf16"}


def test_proxy_fp32_grad_bias_is_zero(tmp_path):
    model = lit.ProxyLitModule(depth=2, width=32, scheme="fp32")
    datamodule = data.ProxyDataModule(width=32, depth=2, batch_size=64)
    run = trainer(
        tmp_path,
        1,
        [GradientBiasMonitor(every_n_steps=1)],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    run.fit(model, datamodule=datamodule)
    assert float(run.callback_metrics["mx/grad_bias/total/zeta"]) == 0.0
    assert float(run.callback_metrics["mx/grad_bias/total/cosine"]) == pytest.approx(1.0, abs=1e-6)
    assert torch.isfinite(run.callback_metrics["mx/grad_bias/total/norm_ratio"])


def test_proxy_fp32_run_switches_to_mx(tmp_path):
    model = lit.ProxyLitModule(depth=2, width=32, scheme="fp32")
    datamodule = data.ProxyDataModule(width=32, depth=2, batch_size=64)
    rule = {
        "name": "to-mx",
        "trigger": {"kind": "step", "at": 1},
        "action": {"kind": "set_scheme", "scheme": "mxfp8_e4m3", "modules": "*fc*"},
    }
    run = trainer(
        tmp_path,
        2,
        [PrecisionIntervention(rules=[rule])],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    run.fit(model, datamodule=datamodule)
    schemes = mxprobe.schemes_of(model)
    assert schemes["student.blocks.0.mlp.fc1"] == mxprobe.PRESETS["mxfp8_e4m3"]
    assert schemes["student.blocks.0.ln"] is None
