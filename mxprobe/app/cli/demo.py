"""``mxprobe demo [--out DIR] [--quick]``: an MX run that diverges where FP32 does not, what the
monitors saw before it, and a rule that rescues it against a rewind-only control.

Four runs from the same initial weights on the same batches, the study's arms of the shipped
configs (:mod:`mxprobe.app.demo_case`, :mod:`mxprobe.configs`):

- ``fp32``: full precision;
- ``mx``: ``mxfp8_e4m3`` (E4M3 GEMMs and layer-norm affine weights, bf16 elementwise, OCP floor
  scale), monitored, no intervention;
- ``mx_intervention``: the same with the rule of ``proxy_cpu_intervention.yaml``: loss spike ->
  rewind to a snapshot -> layer-norm affine weights to bf16 (snapped to the values the MX
  forward used);
- ``mx_rewind_only``: the control of ``proxy_cpu_rewind_only.yaml``, same detector, snapshots,
  rewind and counters, no precision change.

Every run carries the rule configs' loss-spike detector, so its alarms are comparable across
runs; the MX runs add the gradient-bias and norm-affine monitors. The runs train two at a time
(one thread each); then the report is written (``mxprobe report``), and a summary computed from
the runs is printed and written to ``summary.json``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import yaml

from mxprobe import atomic
from mxprobe.app import demo_case as case
from mxprobe.app.cli.errors import ArgumentParser, positive_int
from mxprobe.app.results import SUMMARY_COLUMNS, RunResult
from mxprobe.app.study import DETECTOR_CLASS, MX_SCHEME

RUNS = ("fp32", "mx", "mx_intervention", "mx_rewind_only")
LABELS = {
    "fp32": "FP32",
    "mx": f"MX ({MX_SCHEME})",
    "mx_intervention": "MX + rule",
    "mx_rewind_only": "MX + rewind only",
}
DESCRIPTION = (
    "Train FP32, MX, MX with the spike rule and MX with a rewind-only control from the same "
    "weights on the same batches, then write their report and a summary."
)


def _callbacks(name: str, shipped: list[dict], total: int, quick: bool) -> list[dict]:
    """The progress reporter, the run's shipped callbacks and, on an MX run, the monitors,
    placed after the spike detector so that a rule sees the step's readings."""
    every = 5 if quick else 10
    progress = {
        "class_path": "mxprobe.app.progress.ProgressReporter",
        "init_args": {"run": name, "total": total},
    }
    # zeta is 0 by construction and no norm is quantized in fp32: nothing to monitor there
    monitors = [] if name == "fp32" else [
        {"class_path": f"mxprobe.callbacks.{monitor}", "init_args": {"every_n_steps": every}}
        for monitor in ("GradientBiasMonitor", "NormAffineMonitor")
    ]  # fmt: skip
    callbacks = [progress]
    for callback in copy.deepcopy(shipped):
        callbacks.append(callback)
        if callback["class_path"] == DETECTOR_CLASS:
            if quick:
                callback["init_args"]["window"] = case.QUICK_DETECTOR_WINDOW
            callbacks += monitors
    return callbacks


def demo_config(name: str, seed: int, quick: bool, steps: int | None = None) -> dict:
    """The LightningCLI config (``mxprobe proxy fit --config``) of demo run ``name``: the
    study's arm of the shipped configs, on ``seed``, validated once at the end, with the
    demo's progress and monitors (and with ``quick``, the smoke-test model)."""
    config = case.arm_configs(list(RUNS))[name]
    trainer = config["trainer"]
    total = steps or (case.QUICK_STEPS if quick else trainer["max_steps"])
    if quick:
        for section, values in case.QUICK.items():
            config[section].update(values)
    trainer.update(
        max_steps=total,
        val_check_interval=total,
        enable_progress_bar=False,  # the parent draws the progress (mxprobe.app.progress)
        callbacks=_callbacks(name, trainer.get("callbacks") or [], total, quick),
    )
    config["seed_everything"] = config["model"]["seed"] = config["data"]["seed"] = seed
    return config


def _train(
    name: str, config: Path, run_dir: Path, compile_quantizer: bool
) -> tuple[str, RunResult]:
    from mxprobe.app.training import TrainJob, quiet_lightning, train_run  # Lightning from here

    # The parent shows progress and the summary; Lightning's banners would bury them.
    quiet_lightning()
    if not compile_quantizer:
        # --quick: compiling the quantizer's variants would cost more than the tiny runs.
        from mxprobe.kernels import set_compile

        set_compile(False)
    return name, train_run(TrainJob(str(config), str(run_dir), threads=1))


