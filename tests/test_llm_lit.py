"""mxprobe.models.lit_llm: LLMModule (loss, optimizer, schedule, validation, schemes in
checkpoints) and the DataModule."""

import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from mxprobe.models.lit_base import LrSchedule
from mxprobe.models.lit_llm import ByteTextDataModule, LLMModule
from mxprobe.models.llm import LLMConfig

import mxprobe
from mxprobe.modules import MxLinear


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("llm_cache"))


@pytest.fixture
def one_thread():
    # Tiny tensors: a second OpenMP thread only spin-waits on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(cache_dir, **kw):
    kw = {"batch_size": 4, "val_windows": 8, "max_bytes": 200_000, "val_fraction": 0.05, **kw}
    return ByteTextDataModule(cache_dir=cache_dir, context=LLMConfig().context, **kw)


def test_cosine_schedule_warms_up_then_decays_to_the_final_fraction():
    f = LrSchedule("cosine", warmup=20, total=100, min_ratio=0.1)
    assert f(0) == pytest.approx(1 / 20) and f(19) == pytest.approx(1.0)
    assert f(20) == pytest.approx(1.0) and f(60) == pytest.approx(0.55)
    assert f(100) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(20, 101)]
    assert values == sorted(values, reverse=True)


def test_module_converts_and_compute_loss_is_pure(cache_dir):
    module = LLMModule(
        LLMConfig(mx_attention=True), scheme="mxfp8_e4m3", overrides={"*lm_head": "bf16"}
    )
    assert isinstance(module.model.lm_head, MxLinear)
    assert module.model.lm_head.mx_scheme.weight == "bf16"
    assert module.model.blocks[0].attn.qkv.mx_scheme.weight == "fp8_e4m3"
    data = _data(cache_dir)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    torch.manual_seed(0)
    first = module.compute_loss(batch)
    second = module.compute_loss(batch)
    assert first.item() == second.item()
    assert abs(first.item() - math.log(256)) < 0.3  # near-uniform predictions at init
    assert all(p.grad is None for p in module.parameters())
    fp32 = LLMModule().model.lm_head  # converted even under fp32, running PyTorch's forward
    assert isinstance(fp32, MxLinear) and fp32.mx_scheme is None


def test_configure_optimizers_needs_a_finite_run():
    module = LLMModule()
    module._trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))
    with pytest.raises(ValueError, match="set trainer.max_steps"):
        module.configure_optimizers()


def test_fit_logs_validation_bits_per_byte_and_follows_the_paper_optimizer(
    cache_dir, tmp_path, one_thread
):
    module = LLMModule(scheme="mxfp8_e4m3", lr=0.01, weight_decay=0.1)
    trainer = pl.Trainer(
        max_steps=10,
        val_check_interval=5,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        log_every_n_steps=1,
        callbacks=[LearningRateMonitor(logging_interval="step")],
        default_root_dir=tmp_path,
        logger=pl.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, _data(cache_dir))
    metrics = trainer.callback_metrics
    assert metrics["val/bpb"].item() == pytest.approx(metrics["val/loss"].item() / math.log(2))
    assert metrics["val/loss"].item() < math.log(256)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-15
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    # 10 steps: 2 of warmup, cosine down to 10% of the peak.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(
        0.01 * LrSchedule("cosine", warmup=2, total=10, min_ratio=0.1)(10)
    )


def test_datamodule_resumes_the_stream_and_shards_by_rank(cache_dir):
    data = _data(cache_dir, batch_size=2)
    data.setup("fit")
    data.trainer = SimpleNamespace(
        global_step=7, accumulate_grad_batches=2, global_rank=1, world_size=2
    )
    stream = data.train_dataloader().dataset
    assert (stream.start_batch, stream.rank, stream.world_size) == (14, 1, 2)
    assert data.val_dataloader().dataset.starts.tolist() == [64 * i for i in range(1, 8, 2)]


class _ManualChanges(pl.Callback):
    """At step 1, what a user might do by hand: amend the norms, set the LM head's scheme."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            mxprobe.amend_scheme(pl_module, "norm=bf16", "*ln_*")
            mxprobe.set_scheme(pl_module.model.lm_head, "w=e4m3,a=bf16")


class _SchemesAtStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.schemes = mxprobe.schemes_of(pl_module)


def test_manual_scheme_changes_survive_checkpoint_and_resume(cache_dir, tmp_path, one_thread):
    def fit(callbacks, ckpt_path=None):
        module = LLMModule(scheme="mxfp8_e4m3", lr=0.01)
        trainer = pl.Trainer(
            max_steps=4,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=callbacks,
            default_root_dir=tmp_path,
            logger=False,
            enable_checkpointing=ckpt_path is None,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, _data(cache_dir), ckpt_path=ckpt_path)
        return module

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    full = fit([_ManualChanges(), checkpoint])
    schemes = mxprobe.schemes_of(full)
    assert schemes["model.blocks.0.ln_1"].norm_affine == "bf16"
    assert schemes["model.lm_head"] == mxprobe.PrecisionScheme.parse("w=e4m3,a=bf16")
    seen = _SchemesAtStart()
    resumed = fit([seen], ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    assert seen.schemes == schemes  # put back before training resumed
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
