"""Intervention rules: what to watch (trigger), what to do (action), how often (cooldown,
max_times). Frozen dataclasses that validate themselves. LightningCLI (jsonargparse) reads a
YAML rule into them by their types, ``kind`` telling the members of a union apart, and shows
their fields in ``--help``; :meth:`Rule.from_dict` builds them from plain dicts in Python, with
every mistake reported by rule name, key, bad value and the valid choices.

A rule as YAML::

    name: norms-to-bf16
    trigger: {kind: metric, name: mx/grad_bias/total/zeta, op: ">", value: 0.5, for_steps: 3}
    action: {kind: set_scheme, scheme: "norm=bf16", modules: "*"}
    cooldown: 200
    max_times: 1

Triggers: ``{kind: spike, signal: any}`` (``signal``: ``any``, ``loss``, ``grad_norm``,
``nonfinite`` or ``scaler_skip``; ``any`` leaves out a GradScaler's skipped steps),
``{kind: step, at: 4500}``, ``{kind: metric, name, op, value, for_steps: 1, after: 0}``.
Actions (:mod:`mxprobe.callbacks.actions`): ``{kind: set_scheme, scheme, modules: "*", snap:
false}``, ``{kind: scale_lr, factor}``, ``{kind: rewind, steps, then: <set_scheme or scale_lr
action>}``.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

from mxprobe.callbacks.actions import (
    ACTIONS,
    Action,
    AnyAction,
    RewindAction,
    ScaleLrAction,
    SetSchemeAction,
)
from mxprobe.callbacks.kinds import YamlKind, check_keys, from_mapping, set_field

from mxprobe.checks import check_choice, check_int, check_number
from mxprobe.names import MONITORS, monitor_of

Operator = Literal[">", ">=", "<", "<=", "==", "!="]
OPERATORS: dict[str, Callable[[float, float], bool]] = dict(
    zip(
        get_args(Operator),
        (operator.gt, operator.ge, operator.lt, operator.le, operator.eq, operator.ne),
        strict=True,
    )
)
SpikeSignal = Literal["any", "loss", "grad_norm", "nonfinite", "scaler_skip"]
SPIKE_SIGNALS = get_args(SpikeSignal)

__all__ = [
    "ACTIONS",
    "OPERATORS",
    "SPIKE_SIGNALS",
    "Action",
    "AnyAction",
    "AnyTrigger",
    "MetricTrigger",
    "RewindAction",
    "Rule",
    "ScaleLrAction",
    "SetSchemeAction",
    "SpikeTrigger",
    "StepTrigger",
    "TRIGGERS",
    "Trigger",
    "parse_rules",
]


@dataclasses.dataclass(frozen=True)
class Trigger(YamlKind):
    """Base of the triggers; :data:`TRIGGERS` maps each YAML ``kind`` to its class."""


@dataclasses.dataclass(frozen=True)
class SpikeTrigger(Trigger):
    """Fires at the step after a ``LossSpikeDetector`` event of ``signal``.

    Args:
        signal: ``any``, ``loss``, ``grad_norm``, ``nonfinite`` or ``scaler_skip``. ``any`` is
            every event except a GradScaler's skipped step, which is the scaler working as
            designed.
        kind: ``spike``.
    """

    signal: SpikeSignal = "any"
    kind: Literal["spike"] = "spike"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.signal, SPIKE_SIGNALS, "signal")

    def matches(self, event: Mapping[str, Any]) -> bool:
        """Whether a detector's event is of this trigger's signal."""
        if event["kind"] == "scaler_skip":
            return self.signal == "scaler_skip"
        if self.signal == "any":
            return True
        if self.signal in ("nonfinite", "scaler_skip"):
            return event["kind"] == self.signal
        return self.signal in event["signals"]


@dataclasses.dataclass(frozen=True)
class StepTrigger(Trigger):
    """Fires before one optimizer step.

    Args:
        at: the step (``trainer.global_step == at``), >= 0.
        kind: ``step``.
    """

    at: int
    kind: Literal["step"] = "step"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.at, "at", minimum=0)


@dataclasses.dataclass(frozen=True)
class MetricTrigger(Trigger):
    """Fires when an mxprobe reading compares with a threshold for some measurements.

    ``<reading> op value`` must hold at ``for_steps`` consecutive measurements.

    Args:
        name: the reading, ``mx/<monitor>/<module>/<stat>`` (e.g. ``mx/grad_bias/total/zeta``).
        op: ``>``, ``>=``, ``<``, ``<=``, ``==`` or ``!=``.
        value: the threshold.
        for_steps: consecutive measurements the condition must hold (>= 1).
        after: not checked before ``global_step >= after``.
        kind: ``metric``.
    """

    name: str
    op: Operator
    value: float
    for_steps: int = 1
    after: int = 0
    kind: Literal["metric"] = "metric"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a metric name, got {self.name!r}")
        check_choice(self.op, OPERATORS, "operator")
        set_field(self, "value", check_number(self.value, "value"))
        check_int(self.for_steps, "for_steps", minimum=1)
        check_int(self.after, "after", minimum=0)
        if monitor_of(self.name) not in MONITORS:
            raise ValueError(
                f"metric {self.name!r} is not an mxprobe reading; metric triggers watch "
                f"mx/<monitor>/<module>/<stat> with <monitor> one of {', '.join(MONITORS)}"
            )

    @property
    def monitor(self) -> str:
        """The monitor whose readings this trigger watches (``grad_bias``, ...)."""
        return monitor_of(self.name)

    def holds(self, value: float) -> bool:
        return OPERATORS[self.op](value, self.value)


# The triggers, in the order the docs list them: the type of a rule's trigger, and by YAML kind.
AnyTrigger = SpikeTrigger | StepTrigger | MetricTrigger
TRIGGERS: dict[str, type[Trigger]] = {cls.kind: cls for cls in get_args(AnyTrigger)}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One intervention rule: when it fires, what it does, how often.

    Built directly, by LightningCLI from YAML, or from a plain dict with :meth:`from_dict`.

    Args:
        name: unique among a callback's rules: it keys the rule's state in checkpoints.
        trigger: when it fires: ``{kind: spike, ...}``, ``{kind: step, ...}`` or
            ``{kind: metric, ...}``.
        action: what it does: ``{kind: set_scheme, ...}``, ``{kind: scale_lr, ...}`` or
            ``{kind: rewind, ...}``.
        cooldown: steps after firing during which the rule cannot fire again.
        max_times: how often the rule may fire in the whole run; ``null``: no limit.

    Raises:
        ValueError: for a trigger or action of the wrong type, a bad ``cooldown`` or
            ``max_times`` (the message names the rule).
    """

    name: str
    trigger: AnyTrigger
    action: AnyAction
    cooldown: int = 0
    max_times: int | None = 1

    def __post_init__(self) -> None:
        where = f"rule {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"{where}: name must be a non-empty string")
        for field, base, table in (("trigger", Trigger, TRIGGERS), ("action", Action, ACTIONS)):
            if not isinstance(getattr(self, field), base):
                raise ValueError(
                    f"{where}: {field} must be one of {', '.join(table)} "
                    f"({field} kinds), got {getattr(self, field)!r}"
                )
        try:
            check_int(self.cooldown, "cooldown", minimum=0)
            if self.max_times is not None:
                check_int(self.max_times, "max_times", minimum=1)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | Rule, index: int = 0) -> Rule:
        """Parse a plain-dict rule (``name`` defaults to ``rule<index>``); a ``Rule``, already
        validated when it was built, is returned as it is.

        Raises:
            ValueError: naming the rule, the key, the bad value and the valid choices.
        """
        if isinstance(d, Rule):
            return d
        name = d.get("name", f"rule{index}") if isinstance(d, Mapping) else f"rule{index}"
        where = f"rule {name!r}"
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {d!r}")
        check_keys(d, (f.name for f in dataclasses.fields(cls)), where)
        for key in ("trigger", "action"):
            if key not in d:
                raise ValueError(f"{where}: missing '{key}'")
        return cls(
            name=str(name),
            trigger=from_mapping(TRIGGERS, d["trigger"], f"{where} trigger"),
            action=from_mapping(ACTIONS, d["action"], f"{where} action"),
            cooldown=d.get("cooldown", 0),
            max_times=d.get("max_times", 1),
        )

    def to_dict(self) -> dict[str, Any]:
        """The plain dict :meth:`from_dict` reads back."""
        return {
            "name": self.name,
            "trigger": self.trigger.to_dict(),
            "action": self.action.to_dict(),
            "cooldown": self.cooldown,
            "max_times": self.max_times,
        }

    def scheme_actions(self) -> list[SetSchemeAction]:
        """The set_scheme actions this rule may apply (for setup-time module checks)."""
        return self.action.scheme_actions()


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
