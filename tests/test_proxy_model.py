"""The proxy model, its data and its LightningModule against the paper (docs/proxy.md)."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from mxprobe.models.data import ProxyDataModule, make_batch
from mxprobe.models.lit import ProxyLitModule
from mxprobe.models.student_teacher import ProxyConfig, Student, build_student, build_teacher
from torch import nn

import mxprobe
from mxprobe.modules import MxGELU, MxLayerNorm, MxLinear, MxSiLU

D = 32


@pytest.mark.parametrize("activation", ["gelu", "relu", "linear", "swiglu"])
def test_student_structure_matches_the_paper(activation):
    student = Student(ProxyConfig(depth=3, width=D, activation=activation))
    hidden = round(8 * D / 3) if activation == "swiglu" else 4 * D
    assert len(student.blocks) == 3
    for block in student.blocks:
        assert isinstance(block.ln, nn.LayerNorm) and block.ln.elementwise_affine
        assert block.ln.bias is not None
        fc1_out = 2 * hidden if activation == "swiglu" else hidden
        assert block.mlp.fc1.weight.shape == (fc1_out, D) and block.mlp.fc1.bias is None
        assert block.mlp.fc2.weight.shape == (D, hidden) and block.mlp.fc2.bias.shape == (D,)
    # No final LayerNorm: the last module run is the last block's fc2, added to the residual.
    assert [name for name, _ in student.named_children()] == ["blocks"]
    x = torch.randn(5, D)
    block = student.blocks[0]
    assert torch.allclose(block(x), x + block.mlp.fc2(block.mlp.act(block.mlp.fc1(block.ln(x)))))


def test_swiglu_hidden_and_activation_modules():
    assert ProxyConfig(width=512, activation="swiglu").hidden == 1365  # round(8 * 512 / 3)
    student = Student(ProxyConfig(depth=1, width=D, activation="swiglu"))
    mxprobe.convert(student, "mxfp8_e4m3")
    assert isinstance(student.blocks[0].mlp.act.silu, MxSiLU)
    gelu = Student(ProxyConfig(depth=1, width=D, activation="gelu"))
    mxprobe.convert(gelu, "mxfp8_e4m3")
    kinds = {type(m) for m in gelu.modules()}
    assert {MxGELU, MxLinear, MxLayerNorm} <= kinds and nn.Linear not in kinds


def test_no_layer_norm_option_and_bad_values():
    student = Student(ProxyConfig(depth=2, width=D, layer_norm=False))
    assert not any(isinstance(m, nn.LayerNorm) for m in student.modules())
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        ProxyConfig(activation="tanh")
    with pytest.raises(ValueError, match="unknown init"):
        ProxyConfig(init="xavier")


def test_custom_init():
    student = build_student(ProxyConfig(depth=2, width=D, init="custom"), seed=0)
    block = student.blocks[1]
    assert torch.equal(block.ln.weight, torch.ones(D)) and torch.equal(
        block.mlp.fc2.bias, torch.zeros(D)
    )
    assert abs(block.mlp.fc1.weight.std().item() - 0.02) < 0.003


def test_teacher_is_frozen_bias_free_and_unchanged_by_training():
    teacher = build_teacher(D, 3, "gelu", seed=1)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(m.bias is None for m in teacher.modules() if isinstance(m, nn.Linear))
    assert len(list(teacher.parameters())) == 6
    gained = build_teacher(D, 3, "gelu", seed=1, gain=2.0)
    assert torch.equal(gained.blocks[0].fc1.weight, 2 * teacher.blocks[0].fc1.weight)

    dm = ProxyDataModule(width=D, depth=2, batch_size=16, val_batches=1)
    before = [p.clone() for p in dm.teacher.parameters()]
    model = ProxyLitModule(depth=2, width=D, lr=1e-2)
    assert not any(p is q for p in model.parameters() for q in dm.teacher.parameters())
    _trainer(max_steps=3).fit(model, datamodule=dm)
    assert all(torch.equal(a, b) for a, b in zip(before, dm.teacher.parameters(), strict=True))


def test_identical_batches_for_the_same_seed():
    first = ProxyDataModule(width=D, depth=2, batch_size=8, seed=3)
    second = ProxyDataModule(width=D, depth=2, batch_size=8, seed=3)
    other = ProxyDataModule(width=D, depth=2, batch_size=8, seed=4)
    a, b, c = (iter(dm.train_dataloader()) for dm in (first, second, other))
    for _ in range(3):
        (xa, ya), (xb, yb), (xc, _) = next(a), next(b), next(c)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)
    x, y = make_batch(first.teacher, D, 8, 3, 0, 0.0)
    assert torch.equal(y, first.teacher(x))


class _RecordBatches(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, batch[0].sum().item()))


def _trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def test_resume_from_checkpoint_continues_with_the_same_batches(tmp_path):
    def fit(max_steps, ckpt_path=None, checkpoint=True):
        recorder = _RecordBatches()
        callbacks = [recorder]
        if checkpoint:
            callbacks.append(
                ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
            )
        model = ProxyLitModule(depth=1, width=D, lr=1e-2, scheme="mxfp8_e4m3")
        dm = ProxyDataModule(width=D, depth=1, batch_size=8, seed=5, val_batches=0)
        trainer = _trainer(
            max_steps=max_steps, callbacks=callbacks, enable_checkpointing=checkpoint
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return recorder.seen, model

    full, full_model = fit(6)
    checkpoint = next(tmp_path.glob("*step=3.ckpt"))
    resumed, resumed_model = fit(6, ckpt_path=str(checkpoint), checkpoint=False)
    assert [step for step, _ in resumed] == [3, 4, 5]
    assert resumed == full[3:]
    for p, q in zip(full_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_same_initial_weights_whatever_the_scheme():
    fp32 = ProxyLitModule(depth=2, width=D, seed=7)
    mx = ProxyLitModule(depth=2, width=D, seed=7, scheme="mxfp8_e4m3")
    other = ProxyLitModule(depth=2, width=D, seed=8)
    for (k, p), (k2, q) in zip(fp32.state_dict().items(), mx.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(p, q)
    assert not torch.equal(
        fp32.student.blocks[0].mlp.fc1.weight, other.student.blocks[0].mlp.fc1.weight
    )


def test_fp32_run_is_plain_pytorch_and_mx_run_differs():
    x, y = torch.randn(16, D), torch.randn(16, D)
    fp32 = ProxyLitModule(depth=2, width=D, seed=1)
    plain = build_student(ProxyConfig(depth=2, width=D), seed=1)
    assert torch.equal(fp32(x), plain(x))
    mx = ProxyLitModule(depth=2, width=D, seed=1, scheme="mxfp8_e4m3")
    assert not torch.equal(mx(x), plain(x))
    loss = mx.compute_loss((x, y))
    assert loss.shape == () and mx.student.blocks[0].mlp.fc1.weight.grad is None


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_layer_norm_beta_trains_under_mx(activation):
    """The released code's MX LayerNorm returned no β gradient; ours must."""
    torch.manual_seed(0)
    model = ProxyLitModule(depth=2, width=D, activation=activation, scheme="mxfp8_e4m3")
    x = torch.randn(64, D)
    y = torch.randn(64, D) * 0.1
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.compute_loss((x, y)).backward()
    for block in model.student.blocks:
        assert block.ln.bias.grad is not None and block.ln.bias.grad.abs().sum() > 0
        assert block.ln.weight.grad.abs().sum() > 0
    optimizer.step()
    assert all(block.ln.bias.abs().sum() > 0 for block in model.student.blocks)


