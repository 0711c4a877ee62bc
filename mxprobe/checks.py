"""The argument checks shared by the whole package: each raises ``ValueError`` with one line that
names the argument, the value given and what was expected."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def check_choice(value: T, choices: Iterable[Any], name: str) -> T:
    """``value`` if it is one of ``choices``; otherwise a ValueError naming both."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(
            f"unknown {name} {value!r}; expected one of {', '.join(map(str, choices))}"
        )
    return value


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``; otherwise a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_number(value: Any, name: str) -> float:
    """``value`` as a float if it is an int or float (not a bool); otherwise a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)
