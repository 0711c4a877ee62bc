"""``mxprobe demo [--out DIR] [--quick]``: an MX run that diverges where FP32 does not, what the
monitors saw before it, and a rule that rescues it against a rewind-only control.

Four runs from the same initial weights on the same batches (:mod:`mxprobe.app.demo_case`):

- ``fp32``: full precision;
- ``mx``: ``mxfp8_e4m3`` (E4M3 GEMMs and layer-norm affine weights, bf16 elementwise, OCP floor
  scale), monitored, no intervention;
- ``mx_intervention``: the same with the rule loss spike -> rewind to a snapshot -> layer-norm
  affine weights to bf16 (snapped to the values the MX forward used);
- ``mx_rewind_only``: the control, same detector, snapshots, rewind and counters, no precision
  change.

Every run carries the same loss-spike detector, so its alarms are comparable across runs. The
runs train two at a time (one thread each); then the report is written (``mxprobe report``), and
a summary computed from the runs is printed and written to ``summary.json``.
"""

from __future__ import annotations

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

RUNS = ("fp32", "mx", "mx_intervention", "mx_rewind_only")
LABELS = {
    "fp32": "FP32",
    "mx": f"MX ({case.MX_SCHEME})",
    "mx_intervention": "MX + rule",
    "mx_rewind_only": "MX + rewind only",
}


def _callbacks(name: str, total: int, quick: bool) -> list[dict]:
    every = 5 if quick else 10
    detector = case.QUICK_SPIKE_DETECTOR if quick else case.SPIKE_DETECTOR
    callbacks = [
        {
            "class_path": "mxprobe.app.progress.ProgressReporter",
            "init_args": {"run": name, "total": total},
        },
        {"class_path": "mxprobe.callbacks.LossSpikeDetector", "init_args": dict(detector)},
    ]
    if name == "fp32":  # zeta is 0 by construction and no norm is quantized: nothing to monitor
        return callbacks
    callbacks += [
        {
            "class_path": "mxprobe.callbacks.GradientBiasMonitor",
            "init_args": {"every_n_steps": every},
        },
        {
            "class_path": "mxprobe.callbacks.NormAffineMonitor",
            "init_args": {"every_n_steps": every},
        },
    ]
    rule = {"mx_intervention": case.RULE, "mx_rewind_only": case.CONTROL_RULE}.get(name)
    if rule is not None:
        callbacks.append(
            {
                "class_path": "mxprobe.callbacks.PrecisionIntervention",
                "init_args": {"rules": [rule], **case.SNAPSHOTS},
            }
        )
    return callbacks


def demo_config(name: str, seed: int, quick: bool, steps: int | None = None) -> dict:
    """The LightningCLI config (``mxprobe proxy fit --config``) of one demo run."""
    total = steps or (case.QUICK_STEPS if quick else case.STEPS)
    model = case.QUICK_MODEL if quick else case.MODEL
    data = case.QUICK_DATA if quick else case.DATA
    return {
        "seed_everything": seed,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": total,
            "val_check_interval": total,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "enable_progress_bar": False,  # the parent draws the progress (mxprobe.app.progress)
            "callbacks": _callbacks(name, total, quick),
        },
        "model": {
            **model,
            "seed": seed,
            "scheme": "fp32" if name == "fp32" else case.MX_SCHEME,
        },
        "data": {**data, "seed": seed, "val_batches": 1},
    }


def _train(job: tuple[str, str, str, bool]) -> tuple[str, dict]:
    import logging
    import warnings

    from mxprobe.app.cli.proxy import train_run  # Lightning from here

    # The parent shows progress and the summary; Lightning's banners would bury them.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    name, config_path, run_dir, compile_quantizer = job
    if not compile_quantizer:
        # --quick: compiling the quantizer's variants would cost more than the tiny runs.
        from mxprobe.compile_cache import set_compile

        set_compile(False)
    return name, train_run(config_path, run_dir, stop_on_divergence=True, threads=1)


def _train_all(jobs: list[tuple[str, str, str, bool]], n_parallel: int) -> dict[str, dict]:
    from mxprobe.app.progress import ProgressBoard, set_queue

    ctx = get_context("spawn")
    progress = ctx.Queue()
    board = ProgressBoard([job[0] for job in jobs])
    rows = {}
    # One thread per run: two runs on two cores beat one run on two threads at this size.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        with ProcessPoolExecutor(
            n_parallel, mp_context=ctx, initializer=set_queue, initargs=(progress,)
        ) as pool:
            pending = {pool.submit(_train, job) for job in jobs}
            while pending:
                board.poll(progress, timeout=0.5)
                done, pending = wait(pending, timeout=0)
                for future in done:
                    name, row = future.result()
                    rows[name] = row
            board.poll(progress, timeout=0.1)
    finally:
        board.close()
    return rows


def summarize(
    report, rows: dict[str, dict], seed: int, steps: int, wall_s: float, out: Path
) -> tuple[dict, list[str]]:
    """summary.json's content and the lines printed, from the runs (``rows``: each run's own
    divergence tracker) and the report built from their run records."""
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
        "divergence_step": {n: rows[n]["divergence_step"] for n in RUNS},
        "final_loss": {n: rows[n]["final_loss"] for n in RUNS},
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
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/demo", help="output directory (default out/demo)")
    parser.add_argument("--quick", action="store_true", help="tiny model, under a minute")
    parser.add_argument("--seed", type=int, default=case.SEED)
    parser.add_argument("--steps", type=positive_int, default=None, help="override the step budget")
    parser.add_argument(
        "--jobs", type=positive_int, default=2, help="runs trained at once (default 2)"
    )
    args = parser.parse_args(argv)

    from mxprobe.app.cli.proxy import SUMMARY_COLUMNS, write_csv
    from mxprobe.app.report import build_report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = []
    # Longest first, so that two workers finish together.
    for name in ("mx_intervention", "mx_rewind_only", "mx", "fp32"):
        config_path = out / f"{name}.yaml"
        config = demo_config(name, args.seed, args.quick, args.steps)
        atomic.write_text(config_path, yaml.safe_dump(config, sort_keys=False))
        jobs.append((name, str(config_path), str(out / name), not args.quick))
    steps = jobs and demo_config("mx", args.seed, args.quick, args.steps)["trainer"]["max_steps"]
    print(
        f"[demo] {len(jobs)} runs of {steps} steps, seed {args.seed}, {args.jobs} at a time "
        f"-> {out}",
        file=sys.stderr,
        flush=True,
    )
    rows = _train_all(jobs, args.jobs)
    table = [{**rows[name], "scheme": name, "seed": args.seed} for name in RUNS]
    write_csv(out / "summary.csv", table, (*SUMMARY_COLUMNS, "steps", "wall_s"))
    framing = case.framing(args.seed, args.quick)
    report = build_report([out / name for name in RUNS], out / "report", framing=framing)
    summary, lines = summarize(report, rows, args.seed, steps, time.perf_counter() - start, out)
    atomic.write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    print("\n".join(lines))
    return 0
