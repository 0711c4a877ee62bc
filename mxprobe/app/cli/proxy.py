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

import argparse
import csv
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from mxprobe.app.rates import by_arm, write_tables
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
    from lightning.pytorch.cli import LightningCLI

    from mxprobe.callbacks import RunRecorder

    class ProxyCLI(LightningCLI):
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
    """The LightningCLI of the proxy for ``args`` (subcommand first when ``run``)."""
    from mxprobe.models.data import ProxyDataModule
    from mxprobe.models.lit import ProxyLitModule

    return _cli_class()(
        ProxyLitModule,
        ProxyDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
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
    logger = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(run_path), "name": "", "version": ""},
    }
    cli_args = ([f"--config={config}"] if config else []) + list(args)
    cli_args += [f"--trainer.logger={json.dumps(logger)}", f"--trainer.default_root_dir={run_path}"]
    start, cpu_start = time.perf_counter(), time.process_time()
    cli = make_cli(cli_args, run=False)
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


def _compare_one(job: tuple) -> dict:
    config, out, scheme, seed, extra, stop, factor, patience, threads = job
    run_dir = Path(out) / f"{scheme.replace('=', '-').replace(',', '_')}-seed{seed}"
    args = [f"--model.scheme={scheme}", f"--model.seed={seed}", f"--data.seed={seed}", *extra]
    row = train_run(config, str(run_dir), args, stop, factor, patience, threads)
    return {"scheme": scheme, "seed": seed, **row, "run_dir": str(run_dir)}


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    """Write ``rows`` (extra keys ignored) atomically: a reader never sees half a table."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def compare(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
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
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    parser.add_argument("--out", default="runs/compare", help="output directory")
    parser.add_argument("--jobs", type=int, default=1, help="parallel processes (default 1)")
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
    schemes = [
        s.strip() for s in (ns.schemes.split(";") if ";" in ns.schemes else ns.schemes.split(","))
    ]
    seeds = [int(s) for s in ns.seeds.split(",")]
    extra = [f"--{item}" for item in ns.set]
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // ns.jobs) if ns.jobs > 1 else None
    jobs = [
        (ns.config, str(out), scheme, seed, extra, not ns.no_stop, ns.factor, ns.patience, threads)
        for seed in seeds
        for scheme in schemes
    ]
    if ns.jobs > 1:
        with ProcessPoolExecutor(ns.jobs, mp_context=get_context("spawn")) as pool:
            rows = list(pool.map(_compare_one, jobs))
    else:
        rows = [_compare_one(job) for job in jobs]
    write_csv(out / "summary.csv", rows, (*SUMMARY_COLUMNS, "steps", "wall_s", "cpu_s"))
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
