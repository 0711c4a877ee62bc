"""The MX schemes in checkpoints (mxprobe.callbacks.precision_state): a manual change survives
resume on ProxyLitModule and, through PrecisionIntervention, on any LightningModule; checkpoints
written before ``checkpoint["mx_precision"]`` still load."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from mxprobe.callbacks import PrecisionIntervention, load_schemes, save_schemes
from mxprobe.callbacks.precision_state import SCHEMES_KEY

import mxprobe
from mxprobe.convert import module_names
from tests.helpers_lightning import TinyMx, trainer

lit = pytest.importorskip("mxprobe.models.lit")
data = pytest.importorskip("mxprobe.models.data")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class AmendAt(Callback):
    """A user's own mid-run change, outside any rule: ``mxprobe.amend_scheme`` at ``step``."""

    def __init__(self, step, change, modules):
        self.step, self.change, self.modules = step, change, modules

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            mxprobe.amend_scheme(pl_module, self.change, self.modules)


class SchemesAtStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.schemes = mxprobe.schemes_of(pl_module)


def _resume_keeps_manual_changes(
    tmp_path, build, fit_kwargs, norms, callbacks=list, **trainer_kwargs
):
    """Train 4 steps with manual changes at step 1 and a checkpoint at step 2, resume a fresh
    module from it; returns (full run's module, resumed module, schemes at the resumed start)."""
    full = build()
    amend = [AmendAt(1, "norm=bf16", norms), AmendAt(1, "w=e5m2,g_wgrad=bf16", "*fc*")]
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer(
        tmp_path / "full",
        4,
        [*amend, *callbacks(), checkpoint],
        enable_checkpointing=True,
        **trainer_kwargs,
    ).fit(full, **fit_kwargs())
    resumed, seen = build(), SchemesAtStart()
    trainer(tmp_path / "resumed", 4, [seen, *callbacks()], **trainer_kwargs).fit(
        resumed, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt", **fit_kwargs()
    )
    return full, resumed, seen.schemes


def _weights(module):
    return torch.cat([t.detach().reshape(-1) for t in module.state_dict().values()])


def test_manual_amend_survives_resume_on_the_proxy(tmp_path):
    full, resumed, at_start = _resume_keeps_manual_changes(
        tmp_path,
        lambda: lit.ProxyLitModule(depth=1, width=32, lr=1e-2, scheme="mxfp8_e4m3"),
        lambda: {"datamodule": data.ProxyDataModule(width=32, depth=1, batch_size=16)},
        norms="*ln",
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    schemes = mxprobe.schemes_of(full)
    assert schemes["student.blocks.0.ln"].norm_affine == "bf16"
    assert schemes["student.blocks.0.mlp.fc1"].weight == "fp8_e5m2"
    assert at_start == schemes  # put back before training resumed
    assert mxprobe.schemes_of(resumed) == schemes
    assert torch.equal(_weights(resumed), _weights(full))


def test_intervention_keeps_manual_changes_of_any_module(tmp_path):
    never = {
        "name": "never",
        "trigger": {"kind": "step", "at": 99},
        "action": {"kind": "scale_lr", "factor": 2},
    }
    full, resumed, at_start = _resume_keeps_manual_changes(
        tmp_path,
        TinyMx,  # a LightningModule that knows nothing of schemes in checkpoints
        dict,
        norms="*norm",
        callbacks=lambda: [PrecisionIntervention(rules=[never])],
    )
    schemes = mxprobe.schemes_of(full)
    assert {schemes["model.0.norm"].norm_affine, schemes["model.1.fc2"].weight} == {
        "bf16",
        "fp8_e5m2",
    }
    assert at_start == schemes
    assert torch.equal(_weights(resumed), _weights(full))


def _amended_proxy():
    model = lit.ProxyLitModule(depth=2, width=32, scheme="mxfp8_e4m3")
    mxprobe.amend_scheme(model, "norm=bf16", "*ln")
    mxprobe.set_scheme(model.student.blocks[1].mlp.fc2, "w=e4m3,a=bf16")
    return model


def test_schemes_of_another_model_fail_with_what_to_do():
    checkpoint = {}
    save_schemes(_amended_proxy(), checkpoint)
    assert set(checkpoint[SCHEMES_KEY]) == set(module_names(_amended_proxy()))
    with pytest.raises(ValueError, match="belong to another model: load it into the model"):
        load_schemes(TinyMx(), checkpoint)
    assert load_schemes(TinyMx(), {}) is False  # nothing saved: the module keeps its schemes
