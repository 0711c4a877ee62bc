"""The monitors on a converted transformers model inside a Lightning run: every norm, every
GEMM-like layer reported; a norm not in force is never reported as saturated; a monitor with
nothing to watch says so at setup."""

from __future__ import annotations

import csv
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from mxprobe.callbacks import ActivationMonitor, GradientBiasMonitor, NormAffineMonitor
from torch import nn

import mxprobe
from mxprobe.modules import MxModule
from mxprobe.record import read_record
from tests.helpers_hf import move_norm_weights_off_grid, pair, tokens
from tests.helpers_lightning import trainer


class CausalLM(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def compute_loss(self, batch):
        return self.model(input_ids=batch, labels=batch).loss

    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return torch.utils.data.DataLoader([tokens(i, (12,)) for i in range(8)], batch_size=2)


def _fit(tmp_path, module, callbacks, steps=2):
    logger = CSVLogger(tmp_path, name="", version="")
    trainer(tmp_path, steps, callbacks, logger=logger, log_every_n_steps=1).fit(module)
    with open(tmp_path / "metrics.csv") as f:
        return list(csv.DictReader(f))[0].keys()


@pytest.mark.parametrize("name", ["gpt2", "qwen3"])
def test_monitors_report_every_norm_and_every_gemm(tmp_path, name):
    model, _ = pair(name)
    move_norm_weights_off_grid(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mxprobe.convert(model, "mxfp8_e4m3")
    module = CausalLM(model)
    norms = [
        n
        for n, m in module.named_modules()
        if isinstance(m, MxModule) and "norm_affine" in m.mx_roles
    ]
    gemms = [
        n for n, m in module.named_modules() if isinstance(m, MxModule) and "weight" in m.mx_roles
    ]
    columns = _fit(tmp_path, module, [NormAffineMonitor(1), ActivationMonitor(1)])
    for n in norms:
        assert f"mx/norm_affine/{n}/weight_saturation" in columns, n
    for n in gemms:
        assert f"mx/activations/{n}/sqnr_db" in columns, n
    assert len(norms) >= 5 and len(gemms) >= 9


def test_a_norm_not_in_force_is_marked_so(tmp_path):
    model, _ = pair("qwen3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mxprobe.convert(model, "mxfp8_e4m3,norm=bf16")
    _fit(tmp_path, CausalLM(model), [NormAffineMonitor(1)], steps=1)
    readings = read_record(tmp_path).readings
    norms = {n.rsplit("/", 2)[1] for n in readings if n.endswith("/in_force")}
    assert "model.model.norm" in norms
    # Reference statistics under the same names, every one of them marked not in force.
    for norm in norms:
        assert readings[f"mx/norm_affine/{norm}/in_force"][1] == [0.0]
        assert f"mx/norm_affine/{norm}/weight_saturation" in readings


def test_monitors_with_nothing_to_watch_warn_at_setup(tmp_path):
    model, _ = pair("llama")  # unconverted: no MX module, and its RMSNorm is not a torch norm
    callbacks = [NormAffineMonitor(1), ActivationMonitor(1), GradientBiasMonitor(1)]
    with pytest.warns(UserWarning) as record:
        trainer(tmp_path, 1, callbacks).fit(CausalLM(model))
    messages = " ".join(str(w.message) for w in record)
    assert "NormAffineMonitor(modules='*') finds no norm" in messages
    assert "ActivationMonitor(modules='*') finds no MX linear layer" in messages
    assert "GradientBiasMonitor: the model has no MX module" in messages


def _zeta(tmp_path, dropout: float, scheme: str) -> list[float]:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    config.eos_token_id = 0
    model = transformers.GPT2LMHeadModel(config)  # train mode: dropout active
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mxprobe.convert(model, scheme)
    logger = CSVLogger(tmp_path, name="", version="")
    monitor = GradientBiasMonitor(every_n_steps=1, per_module=False)
    trainer(tmp_path, 3, [monitor], logger=logger, log_every_n_steps=1).fit(CausalLM(model))
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [float(r["mx/grad_bias/total/zeta"]) for r in rows if r["mx/grad_bias/total/zeta"]]


def test_shadow_pass_replays_the_dropout_masks(tmp_path):
    """All-fp32 scheme with dropout 0.1: the shadow pass is the training pass, zeta is 0."""
    zeta = _zeta(tmp_path / "fp32", 0.1, "fp32")
    assert len(zeta) == 3 and zeta == [0.0, 0.0, 0.0]
    mx = _zeta(tmp_path / "mx", 0.1, "mxfp8_e4m3")
    assert all(0 < z < 0.2 for z in mx), mx  # quantization's share, not dropout noise (~0.2)
