"""Training one run of the student-teacher proxy, and what the run did: the domain module under
``mxprobe proxy fit/compare``, ``mxprobe sweep``, ``mxprobe demo``, ``mxprobe study`` and the
benchmarks.

- :func:`proxy_cli` builds the proxy's LightningCLI (``ProxyLitModule`` and ``ProxyDataModule``,
  the data's width, depth and activation linked to the model's; a run record is always kept);
- a :class:`TrainJob` says what to train: a YAML config, extra LightningCLI arguments, the run
  directory, the divergence rule; :func:`train_run` trains it and returns a
  :class:`~mxprobe.app.results.RunResult` (the results tables' schema, importable without
  Lightning);
- :class:`DivergenceWatch` feeds each training loss to a :class:`DivergenceTracker`: divergence
  is defined once, in :mod:`mxprobe.outcome` (docs/proxy.md).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch

from mxprobe.app.lightning_parts import AtomicSaveConfig, CheckedCheckpointPath
from mxprobe.app.parsing import raising_parser_kwargs
from mxprobe.app.results import RunResult
from mxprobe.callbacks import RunRecorder
from mxprobe.models.data import ProxyDataModule
from mxprobe.models.lit import ProxyLitModule
from mxprobe.outcome import DIVERGENCE_FACTOR, DIVERGENCE_PATIENCE, DivergenceTracker


@dataclass(frozen=True)
class TrainJob:
    """One proxy run to train; picklable, so a process pool takes it as it is.

    Args:
        config: LightningCLI YAML (``trainer``, ``model``, ``data``), or None for the defaults.
        run_dir: where the run writes its run record and its CSVLogger ``metrics.csv``.
        args: extra LightningCLI arguments, such as ``--model.scheme=mxfp8_e4m3``.
        stop_on_divergence: end the run at the step it is found diverged.
        factor: the divergence rule's loss factor (:mod:`mxprobe.outcome`).
        patience: the divergence rule's count of consecutive high steps.
        threads: ``torch.set_num_threads`` for the process before it trains (None: unchanged).
    """

    config: str | None
    run_dir: str
    args: tuple[str, ...] = ()
    stop_on_divergence: bool = True
    factor: float = DIVERGENCE_FACTOR
    patience: int = DIVERGENCE_PATIENCE
    threads: int | None = None

    def cli_args(self) -> list[str]:
        """The LightningCLI arguments of the run: its config, its extra arguments, and a
        CSVLogger and root directory in ``run_dir``."""
        run_path = Path(self.run_dir)
        logger = {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(run_path), "name": "", "version": ""},
        }
        cli_args = ([f"--config={self.config}"] if self.config else []) + list(self.args)
        return cli_args + [
            f"--trainer.logger={json.dumps(logger)}",
            f"--trainer.default_root_dir={run_path}",
        ]


class DivergenceWatch(pl.Callback):
    """Feeds every training loss to ``tracker``; with ``stop``, ends the run once it diverged.

    Args:
        tracker: the divergence rule's online test (:class:`mxprobe.outcome.DivergenceTracker`).
        stop: set ``trainer.should_stop`` at the step the tracker finds the run diverged.
    """

    def __init__(self, tracker: DivergenceTracker, stop: bool = True) -> None:
        self.tracker = tracker
        self.stop = stop

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if self.tracker.update(float(loss)) and self.stop:
            trainer.should_stop = True


class ProxyCLI(CheckedCheckpointPath):
    """The proxy's LightningCLI: the data module's width, depth and activation follow the
    model's, and every run keeps its run record, whatever callbacks its YAML lists."""

    def add_arguments_to_parser(self, parser) -> None:
        for key in ("width", "depth", "activation"):
            parser.link_arguments(f"model.{key}", f"data.{key}")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        RunRecorder.of(trainer)
        return trainer


def proxy_cli(args: list[str], run: bool = True, **kwargs) -> ProxyCLI:
    """The proxy's LightningCLI for ``args`` (subcommand first when ``run``); ``kwargs`` go to
    LightningCLI. A bad argument raises ``argparse.ArgumentError`` (``mxprobe`` says it in one
    line)."""
    # LightningCLI warns when it gets args while sys.argv holds a command line: mxprobe passes
    # the tail of that same command line, or a run's own arguments.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return ProxyCLI(
        ProxyLitModule,
        ProxyDataModule,
        args=args,
        run=run,
        save_config_callback=AtomicSaveConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=raising_parser_kwargs(kwargs.pop("parser_kwargs", {}), ("fit", "validate")),
        **kwargs,
    )


def train_run(job: TrainJob) -> RunResult:
    """Train ``job`` into its run directory (created if missing) and return what it did."""
    if job.threads:
        torch.set_num_threads(job.threads)
    Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    cli = proxy_cli(job.cli_args(), run=False)
    tracker = DivergenceTracker(job.factor, job.patience)
    cli.trainer.callbacks.append(DivergenceWatch(tracker, job.stop_on_divergence))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return RunResult.of(tracker, time.perf_counter() - start, time.process_time() - cpu_start)


def check_run(job: TrainJob) -> None:
    """Build, without training or writing anything, the run :func:`train_run` would train:
    raises what a bad config, scheme, rule or number raises, before any run starts."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # the runs themselves say what Lightning finds (GPUs, seeds)
    try:
        proxy_cli(job.cli_args(), run=False)
    finally:
        logging.disable(previous)


def quiet_lightning() -> None:
    """Lightning's banners and warnings off in this process: a worker whose parent shows the
    progress and the summary (the demo, the study)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