def test_overrides_and_cosine_schedule():
    model = ProxyLitModule(
        depth=2, width=D, scheme="mxfp8_e4m3", overrides={"blocks.*.ln": "norm=bf16"}
    )
    assert model.student.blocks[0].ln.mx_scheme.norm_affine == "bf16"
    assert model.student.blocks[0].mlp.fc1.mx_scheme.weight == "fp8_e4m3"
    with pytest.raises(ValueError, match="unknown schedule"):
        ProxyLitModule(schedule="linear")
    cosine = ProxyLitModule(depth=1, width=D, lr=1.0, schedule="cosine", warmup_steps=2)
    dm = ProxyDataModule(width=D, depth=1, batch_size=4, val_batches=0)
    trainer = _trainer(max_steps=10)
    trainer.fit(cosine, datamodule=dm)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.1, abs=1e-6)  # min_lr_ratio at max_steps


def test_switched_schemes_survive_a_checkpoint(tmp_path):
    model = ProxyLitModule(depth=1, width=D, scheme="mxfp8_e4m3")
    mxprobe.amend_scheme(model.student, "norm=bf16")
    checkpoint = {}
    model.on_save_checkpoint(checkpoint)
    fresh = ProxyLitModule(depth=1, width=D, scheme="mxfp8_e4m3")
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.student.blocks[0].ln.mx_scheme.norm_affine == "bf16"
