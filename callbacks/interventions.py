"""In-situ precision interventions: rule-driven scheme switches, rewinds and LR scaling."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from mxprobe.callbacks.actions import ActionContext
from mxprobe.callbacks.distributed import reduce_sum
from mxprobe.callbacks.events import record_event
from mxprobe.callbacks.precision_state import load_schemes, save_schemes
from mxprobe.callbacks.recorder import RunRecorder
from mxprobe.callbacks.rules import MetricTrigger, Rule, SpikeTrigger, StepTrigger, parse_rules
from mxprobe.callbacks.snapshots import Snapshot, SnapshotStore

from mxprobe import nvfp4_random
from mxprobe.convert import check_scheme_change
from mxprobe.modules import is_sharded
from mxprobe.names import MONITOR_CALLBACKS, SPIKES, monitor_prefix


@dataclasses.dataclass
class RuleState:
    """What a rule remembers between checks; saved in checkpoints."""

    fired: int = 0
    """Times the rule has fired."""
    last_step: int | None = None
    """Step of its last firing (for ``cooldown``)."""
    streak: int = 0
    """Consecutive measurements that met a metric trigger's condition."""
    seen: bool = False
    """Whether a metric trigger's metric has been found (a missing one is an error only at the
    first check)."""


class RuleCheck(NamedTuple):
    """The outcome of checking one rule's trigger at one step."""

    held: bool
    """The trigger's condition holds."""
    fresh: bool
    """A new measurement was read (a metric trigger counts its streak over these)."""
    values: dict[str, Any]
    """The values behind the decision, for the event."""
    missing: bool = False
    """A metric trigger's metric is absent at its first check."""


