"""What a :class:`~mxprobe.callbacks.PrecisionIntervention` rule does when it fires.

Each action is a frozen dataclass that validates itself, is named in YAML by its ``kind`` and
applies its own effect (:meth:`Action.apply`, which returns the keys it adds to its event).
A new action is one subclass of :class:`Action` with a ``kind``, listed in :data:`ACTIONS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

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


class Action(YamlKind):
    """Base of the actions; :data:`ACTIONS` maps each YAML ``kind`` to its class."""

    chainable: ClassVar[bool] = True
    """Whether it may be a rewind's ``then``."""
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


def _chainable() -> list[str]:
    return [kind for kind, cls in ACTIONS.items() if cls.chainable]


@dataclasses.dataclass(frozen=True)
class SetSchemeAction(Action):
    """Amend the scheme of the MX modules matching the glob ``modules`` with ``scheme`` (a
    partial string amends, a leading preset replaces; see ``mxprobe.amend_scheme``). With
    ``snap`` the switched weights first take the values the old scheme's forward used, so
    the switch does not change the network's output (see ``mxprobe.modules.snap_parameters``)."""

    scheme: str
    modules: str = "*"
    snap: bool = False
    kind: ClassVar[str] = "set_scheme"

    def __post_init__(self) -> None:
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
    """Multiply ``lr`` (and ``initial_lr``) of every parameter group of every optimizer and the
    ``base_lrs`` of every LR scheduler, so a closed-form schedule keeps the change."""

    factor: float
    kind: ClassVar[str] = "scale_lr"

    def __post_init__(self) -> None:
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
    """Restore the newest snapshot at least ``steps`` before now (model weights and buffers,
    optimizer state), then apply ``then`` (a ``set_scheme`` or ``scale_lr`` action)."""

    steps: int
    then: Action | None = None
    kind: ClassVar[str] = "rewind"
    chainable: ClassVar[bool] = False
    needs_snapshots: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_int(self.steps, "steps", minimum=1)
        if self.then is not None and not (isinstance(self.then, Action) and self.then.chainable):
            raise ValueError(
                f"then must be an action of kind {' or '.join(_chainable())}, got {self.then!r}"
            )

    @classmethod
    def parse_fields(cls, values: dict[str, Any], where: str) -> dict[str, Any]:
        if values.get("then") is None:
            return values
        then = from_mapping(ACTIONS, values["then"], f"{where} then", allowed=_chainable())
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


# The actions by YAML kind, in the order the docs list them.
ACTIONS: dict[str, type[Action]] = {
    cls.kind: cls for cls in (SetSchemeAction, ScaleLrAction, RewindAction)
}
