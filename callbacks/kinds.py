"""Frozen dataclasses chosen in YAML by their ``kind`` (rule triggers and actions), and the
checks their ``__post_init__`` share.

A family (:class:`~mxprobe.callbacks.rules.Trigger`, :class:`~mxprobe.callbacks.actions.Action`)
is a direct subclass of :class:`Kinded`; a member is a dataclass that subclasses the family and
sets ``kind: ClassVar[str]``, which registers it. ``kind`` is a class constant, not a field, so
``StepTrigger(at=3, kind="metric")`` is a ``TypeError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, TypeVar

K = TypeVar("K", bound="Kinded")


class Kinded:
    """Base of the families of YAML-selectable dataclasses."""

    kind: ClassVar[str]
    kinds: ClassVar[dict[str, type[Kinded]]]
    """The family's members by kind, in definition order."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            cls.kinds[cls.kind] = cls
        else:
            cls.kinds = {}

    @classmethod
    def from_mapping(cls: type[K], d: Any, where: str, allowed: Iterable[str] | None = None) -> K:
        """Build the member named by ``d["kind"]`` from a plain dict.

        Raises:
            ValueError: prefixed with ``where``, for a non-mapping, an unknown kind (the message
                lists ``allowed``, default: every member), an unknown or missing key, or a value
                the member's ``__post_init__`` rejects.
        """
        choices = {k: cls.kinds[k] for k in (cls.kinds if allowed is None else allowed)}
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a mapping with a 'kind', got {d!r}")
        kind = d.get("kind")
        if kind not in choices:
            raise ValueError(
                f"{where}: unknown kind {kind!r}; expected one of {', '.join(choices)}"
            )
        member = choices[kind]
        fields = dataclasses.fields(member)
        check_keys(d, ("kind", *(f.name for f in fields)), f"{where} ({kind})")
        missing = [f.name for f in fields if _required(f) and f.name not in d]
        if missing:
            raise ValueError(f"{where} ({kind}): missing {', '.join(map(repr, missing))}")
        values = member.parse_fields({k: v for k, v in d.items() if k != "kind"}, where)
        try:
            return member(**values)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    @classmethod
    def parse_fields(cls, values: dict[str, Any], where: str) -> dict[str, Any]:
        """Turn nested plain values into objects before construction (default: none)."""
        return values

    def to_dict(self) -> dict[str, Any]:
        """The plain dict :meth:`from_mapping` reads back."""
        out: dict[str, Any] = {"kind": self.kind}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = value.to_dict() if isinstance(value, Kinded) else value
        return out


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def check_keys(d: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    valid = tuple(valid)
    unknown = [k for k in d if k not in valid]
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; expected some of "
            f"{', '.join(valid)}"
        )


def set_field(obj: Any, name: str, value: Any) -> None:
    """Normalise a field of a frozen dataclass in its ``__post_init__`` (e.g. int -> float)."""
    object.__setattr__(obj, name, value)
