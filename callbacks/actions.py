"""What a :class:`~mxprobe.callbacks.PrecisionIntervention` rule does when it fires.

Each action is a frozen dataclass that validates itself, is named in YAML by its ``kind`` and
applies its own effect (:meth:`Action.apply`, which returns the keys it adds to its event).
A new action is one subclass of :class:`Action` with a ``kind`` field, listed in
:data:`AnyAction` (and in :data:`ChainedAction` if it may follow a rewind); :data:`ACTIONS` is
built from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal, get_args

import lightning.pytorch as pl
from mxprobe.callbacks.events import scheme_strings
from mxprobe.callbacks.kinds import YamlKind, from_mapping, set_field
from mxprobe.callbacks.recorder import RunRecorder
from mxprobe.callbacks.snapshots import SnapshotStore

from mxprobe.checks import check_int, check_number
from mxprobe.convert import amend_scheme
from mxprobe.scheme import PrecisionScheme


@dataclasses.dataclass(frozen=True)
class ActionContext:
    """Where an action acts: the run, the step it applies from, the snapshots it may restore."""

    trainer: pl.Trainer
    pl_module: pl.LightningModule
    step: int
    snapshots: SnapshotStore


@dataclasses.dataclass(frozen=True)
class Action(YamlKind):
    """Base of the actions; :data:`ACTIONS` maps each YAML ``kind`` to its class."""

    needs_snapshots: ClassVar[bool] = False
    """Whether the callback must take snapshots for it."""

    def apply(self, context: ActionContext) -> dict[str, Any]:
        """Act at ``context.step``; returns the keys this action adds to its event."""
        raise NotImplementedError

    def followed_by(self) -> Action | None:
        """The action applied right after this one, with its own event (a rewind's ``then``)."""
        return None

    def scheme_actions(self) -> list[SetSchemeAction]:
        """The ``set_scheme`` actions among this one and those it is followed by."""
        following = self.followed_by()
        rest = [] if following is None else following.scheme_actions()
        return [self, *rest] if isinstance(self, SetSchemeAction) else rest


@dataclasses.dataclass(frozen=True)
class SetSchemeAction(Action):
    """Amend the scheme of the MX modules matching a glob.

    Args:
        scheme: the change, e.g. ``norm=bf16`` (a partial string amends each module's current
            scheme; a leading preset replaces it; see ``mxprobe.amend_scheme``).
        modules: glob on the qualified module names; ``*``: every MX module.
        snap: first set each switched weight to the value the old scheme's forward used, so
            the switch does not change the network's output (``mxprobe.modules.snap_parameters``).
        kind: ``set_scheme``.
    """

    scheme: str
    modules: str = "*"
    snap: bool = False
    kind: Literal["set_scheme"] = "set_scheme"

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            PrecisionScheme().amend(self.scheme)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"bad scheme {self.scheme!r}: {exc}") from None
        if not isinstance(self.modules, str) or not self.modules:
            raise ValueError(f"modules must be a glob string, got {self.modules!r}")
        if not isinstance(self.snap, bool):
            raise ValueError(f"snap must be true or false, got {self.snap!r}")

    def apply(self, context: ActionContext) -> dict[str, Any]:
        changed = amend_scheme(context.pl_module, self.scheme, self.modules, snap=self.snap)
        return {
            "scheme": self.scheme,
            "modules": self.modules,
            "snap": self.snap,
            "scheme_before": scheme_strings({n: b for n, (b, _) in changed.items()}),
            "scheme_after": scheme_strings({n: a for n, (_, a) in changed.items()}),
        }


@dataclasses.dataclass(frozen=True)
class ScaleLrAction(Action):
    """Multiply the learning rate.

    ``lr`` (and ``initial_lr``) of every parameter group of every optimizer and the
    ``base_lrs`` of every LR scheduler, so a closed-form schedule keeps the change.

    Args:
        factor: the multiplier, > 0.
        kind: ``scale_lr``.
    """

    factor: float
    kind: Literal["scale_lr"] = "scale_lr"

    def __post_init__(self) -> None:
        super().__post_init__()
        set_field(self, "factor", check_number(self.factor, "factor"))
        if not self.factor > 0:
            raise ValueError(f"factor must be positive, got {self.factor!r}")

    def apply(self, context: ActionContext) -> dict[str, Any]:
        before, after = [], []
        for optimizer in context.trainer.optimizers:
            for group in optimizer.param_groups:
                before.append(group["lr"])
                group["lr"] = group["lr"] * self.factor
                if "initial_lr" in group:
                    group["initial_lr"] = group["initial_lr"] * self.factor
                after.append(group["lr"])
        for config in context.trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [lr * self.factor for lr in config.scheduler.base_lrs]
        return {"factor": self.factor, "lr_before": before, "lr_after": after}


@dataclasses.dataclass(frozen=True)
class RewindAction(Action):
    """Restore an earlier snapshot, then apply ``then``.

    The snapshot is the newest taken at least ``steps`` before now: model weights and buffers,
    optimizer state; not the LR schedule nor the schemes.

    Args:
        steps: how far back the snapshot must be, in optimizer steps (>= 1).
        then: the action applied right after, with its own event: a ``set_scheme`` or
            ``scale_lr`` action; ``null``: none.
        kind: ``rewind``.
    """

    steps: int
    then: ChainedAction | None = None
    kind: Literal["rewind"] = "rewind"
    needs_snapshots: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.steps, "steps", minimum=1)
        if self.then is not None and not isinstance(self.then, get_args(ChainedAction)):
            raise ValueError(
                f"then must be an action of kind {' or '.join(_chained_kinds())}, got {self.then!r}"
            )

    @classmethod
    def parse_fields(cls, values: dict[str, Any], where: str) -> dict[str, Any]:
        if values.get("then") is None:
            return values
        then = from_mapping(ACTIONS, values["then"], f"{where} then", allowed=_chained_kinds())
        return {**values, "then": then}

    def apply(self, context: ActionContext) -> dict[str, Any]:
        rewound_to = context.snapshots.rewind(
            context.pl_module, context.trainer.optimizers, context.step, self.steps
        )
        if rewound_to is not None:
            # The detector drops the undone steps: the spike must not stay in the window it skews.
            RunRecorder.of(context.trainer).rewound(rewound_to)
        return {"steps": self.steps, "rewound_to": rewound_to}

    def followed_by(self) -> Action | None:
        return self.then


# The actions, in the order the docs list them: the type of a rule's action, and by YAML kind.
AnyAction = SetSchemeAction | ScaleLrAction | RewindAction
ACTIONS: dict[str, type[Action]] = {cls.kind: cls for cls in get_args(AnyAction)}
# The actions a rewind may be followed by (its ``then``).
ChainedAction = SetSchemeAction | ScaleLrAction


def _chained_kinds() -> list[str]:
    return [cls.kind for cls in get_args(ChainedAction)]
