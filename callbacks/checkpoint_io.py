"""Checkpoints that are complete, checked and plain data: :class:`VerifiedCheckpointIO`.

Lightning's own ``TorchCheckpointIO`` writes a checkpoint under its final name as it goes (a
full disk leaves a truncated ``step=50.ckpt``) and loads whatever bytes it finds (a flipped
byte in an optimizer state trains on garbage). This one writes each checkpoint to a temporary
name, flushes and renames it (:mod:`mxprobe.atomic`), with its SHA-256 beside it
(``step=50.ckpt.sha256``, the ``sha256sum`` format), and at load refuses, in one line, a file
whose digest differs, a truncated or empty file, and anything ``torch.load(weights_only=True)``
refuses. A checkpoint with no digest beside it (written by another tool) is checked against the
CRC-32 of every member of its zip archive instead.

Every mxprobe run uses it: :class:`~mxprobe.callbacks.RunRecorder` puts it on the trainer's
strategy when that strategy has Lightning's default IO (a user's own IO is left alone).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mxprobe import atomic

DIGEST_SUFFIX = ".sha256"


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded: corrupt, truncated, empty, or not plain data. The
    message names the file and what is wrong in one line."""


def digest_path(path: str | os.PathLike) -> Path:
    return Path(f"{path}{DIGEST_SUFFIX}")


def read_verified(path: str | os.PathLike) -> bytes:
    """The bytes of the checkpoint at ``path``, checked against its digest (or, without one,
    its zip members' CRC-32).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: empty, truncated or corrupt, naming ``path``.
    """
    path = Path(path)
    data = path.read_bytes()
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): a save that never finished")
    sidecar = digest_path(path)
    if sidecar.exists():
        recorded = sidecar.read_text(encoding="utf-8", errors="replace").split(maxsplit=1)
        actual = hashlib.sha256(data).hexdigest()
        if not recorded or recorded[0] != actual:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: its SHA-256 {actual[:16]}... differs from the "
                f"one recorded when it was saved in {sidecar.name}"
            )
        return data
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a checkpoint ({len(data)} bytes: {err})"
        ) from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: member {bad!r} fails its CRC-32")
    return data


def load_verified(
    path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
) -> Any:
    """``torch.load`` of a checkpoint checked by :func:`read_verified`, ``weights_only=True``
    unless the caller passes ``False`` for a file it trusts (classes a module registered with
    ``torch.serialization.add_safe_globals`` load too: ``LLMConfig``, by ``mxprobe.models``).

    Raises:
        CheckpointError: as :func:`read_verified`, or when the file holds objects that plain-data
            loading refuses.
    """
    data = read_verified(path)
    restricted = True if weights_only is None else weights_only
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=restricted)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1][:200] if str(err).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} holds objects that weights_only loading refuses ({first}); "
            "load it with weights_only=False only if you trust where it came from"
        ) from None
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({err})") from None


class VerifiedCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic saves, a SHA-256 beside each checkpoint, checked loads
    and ``weights_only=True`` by default (see the module docstring).

    Raises:
        mxprobe.atomic.WriteError: when a save fails (disk full, ...), naming the path; the
            previous checkpoint under that name, if any, is unchanged.
        CheckpointError: when a load finds the file corrupt, truncated, empty or not plain data.

    Example::

        trainer = Trainer(plugins=[VerifiedCheckpointIO()])
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(path, data)
        atomic.write_text(digest_path(path), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_verified(path, map_location, weights_only)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        super().remove_checkpoint(path)
        if "://" not in str(path):
            digest_path(path).unlink(missing_ok=True)


def use_verified_checkpoints(trainer) -> None:
    """Put :class:`VerifiedCheckpointIO` on ``trainer``'s strategy when it has Lightning's
    default IO (a user's own IO, or a wrapper such as ``AsyncCheckpointIO``, is left alone)."""
    strategy = trainer.strategy
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = VerifiedCheckpointIO()
