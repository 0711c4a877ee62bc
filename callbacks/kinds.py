"""Frozen dataclasses chosen in YAML by their ``kind`` (rule triggers and actions), and the
checks their ``__post_init__`` share.

A family (:class:`~mxprobe.callbacks.rules.Trigger`, :class:`~mxprobe.callbacks.actions.Action`)
subclasses :class:`YamlKind`; a member is a dataclass that subclasses the family, has the field
``kind: Literal["<its kind>"] = "<its kind>"`` and is listed in its family's union
(``rules.AnyTrigger``, ``actions.AnyAction``), from which the ``{kind: class}`` tables
(``rules.TRIGGERS``, ``actions.ACTIONS``) are built. ``kind`` is a field, typed by its one
value, so that jsonargparse (LightningCLI) shows every member's fields in ``--help``, tells the
members of a union apart in YAML by it, and writes it back in a saved ``config.yaml``;
``StepTrigger(at=3, kind="metric")`` is a ``ValueError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

K = TypeVar("K", bound="YamlKind")


@dataclasses.dataclass(frozen=True)
class YamlKind:
    """Base of the families of YAML-selectable dataclasses (no registry: each family lists its
    members in a union and a plain ``{kind: class}`` table built from it).

    A dataclass without fields, as its families are: jsonargparse reads a class whose bases are
    all dataclasses from its fields, and any other class as a ``class_path`` + ``init_args``.
    Not annotated here: a member's own ``kind`` field would then keep this position, first,
    ahead of the member's required fields.
    """

    def __post_init__(self) -> None:
        """Refuses an instance whose ``kind`` is not its class's (members call it first)."""
        own = type(self).kind
        if self.kind != own:
            raise ValueError(
                f"kind of a {type(self).__name__} is {own!r}, got {self.kind!r}; "
                f"another kind is another class"
            )

    @classmethod
    def parse_fields(cls, values: dict[str, Any], where: str) -> dict[str, Any]:
        """Turn nested plain values into objects before construction (default: none)."""
        return values

    def to_dict(self) -> dict[str, Any]:
        """The plain dict :func:`from_mapping` reads back (``kind`` first)."""
        out: dict[str, Any] = {"kind": self.kind}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = value.to_dict() if isinstance(value, YamlKind) else value
        return out


def from_mapping(
    table: Mapping[str, type[K]], d: Any, where: str, allowed: Iterable[str] | None = None
) -> K:
    """Build the member of ``table`` named by ``d["kind"]`` from a plain dict.

    Raises:
        ValueError: prefixed with ``where``, for a non-mapping, an unknown kind (the message
            lists ``allowed``, default: every member), an unknown or missing key, or a value the
            member's ``__post_init__`` rejects.
    """
    choices = {k: table[k] for k in (table if allowed is None else allowed)}
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping with a 'kind', got {d!r}")
    kind = d.get("kind")
    if kind not in choices:
        raise ValueError(f"{where}: unknown kind {kind!r}; expected one of {', '.join(choices)}")
    member = choices[kind]
    fields = dataclasses.fields(member)
    check_keys(d, (f.name for f in fields), f"{where} ({kind})")
    missing = [f.name for f in fields if _required(f) and f.name not in d]
    if missing:
        raise ValueError(f"{where} ({kind}): missing {', '.join(map(repr, missing))}")
    values = member.parse_fields({k: v for k, v in d.items() if k != "kind"}, where)
    try:
        return member(**values)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


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
