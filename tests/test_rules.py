"""Rules, triggers and actions: self-validation, errors of YAML rules, ``kind`` as a field typed
by its one value, round trips through plain dicts, typed parsing and help through jsonargparse,
and a new action as one class and a table entry."""

import dataclasses
import re
import typing
from typing import Any, Literal

import pytest
from jsonargparse import ArgumentParser
from mxprobe.callbacks import PrecisionIntervention, Rule, read_events
from mxprobe.callbacks.actions import Action, ActionContext
from mxprobe.callbacks.rules import (
    ACTIONS,
    TRIGGERS,
    MetricTrigger,
    RewindAction,
    ScaleLrAction,
    SetSchemeAction,
    SpikeTrigger,
    StepTrigger,
    Trigger,
)

from tests.helpers_lightning import TinyMx, trainer

MEMBERS = [SpikeTrigger, StepTrigger, MetricTrigger, SetSchemeAction, ScaleLrAction, RewindAction]


@pytest.mark.parametrize("cls", MEMBERS)
def test_kind_is_a_field_typed_by_its_one_value(cls):
    kind = {f.name: f for f in dataclasses.fields(cls)}["kind"]
    assert kind.default == cls.kind
    assert typing.get_args(typing.get_type_hints(cls)["kind"]) == (cls.kind,)
    table = TRIGGERS if issubclass(cls, Trigger) else ACTIONS
    assert table[cls.kind] is cls


def test_a_trigger_cannot_be_given_another_kind():
    with pytest.raises(ValueError, match="kind of a StepTrigger is 'step', got 'metric'"):
        StepTrigger(at=3, kind="metric")
    with pytest.raises(ValueError, match="kind of a SetSchemeAction is 'set_scheme'"):
        SetSchemeAction(scheme="norm=bf16", kind="rewind")
    assert StepTrigger(at=3).kind == "step"


def test_families_list_their_kinds_in_the_documented_order():
    assert list(TRIGGERS) == ["spike", "step", "metric"]
    assert list(ACTIONS) == ["set_scheme", "scale_lr", "rewind"]


