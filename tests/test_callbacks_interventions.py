"""PrecisionIntervention: rules, actions, rewinds, exact resume, configuration errors."""

import copy

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from mxprobe.callbacks import (
    RECORD_FILE,
    GradientBiasMonitor,
    LossSpikeDetector,
    PrecisionIntervention,
    read_events,
    read_record,
)

import mxprobe
from mxprobe.modules import quantize_role
from tests.helpers_lightning import TinyMx, trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def _rule(name, trigger, action, **extra):
    return {"name": name, "trigger": trigger, "action": action, **extra}


def _weights(module):
    return torch.cat([t.detach().reshape(-1) for t in module.state_dict().values()])


def _without_time(events):
    return [{k: v for k, v in e.items() if k != "time"} for e in events]


def test_step_rule_switches_norm_affine(tmp_path):
    module = TinyMx()
    rule = _rule(
        "norms-to-bf16",
        {"kind": "step", "at": 2},
        {"kind": "set_scheme", "scheme": "norm=bf16", "modules": "*norm"},
    )
    intervention = PrecisionIntervention(rules=[rule])
    trainer(tmp_path, 3, [intervention]).fit(module)
    rows = {name: roles for name, _, roles in mxprobe.describe(module).rows}
    assert rows["model.0.norm"]["norm_affine"] == "bf16"
    assert rows["model.1.norm"]["norm_affine"] == "bf16"
    assert rows["model.0.fc1"]["weight"] == "fp8_e4m3"
    assert "bf16" in str(mxprobe.describe(module)).splitlines()[1]
    (event,) = read_events(tmp_path)
    assert event["step"] == 2 and event["kind"] == "set_scheme"
    assert event["rule"] == "norms-to-bf16" and event["values"] == {"at": 2}
    assert event["scheme_before"] == {"model.0.norm": "mxfp8_e4m3", "model.1.norm": "mxfp8_e4m3"}
    after = mxprobe.PrecisionScheme.parse(event["scheme_after"]["model.0.norm"])
    assert after == mxprobe.PRESETS["mxfp8_e4m3"].amend("norm=bf16")
    assert intervention.timeline == _without_time([event])


@pytest.mark.parametrize("snap", [True, False])
def test_snapping_rule_sets_switched_weights_to_their_mx_values(tmp_path, snap):
    module = TinyMx(lr=0.0)  # the weights move only by the snap
    norms = [m for m in module.modules() if isinstance(m, torch.nn.LayerNorm)]
    with torch.no_grad():
        for i, norm in enumerate(norms):
            gen = torch.Generator().manual_seed(i)
            norm.weight.copy_(1.0 + 0.1 * torch.randn(norm.weight.shape, generator=gen))
            norm.bias.copy_(0.1 * torch.randn(norm.bias.shape, generator=gen))
    initial = [p.clone() for norm in norms for p in (norm.weight, norm.bias)]
    scheme = mxprobe.PRESETS["mxfp8_e4m3"]
    mx_values = [quantize_role(p, scheme, "norm_affine") for p in initial]
    assert not all(torch.equal(q, p) for q, p in zip(mx_values, initial, strict=True))
    action = {"kind": "set_scheme", "scheme": "norm=bf16", "modules": "*norm", "snap": snap}
    intervention = PrecisionIntervention(rules=[_rule("snap", {"kind": "step", "at": 2}, action)])
    trainer(tmp_path, 3, [intervention]).fit(module)
    final = [p for norm in norms for p in (norm.weight, norm.bias)]
    want = mx_values if snap else initial
    assert all(torch.equal(a, b) for a, b in zip(final, want, strict=True))
    (event,) = read_events(tmp_path)
    assert event["snap"] is snap


