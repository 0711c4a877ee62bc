"""Intervention rules: what to watch (trigger), what to do (action), how often (cooldown,
max_times). Parsed from plain dicts (YAML) into frozen dataclasses, with every mistake
reported by rule name, key, bad value and the valid choices.

A rule as YAML::

    name: norms-to-bf16
    trigger: {kind: metric, name: mx/grad_bias/total/zeta, op: ">", value: 0.5, for_steps: 3}
    action: {kind: set_scheme, scheme: "norm=bf16", modules: "*"}
    cooldown: 200
    max_times: 1

Triggers: ``{kind: spike, signal: any}`` (``signal``: ``any``, ``loss``, ``grad_norm`` or
``nonfinite``), ``{kind: step, at: 4500}``, ``{kind: metric, name, op, value, for_steps: 1,
after: 0}``. Actions: ``{kind: set_scheme, scheme, modules: "*"}``, ``{kind: scale_lr,
factor}``, ``{kind: rewind, steps, then: <set_scheme or scale_lr action>}``; ``set_scheme``
takes ``snap: true`` for a function-preserving switch.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from typing import Any

from mxprobe.scheme import PrecisionScheme

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
SPIKE_SIGNALS = ("any", "loss", "grad_norm", "nonfinite")


@dataclasses.dataclass(frozen=True)
class SpikeTrigger:
    """Fires at the step after a ``LossSpikeDetector`` event of ``signal``."""

    signal: str = "any"
    kind: str = "spike"


@dataclasses.dataclass(frozen=True)
class StepTrigger:
    """Fires before optimizer step ``at`` (``trainer.global_step == at``)."""

    at: int
    kind: str = "step"


@dataclasses.dataclass(frozen=True)
class MetricTrigger:
    """Fires when the logged metric ``name`` satisfies ``<value> op value`` at ``for_steps``
    consecutive measurements; not checked before ``global_step >= after``."""

    name: str
    op: str
    value: float
    for_steps: int = 1
    after: int = 0
    kind: str = "metric"


@dataclasses.dataclass(frozen=True)
class SetSchemeAction:
    """Amend the scheme of the MX modules matching the glob ``modules`` with ``scheme`` (a
    partial string amends, a leading preset replaces; see ``mxprobe.amend_scheme``). With
    ``snap`` the switched weights first take the values the old scheme's forward used, so
    the switch does not change the network's output (see ``mxprobe.modules.snap_parameters``)."""

    scheme: str
    modules: str = "*"
    snap: bool = False
    kind: str = "set_scheme"


@dataclasses.dataclass(frozen=True)
class ScaleLrAction:
    """Multiply the learning rate of every parameter group (and the schedulers' base LRs)."""

    factor: float
    kind: str = "scale_lr"


@dataclasses.dataclass(frozen=True)
class RewindAction:
    """Restore the newest snapshot at least ``steps`` before now, then apply ``then``."""

    steps: int
    then: SetSchemeAction | ScaleLrAction | None = None
    kind: str = "rewind"


Trigger = SpikeTrigger | StepTrigger | MetricTrigger
Action = SetSchemeAction | ScaleLrAction | RewindAction

_TRIGGERS: dict[str, type] = {"spike": SpikeTrigger, "step": StepTrigger, "metric": MetricTrigger}
_ACTIONS: dict[str, type] = {
    "set_scheme": SetSchemeAction,
    "scale_lr": ScaleLrAction,
    "rewind": RewindAction,
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One intervention rule; build it directly or with :meth:`from_dict`."""

    name: str
    trigger: Trigger
    action: Action
    cooldown: int = 0
    """Steps after firing during which the rule cannot fire again."""
    max_times: int | None = 1
    """How often the rule may fire in the whole run; ``None``: no limit."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], index: int = 0) -> Rule:
        """Parse and validate a plain-dict rule (``name`` defaults to ``rule<index>``).

        Raises:
            ValueError: naming the rule, the key, the bad value and the valid choices.
        """
        if isinstance(d, Rule):
            d = d.to_dict()  # validate rules built in code exactly like YAML ones
        name = d.get("name", f"rule{index}") if isinstance(d, Mapping) else f"rule{index}"
        where = f"rule {name!r}"
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {d!r}")
        _check_keys(d, ("name", "trigger", "action", "cooldown", "max_times"), where)
        for key in ("trigger", "action"):
            if key not in d:
                raise ValueError(f"{where}: missing '{key}'")
        rule = cls(
            name=str(name),
            trigger=_parse_trigger(d["trigger"], f"{where} trigger"),
            action=_parse_action(d["action"], f"{where} action"),
            cooldown=d.get("cooldown", 0),
            max_times=d.get("max_times", 1),
        )
        _check_int(rule.cooldown, f"{where} cooldown", minimum=0)
        if rule.max_times is not None:
            _check_int(rule.max_times, f"{where} max_times", minimum=1)
        return rule

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def scheme_actions(self) -> list[SetSchemeAction]:
        """The set_scheme actions this rule may apply (for setup-time module checks)."""
        actions = [self.action, getattr(self.action, "then", None)]
        return [a for a in actions if isinstance(a, SetSchemeAction)]


def parse_rules(rules: list[Any] | None) -> list[Rule]:
    """Parse every rule; names must be unique (they key the rules' state in checkpoints)."""
    if rules is None:
        return []
    if not isinstance(rules, (list, tuple)):
        raise ValueError(f"rules must be a list of rules, got {rules!r}")
    parsed = [Rule.from_dict(r, i) for i, r in enumerate(rules)]
    names = [r.name for r in parsed]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"rule names must be unique; duplicated: {', '.join(duplicated)}")
    return parsed


