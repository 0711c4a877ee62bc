"""Checkpoints of mxprobe runs: atomic saves with a SHA-256 beside them, checked loads
(corrupt, truncated, empty: one line), plain-data loading (issue 27)."""

import hashlib

import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from mxprobe.callbacks import RunRecorder
from mxprobe.callbacks.checkpoint_io import (
    CheckpointError,
    VerifiedCheckpointIO,
    digest_path,
    load_verified,
)

from mxprobe import atomic
from tests.helpers_faults import full_disk, leftovers
from tests.helpers_lightning import TinyMx, trainer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A recorded 4-step run that checkpointed at steps 2 and 4."""
    root = tmp_path_factory.mktemp("run")
    every = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer(root, 4, [RunRecorder(), every], enable_checkpointing=True).fit(TinyMx())
    return root / "ckpt"


def test_every_checkpoint_has_its_digest(saved):
    for ckpt in sorted(saved.glob("*.ckpt")):
        recorded = digest_path(ckpt).read_text().split()
        assert recorded == [hashlib.sha256(ckpt.read_bytes()).hexdigest(), ckpt.name]
    assert not [p for p in saved.iterdir() if p.name.startswith(".")]  # no temporary left


def _copy(saved, tmp_path, name="epoch=0-step=2.ckpt"):
    ckpt = tmp_path / name
    ckpt.write_bytes((saved / name).read_bytes())
    digest_path(ckpt).write_bytes(digest_path(saved / name).read_bytes())
    return ckpt


def test_a_checked_checkpoint_resumes(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    run = trainer(tmp_path, 3, [RunRecorder()])
    run.fit(TinyMx(), ckpt_path=ckpt)
    assert run.global_step == 3


def _flip(data: bytes, at: int, count: int = 64) -> bytes:
    return data[:at] + bytes(b ^ 0xFF for b in data[at : at + count]) + data[at + count :]


@pytest.mark.parametrize("digest", [True, False], ids=["digest", "zip-crc"])
def test_a_flipped_byte_is_refused(saved, tmp_path, digest):
    ckpt = _copy(saved, tmp_path)
    if not digest:
        digest_path(ckpt).unlink()
    data = ckpt.read_bytes()
    ckpt.write_bytes(_flip(data, len(data) // 2))
    with pytest.raises(CheckpointError, match="is corrupt") as refused:
        load_verified(ckpt)
    assert str(ckpt) in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("keep", [0, 100, 0.5], ids=["empty", "100-bytes", "half"])
def test_a_truncated_checkpoint_is_one_line(saved, tmp_path, keep):
    ckpt = _copy(saved, tmp_path)
    digest_path(ckpt).unlink()
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match="empty|truncated") as refused:
        load_verified(ckpt)
    assert str(ckpt) in str(refused.value) and "\n" not in str(refused.value)


def test_a_corrupt_checkpoint_stops_a_resume_before_training(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    data = ckpt.read_bytes()
    ckpt.write_bytes(_flip(data, len(data) // 2))
    run = trainer(tmp_path, 3, [RunRecorder()])
    with pytest.raises(CheckpointError, match="corrupt"):
        run.fit(TinyMx(), ckpt_path=ckpt)
    assert run.global_step == 0


class _Code:
    """Not plain data: a pickle of it could run code at load."""


def test_objects_are_refused_unless_trusted(tmp_path):
    path = tmp_path / "evil.ckpt"
    VerifiedCheckpointIO().save_checkpoint({"state": _Code()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_verified(path)
    assert isinstance(load_verified(path, weights_only=False)["state"], _Code)


def test_llm_hyperparameters_load_as_plain_data(tmp_path):
    from mxprobe.models.lit_llm import LLMConfig  # which allows it to weights_only loading

    path = tmp_path / "llm.ckpt"
    VerifiedCheckpointIO().save_checkpoint({"hyper_parameters": {"config": LLMConfig()}}, path)
    assert load_verified(path)["hyper_parameters"]["config"] == LLMConfig()


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io_ = VerifiedCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    before = path.read_bytes(), digest_path(path).read_bytes()
    full_disk(monkeypatch)
    with pytest.raises(atomic.WriteError, match="No space left") as failed:
        io_.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    assert str(path) in str(failed.value) and "previous file is unchanged" in str(failed.value)
    monkeypatch.undo()
    assert (path.read_bytes(), digest_path(path).read_bytes()) == before
    assert leftovers(tmp_path) == []
    assert load_verified(path)["step"] == 1


def test_a_full_disk_on_a_first_save_leaves_nothing(tmp_path, monkeypatch):
    full_disk(monkeypatch)
    with pytest.raises(atomic.WriteError, match="no file was written"):
        VerifiedCheckpointIO().save_checkpoint({"w": torch.ones(10)}, tmp_path / "a.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_the_recorder_leaves_a_users_own_io_alone(tmp_path):
    class Mine(TorchCheckpointIO):
        pass

    run = trainer(tmp_path, 1, [RunRecorder()], plugins=[Mine()])
    run.fit(TinyMx())
    assert type(run.strategy.checkpoint_io) is Mine
    default = trainer(tmp_path, 1, [RunRecorder()])
    default.fit(TinyMx())
    assert type(default.strategy.checkpoint_io) is VerifiedCheckpointIO
