"""The ``config.yaml`` LightningCLI saves in a run's directory, written atomically: a full disk
leaves the previous file or none, never a 0-byte or half ``config.yaml`` (:mod:`mxprobe.atomic`).
"""

from __future__ import annotations

from lightning.pytorch.cli import SaveConfigCallback

from mxprobe import atomic


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