STEP = StepTrigger(at=1)
HALVE = ScaleLrAction(factor=0.5)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: SpikeTrigger(signal="gradnorm"),
            "unknown signal 'gradnorm'; expected one of any, loss, grad_norm, nonfinite",
        ),
        (lambda: StepTrigger(at=-1), "at must be an integer >= 0, got -1"),
        (lambda: StepTrigger(at=1.5), "at must be an integer >= 0, got 1.5"),
        (lambda: StepTrigger(at=True), "at must be an integer >= 0, got True"),
        (lambda: MetricTrigger(name="", op=">", value=1), "name must be a metric name, got ''"),
        (
            lambda: MetricTrigger(name="m", op="=>", value=1),
            "unknown operator '=>'; expected one of >, >=, <, <=, ==, !=",
        ),
        (lambda: MetricTrigger(name="m", op=">", value="big"), "value must be a number"),
        (
            lambda: MetricTrigger(name="val_loss", op=">", value=1),
            "metric 'val_loss' is not an mxprobe reading",
        ),
        (
            lambda: MetricTrigger(name="m", op=">", value=1, for_steps=0),
            "for_steps must be an integer >= 1, got 0",
        ),
        (
            lambda: MetricTrigger(name="m", op=">", value=1, after=-1),
            "after must be an integer >= 0, got -1",
        ),
        (lambda: SetSchemeAction(scheme="norm=e4m4"), "bad scheme 'norm=e4m4'"),
        (lambda: SetSchemeAction(scheme="bf16", modules=""), "modules must be a glob string"),
        (
            lambda: SetSchemeAction(scheme="bf16", snap="yes"),
            "snap must be true or false, got 'yes'",
        ),
        (lambda: ScaleLrAction(factor=0), "factor must be positive, got 0.0"),
        (lambda: ScaleLrAction(factor="2"), "factor must be a number, got '2'"),
        (lambda: RewindAction(steps=0), "steps must be an integer >= 1, got 0"),
        (
            lambda: RewindAction(steps=2, then=RewindAction(steps=1)),
            "then must be an action of kind set_scheme or scale_lr",
        ),
        (lambda: Rule("", STEP, HALVE), "rule '': name must be a non-empty string"),
        (
            lambda: Rule("r", {"kind": "step", "at": 1}, HALVE),
            "rule 'r': trigger must be one of spike, step, metric",
        ),
        (
            lambda: Rule("r", STEP, STEP),
            "rule 'r': action must be one of set_scheme, scale_lr, rewind",
        ),
        (lambda: Rule("r", STEP, HALVE, cooldown=-1), "rule 'r': cooldown must be an integer >= 0"),
        (
            lambda: Rule("r", STEP, HALVE, max_times=0),
            "rule 'r': max_times must be an integer >= 1, got 0",
        ),
    ],
)
def test_dataclasses_validate_themselves(build, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        build()


def test_numbers_are_normalised_to_float():
    assert MetricTrigger(name="mx/grad_bias/total/zeta", op=">", value=1).value == 1.0
    assert isinstance(ScaleLrAction(factor=2).factor, float)


def test_dict_errors_carry_the_rule_and_the_kind():
    with pytest.raises(ValueError, match=r"rule 'r' trigger: at must be an integer >= 0, got -2"):
        Rule.from_dict({"name": "r", "trigger": {"kind": "step", "at": -2}, "action": {}})
    with pytest.raises(ValueError, match=r"rule 'r' action \(scale_lr\): unknown key\(s\) 'fac'"):
        Rule.from_dict(
            {
                "name": "r",
                "trigger": {"kind": "step", "at": 1},
                "action": {"kind": "scale_lr", "fac": 2},
            }
        )


@pytest.mark.parametrize(
    "rule",
    [
        {
            "name": "zeta",
            "trigger": {
                "kind": "metric",
                "name": "mx/grad_bias/total/zeta",
                "op": ">",
                "value": 0.5,
                "for_steps": 3,
                "after": 10,
            },
            "action": {"kind": "set_scheme", "scheme": "norm=bf16", "modules": "*", "snap": True},
            "cooldown": 200,
            "max_times": None,
        },
        {
            "name": "rewind",
            "trigger": {"kind": "spike", "signal": "loss"},
            "action": {
                "kind": "rewind",
                "steps": 50,
                "then": {"kind": "scale_lr", "factor": 1.0},
            },
            "cooldown": 100,
            "max_times": 3,
        },
    ],
)
def test_rules_round_trip_through_plain_dicts(rule):
    parsed = Rule.from_dict(rule)
    assert parsed.to_dict() == rule
    assert Rule.from_dict(parsed.to_dict()) == parsed
    assert Rule.from_dict(parsed) is parsed


def _rule(name, trigger, action, **extra):
    return {"name": name, "trigger": trigger, "action": action, **extra}


@pytest.mark.parametrize(
    ("rules", "match"),
    [
        (
            [_rule("r", {"kind": "stepp", "at": 1}, {"kind": "scale_lr", "factor": 2})],
            "unknown kind 'stepp'; expected one of spike, step, metric",
        ),
        (
            [_rule("r", {"kind": "step", "at": 1}, {"kind": "set_precision", "scheme": "bf16"})],
            "unknown kind 'set_precision'",
        ),
        (
            [
                _rule(
                    "r",
                    {"kind": "metric", "name": "m", "op": "=>", "value": 1},
                    {"kind": "scale_lr", "factor": 2},
                )
            ],
            "unknown operator '=>'",
        ),
        (
            [_rule("r", {"kind": "step", "at": 1}, {"kind": "set_scheme", "scheme": "norm=e4m4"})],
            "rule 'r' action: bad scheme 'norm=e4m4'",
        ),
        (
            [_rule("r", {"kind": "step", "at": 1}, {"kind": "set_scheme", "scheme": "nrom=bf16"})],
            "unknown key 'nrom'",
        ),
        (
            [
                {
                    **_rule("r", {"kind": "step", "at": 1}, {"kind": "scale_lr", "factor": 2}),
                    "coolddown": 3,
                }
            ],
            "unknown key\\(s\\) 'coolddown'",
        ),
        ([_rule("r", {"kind": "step"}, {"kind": "scale_lr", "factor": 2})], "missing 'at'"),
        (
            [
                _rule(
                    "r",
                    {"kind": "step", "at": 1},
                    {"kind": "rewind", "steps": 3, "then": {"kind": "rewind", "steps": 1}},
                )
            ],
            "then: unknown kind 'rewind'",
        ),
        (
            [
                _rule(
                    "r",
                    {"kind": "step", "at": 1},
                    {"kind": "set_scheme", "scheme": "norm=bf16", "snap": "yes"},
                )
            ],
            "snap must be true or false, got 'yes'",
        ),
        (
            [_rule("r", {"kind": "step", "at": 1}, {"kind": "scale_lr", "factor": -1})],
            "factor must be positive",
        ),
        (
            [
                _rule(
                    "r", {"kind": "spike", "signal": "gradnorm"}, {"kind": "scale_lr", "factor": 2}
                )
            ],
            "unknown signal 'gradnorm'",
        ),
        (
            [_rule("r", {"kind": "step", "at": 1}, {"kind": "scale_lr", "factor": 2}, cooldown=-1)],
            "cooldown must be an integer >= 0",
        ),
        (
            [_rule("r", {"kind": "step", "at": 1}, {"kind": "scale_lr", "factor": 2})] * 2,
            "duplicated: r",
        ),
    ],
)
def test_bad_rules_are_rejected(rules, match):
    with pytest.raises(ValueError, match=match):
        PrecisionIntervention(rules=rules)


def test_rule_objects_are_validated_like_dicts():
    rule = Rule.from_dict(_rule("r", {"kind": "step", "at": 4}, {"kind": "scale_lr", "factor": 2}))
    assert PrecisionIntervention(rules=[rule]).rules == [rule]
    with pytest.raises(ValueError, match="at must be an integer"):
        PrecisionIntervention(rules=[Rule("bad", rule.trigger.__class__(at=-2), rule.action)])


@pytest.fixture
def note_action(monkeypatch):
    """A test-only action, in the ACTIONS table only while the test runs: adds ``text`` to its
    event. (In the package, listing it in ``actions.AnyAction`` also types it for YAML.)"""

    @dataclasses.dataclass(frozen=True)
    class NoteAction(Action):
        text: str
        kind: Literal["note"] = "note"

        def apply(self, context: ActionContext) -> dict[str, Any]:
            return {"text": self.text, "at_step": context.step}

    monkeypatch.setitem(ACTIONS, "note", NoteAction)
    return NoteAction


def test_a_new_action_is_one_class_and_a_table_entry(tmp_path, note_action):
    rule = {
        "name": "n",
        "trigger": {"kind": "step", "at": 1},
        "action": {"kind": "note", "text": "hi"},
    }
    intervention = PrecisionIntervention(rules=[rule])
    assert intervention.rules[0].action == note_action(text="hi")
    trainer(tmp_path, 2, [intervention]).fit(TinyMx())
    (note,) = read_events(tmp_path)
    assert (note["kind"], note["text"], note["at_step"], note["rule"]) == ("note", "hi", 1, "n")


def _parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PrecisionIntervention, "intervention")
    return parser


