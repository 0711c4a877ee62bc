"""Step-time overhead of the mxprobe callbacks at their default cadence.

Trains the student-teacher proxy (``mxprobe.models.lit.ProxyLitModule``; d=256, depth 4, batch
512, ``mxfp8_e4m3`` by default) with no callbacks and with all of them — GradientBiasMonitor,
NormAffineMonitor, ActivationMonitor (every 50 steps), LossSpikeDetector (every step), a
PrecisionIntervention whose never-firing rewind rule makes it snapshot every 100 steps, and the
RunRecorder that writes the run record (one SQLite transaction per step) — in
one process, alternating the two variants ``--rounds`` times in ABBA order so that load
from other processes (and its drift) hits both alike. Time per step is the wall time from
the start of the first measured step to the end of training, divided by the number of
measured steps; the first ``--warmup`` steps are not measured, and an unmeasured run with
every callback comes first so that torch.compile of the quantizer (CPU) has met every shape
before timing starts.
Measured steps should span several multiples of 50 so that monitored steps appear at their
real rate. Prints both times and their ratio (goal: <= 1.05).

On a shared machine the run-to-run ratio is at the mercy of other processes' load, so the
script also times, inside the monitored runs, every callback hook and ActivationMonitor's
forward hooks, and prints the attributed ratio ``total / (total - time in callbacks)``: the
same run, the same load, only the callbacks' own work counted.

Run from the repository root with ``PYTHONPATH=.`` (or mxprobe installed)::

    python benchmarks/monitor_overhead.py
    python benchmarks/monitor_overhead.py --steps 400 --rounds 3 --accelerator gpu
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from mxprobe.callbacks import (
    ActivationMonitor,
    GradientBiasMonitor,
    LossSpikeDetector,
    NormAffineMonitor,
    PrecisionIntervention,
    RunRecorder,
)
from mxprobe.models.data import ProxyDataModule
from mxprobe.models.lit import ProxyLitModule

HOOKS = (
    "setup",
    "on_train_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
)


class HookClock:
    """Wraps the hooks of callback instances (and ActivationMonitor's forward hooks) with a
    timer; ``by_callback`` is the time spent inside them after warm-up, per callback class."""

    def __init__(self) -> None:
        self.by_callback: dict[str, float] = {}
        self.measuring = False

    @property
    def seconds(self) -> float:
        return sum(self.by_callback.values())

    def wrap(self, callback: Callback) -> Callback:
        owner = type(callback).__name__
        for name in HOOKS:
            setattr(callback, name, self._timed(getattr(callback, name), owner))
        if isinstance(callback, ActivationMonitor):
            make_hook = callback._hook
            callback._hook = lambda module_name: self._timed(make_hook(module_name), owner)
        return callback

    def _timed(self, fn, owner: str):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.measuring:
                    spent = time.perf_counter() - start
                    self.by_callback[owner] = self.by_callback.get(owner, 0.0) + spent

        return timed


class StepTimer(Callback):
    """Wall time from the start of step ``warmup`` to the end of training."""

    def __init__(self, warmup: int, clock: HookClock) -> None:
        self.warmup, self.clock, self.start, self.seconds = warmup, clock, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            self._sync(pl_module)
            self.start = time.perf_counter()
            self.clock.measuring = True

    def on_train_end(self, trainer, pl_module):
        self._sync(pl_module)
        self.seconds = time.perf_counter() - self.start

    @staticmethod
    def _sync(pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


def all_callbacks() -> list[Callback]:
    never = {
        "name": "never",
        "trigger": {"kind": "metric", "name": "mx/spikes/total/loss", "op": ">", "value": 1e30},
        "action": {
            "kind": "rewind",
            "steps": 100,
            "then": {"kind": "set_scheme", "scheme": "norm=bf16"},
        },
    }
    return [
        GradientBiasMonitor(),
        NormAffineMonitor(),
        ActivationMonitor(),
        LossSpikeDetector(),
        PrecisionIntervention(rules=[never]),
        RunRecorder(),  # listed, so that its hooks (the record's commits) are timed too
    ]


def time_run(
    args: argparse.Namespace, callbacks: list[Callback], root: str
) -> tuple[float, dict[str, float]]:
    """(seconds per measured step, {callback: seconds per step inside its hooks})."""
    model = ProxyLitModule(depth=args.depth, width=args.width, lr=1e-3, scheme=args.scheme)
    data = ProxyDataModule(width=args.width, depth=args.depth, batch_size=args.batch_size)
    clock = HookClock()
    callbacks = [clock.wrap(c) for c in callbacks]
    timer = StepTimer(args.warmup, clock)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=[*callbacks, timer],
    )
    trainer.fit(model, datamodule=data)
    return timer.seconds / args.steps, {k: v / args.steps for k, v in clock.by_callback.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--scheme", default="mxfp8_e4m3")
    parser.add_argument("--steps", type=int, default=200, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        __import__("logging").getLogger(name).setLevel("ERROR")

    times: dict[str, list[float]] = {"none": [], "all": []}
    inside: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as root:
        # One unmeasured run first: torch.compile of the quantizer (CPU) specializes on the
        # shapes it meets, and the first measured run would otherwise pay for all of them.
        time_run(argparse.Namespace(**{**vars(args), "steps": 1}), all_callbacks(), root)
        for round_ in range(args.rounds):
            # ABBA order: a load that drifts linearly over time hits both variants alike.
            for variant in ("none", "all") if round_ % 2 == 0 else ("all", "none"):
                if variant == "none":
                    times["none"].append(time_run(args, [], root)[0])
                    continue
                step, hooks = time_run(args, all_callbacks(), root)
                times["all"].append(step)
                for name, seconds in hooks.items():
                    inside[name] = inside.get(name, 0.0) + seconds / args.rounds
    none, every = sum(times["none"]), sum(times["all"])
    print(
        f"monitor overhead: d={args.width} depth={args.depth} batch={args.batch_size} "
        f"{args.scheme} on {args.accelerator} ({platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    print(
        f"  steps measured per run: {args.steps} (after {args.warmup} warm-up), "
        f"rounds: {args.rounds}"
    )
    for name, values in times.items():
        per_round = ", ".join(f"{1e3 * v:.2f}" for v in values)
        print(f"  {name:>4}: {1e3 * sum(values) / len(values):8.2f} ms/step  (rounds: {per_round})")
    print(f"  ratio all/none (between runs): {every / none:.3f}  (goal <= 1.05)")
    spent = sum(inside.values())
    mean_all = every / args.rounds
    print(f"  time inside the callbacks: {1e3 * spent:.2f} ms/step")
    for name, seconds in sorted(inside.items(), key=lambda kv: -kv[1]):
        print(f"    {name:<24} {1e3 * seconds:8.3f} ms/step")
    print(f"  attributed ratio (same runs): {mean_all / (mean_all - spent):.4f}  (goal <= 1.05)")
    record = inside.get(RunRecorder.__name__, 0.0)
    print(
        f"  run record (RunRecorder's hooks: one commit per step): {1e3 * record:.3f} ms/step, "
        f"{100 * record / (mean_all - spent):.2f} % of the monitored step without callbacks "
        "(goal <= 2 %)"
    )


if __name__ == "__main__":
    main()
