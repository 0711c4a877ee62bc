"""In-situ precision interventions: rule-driven scheme switches, rewinds and LR scaling."""

from __future__ import annotations

import fnmatch
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from mxprobe.callbacks.events import EventLog, PeriodicMonitor, reduce_sum, scheme_strings
from mxprobe.callbacks.rules import (
    OPERATORS,
    MetricTrigger,
    RewindAction,
    Rule,
    ScaleLrAction,
    SetSchemeAction,
    SpikeTrigger,
    StepTrigger,
    parse_rules,
)
from mxprobe.callbacks.spikes import LossSpikeDetector

from mxprobe.convert import amend_scheme, module_names, restore_schemes, schemes_of
from mxprobe.scheme import PrecisionScheme


def _cpu_copy(obj: Any) -> Any:
    return apply_to_collection(obj, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))


def _clone(obj: Any) -> Any:
    return apply_to_collection(obj, torch.Tensor, torch.clone)


class PrecisionIntervention(Callback):
    r"""Change precision, rewind or scale the learning rate mid-run when a rule's trigger fires.

    Rules are plain dicts (YAML) or :class:`~mxprobe.callbacks.rules.Rule` objects; see
    :mod:`mxprobe.callbacks.rules` for the grammar. Example::

        - name: norms-to-bf16
          trigger: {kind: spike}
          action: {kind: set_scheme, scheme: "norm=bf16", modules: "*"}
          cooldown: 200
          max_times: 1

    When rules are checked: once per optimizer step, in ``on_train_batch_start`` of its first
    micro-batch, i.e. between optimizer steps, after every hook of the previous step has run
    (so the callback order in ``Trainer(callbacks=...)`` does not matter). An action taken at
    ``global_step == g`` applies from step ``g`` on:

    - ``step`` trigger ``at: g`` fires at ``g`` (before step ``g`` trains).
    - ``spike`` trigger fires at ``g`` when a ``LossSpikeDetector`` reported an
      event of the requested signal for step ``g - 1``.
    - ``metric`` trigger compares the latest ``trainer.callback_metrics[name]`` with
      ``value``, once per *measurement*: for a metric of an mxprobe monitor
      (``mx/grad_bias/``, ``mx/norm_affine/``, ``mx/activations/``, ``mx/spikes/``) a
      measurement is a step the monitor measured, so ``for_steps: 3`` with
      ``every_n_steps=50`` means three consecutive measurements (100+ steps); any other
      metric is read at every step. Checks start at ``global_step >= max(1, after)``; a
      metric absent from ``callback_metrics`` at its first check (for a monitor's metric:
      its first measurement) stops training with a message listing the metrics that exist.

    Actions (each one appended to ``events.jsonl`` and to :attr:`timeline`):

    - ``set_scheme``: ``mxprobe.amend_scheme(pl_module, scheme, modules, snap)``; a partial
      string amends each module's current scheme, a leading preset replaces it. ``snap:
      true`` first sets each switched weight to the value the old scheme's forward used, so
      the output does not jump at the switch (a run adapted to, e.g., floor-saturated
      LayerNorm gamma can otherwise blow up right after switching it to bf16).
    - ``scale_lr``: multiplies ``lr`` (and ``initial_lr``) of every parameter group of every
      optimizer and the ``base_lrs`` of every LR scheduler, so schedulers keep the change.
    - ``rewind``: restores the newest snapshot taken at a step ``<= g - steps`` (the oldest
      kept one, with a warning, when none is that old): model weights and buffers and the
      optimizer *state* (moments, step counts). Then ``then`` is applied. ``global_step``
      keeps increasing and the data stream continues with fresh batches; LR schedulers are
      not rewound and parameter-group hyperparameters (``lr``...) keep their current values,
      so the schedule stays a function of ``global_step``; precision schemes are not
      rewound either (the precision timeline only moves forward). Snapshots newer than the
      restored one belong to the abandoned trajectory and are dropped.

    Snapshots (only when some rule rewinds) are taken every ``snapshot_every`` steps in
    ``on_train_batch_start`` (after the rules), copied to CPU; the newest ``keep_snapshots``
    are kept in memory. With ``checkpoint_snapshots`` they also go into checkpoints, so a
    rewind after a resume restores exactly what the uninterrupted run would; without it a
    resumed run can only rewind to snapshots taken since the resume.

    Resume: ``state_dict`` holds the timeline, every MX module's scheme, each rule's counters
    (times fired, last step, metric streak), the current values of the watched metrics (the
    first check after a resume sees what the uninterrupted run would) and optionally the
    snapshots. ``load_state_dict``
    re-applies the schemes at once (Lightning restores callbacks after the model weights and
    before the optimizer and loops); with strategies that restore callbacks only after
    ``on_fit_start`` (FSDP, DeepSpeed) they are applied at the latest in ``on_train_start``.
    The state is keyed by the rule names; a checkpoint whose state is keyed by other names is
    adopted with a warning.

    DDP: the per-rule conditions are OR-reduced across ranks in one all-reduce per step
    before any decision, so every rank acts identically at the same step (snapshots and
    rewinds included); only rank 0 writes events.

    Args:
        rules: the rules, in the order they are checked (all may fire at one step).
        snapshot_every: steps between snapshots for ``rewind``.
        keep_snapshots: snapshots kept in memory.
        checkpoint_snapshots: also store the snapshots in checkpoints.

    Raises:
        ValueError: at construction for a malformed rule (unknown kind, key or operator, bad
            scheme string, bad number) or duplicate names; at ``setup`` for a ``modules``
            glob that matches no MX module.
        MisconfigurationException: at ``setup`` for a spike rule without a
            ``LossSpikeDetector`` in the trainer's callbacks.
        RuntimeError: at the first check of a metric rule whose metric was never logged.
    """

    def __init__(
        self,
        rules: list[dict[str, Any]] | None = None,
        snapshot_every: int = 100,
        keep_snapshots: int = 3,
        checkpoint_snapshots: bool = False,
    ) -> None:
        self.rules: list[Rule] = parse_rules(rules)
        for name, value in (("snapshot_every", snapshot_every), ("keep_snapshots", keep_snapshots)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.snapshot_every = snapshot_every
        self.keep_snapshots = keep_snapshots
        self.checkpoint_snapshots = checkpoint_snapshots
        self.timeline: list[dict[str, Any]] = []
        self._rule_state = {r.name: self._fresh_rule_state() for r in self.rules}
        self._snapshots: list[dict[str, Any]] = []
        self._events = EventLog()
        self._pl_module: pl.LightningModule | None = None
        self._pending_schemes: dict[str, str | None] | None = None
        self._checked_step: int | None = None
        self._restored_metrics: dict[str, float] = {}

    @staticmethod
    def _fresh_rule_state() -> dict[str, Any]:
        return {"fired": 0, "last_step": None, "streak": 0, "seen": False}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rules=[r.name for r in self.rules])

    @property
    def snapshots(self) -> list[dict[str, Any]]:
        """The in-memory snapshots, oldest first (``step``, ``model``, ``optimizers``)."""
        return self._snapshots

    def _needs_snapshots(self) -> bool:
        return any(isinstance(r.action, RewindAction) for r in self.rules)

    @staticmethod
    def _detectors(trainer: pl.Trainer) -> list[LossSpikeDetector]:
        return [c for c in trainer.callbacks if isinstance(c, LossSpikeDetector)]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._pl_module = pl_module
        self._events.setup(trainer)
        names = module_names(pl_module)
        for rule in self.rules:
            for action in rule.scheme_actions():
                if not any(fnmatch.fnmatchcase(n, action.modules) for n in names):
                    raise ValueError(
                        f"rule {rule.name!r}: modules {action.modules!r} matches no MX module; "
                        f"MX modules: {names[:12] or 'none (call mxprobe.convert first)'}"
                    )
            if isinstance(rule.trigger, SpikeTrigger) and not self._detectors(trainer):
                raise MisconfigurationException(
                    f"rule {rule.name!r} has a spike trigger but the Trainer has no "
                    "LossSpikeDetector callback; add mxprobe.callbacks.LossSpikeDetector(...)"
                )
        self._apply_pending_schemes()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_pending_schemes()
        self._checked_step = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._checked_step:
            return  # a later micro-batch of the same optimizer step
        self._checked_step = step
        if self.rules:
            self._run_rules(trainer, pl_module, step)
        if self._needs_snapshots() and step % self.snapshot_every == 0:
            if not self._snapshots or self._snapshots[-1]["step"] != step:
                self._take_snapshot(trainer, pl_module, step)

    def _run_rules(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        checks = [self._condition(trainer, rule, step) for rule in self.rules]
        flags = [[held, fresh, missing] for held, fresh, missing, _ in checks]
        if trainer.world_size > 1:
            reduced = reduce_sum(trainer, torch.tensor(flags, device=pl_module.device) * 1.0)
            flags = (reduced > 0).tolist()
        missing = [rule for rule, f in zip(self.rules, flags, strict=True) if f[2]]
        if missing:
            metrics = ", ".join(sorted(trainer.callback_metrics)) or "none"
            raise RuntimeError(
                f"PrecisionIntervention rule {missing[0].name!r} watches metric "
                f"{missing[0].trigger.name!r}, which has not been logged by its first check "
                f"(global_step {step}). Metrics logged so far: {metrics}. Fix the name, log "
                "the metric, or delay the check with `after:` in the trigger."
            )
        for rule, (held, fresh, _), (*_, values) in zip(self.rules, flags, checks, strict=True):
            state = self._rule_state[rule.name]
            if isinstance(rule.trigger, MetricTrigger):
                if not fresh:
                    continue
                state["streak"] = state["streak"] + 1 if held else 0
                if state["streak"] < rule.trigger.for_steps:
                    continue
            elif not held:
                continue
            if not self._may_fire(rule, step):
                continue
            state.update(fired=state["fired"] + 1, last_step=step, streak=0)
            self._act(trainer, pl_module, rule, rule.action, step, values)

    def _condition(
        self, trainer: pl.Trainer, rule: Rule, step: int
    ) -> tuple[bool, bool, bool, dict[str, Any]]:
        """(condition holds, fresh measurement, metric missing at its first check, values)."""
        trigger = rule.trigger
        if isinstance(trigger, StepTrigger):
            return step == trigger.at, True, False, {"at": trigger.at}
        if isinstance(trigger, SpikeTrigger):
            events = [
                e
                for d in self._detectors(trainer)
                for e in d.events_at(step - 1)
                if trigger.signal == "any"
                or (trigger.signal == "nonfinite" and e["kind"] == "nonfinite")
                or trigger.signal in e["signals"]
            ]
            if not events:
                return False, True, False, {}
            return True, True, False, {"spike_step": step - 1, **events[0]["values"]}
        if step < max(1, trigger.after):
            return False, False, False, {}
        producers = [
            c
            for c in trainer.callbacks
            if isinstance(c, PeriodicMonitor) and trigger.name.startswith(c.metric_prefix)
        ]
        if producers and not producers[0].measures(step - 1):
            return False, False, False, {}  # no new measurement; skip the costly lookup
        state = self._rule_state[rule.name]
        # After a resume, callback_metrics starts empty; the checkpoint's values stand in, as
        # Lightning's stale values do in the uninterrupted run.
        metric = trainer.callback_metrics.get(trigger.name)
        metric = self._restored_metrics.get(trigger.name) if metric is None else metric
        if metric is None:
            return False, False, not state["seen"], {}
        state["seen"] = True
        value = float(metric)
        return OPERATORS[trigger.op](value, trigger.value), True, False, {trigger.name: value}

    def _may_fire(self, rule: Rule, step: int) -> bool:
        state = self._rule_state[rule.name]
        if rule.max_times is not None and state["fired"] >= rule.max_times:
            return False
        return state["last_step"] is None or step - state["last_step"] >= rule.cooldown

    def _act(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        rule: Rule,
        action: SetSchemeAction | ScaleLrAction | RewindAction,
        step: int,
        values: dict[str, Any],
    ) -> None:
        event: dict[str, Any] = {
            "step": step,
            "kind": action.kind,
            "rule": rule.name,
            "trigger": rule.trigger.kind,
            "values": values,
            "scheme_before": None,
            "scheme_after": None,
            "source": type(self).__name__,
        }
        if isinstance(action, SetSchemeAction):
            changed = amend_scheme(pl_module, action.scheme, action.modules, snap=action.snap)
            event.update(
                scheme=action.scheme,
                modules=action.modules,
                snap=action.snap,
                scheme_before=scheme_strings({n: b for n, (b, _) in changed.items()}),
                scheme_after=scheme_strings({n: a for n, (_, a) in changed.items()}),
            )
        elif isinstance(action, ScaleLrAction):
            event.update(factor=action.factor, **self._scale_lr(trainer, action.factor))
        else:
            event.update(
                steps=action.steps, rewound_to=self._rewind(pl_module, trainer, step, action)
            )
        self.timeline.append(event)
        self._events.write(trainer, event)
        rank_zero_info(f"PrecisionIntervention: rule {rule.name!r} at step {step}: {action.kind}")
        if isinstance(action, RewindAction) and action.then is not None:
            self._act(trainer, pl_module, rule, action.then, step, values)

    @staticmethod
    def _scale_lr(trainer: pl.Trainer, factor: float) -> dict[str, list[float]]:
        before, after = [], []
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                before.append(group["lr"])
                group["lr"] = group["lr"] * factor
                if "initial_lr" in group:
                    group["initial_lr"] = group["initial_lr"] * factor
                after.append(group["lr"])
        for config in trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [lr * factor for lr in config.scheduler.base_lrs]
        return {"lr_before": before, "lr_after": after}

    def _take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        snapshot = {
            "step": step,
            "model": _cpu_copy(pl_module.state_dict()),
            "optimizers": [_cpu_copy(o.state_dict()) for o in trainer.optimizers],
        }
        kept = self._snapshots[max(0, len(self._snapshots) + 1 - self.keep_snapshots) :]
        self._snapshots = [*kept, snapshot]

    def _rewind(
        self, pl_module: pl.LightningModule, trainer: pl.Trainer, step: int, action: RewindAction
    ) -> int | None:
        if not self._snapshots:
            rank_zero_warn(f"rewind at step {step}: no snapshot to rewind to; only `then` applies")
            return None
        target = step - action.steps
        old_enough = [s for s in self._snapshots if s["step"] <= target]
        if old_enough:
            snapshot = old_enough[-1]
        else:
            snapshot = self._snapshots[0]
            rank_zero_warn(
                f"rewind at step {step} by {action.steps} steps: the oldest snapshot kept is at "
                f"step {snapshot['step']}; rewinding there (raise keep_snapshots or "
                "snapshot_every to reach further)"
            )
        # load_state_dict copies into the existing parameters, so DDP and optimizers keep them.
        pl_module.load_state_dict(snapshot["model"])
        for optimizer, saved in zip(trainer.optimizers, snapshot["optimizers"], strict=True):
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            # A clone: the optimizer would otherwise update the snapshot's tensors in place.
            optimizer.load_state_dict(_clone(saved))
            for group, h in zip(optimizer.param_groups, hyper, strict=True):
                group.update(h)
        self._snapshots = [s for s in self._snapshots if s["step"] <= snapshot["step"]]
        return snapshot["step"]

    def _apply_pending_schemes(self) -> None:
        if self._pending_schemes is None or self._pl_module is None:
            return
        schemes = {
            n: None if s is None else PrecisionScheme.parse(s)
            for n, s in self._pending_schemes.items()
        }
        restore_schemes(self._pl_module, schemes)
        self._pending_schemes = None

    def state_dict(self) -> dict[str, Any]:
        schemes = self._pending_schemes
        if schemes is None and self.timeline and self._pl_module is not None:
            schemes = scheme_strings(schemes_of(self._pl_module))
        return {
            "timeline": [dict(e) for e in self.timeline],
            "schemes": schemes,
            "rules": {name: dict(s) for name, s in self._rule_state.items()},
            "metrics": self._watched_metrics(),
            "snapshots": list(self._snapshots) if self.checkpoint_snapshots else [],
        }

    def _watched_metrics(self) -> dict[str, float]:
        """The current values of the metrics that metric rules watch (for the first check
        after a resume, which happens before anything is logged again)."""
        trainer = self._pl_module.trainer if self._pl_module is not None else None
        values = dict(self._restored_metrics)
        if trainer is not None:
            for rule in self.rules:
                trigger = rule.trigger
                if isinstance(trigger, MetricTrigger) and trigger.name in trainer.callback_metrics:
                    values[trigger.name] = float(trainer.callback_metrics[trigger.name])
        return values

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.timeline = [dict(e) for e in state_dict["timeline"]]
        for name, saved in state_dict["rules"].items():
            if name in self._rule_state:
                self._rule_state[name].update(saved)
        self._snapshots = list(state_dict["snapshots"])
        self._restored_metrics = dict(state_dict.get("metrics", {}))
        self._pending_schemes = state_dict["schemes"]
        self._apply_pending_schemes()

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("callbacks", {})
        if self.state_key in states:
            return
        others = [k for k in states if str(k).startswith(type(self).__qualname__)]
        if len(others) == 1:
            rank_zero_warn(
                f"checkpoint holds PrecisionIntervention state under {others[0]!r} (other rule "
                "names); adopting its timeline and schemes, and the counters of rules whose "
                "names match"
            )
            self.load_state_dict(states[others[0]])