def _train_all(
    configs: dict[str, Path], out: Path, compile_quantizer: bool, n_parallel: int
) -> dict[str, RunResult]:
    """Train each run's config into ``out/<run>``, ``n_parallel`` at a time in spawned
    processes, drawing their progress; what each run did."""
    from mxprobe.app.progress import ProgressBoard, set_queue

    ctx = get_context("spawn")
    progress = ctx.Queue()
    board = ProgressBoard(list(configs))
    results = {}
    # One thread per run: two runs on two cores beat one run on two threads at this size.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        with ProcessPoolExecutor(
            n_parallel, mp_context=ctx, initializer=set_queue, initargs=(progress,)
        ) as pool:
            pending = {
                pool.submit(_train, name, config, out / name, compile_quantizer)
                for name, config in configs.items()
            }
            while pending:
                board.poll(progress, timeout=0.5)
                done, pending = wait(pending, timeout=0)
                for future in done:
                    name, result = future.result()
                    results[name] = result
            board.poll(progress, timeout=0.1)
    finally:
        board.close()
    return results


def summarize(
    report, results: dict[str, RunResult], seed: int, steps: int, wall_s: float, out: Path
) -> tuple[dict, list[str]]:
    """summary.json's content and the lines printed, from the runs (``results``: what each
    run's own divergence tracker saw) and the report built from their run records."""
    names = {o.name: o for o in report.outcomes}
    width = max(map(len, LABELS.values())) + 1
    lines = [f"{LABELS[n] + ':':<{width}} {report.headlines[n]}" for n in RUNS]
    lines += [f"{'lead time:':<{width}} {x}" for x in report.lead_times]
    if report.mechanism:
        lines += [
            f"{'before it:':<{width}} {x.replace('`', '')}" for x in report.mechanism.summary()
        ]
    lines += [f"{'this is:':<{width}} {report.framing[0]}"]
    lines += [f"{'':<{width}} {r.line()}" for r in case.BASE_RATES]
    html_path = out / "report" / "report.html"
    lines.append(f"{'report:':<{width}} {html_path} ({wall_s:.0f} s in all)")
    summary = {
        **{n: report.headlines[n] for n in RUNS},
        "divergence_step": {n: results[n].divergence_step for n in RUNS},
        "final_loss": {n: results[n].final_loss for n in RUNS},
        "events": {n: names[n].events for n in RUNS},
        "lead_time": report.lead_times,
        "mechanism": report.mechanism.summary() if report.mechanism else [],
        "seed": seed,
        "framing": report.framing,
        "base_rates": [{**vars(r), "source": case.SOURCE} for r in case.BASE_RATES],
        "steps": steps,
        "wall_s": round(wall_s, 1),
        "report": str(html_path),
    }
    return summary, lines


def run(argv: list[str], prog: str = "mxprobe demo") -> int:
    parser = ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("--out", default="out/demo", help="output directory (default out/demo)")
    parser.add_argument("--quick", action="store_true", help="tiny model, under a minute")
    parser.add_argument(
        "--seed",
        type=int,
        default=case.SEED,
        help=f"model and data seed of every run (default {case.SEED}: a seed of the study where "
        "MX diverges and FP32 does not)",
    )
    parser.add_argument("--steps", type=positive_int, default=None, help="override the step budget")
    parser.add_argument(
        "--jobs", type=positive_int, default=2, help="runs trained at once (default 2)"
    )
    args = parser.parse_args(argv)

    from mxprobe.app.report import build_report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    configs = {}
    # Longest first, so that two workers finish together.
    for name in ("mx_intervention", "mx_rewind_only", "mx", "fp32"):
        configs[name] = out / f"{name}.yaml"
        config = demo_config(name, args.seed, args.quick, args.steps)
        atomic.write_text(configs[name], yaml.safe_dump(config, sort_keys=False))
    steps = config["trainer"]["max_steps"]
    print(
        f"[demo] {len(configs)} runs of {steps} steps, seed {args.seed}, {args.jobs} at a time "
        f"-> {out}",
        file=sys.stderr,
        flush=True,
    )
    results = _train_all(configs, out, not args.quick, args.jobs)
    table = [{"scheme": name, "seed": args.seed, **results[name].to_row()} for name in RUNS]
    atomic.write_csv(out / "summary.csv", table, SUMMARY_COLUMNS)
    framing = case.framing(args.seed, args.quick)
    report = build_report([out / name for name in RUNS], out / "report", framing=framing)
    summary, lines = summarize(report, results, args.seed, steps, time.perf_counter() - start, out)
    atomic.write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    print("\n".join(lines))
    return 0
