"""The MX schemes in a checkpoint: one entry, one format, written and read by these helpers.

Which format each MX module computes in is model state, like its weights: it goes into the
checkpoint next to ``state_dict`` as ``checkpoint["mx_precision"] = {qualified module name:
PrecisionScheme.to_dict() or None}`` (names as in ``mxprobe.schemes_of(pl_module)``), whatever
changed it (a rule, ``mxprobe.amend_scheme``, ``mxprobe.set_scheme``). mxprobe's
LightningModules call :func:`save_schemes` / :func:`load_schemes` from the
``on_save_checkpoint`` / ``on_load_checkpoint`` of their base
(:class:`mxprobe.models.lit_base.MxLitModule`), so a checkpoint keeps its schemes with no
callback; :class:`~mxprobe.callbacks.PrecisionIntervention` calls them too, so any other
LightningModule's checkpoints keep them as well. Both read the live model at save time, so they
write the same value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from mxprobe.convert import restore_schemes, schemes_of
from mxprobe.scheme import PrecisionScheme

SCHEMES_KEY = "mx_precision"


def save_schemes(model: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Store the current scheme of every MX module of ``model`` in ``checkpoint``."""
    checkpoint[SCHEMES_KEY] = {
        name: None if scheme is None else scheme.to_dict()
        for name, scheme in schemes_of(model).items()
    }


def saved_schemes(checkpoint: Mapping[str, Any]) -> dict[str, PrecisionScheme | None] | None:
    """The schemes a checkpoint holds (``None``: it holds none)."""
    if SCHEMES_KEY not in checkpoint:
        return None
    return {
        name: None if d is None else PrecisionScheme.from_dict(d)
        for name, d in checkpoint[SCHEMES_KEY].items()
    }


def load_schemes(model: nn.Module, checkpoint: Mapping[str, Any]) -> bool:
    """Put back the schemes ``checkpoint`` holds; returns whether it held any.

    Raises:
        ValueError: when the checkpoint names MX modules ``model`` lacks (it was written by
            another model).
    """
    schemes = saved_schemes(checkpoint)
    if schemes is None:
        return False
    try:
        restore_schemes(model, schemes)
    except ValueError as exc:
        raise ValueError(
            f"{exc}. The checkpoint's MX schemes ({SCHEMES_KEY!r}) belong to another model: "
            "load it into the model that wrote it, or delete that entry to keep this model's "
            "own schemes"
        ) from None
    return True