YAML_RULES = """
intervention:
  rules:
    - name: zeta
      trigger: {kind: metric, name: mx/grad_bias/total/zeta, op: ">", value: 1}
      action: {kind: rewind, steps: 5, then: {kind: set_scheme, scheme: "norm=bf16", snap: true}}
    - name: at-3
      trigger: {kind: step, at: 3}
      action: {kind: scale_lr, factor: 2}
      max_times: null
"""


def test_yaml_rules_parse_into_their_types():
    parser = _parser()
    intervention = parser.instantiate(parser.parse_string(YAML_RULES)).intervention
    assert isinstance(intervention, PrecisionIntervention)
    zeta, at_3 = intervention.rules
    assert zeta.trigger == MetricTrigger(name="mx/grad_bias/total/zeta", op=">", value=1.0)
    assert zeta.action == RewindAction(steps=5, then=SetSchemeAction("norm=bf16", snap=True))
    assert (at_3.trigger, at_3.action, at_3.max_times) == (
        STEP.__class__(at=3),
        ScaleLrAction(2),
        None,
    )


@pytest.mark.parametrize(
    ("change", "bad"),
    [
        (("kind: step, at: 3", "kind: stepp, at: 3"), "stepp"),
        (("kind: step, at: 3", "kind: step, att: 3"), "att"),
        (('op: ">"', 'op: "=>"'), "=>"),
        (("factor: 2", "factor: big"), "big"),
        (("max_times: null", "max_time: null"), "max_time"),
    ],
)
def test_yaml_rules_are_checked_against_their_types_when_parsed(change, bad):
    with pytest.raises(Exception, match=re.escape(bad)):
        _parser().parse_string(YAML_RULES.replace(*change))


def test_help_shows_the_fields_of_rules_triggers_and_actions(capsys):
    for option in ("--intervention.rules.help", "--intervention.rules.trigger.help=MetricTrigger"):
        with pytest.raises(SystemExit):
            _parser().parse_args([option])
    shown = " ".join(capsys.readouterr().out.split())
    assert "SpikeTrigger | StepTrigger | MetricTrigger" in shown
    assert "SetSchemeAction | ScaleLrAction | RewindAction" in shown
    assert "how often the rule may fire in the whole run" in shown
    assert "consecutive measurements the condition must hold" in shown
    assert "Literal['>', '>=', '<', '<=', '==', '!=']" in shown
