"""Checks of the optimizer settings both LightningModules take, made in ``__init__`` so that a
bad value in a YAML or on the command line is refused before any work, naming the setting."""

from __future__ import annotations

import math
from collections.abc import Sequence


def check_adam(lr: float, betas: Sequence[float], eps: float, **fractions: float) -> None:
    """Raise ValueError unless ``lr`` > 0, each beta in [0, 1), ``eps`` >= 0 (all finite) and
    each of ``fractions`` (``name=value``) in [0, 1]."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {list(betas)!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    for name, value in fractions.items():
        if not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
