"""The bias each format imposes on the proxy's layer-norm affine weights *during training*, as
NormAffineMonitor reports it: the format study's configuration (examples/configs/proxy_cpu.yaml,
eager), one seed, each format's own run with the monitor every ``--every`` steps.

Prints, per format, the mean over the proxy's norms and over the run's measurements (those
after step 0, which reads the initial γ = 1, and those before ``--early`` steps) of
``weight_rel_bias`` (mean q(γ)/γ − 1), ``weight_saturation`` (share of γ clipped in its block:
at the E8M0 floor scale for MX, at ±6 after the E4M3 scale's rounding for NVFP4) and
``weight_mean`` (γ itself), and writes every measurement (format, step, the three means over the
norms) as CSV to ``--out``. The runs do not stop at a divergence, so a run that diverges is
measured after it too (the early window is before it in the format study's seed 1).

    python benchmarks/nvfp4_monitored_gamma.py --steps 1200 --every 25 --seed 1 \\
        --out docs/nvfp4_study/gamma.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

import yaml

from mxprobe import atomic, configs
from mxprobe.app.training import TrainJob, quiet_lightning, train_run

FORMATS = {
    "mxfp8": "mxfp8_e4m3",
    "mxfp4": "mxfp4_e2m1",
    "nvfp4": "nvfp4",
    "nvfp4_full": "nvfp4_recipe,norm=nvfp4",
}
STATS = ("weight_rel_bias", "weight_saturation", "weight_mean")
COLUMNS = ("arm", "scheme", "step", *STATS)


def monitored_config(scheme: str, seed: int, steps: int, every: int) -> dict:
    config = yaml.safe_load(configs.path("proxy_cpu.yaml").read_text())
    config["seed_everything"] = config["model"]["seed"] = config["data"]["seed"] = seed
    config["model"].update(scheme=scheme, compiled=False)
    config["trainer"].update(max_steps=steps, val_check_interval=steps)
    config["trainer"]["callbacks"] = [
        {
            "class_path": "mxprobe.callbacks.NormAffineMonitor",
            "init_args": {"every_n_steps": every},
        }
    ]
    return config


def read_stats(run_dir: Path) -> dict[int, dict[str, float]]:
    """{step: each stat's mean over the norms} of the run's monitor readings."""
    with open(next(run_dir.rglob("metrics.csv")), newline="") as f:
        rows = list(csv.DictReader(f))
    by_step: dict[int, dict[str, list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            stat = key.rsplit("/", 1)[-1]
            if key.startswith("mx/norm_affine/") and stat in STATS and value not in ("", None):
                readings = by_step.setdefault(int(row["step"]), {s: [] for s in STATS})
                readings[stat].append(float(value))
    if not by_step:
        raise RuntimeError(f"no NormAffineMonitor reading in {run_dir}")
    return {step: {s: statistics.fmean(v) for s, v in r.items()} for step, r in by_step.items()}


def _words(stats: list[dict[str, float]]) -> str:
    mean = {s: statistics.fmean(r[s] for r in stats) for s in STATS}
    return (
        f"rel_bias {100 * mean['weight_rel_bias']:+7.3f} %  saturation "
        f"{100 * mean['weight_saturation']:6.2f} %  mean γ {mean['weight_mean']:.4f} "
        f"({len(stats)} measurements)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="steps per run (default 400)")
    parser.add_argument("--seed", type=int, default=1, help="model and data seed (default 1)")
    parser.add_argument("--every", type=int, default=20, help="monitor period (default 20)")
    parser.add_argument("--early", type=int, default=150, help="early window (default 150)")
    parser.add_argument("--out", type=Path, help="CSV of every measurement (optional)")
    args = parser.parse_args()
    quiet_lightning()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arm, scheme in FORMATS.items():
            run_dir = Path(tmp) / arm
            path = run_dir.with_suffix(".yaml")
            path.write_text(
                yaml.safe_dump(monitored_config(scheme, args.seed, args.steps, args.every))
            )
            train_run(TrainJob(str(path), str(run_dir), threads=1, stop_on_divergence=False))
            by_step = read_stats(run_dir)
            rows += [{"arm": arm, "scheme": scheme, "step": k, **v} for k, v in by_step.items()]
            # Step 0 reads the initial γ = 1, on every grid: no bias, nothing clipped.
            after = {k: v for k, v in by_step.items() if k > 0}
            early = [v for k, v in after.items() if k < args.early]
            print(f"{arm:11s} {scheme:26s} steps > 0: {_words(list(after.values()))}", flush=True)
            print(f"{'':38s} 0 < step < {args.early}: {_words(early)}", flush=True)
    if args.out:
        atomic.write_csv(args.out, rows, COLUMNS)


if __name__ == "__main__":
    main()
