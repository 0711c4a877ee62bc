"""``mxprobe proxy``: train the paper's student-teacher proxy.

- ``mxprobe proxy fit --config FILE.yaml`` / ``validate`` — LightningCLI over
  ``ProxyLitModule`` and ``ProxyDataModule``; every Trainer option, callback and rule is set in
  the YAML (the data module's width, depth and activation follow the model's).
- ``mxprobe proxy compare --config FILE.yaml --schemes fp32,mxfp8_e4m3 [--seeds 0,1,2]
  [--out DIR] [--jobs N]`` — trains every (scheme, seed) from the same initial weights on the same
  batches (seed = model seed = data seed), one run directory each with its CSVLogger
  ``metrics.csv``, and writes ``summary.csv`` (columns :data:`SUMMARY_COLUMNS`), ``rates.csv``
  (each scheme's divergence rate with its exact interval) and ``tests.csv`` (each pair of
  schemes: exact McNemar over the seeds; :mod:`mxprobe.app.rates`).

Divergence is defined once, in :mod:`mxprobe.outcome` (docs/proxy.md).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from mxprobe.app.cli.errors import (
    ArgumentParser,
    UsageError,
    inside,
    int_list,
    positive_int,
    raising_parser_kwargs,
)
from mxprobe.app.rates import by_arm, write_tables
from mxprobe.atomic import atomic_open
from mxprobe.outcome import DIVERGENCE_FACTOR, DIVERGENCE_PATIENCE, DivergenceTracker

SUMMARY_COLUMNS = (
    "scheme",
    "seed",
    "final_loss",
    "min_loss",
    "diverged",
    "divergence_step",
    "recovered_spikes",
)


def _divergence_callback(tracker: DivergenceTracker, stop: bool):
    import lightning.pytorch as pl

    class DivergenceWatch(pl.Callback):
        """Feeds every training loss to the tracker; stops the run once it diverged if asked."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if tracker.update(float(loss)) and stop:
                trainer.should_stop = True

    return DivergenceWatch()


def _cli_class():
    from mxprobe.app.cli.lightning_parts import CheckedCheckpointPath
    from mxprobe.callbacks import RunRecorder

    class ProxyCLI(CheckedCheckpointPath):
        def add_arguments_to_parser(self, parser) -> None:
            for key in ("width", "depth", "activation"):
                parser.link_arguments(f"model.{key}", f"data.{key}")

        def instantiate_trainer(self, **kwargs):
            # Every proxy run keeps its record, whatever callbacks its YAML lists.
            trainer = super().instantiate_trainer(**kwargs)
            RunRecorder.of(trainer)
            return trainer

    return ProxyCLI


def make_cli(args: list[str], run: bool = True, **kwargs):
    """The LightningCLI of the proxy for ``args`` (subcommand first when ``run``); a bad
    argument raises ``argparse.ArgumentError`` (the CLI's main says it in one line)."""
    from mxprobe.app.cli import lightning_parts
    from mxprobe.models.data import ProxyDataModule
    from mxprobe.models.lit import ProxyLitModule

    # LightningCLI warns when it gets args while sys.argv holds a command line: mxprobe passes
    # the tail of that same command line, or a run's own arguments.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return _cli_class()(
        ProxyLitModule,
        ProxyDataModule,
        args=args,
        run=run,
        save_config_callback=lightning_parts.AtomicSaveConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=raising_parser_kwargs(kwargs.pop("parser_kwargs", {}), ("fit", "validate")),
        **kwargs,
    )


