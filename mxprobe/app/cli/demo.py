"""``mxprobe demo [--out DIR] [--quick]``: the paper's story on this machine, in minutes.

On a CPU proxy configuration (d=64, docs/proxy_cpu.md) it trains, from the same initial weights on
the same batches: (a) FP32, (b) MX (``mxfp8_e4m3``: E4M3 GEMMs and LayerNorm affine weights,
bf16 elementwise, OCP floor scale) without intervention, (c) the same MX run with the default
automatic rules (a loss spike or a non-finite loss -> rewind to a snapshot and switch the
layer-norm affine weights to bf16, snapped to the values the MX forward used). Then it writes
the report (``mxprobe report``), prints a five-line summary computed from the runs, and writes
it to ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from mxprobe.events import EVENTS_FILE, read_events

# The embedded default: the first CPU proxy configuration of docs/proxy_cpu.md (d=64, lr 1.4e-2;
# eager emulation), with a step budget that fits the demo's time on two cores. --quick shrinks
# it for a smoke test.
FULL = {"depth": 4, "width": 64, "batch_size": 256, "lr": 1.4e-2, "steps": 900, "every": 50}
QUICK = {"depth": 2, "width": 32, "batch_size": 64, "lr": 1.4e-2, "steps": 60, "every": 20}

DEFAULT_RULES = [
    {
        "name": "spike-rewind-norms-to-bf16",
        "trigger": {"kind": "spike"},
        "action": {
            "kind": "rewind",
            "steps": 100,
            # snap: the switch keeps the function (docs/proxy_cpu.md, "The switch itself is a
            # shock").
            "then": {"kind": "set_scheme", "scheme": "norm=bf16", "modules": "*", "snap": True},
        },
        "cooldown": 100,
        "max_times": 2,
    }
]


def _callbacks(every: int, intervene: bool) -> list[dict]:
    monitors = [
        {
            "class_path": "mxprobe.callbacks.GradientBiasMonitor",
            "init_args": {"every_n_steps": every},
        },
        {
            "class_path": "mxprobe.callbacks.NormAffineMonitor",
            "init_args": {"every_n_steps": every},
        },
        {
            "class_path": "mxprobe.callbacks.ActivationMonitor",
            "init_args": {"every_n_steps": every},
        },
    ]
    if not intervene:
        return monitors
    return monitors + [
        {"class_path": "mxprobe.callbacks.LossSpikeDetector", "init_args": {"method": "zscore"}},
        {
            "class_path": "mxprobe.callbacks.PrecisionIntervention",
            "init_args": {"rules": DEFAULT_RULES, "snapshot_every": 50, "keep_snapshots": 4},
        },
    ]


def demo_config(size: dict, scheme: str, callbacks: list[dict], seed: int) -> dict:
    """A LightningCLI config (``mxprobe proxy fit --config``) for one demo run."""
    return {
        "seed_everything": seed,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": size["steps"],
            "val_check_interval": size["steps"],
            "check_val_every_n_epoch": None,
            "limit_val_batches": 1,
            "log_every_n_steps": 1,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "enable_progress_bar": True,
            "callbacks": callbacks,
        },
        "model": {
            "depth": size["depth"],
            "width": size["width"],
            "lr": size["lr"],
            "seed": seed,
            "scheme": scheme,
        },
        "data": {"batch_size": size["batch_size"], "seed": seed, "val_batches": 1},
    }


def _events(run_dir: Path) -> list[dict]:
    path = next(run_dir.rglob(EVENTS_FILE), None)
    return [] if path is None else read_events(path)


def _describe_run(row: dict, steps: int) -> str:
    if row["diverged"] == "true":
        return f"diverged at step {row['divergence_step']}"
    spikes = f", {row['recovered_spikes']} recovered spike(s)" if row["recovered_spikes"] else ""
    return f"stable over {row['steps']} of {steps} steps{spikes}"


def summarize(rows: dict[str, dict], events: list[dict], steps: int, wall_s: float, out: Path):
    fired = [e for e in events if e.get("kind") in ("set_scheme", "rewind", "scale_lr")]
    spikes = [e for e in events if e.get("kind") in ("spike", "nonfinite")]
    if fired:
        what = "; ".join(
            f"step {e['step']}: {e['kind']}"
            + (f" -> step {e['rewound_to']}" if e.get("rewound_to") is not None else "")
            + (f" ({e['scheme']})" if e.get("scheme") else "")
            for e in fired
        )
    else:
        what = "no rule fired"
    summary = {
        "fp32": _describe_run(rows["fp32"], steps),
        "mx": _describe_run(rows["mx"], steps),
        "mx_intervention": _describe_run(rows["mx_intervention"], steps),
        "intervention_events": fired,
        "spikes_detected": len(spikes),
        "final_loss": {k: rows[k]["final_loss"] for k in rows},
        "divergence_step": {k: rows[k]["divergence_step"] for k in rows},
        "steps": steps,
        "wall_s": round(wall_s, 1),
        "report": str(out / "report" / "report.md"),
    }
    lines = [
        f"FP32:                 {summary['fp32']}",
        f"MX (mxfp8_e4m3):      {summary['mx']}",
        f"MX + auto rules:      {summary['mx_intervention']}; {len(spikes)} spike(s) seen, {what}",
        "final losses:         "
        + ", ".join(f"{k} {rows[k]['final_loss']:.4g}" for k in ("fp32", "mx", "mx_intervention")),
        f"report:               {summary['report']} ({summary['wall_s']} s in all)",
    ]
    return summary, lines


def run(argv: list[str], prog: str = "mxprobe demo") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/demo", help="output directory (default out/demo)")
    parser.add_argument("--quick", action="store_true", help="tiny model, ~1 minute in all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the step budget")
    args = parser.parse_args(argv)

    from mxprobe.app.cli.proxy import SUMMARY_COLUMNS, train_run, write_csv  # Lightning from here
    from mxprobe.app.report import build_report

    size = dict(QUICK if args.quick else FULL)
    if args.steps:
        size["steps"] = args.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = {
        "fp32": ("fp32", _callbacks(size["every"], intervene=False)),
        "mx": ("mxfp8_e4m3", _callbacks(size["every"], intervene=False)),
        "mx_intervention": ("mxfp8_e4m3", _callbacks(size["every"], intervene=True)),
    }
    start = time.perf_counter()
    rows = {}
    for name, (scheme, callbacks) in plan.items():
        config_path = out / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(demo_config(size, scheme, callbacks, args.seed)))
        print(f"[demo] {name}: {scheme}, {size['steps']} steps -> {out / name}", flush=True)
        rows[name] = train_run(str(config_path), str(out / name), stop_on_divergence=True)
    table = [{**row, "scheme": name, "seed": args.seed} for name, row in rows.items()]
    write_csv(out / "summary.csv", table, (*SUMMARY_COLUMNS, "steps", "wall_s"))
    report_dir = out / "report"
    build_report([out], report_dir)
    summary, lines = summarize(
        rows, _events(out / "mx_intervention"), size["steps"], time.perf_counter() - start, out
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\n".join(lines))
    return 0
