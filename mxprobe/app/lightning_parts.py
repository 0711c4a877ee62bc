"""What mxprobe's LightningCLIs (``mxprobe proxy``, ``mxprobe llm``) add to Lightning's:

- :class:`AtomicSaveConfig`: the ``config.yaml`` saved in a run's directory is written
  atomically: a full disk leaves the previous file or none, never a 0-byte or half one;
- :class:`CheckedCheckpointPath`: a ``--ckpt_path`` is checked (digest, or zip CRC-32) before
  LightningCLI reads hyperparameters from it, so a corrupt, truncated or empty checkpoint is one
  line before anything is built (:mod:`mxprobe.callbacks.checkpoint_io`).
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from mxprobe import atomic
from mxprobe.app.parsing import UsageError


class AtomicSaveConfig(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback`` (same checks, same ranks) whose single-file save goes
    through :func:`mxprobe.atomic.write_text`.

    Raises:
        mxprobe.atomic.WriteError: when the file cannot be written, naming it.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        parser = self.parser
        self.parser = _AtomicSave(parser)
        try:
            super().setup(trainer, pl_module, stage)
        finally:
            self.parser = parser


class _AtomicSave:
    """The parser, with ``save`` writing the dumped config atomically (local, single file)."""

    def __init__(self, parser) -> None:
        self._parser = parser

    def save(self, config, path, skip_none=False, overwrite=False, multifile=False, **kwargs):
        if multifile or kwargs or "://" in str(path):
            return self._parser.save(
                config,
                path,
                skip_none=skip_none,
                overwrite=overwrite,
                multifile=multifile,
                **kwargs,
            )
        atomic.write_text(path, self._parser.dump(config, skip_none=skip_none))

    def __getattr__(self, name):
        return getattr(self._parser, name)


class CheckedCheckpointPath(LightningCLI):
    """A LightningCLI whose ``ckpt_path`` is checked right after parsing: a missing file is a
    UsageError, a corrupt one a CheckpointError, before anything is built."""

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        from mxprobe.callbacks.checkpoint_io import read_verified

        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in _CKPT_KEYWORDS or "://" in str(ckpt_path):
            return
        if not Path(ckpt_path).is_file():
            raise UsageError(f"ckpt_path {ckpt_path!r}: no such file")
        read_verified(ckpt_path)


# What Lightning takes as a ckpt_path besides a file: it resolves them itself.
_CKPT_KEYWORDS = ("last", "best", "hpc")