def train_run(
    config: str | None,
    run_dir: str,
    args: list[str] = (),
    stop_on_divergence: bool = True,
    factor: float = DIVERGENCE_FACTOR,
    patience: int = DIVERGENCE_PATIENCE,
    threads: int | None = None,
) -> dict:
    """Train one proxy run into ``run_dir`` (its run record and a CSVLogger ``metrics.csv``
    there) and return its divergence summary plus ``steps``, ``wall_s`` and ``cpu_s``;
    ``args`` are extra LightningCLI arguments such as ``--model.scheme=mxfp8_e4m3``."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    run_path = Path(run_dir)
    run_path.mkdir(parents=True, exist_ok=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    cli = make_cli(_run_args(config, run_path, args), run=False)
    tracker = DivergenceTracker(factor, patience)
    cli.trainer.callbacks.append(_divergence_callback(tracker, stop_on_divergence))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    row = tracker.summary()
    row.update(
        steps=tracker.step,
        wall_s=round(time.perf_counter() - start, 1),
        cpu_s=round(time.process_time() - cpu_start, 1),
    )
    return row


def _run_args(config: str | None, run_path: Path, args) -> list[str]:
    logger = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(run_path), "name": "", "version": ""},
    }
    cli_args = ([f"--config={config}"] if config else []) + list(args)
    return cli_args + [
        f"--trainer.logger={json.dumps(logger)}",
        f"--trainer.default_root_dir={run_path}",
    ]


def check_run(config: str | None, run_dir: str, args: list[str] = ()) -> None:
    """Build, without training or writing anything, the run :func:`train_run` would train:
    raises what a bad config, scheme, rule or number raises, before any run starts."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # the runs themselves say what Lightning finds (GPUs, seeds)
    try:
        make_cli(_run_args(config, Path(run_dir), args), run=False)
    finally:
        logging.disable(previous)


def check_config(config: str | None) -> None:
    """A UsageError unless ``config`` is None or a readable file."""
    if config is not None and not Path(config).is_file():
        raise UsageError(f"config {config!r}: no such file")