def _check_keys(d: Mapping[str, Any], valid: tuple[str, ...], where: str) -> None:
    unknown = [k for k in d if k not in valid]
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; expected some of "
            f"{', '.join(valid)}"
        )


def _check_int(value: Any, where: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}")


def _check_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}")
    return float(value)


def _kind_and_fields(d: Any, kinds: dict[str, type], where: str) -> tuple[type, dict[str, Any]]:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping with a 'kind', got {d!r}")
    kind = d.get("kind")
    if kind not in kinds:
        raise ValueError(f"{where}: unknown kind {kind!r}; expected one of {', '.join(kinds)}")
    cls = kinds[kind]
    fields = tuple(f.name for f in dataclasses.fields(cls))
    _check_keys(d, fields, f"{where} ({kind})")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.name not in d
    ]
    if required:
        raise ValueError(f"{where} ({kind}): missing {', '.join(map(repr, required))}")
    return cls, {k: v for k, v in d.items() if k != "kind"}


def _parse_trigger(d: Any, where: str) -> Trigger:
    cls, fields = _kind_and_fields(d, _TRIGGERS, where)
    if cls is SpikeTrigger:
        signal = fields.get("signal", "any")
        if signal not in SPIKE_SIGNALS:
            raise ValueError(
                f"{where}: unknown signal {signal!r}; expected one of {', '.join(SPIKE_SIGNALS)}"
            )
        return SpikeTrigger(signal=signal)
    if cls is StepTrigger:
        _check_int(fields["at"], f"{where} at", minimum=0)
        return StepTrigger(at=fields["at"])
    if not isinstance(fields["name"], str) or not fields["name"]:
        raise ValueError(f"{where}: name must be a metric name, got {fields['name']!r}")
    if fields["op"] not in OPERATORS:
        raise ValueError(
            f"{where}: unknown operator {fields['op']!r}; expected one of {', '.join(OPERATORS)}"
        )
    trigger = MetricTrigger(
        name=fields["name"],
        op=fields["op"],
        value=_check_number(fields["value"], f"{where} value"),
        for_steps=fields.get("for_steps", 1),
        after=fields.get("after", 0),
    )
    _check_int(trigger.for_steps, f"{where} for_steps", minimum=1)
    _check_int(trigger.after, f"{where} after", minimum=0)
    return trigger


def _parse_action(d: Any, where: str, nested: bool = False) -> Action:
    kinds = {k: v for k, v in _ACTIONS.items() if not (nested and k == "rewind")}
    cls, fields = _kind_and_fields(d, kinds, where)
    if cls is SetSchemeAction:
        scheme, modules = fields["scheme"], fields.get("modules", "*")
        try:
            PrecisionScheme().amend(scheme)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: bad scheme {scheme!r}: {exc}") from None
        if not isinstance(modules, str) or not modules:
            raise ValueError(f"{where}: modules must be a glob string, got {modules!r}")
        snap = fields.get("snap", False)
        if not isinstance(snap, bool):
            raise ValueError(f"{where}: snap must be true or false, got {snap!r}")
        return SetSchemeAction(scheme=scheme, modules=modules, snap=snap)
    if cls is ScaleLrAction:
        factor = _check_number(fields["factor"], f"{where} factor")
        if not factor > 0:
            raise ValueError(f"{where}: factor must be positive, got {factor!r}")
        return ScaleLrAction(factor=factor)
    _check_int(fields["steps"], f"{where} steps", minimum=1)
    then = fields.get("then")
    then = None if then is None else _parse_action(then, f"{where} then", nested=True)
    return RewindAction(steps=fields["steps"], then=then)
