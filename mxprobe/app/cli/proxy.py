"""``mxprobe proxy``: train the paper's student-teacher proxy.

- ``mxprobe proxy fit --config FILE.yaml`` / ``validate`` — LightningCLI over
  ``ProxyLitModule`` and ``ProxyDataModule``; every Trainer option, callback and rule is set in
  the YAML (the data module's width, depth and activation follow the model's).
- ``mxprobe proxy compare --config FILE.yaml --schemes fp32,mxfp8_e4m3 [--seeds 0,1,2]
  [--out DIR] [--jobs N]`` — trains every (scheme, seed) from the same initial weights on the same
  batches (seed = model seed = data seed), one run directory each with its CSVLogger
  ``metrics.csv``, and writes ``summary.csv`` (columns
  :data:`mxprobe.app.results.SUMMARY_COLUMNS`), ``rates.csv`` (each scheme's divergence rate
  with its exact interval) and ``tests.csv`` (each pair of schemes: exact McNemar over the
  seeds; :mod:`mxprobe.app.rates`).

The runs are trained by :mod:`mxprobe.app.training`; divergence is defined once, in
:mod:`mxprobe.outcome` (docs/proxy.md).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from mxprobe.app.cli.errors import ArgumentParser, inside, int_list, positive_int
from mxprobe.app.parsing import UsageError
from mxprobe.app.rates import by_arm, write_tables
from mxprobe.app.results import SUMMARY_COLUMNS
from mxprobe.atomic import write_csv
from mxprobe.outcome import DIVERGENCE_FACTOR, DIVERGENCE_PATIENCE

DESCRIPTION = "Train each scheme and seed from the same initial weights on the same batches."


def check_config(config: str | None) -> None:
    """A UsageError unless ``config`` is None or a readable file."""
    if config is not None and not Path(config).is_file():
        raise UsageError(f"config {config!r}: no such file")


def add_divergence_arguments(parser) -> None:
    """``--factor`` and ``--patience``: the divergence rule of :mod:`mxprobe.outcome`."""
    parser.add_argument(
        "--factor",
        type=float,
        default=DIVERGENCE_FACTOR,
        help=f"a step is high when its loss exceeds this times the running minimum "
        f"(default {DIVERGENCE_FACTOR:g})",
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=DIVERGENCE_PATIENCE,
        help=f"consecutive high steps that make a divergence (default {DIVERGENCE_PATIENCE})",
    )


def check_divergence_rule(factor: float, patience: int) -> None:
    """A UsageError unless ``factor`` > 1 (finite) and ``patience`` >= 1 (mxprobe.outcome)."""
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 1):
        raise UsageError(f"divergence factor must be a finite number > 1, got {factor!r}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise UsageError(f"divergence patience must be an integer >= 1, got {patience!r}")


def compare_run_dir(out: Path, scheme: str, seed: int) -> Path:
    name = f"{scheme.replace('=', '-').replace(',', '_')}-seed{seed}"
    return inside(out, out / name, f"--schemes {scheme!r}: run directory")


def _compare_args(scheme: str, seed: int, extra: list[str]) -> list[str]:
    return [f"--model.scheme={scheme}", f"--model.seed={seed}", f"--data.seed={seed}", *extra]


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
    from mxprobe.app.training import TrainJob, check_run, train_run

    parser = ArgumentParser(prog=f"{prog} compare", description=DESCRIPTION)
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
    add_divergence_arguments(parser)
    ns = parser.parse_args(argv)
    # Everything the runs need is checked before the first one trains.
    check_config(ns.config)
    check_divergence_rule(ns.factor, ns.patience)
    schemes, seeds = parse_schemes(ns.schemes), ns.seeds
    extra = [f"--{item}" for item in ns.set]
    out = Path(ns.out)
    threads = max(1, (os.cpu_count() or 1) // ns.jobs) if ns.jobs > 1 else None

    def job(scheme: str, seed: int) -> TrainJob:
        run_dir = str(compare_run_dir(out, scheme, seed))
        args = tuple(_compare_args(scheme, seed, extra))
        return TrainJob(ns.config, run_dir, args, not ns.no_stop, ns.factor, ns.patience, threads)

    for scheme in schemes:
        check_run(job(scheme, seeds[0]))
    out.mkdir(parents=True, exist_ok=True)
    runs = [(scheme, seed) for seed in seeds for scheme in schemes]
    jobs = [job(scheme, seed) for scheme, seed in runs]
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        if ns.jobs > 1:
            pool = stack.enter_context(
                ProcessPoolExecutor(ns.jobs, mp_context=get_context("spawn"))
            )
            finished = pool.map(train_run, jobs)
        else:
            finished = map(train_run, jobs)
        # summary.csv keeps every finished run, whatever fails later
        for (scheme, seed), j, result in zip(runs, jobs, finished, strict=True):
            rows.append({"scheme": scheme, "seed": seed, **result.to_row(), "run_dir": j.run_dir})
            write_csv(out / "summary.csv", rows, SUMMARY_COLUMNS)
    width = max(len(r["scheme"]) for r in rows)
    print(f"{'scheme':<{width}}  seed  diverged  step   final_loss  min_loss    wall_s  cpu_s")
    for r in rows:
        step = "" if r["divergence_step"] is None else r["divergence_step"]
        print(
            f"{r['scheme']:<{width}}  {r['seed']:<4}  {str(r['diverged']).lower():<8}  "
            f"{step!s:<5}  {r['final_loss']:<10.4g}  {r['min_loss']:<10.4g}  "
            f"{r['wall_s']:<6}  {r['cpu_s']}"
        )
    arms = by_arm(rows, lambda r: r["scheme"])
    print("divergence rate (95 % exact interval):")
    for found in write_tables(out, arms):
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
    from mxprobe.app.training import proxy_cli

    proxy_cli(argv, run=True, parser_kwargs={"prog": prog})
    return 0