def test_spike_rule_acts_at_the_next_step(tmp_path):
    module = TinyMx(spike_at=6, return_dict=True)
    rule = _rule(
        "spike-to-bf16",
        {"kind": "spike", "signal": "loss"},
        {"kind": "set_scheme", "scheme": "mxfp8_e4m3,norm=bf16,a=bf16"},
        cooldown=5,
    )
    callbacks = [PrecisionIntervention(rules=[rule]), LossSpikeDetector(window=4)]
    trainer(tmp_path, 8, callbacks).fit(module)
    events = read_events(tmp_path)
    assert [(e["step"], e["kind"]) for e in events] == [(6, "spike"), (7, "set_scheme")]
    assert events[1]["values"]["spike_step"] == 6
    assert events[1]["values"]["loss"] == events[0]["values"]["loss"]
    assert all(s.act == "bf16" for s in mxprobe.schemes_of(module.model).values())


class Probe(Callback):
    """Copies the model and optimizer state at the start of optimizer step ``step``."""

    def __init__(self, step):
        self.step, self.state = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.state = (_weights(pl_module).clone(), copy.deepcopy(trainer.optimizers[0].state))


def test_rewind_restores_the_snapshot_exactly(tmp_path):
    reference = TinyMx()
    ref_trainer = trainer(tmp_path / "ref", 4)
    ref_trainer.fit(reference)

    module = TinyMx()
    rule = _rule(
        "rewind",
        {"kind": "step", "at": 6},
        {"kind": "rewind", "steps": 2, "then": {"kind": "set_scheme", "scheme": "norm=bf16"}},
    )
    intervention = PrecisionIntervention(rules=[rule], snapshot_every=2, keep_snapshots=3)
    probe = Probe(6)
    run = trainer(tmp_path, 8, [intervention, probe])
    run.fit(module)
    weights, optimizer_state = probe.state
    assert torch.equal(weights, _weights(reference))
    ref_state = list(ref_trainer.optimizers[0].state.values())
    for ours, theirs in zip(optimizer_state.values(), ref_state, strict=True):
        assert all(torch.equal(ours[k], theirs[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert run.global_step == 8  # the step counter keeps going
    assert [s.step for s in intervention.snapshots] == [2, 4, 6]
    kinds = [(e["step"], e["kind"], e.get("rewound_to")) for e in intervention.timeline]
    assert kinds == [(6, "rewind", 4), (6, "set_scheme", None)]


def test_scale_lr_survives_the_scheduler(tmp_path):
    lrs = []
    for rules in (
        [],
        [_rule("half", {"kind": "step", "at": 2}, {"kind": "scale_lr", "factor": 0.5})],
    ):
        module = TinyMx(schedule=True)
        run = trainer(tmp_path, 5, [PrecisionIntervention(rules=rules)])
        run.fit(module)
        lrs.append(run.optimizers[0].param_groups[0]["lr"])
    assert lrs[1] == pytest.approx(0.5 * lrs[0], rel=1e-12)


def _resume_callbacks():
    rules = [
        _rule("norms", {"kind": "step", "at": 3}, {"kind": "set_scheme", "scheme": "norm=bf16"}),
        _rule(
            "early-rewind",
            {"kind": "step", "at": 5},
            {
                "kind": "rewind",
                "steps": 2,
                "then": {"kind": "set_scheme", "scheme": "a=bf16", "modules": "model.1.*"},
            },
        ),
        _rule(
            "zeta",
            {
                "kind": "metric",
                "name": "mx/grad_bias/total/zeta",
                "op": ">",
                "value": 0.0,
                "for_steps": 4,
            },
            {"kind": "scale_lr", "factor": 0.9},
        ),
        _rule("spike", {"kind": "spike"}, {"kind": "scale_lr", "factor": 0.5}),
        _rule(
            "late-rewind",
            {"kind": "step", "at": 9},
            {
                "kind": "rewind",
                "steps": 5,
                "then": {"kind": "set_scheme", "scheme": "mxfp8_e5m2", "modules": "model.0.*"},
            },
        ),
    ]
    intervention = PrecisionIntervention(
        rules=rules, snapshot_every=2, keep_snapshots=3, checkpoint_snapshots=True
    )
    return [
        GradientBiasMonitor(every_n_steps=2),
        LossSpikeDetector(window=3),
        intervention,
    ]


def test_resume_after_interventions_is_bitwise_identical(tmp_path):
    full = TinyMx(spike_at=7)
    callbacks = _resume_callbacks()
    # Saved after step 4, which measured zeta: the resumed run must count that measurement.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    trainer(tmp_path / "full", 11, [*callbacks, checkpoint], enable_checkpointing=True).fit(full)
    timeline = _without_time(callbacks[2].timeline)
    assert [(e["step"], e["rule"], e["kind"]) for e in timeline] == [
        (3, "norms", "set_scheme"),
        (5, "early-rewind", "rewind"),
        (5, "early-rewind", "set_scheme"),
        (7, "zeta", "scale_lr"),
        (8, "spike", "scale_lr"),
        (9, "late-rewind", "rewind"),
        (9, "late-rewind", "set_scheme"),
    ]
    assert timeline[5]["rewound_to"] == 2  # a snapshot taken before the checkpoint

    resumed = TinyMx(spike_at=7)
    again = _resume_callbacks()
    run = trainer(tmp_path / "resumed", 11, again)
    run.fit(resumed, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=5.ckpt")
    assert torch.equal(_weights(resumed), _weights(full))
    assert _without_time(again[2].timeline) == timeline
    assert mxprobe.schemes_of(resumed) == mxprobe.schemes_of(full)
    assert again[1].spikes == callbacks[1].spikes
    # Resumed into another directory, the record carries on the checkpoint's: one history,
    # equal to the uninterrupted run's, and the old record points to the new one.
    whole, carried_on = read_record(tmp_path / "full"), read_record(tmp_path / "resumed")
    assert [(e["step"], e["kind"]) for e in carried_on.events][:4] == [
        (3, "set_scheme"),  # from before the checkpoint, carried over
        (5, "rewind"),
        (5, "set_scheme"),
        (7, "scale_lr"),
    ]
    assert _without_time(carried_on.events) == _without_time(whole.events)
    assert carried_on.losses == whole.losses and carried_on.readings == whole.readings
    assert whole.meta["continued_in"] == str(tmp_path / "resumed" / RECORD_FILE)


def test_schemes_are_restored_before_training_resumes(tmp_path):
    module = TinyMx()
    rule = _rule("a", {"kind": "step", "at": 1}, {"kind": "set_scheme", "scheme": "w=e5m2"})
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer(
        tmp_path, 2, [PrecisionIntervention(rules=[rule]), checkpoint], enable_checkpointing=True
    ).fit(module)
    fresh = TinyMx()
    intervention = PrecisionIntervention(rules=[rule])

    class SchemeAtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            self.weight = {s.weight for s in mxprobe.schemes_of(pl_module).values()}

    seen = SchemeAtStart()  # runs before the intervention's own on_train_start
    trainer(tmp_path, 3, [seen, intervention]).fit(
        fresh, ckpt_path=tmp_path / "epoch=0-step=2.ckpt"
    )
    assert seen.weight == {"fp8_e5m2"}

    # Resuming with an extra rule changes the state key: the saved state is adopted.
    later = _rule("b", {"kind": "step", "at": 50}, {"kind": "scale_lr", "factor": 2})
    renamed = PrecisionIntervention(rules=[rule, later])
    with pytest.warns(UserWarning, match="adopting its timeline"):
        trainer(tmp_path, 3, [renamed]).fit(TinyMx(), ckpt_path=tmp_path / "epoch=0-step=2.ckpt")
    assert [e["rule"] for e in renamed.timeline] == ["a"]
    assert renamed.rule_states["a"].fired == 1


def test_setup_rejects_unknown_modules_and_missing_detector(tmp_path):
    bad_glob = _rule(
        "r",
        {"kind": "step", "at": 1},
        {"kind": "set_scheme", "scheme": "norm=bf16", "modules": "encoder.*"},
    )
    with pytest.raises(ValueError, match="rule 'r': no MX module matches 'encoder.\\*'"):
        trainer(tmp_path, 1, [PrecisionIntervention(rules=[bad_glob])]).fit(TinyMx())
    no_role = _rule(
        "n",
        {"kind": "step", "at": 1},
        {"kind": "set_scheme", "scheme": "norm=bf16", "modules": "*.fc*"},
    )
    with pytest.raises(ValueError, match="rule 'n': scheme 'norm=bf16' sets norm_affine"):
        trainer(tmp_path, 1, [PrecisionIntervention(rules=[no_role])]).fit(TinyMx())
    spike = _rule("s", {"kind": "spike"}, {"kind": "scale_lr", "factor": 0.5})
    with pytest.raises(MisconfigurationException, match="no LossSpikeDetector"):
        trainer(tmp_path, 1, [PrecisionIntervention(rules=[spike])]).fit(TinyMx())


def test_metric_without_its_monitor_is_refused_before_training(tmp_path):
    rule = _rule(
        "z",
        {"kind": "metric", "name": "mx/grad_bias/total/zeta", "op": ">", "value": 1},
        {"kind": "scale_lr", "factor": 0.5},
    )
    module = TinyMx()
    with pytest.raises(MisconfigurationException, match="no GradientBiasMonitor callback"):
        trainer(tmp_path, 5, [PrecisionIntervention(rules=[rule])]).fit(module)
    assert module.trainer.global_step == 0


def test_metric_never_published_stops_training(tmp_path):
    rule = _rule(
        "z",
        {"kind": "metric", "name": "mx/grad_bias/total/zetaa", "op": ">", "value": 1},
        {"kind": "scale_lr", "factor": 0.5},
    )
    module = TinyMx()
    callbacks = [GradientBiasMonitor(every_n_steps=2), PrecisionIntervention(rules=[rule])]
    with pytest.raises(RuntimeError, match="'mx/grad_bias/total/zetaa'.*mx/grad_bias/total/zeta"):
        trainer(tmp_path, 5, callbacks).fit(module)
    assert module.trainer.global_step == 1  # stopped at the check after the first reading


def test_callbacks_parse_from_yaml():
    from jsonargparse import ArgumentParser
    from lightning.pytorch import Callback as LightningCallback

    config = """
callbacks:
  - class_path: mxprobe.callbacks.GradientBiasMonitor
    init_args: {every_n_steps: 25}
  - class_path: mxprobe.callbacks.NormAffineMonitor
  - class_path: mxprobe.callbacks.ActivationMonitor
    init_args: {reference_format: e4m3}
  - class_path: mxprobe.callbacks.LossSpikeDetector
    init_args: {method: derivative, window: 100}
  - class_path: mxprobe.callbacks.PrecisionIntervention
    init_args:
      snapshot_every: 50
      rules:
        - name: norms-to-bf16
          trigger: {kind: metric, name: mx/grad_bias/total/zeta, op: ">", value: 0.5, for_steps: 3}
          action: {kind: set_scheme, scheme: "norm=bf16", modules: "*"}
          cooldown: 200
        - name: rewind-on-spike
          trigger: {kind: spike}
          action: {kind: rewind, steps: 200, then: {kind: set_scheme, scheme: "mxfp8_e4m3,a=bf16"}}
"""
    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[LightningCallback])
    built = parser.instantiate_classes(parser.parse_string(config)).callbacks
    assert [type(c).__name__ for c in built] == [
        "GradientBiasMonitor",
        "NormAffineMonitor",
        "ActivationMonitor",
        "LossSpikeDetector",
        "PrecisionIntervention",
    ]
    assert built[0].every_n_steps == 25 and built[3].method == "derivative"
    assert [r.name for r in built[4].rules] == ["norms-to-bf16", "rewind-on-spike"]
    assert built[4].rules[1].action.then.scheme == "mxfp8_e4m3,a=bf16"


class BuiltInConfigureModel(TinyMx):
    """The model is built and converted in configure_model (after the callbacks' setup)."""

    def __init__(self) -> None:
        super().__init__()
        self._pending = [self.model]  # a list: not registered as a submodule until configured
        self.model = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self._pending.pop()


def test_rules_check_modules_after_configure_model(tmp_path):
    rule = _rule(
        "r",
        {"kind": "step", "at": 1},
        {"kind": "set_scheme", "scheme": "norm=bf16", "modules": "*"},
    )
    intervention = PrecisionIntervention(rules=[rule])
    trainer(tmp_path, 2, [intervention]).fit(BuiltInConfigureModel())
    assert [e["rule"] for e in intervention.timeline] == ["r"]