def check_divergence_rule(factor: float, patience: int) -> None:
    """A UsageError unless ``factor`` > 1 (finite) and ``patience`` >= 1 (mxprobe.outcome)."""
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 1):
        raise UsageError(f"divergence factor must be a finite number > 1, got {factor!r}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise UsageError(f"divergence patience must be an integer >= 1, got {patience!r}")


def compare_run_dir(out: Path, scheme: str, seed: int) -> Path:
    name = f"{scheme.replace('=', '-').replace(',', '_')}-seed{seed}"
    return inside(out, out / name, f"--schemes {scheme!r}: run directory")


def _compare_one(job: tuple) -> dict:
    config, out, scheme, seed, extra, stop, factor, patience, threads = job
    run_dir = compare_run_dir(Path(out), scheme, seed)
    args = _compare_args(scheme, seed, extra)
    row = train_run(config, str(run_dir), args, stop, factor, patience, threads)
    return {"scheme": scheme, "seed": seed, **row, "run_dir": str(run_dir)}


def _compare_args(scheme: str, seed: int, extra: list[str]) -> list[str]:
    return [f"--model.scheme={scheme}", f"--model.seed={seed}", f"--data.seed={seed}", *extra]


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    """Write ``rows`` (extra keys ignored) atomically: a reader never sees half a table, and a
    failed write leaves the previous table (:mod:`mxprobe.atomic`)."""
    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def parse_schemes(text: str) -> list[str]:
    """The schemes of ``--schemes`` (comma-separated, or ';'-separated when a scheme has commas),
    each parsed; a UsageError names a bad or repeated one."""
    from mxprobe.scheme import parse_scheme

    schemes = [s.strip() for s in (text.split(";") if ";" in text else text.split(","))]
    for scheme in schemes:
        if not scheme:
            raise UsageError(f"--schemes {text!r}: empty scheme name")
        try:
            parse_scheme(scheme)
        except ValueError as err:
            raise UsageError(f"--schemes: {err}") from None
    repeated = sorted({s for s in schemes if schemes.count(s) > 1})
    if repeated:
        raise UsageError(f"--schemes {text!r}: {', '.join(repeated)} given twice")
    return schemes


def compare(argv: list[str], prog: str) -> int:
    parser = ArgumentParser(
        prog=f"{prog} compare",
        description="Train each scheme from the same initial weights on the same batches.",
    )
    parser.add_argument("--config", required=True, help="LightningCLI YAML (trainer/model/data)")
    parser.add_argument(
        "--schemes",
        required=True,
        help="comma-separated schemes; separate with ';' when a scheme string "
        "itself has commas (e.g. 'mxfp8_e4m3;mxfp8_e4m3,norm=bf16')",
    )
    parser.add_argument(
        "--seeds", type=int_list, default=[0], help="comma-separated seeds (default: 0)"
    )
    parser.add_argument("--out", default="runs/compare", help="output directory")
    parser.add_argument(
        "--jobs", type=positive_int, default=1, help="parallel processes (default 1)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra LightningCLI argument, e.g. trainer.max_steps=100 (repeatable)",
    )
    parser.add_argument(
        "--no-stop",
        action="store_true",
        help="keep training after divergence (default: stop there)",
    )
    parser.add_argument("--factor", type=float, default=DIVERGENCE_FACTOR)
    parser.add_argument("--patience", type=int, default=DIVERGENCE_PATIENCE)
    ns = parser.parse_args(argv)
    # Everything the runs need is checked before the first one trains.
    check_config(ns.config)
    check_divergence_rule(ns.factor, ns.patience)
    schemes, seeds = parse_schemes(ns.schemes), ns.seeds
    extra = [f"--{item}" for item in ns.set]
    out = Path(ns.out)
    for scheme in schemes:
        check_run(
            ns.config,
            str(compare_run_dir(out, scheme, seeds[0])),
            _compare_args(scheme, seeds[0], extra),
        )
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // ns.jobs) if ns.jobs > 1 else None
    jobs = [
        (ns.config, str(out), scheme, seed, extra, not ns.no_stop, ns.factor, ns.patience, threads)
        for seed in seeds
        for scheme in schemes
    ]
    columns = (*SUMMARY_COLUMNS, "steps", "wall_s", "cpu_s")
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        if ns.jobs > 1:
            pool = stack.enter_context(
                ProcessPoolExecutor(ns.jobs, mp_context=get_context("spawn"))
            )
            finished = pool.map(_compare_one, jobs)
        else:
            finished = map(_compare_one, jobs)
        for row in finished:  # summary.csv keeps every finished run, whatever fails later
            rows.append(row)
            write_csv(out / "summary.csv", rows, columns)
    width = max(len(r["scheme"]) for r in rows)
    print(f"{'scheme':<{width}}  seed  diverged  step   final_loss  min_loss    wall_s  cpu_s")
    for r in rows:
        print(
            f"{r['scheme']:<{width}}  {r['seed']:<4}  {r['diverged']:<8}  "
            f"{str(r['divergence_step']):<5}  {r['final_loss']:<10.4g}  {r['min_loss']:<10.4g}  "
            f"{r['wall_s']:<6}  {r['cpu_s']}"
        )
    arms = by_arm(rows, lambda r: r["scheme"])
    print("divergence rate (95 % exact interval):")
    for found in write_tables(out, arms, write_csv):
        print(f"  {found.arm:<{width}}  {found.words()}")
    print(f"summary: {out / 'summary.csv'}; rates: {out / 'rates.csv'}; tests: {out / 'tests.csv'}")
    return 0


def run(argv: list[str], prog: str) -> int:
    if argv and argv[0] == "compare":
        return compare(argv[1:], prog)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            f"usage: {prog} {{fit,validate,compare}} ...\n\n"
            "  fit / validate   LightningCLI: --config FILE.yaml, any --trainer/model/data key\n"
            "  compare          same init and batches for several schemes and seeds; summary.csv\n",
            file=sys.stdout if argv else sys.stderr,
        )
        return 0 if argv else 2
    if argv[0] not in ("fit", "validate"):
        print(
            f"{prog}: unknown subcommand {argv[0]!r}; expected one of fit, validate, compare",
            file=sys.stderr,
        )
        return 2
    make_cli(argv, run=True, parser_kwargs={"prog": prog})
    return 0