class PrecisionIntervention(Callback):
    r"""Change precision, rewind or scale the learning rate mid-run when a rule's trigger fires.

    Rules are :class:`~mxprobe.callbacks.rules.Rule` objects or their plain dicts (grammar in
    :mod:`mxprobe.callbacks.rules`, actions in :mod:`mxprobe.callbacks.actions`). In a
    LightningCLI YAML they are typed: ``--trainer.callbacks.help PrecisionIntervention`` and
    ``--trainer.callbacks.rules.help Rule`` show them, and a misspelt key or kind is refused
    when the config is parsed.

    When rules are checked: once per optimizer step, in ``on_train_batch_start`` of its first
    micro-batch, i.e. between optimizer steps, after every hook of the previous step has run
    (so the callback order in ``Trainer(callbacks=...)`` does not matter). An action taken at
    ``global_step == g`` applies from step ``g`` on; all rules that fire at one step act, in
    list order:

    - ``step`` trigger ``at: g`` fires at ``g`` (before step ``g`` trains).
    - ``spike`` trigger fires at ``g`` when a ``LossSpikeDetector`` reported an
      event of the requested signal for step ``g - 1``.
    - ``metric`` trigger compares the reading ``name`` of an mxprobe monitor
      (``mx/grad_bias/``, ``mx/norm_affine/``, ``mx/activations/``, ``mx/spikes/``), as the
      run record holds it, with ``value``, once per *measurement*: a step the monitor
      measured, so ``for_steps: 3`` with ``every_n_steps=50`` means three consecutive
      measurements (100+ steps). Checks start at ``global_step >= max(1, after)``.

    Actions (each one written to the run record and appended to :attr:`timeline`): ``set_scheme``
    (``mxprobe.amend_scheme``, optionally snapped), ``scale_lr`` (every parameter group's
    ``lr`` and every scheduler's ``base_lrs``), ``rewind`` (restore the newest snapshot taken
    at ``g - steps`` or before: weights, buffers and optimizer state, not the LR schedule nor
    the schemes; then apply ``then``). Snapshots (only when some rule rewinds) are taken every
    ``snapshot_every`` steps in ``on_train_batch_start``, after the rules, copied to CPU.

    Resume: the schemes of the MX modules are model state, saved in every checkpoint as
    ``checkpoint["mx_precision"]`` (:mod:`mxprobe.callbacks.precision_state`; this callback
    writes it for any LightningModule, mxprobe's modules write it themselves) and put back in
    ``on_load_checkpoint``, after the weights and before the optimizer and loops, whatever
    changed them (a rule or a manual ``mxprobe.amend_scheme``). This callback's own state is
    the timeline, each rule's :class:`RuleState` and, with ``checkpoint_snapshots``, the
    snapshots; the first check after a resume reads the readings and alarms of the step
    before from the run record, as the uninterrupted run would. It is keyed by the rule
    names; a checkpoint whose state is keyed by other names is adopted with a warning.

    DDP: every rank checks the rules; their outcomes are OR-reduced across ranks in one
    all-reduce per step before any decision, so every rank acts identically at the same step
    (snapshots and rewinds included); only rank 0 writes events.

    Args:
        rules: the rules, in the order they are checked. Each: name, trigger (kind spike:
            signal; step: at; metric: name, op, value, for_steps, after), action (kind
            set_scheme: scheme, modules, snap; scale_lr: factor; rewind: steps, then), cooldown,
            max_times (``mxprobe.callbacks.Rule``).
        snapshot_every: steps between snapshots for ``rewind``.
        keep_snapshots: snapshots kept in memory (the newest).
        checkpoint_snapshots: also store the snapshots in checkpoints, so a rewind after a
            resume reaches snapshots taken before it.

    Raises:
        ValueError: at construction for a malformed rule (unknown kind, key or operator, bad
            scheme string, bad number), duplicate names or a non-positive ``snapshot_every`` /
            ``keep_snapshots``; at ``setup`` for a ``modules`` glob that matches no MX module.
        MisconfigurationException: at ``on_fit_start`` for a spike rule without a
            ``LossSpikeDetector``, or a metric rule without the monitor that publishes its
            metric, in the trainer's callbacks.
        RuntimeError: at the check after the monitor's first measurement, for a metric rule
            whose metric the monitor did not publish; the message lists what it published.

    Attributes:
        timeline: every action taken, as its event (also in the run record).
        rule_states: each rule's :class:`RuleState`, by rule name.
        snapshots: the snapshots kept for rewinds, oldest first.

    Example::

        rule = {
            "name": "norms-to-bf16",
            "trigger": {"kind": "spike"},
            "action": {"kind": "set_scheme", "scheme": "norm=bf16", "modules": "*"},
            "cooldown": 200,
        }
        trainer = Trainer(callbacks=[LossSpikeDetector(), PrecisionIntervention(rules=[rule])])
    """

    def __init__(
        self,
        rules: list[Rule] | None = None,
        snapshot_every: int = 100,
        keep_snapshots: int = 3,
        checkpoint_snapshots: bool = False,
    ) -> None:
        self.rules: list[Rule] = parse_rules(rules)
        self.snapshot_every = snapshot_every
        self.keep_snapshots = keep_snapshots
        self.checkpoint_snapshots = checkpoint_snapshots
        self.timeline: list[dict[str, Any]] = []
        self.rule_states = {rule.name: RuleState() for rule in self.rules}
        self._store = SnapshotStore(snapshot_every, keep_snapshots)
        self._takes_snapshots = any(r.action.needs_snapshots for r in self.rules)
        self._recorder: RunRecorder | None = None
        self._checked_step: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rules=[r.name for r in self.rules])

    @property
    def snapshots(self) -> list[Snapshot]:
        """The in-memory snapshots, oldest first."""
        return self._store.snapshots

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._recorder = RunRecorder.of(trainer)

    def _check_sources(self) -> None:
        """Every rule's readings have a publisher (all callbacks' setup has run by now)."""
        for rule in self.rules:
            trigger = rule.trigger
            monitor = SPIKES if isinstance(trigger, SpikeTrigger) else None
            if isinstance(trigger, MetricTrigger):
                monitor = trigger.monitor
            needed = MONITOR_CALLBACKS.get(monitor)
            if needed and monitor not in self._recorder.monitors:
                what = "a spike trigger" if monitor == SPIKES else f"metric {trigger.name!r}"
                raise MisconfigurationException(
                    f"rule {rule.name!r} has {what} but the Trainer has no {needed} callback; "
                    f"add mxprobe.callbacks.{needed}(...)"
                )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_sources()
        # After configure_model: a model built and converted there exists only from here on.
        if self.checkpoint_snapshots and any(is_sharded(p) for p in pl_module.parameters()):
            raise MisconfigurationException(
                "PrecisionIntervention(checkpoint_snapshots=True) is not supported under FSDP2: "
                "snapshots hold each rank's own shards, which the callback state of a "
                "distributed checkpoint does not keep per rank; use checkpoint_snapshots=False "
                "(snapshots are then retaken after a resume)"
            )
        for rule in self.rules:
            for action in rule.scheme_actions():
                try:
                    check_scheme_change(pl_module, action.scheme, action.modules, action.snap)
                except ValueError as err:
                    raise ValueError(f"rule {rule.name!r}: {err}") from None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._checked_step = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # NVFP4's random signs and stochastic rounding are keyed by the batch, so a resumed run
        # draws what the uninterrupted one drew, whatever module the user trains.
        nvfp4_random.set_iteration(step, batch_idx)
        if self._should_skip_check(step):
            return
        self._checked_step = step
        self._run_intervention_check(trainer, pl_module, step)
        if self._takes_snapshots and self._store.due(step):
            self._store.take(pl_module, trainer.optimizers, step)

    def _should_skip_check(self, step: int) -> bool:
        # A later micro-batch of an optimizer step already checked (gradient accumulation).
        return not self.rules or step == self._checked_step

    def _run_intervention_check(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> None:
        local = [self._check_rule(trainer, rule, step) for rule in self.rules]
        checks = self._reduce_across_ranks(trainer, pl_module, local)
        missing = [rule for rule, check in zip(self.rules, checks, strict=True) if check.missing]
        if missing:
            trigger = missing[0].trigger
            prefix = monitor_prefix(trigger.monitor)
            published = [n for n in self._recorder.reading_names() if n.startswith(prefix)]
            raise RuntimeError(
                f"PrecisionIntervention rule {missing[0].name!r} watches metric "
                f"{trigger.name!r}, which its monitor did not publish at its first "
                f"measurement (global_step {step - 1}); it published: "
                f"{', '.join(published) or 'nothing'}. Fix the name or the monitor's modules."
            )
        for rule, check in zip(self.rules, checks, strict=True):
            if self._fires(rule, self.rule_states[rule.name], check, step):
                self._act(trainer, pl_module, rule, step, check.values)

    def _check_rule(self, trainer: pl.Trainer, rule: Rule, step: int) -> RuleCheck:
        trigger = rule.trigger
        if isinstance(trigger, StepTrigger):
            return RuleCheck(held=step == trigger.at, fresh=True, values={"at": trigger.at})
        if isinstance(trigger, SpikeTrigger):
            events = [e for e in self._recorder.alarms_at(step - 1) if trigger.matches(e)]
            if not events:
                return RuleCheck(held=False, fresh=True, values={})
            return RuleCheck(
                held=True, fresh=True, values={"spike_step": step - 1, **events[0]["values"]}
            )
        return self._check_metric(trainer, trigger, self.rule_states[rule.name], step)

    def _check_metric(
        self, trainer: pl.Trainer, trigger: MetricTrigger, state: RuleState, step: int
    ) -> RuleCheck:
        if step < max(1, trigger.after) or not self._recorder.measured(trigger.monitor, step - 1):
            return RuleCheck(held=False, fresh=False, values={})
        reading = self._recorder.reading(trigger.name)
        if reading is None or reading[0] != step - 1:
            return RuleCheck(held=False, fresh=False, values={}, missing=not state.seen)
        state.seen = True
        value = reading[1]
        return RuleCheck(held=trigger.holds(value), fresh=True, values={trigger.name: value})

    @staticmethod
    def _reduce_across_ranks(
        trainer: pl.Trainer, pl_module: pl.LightningModule, checks: list[RuleCheck]
    ) -> list[RuleCheck]:
        """OR of every rank's ``held`` and ``fresh``, AND of ``missing``, for all rules in one
        all-reduce (``reduce_boolean_decision`` reduces one flag per collective call): after a
        resume only rank 0, which reads the record, holds the step before's readings. The
        values stay this rank's, for its event."""
        if trainer.world_size == 1:
            return checks
        flags = torch.tensor(
            [[c.held, c.fresh, c.missing] for c in checks], device=pl_module.device
        ).float()
        counts = reduce_sum(trainer, flags).tolist()
        return [
            c._replace(held=held > 0, fresh=fresh > 0, missing=missing == trainer.world_size)
            for c, (held, fresh, missing) in zip(checks, counts, strict=True)
        ]

    @staticmethod
    def _fires(rule: Rule, state: RuleState, check: RuleCheck, step: int) -> bool:
        """Whether the rule acts now; counts a metric trigger's streak and the firing."""
        if isinstance(rule.trigger, MetricTrigger):
            if not check.fresh:
                return False
            state.streak = state.streak + 1 if check.held else 0
            if state.streak < rule.trigger.for_steps:
                return False
        elif not check.held:
            return False
        if rule.max_times is not None and state.fired >= rule.max_times:
            return False
        if state.last_step is not None and step - state.last_step < rule.cooldown:
            return False
        state.fired, state.last_step, state.streak = state.fired + 1, step, 0
        return True

    def _act(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        rule: Rule,
        step: int,
        values: dict[str, Any],
    ) -> None:
        context = ActionContext(trainer, pl_module, step, self._store)
        action = rule.action
        while action is not None:
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
            event.update(action.apply(context))
            self.timeline.append(event)
            record_event(trainer, event)
            rank_zero_info(
                f"PrecisionIntervention: rule {rule.name!r} at step {step}: {action.kind}"
            )
            action = action.followed_by()

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        save_schemes(pl_module, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {
            "timeline": [dict(e) for e in self.timeline],
            "rules": {name: dataclasses.asdict(s) for name, s in self.rule_states.items()},
            "snapshots": self._store.state_dict() if self.checkpoint_snapshots else [],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.timeline = [dict(e) for e in state_dict["timeline"]]
        for name, saved in state_dict["rules"].items():
            if name in self.rule_states:
                self.rule_states[name] = RuleState(**saved)
        self._store.load_state_dict(state_dict["snapshots"])

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        load_schemes(pl_module, checkpoint)
        states = checkpoint.get("callbacks", {})
        if self.state_key in states:
            return
        others = [k for k in states if str(k).startswith(type(self).__qualname__)]
        if len(others) == 1:
            rank_zero_warn(
                f"checkpoint holds PrecisionIntervention state under {others[0]!r} (other rule "
                "names); adopting its timeline and the counters of rules whose names match"
            )
            self.load_state_dict(states[others[0]])
