"""``report.md`` and a self-contained ``report.html`` (images embedded) from run directories.

Each figure answers one question; a figure with nothing to draw is replaced by a sentence that
says what is missing, so a partial or killed run still gets a report of what is there.
"""

from __future__ import annotations

import base64
import csv
import html
from dataclasses import dataclass, field
from pathlib import Path

from mxprobe.app import plots
from mxprobe.app.runs import Run, find_runs, finite

_TABLE_NAMES = ("summary.csv", "results.csv")


class NoRunsError(ValueError):
    """No run (no metrics.csv) under the given directories."""


@dataclass
class Section:
    title: str
    image: Path | None
    caption: str
    missing: str = ""


@dataclass
class Report:
    runs: list[Run]
    sections: list[Section] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _outcome(row: dict) -> str:
    if row.get("outcome"):
        return row["outcome"]
    if str(row.get("diverged", "")).lower() == "true":
        return "diverged"
    try:
        if float(row.get("recovered_spikes") or 0) > 0:
            return "recovered spike"
    except ValueError:
        pass
    return "stable"


def read_outcome_table(paths: list[Path]) -> list[dict]:
    """Rows of every summary.csv / results.csv at the top of ``paths``, with an ``outcome``."""
    rows = []
    for root in paths:
        for name in _TABLE_NAMES:
            table = root / name
            if table.exists():
                with open(table, newline="") as fh:
                    for row in csv.DictReader(fh):
                        rows.append({**row, "outcome": _outcome(row)})
    return rows


# Columns that are results, not configuration: never an axis of the stability map.
_RESULT_COLUMNS = {
    "outcome",
    "final_loss",
    "min_loss",
    "diverged",
    "divergence_step",
    "recovered_spikes",
    "wall_s",
    "wall_time",
    "time_s",
    "status",
    "run_dir",
    "steps",
    "seed",
}


def _map_axes(rows: list[dict]) -> tuple[str, str] | None:
    """(x, y) configuration columns for a stability map: scheme on y, lr (or the first other
    varying setting) on x, seed when nothing else varies."""
    if not rows:
        return None
    config = [k for k in rows[0] if k not in _RESULT_COLUMNS]
    varying = [k for k in config if len({r[k] for r in rows}) > 1]
    y = "scheme" if "scheme" in config else (varying[0] if varying else None)
    others = [k for k in varying if k != y]
    preferred = [k for k in ("lr", "learning_rate", "width", "depth", "activation") if k in others]
    x = (preferred or others or (["seed"] if "seed" in rows[0] else []) or [None])[0]
    return (x, y) if x and y else None


def build_report(run_dirs: list[str | Path], out: str | Path) -> Report:
    """Write the figures, report.md and report.html for ``run_dirs`` into ``out``.

    Raises:
        NoRunsError: when no directory holds a metrics.csv.
    """
    roots = [Path(p) for p in run_dirs]
    missing = [str(p) for p in roots if not p.exists()]
    if missing:
        raise NoRunsError(f"no such directory: {', '.join(missing)}")
    runs = find_runs(roots)
    if not runs:
        raise NoRunsError(
            f"no runs found under {', '.join(map(str, roots))}: expected a metrics.csv "
            "(Lightning CSVLogger) in each run directory"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(runs)
    for run in runs:
        report.notes += [f"{run.name}: {n}" for n in run.notes]
        if run.loss_name() is None:
            report.notes.append(f"{run.name}: no training loss logged (empty or just-started run)")
        if not run.events:
            report.notes.append(f"{run.name}: no events.jsonl (no spikes or interventions logged)")
    first = runs[0]
    add = report.sections.append
    add(
        Section(
            "Loss",
            plots.loss_curves(runs, out / "loss.png"),
            "Training loss per run on a log scale; spikes, interventions and rewinds from "
            "events.jsonl are marked and labelled with their rule.",
            "no run logged a training loss",
        )
    )
    for run in runs:
        add(
            Section(
                f"Gradient bias per layer — {run.name}",
                plots.module_heatmap(
                    run,
                    "grad_bias",
                    "zeta",
                    out / f"grad_bias_{_slug(run.name)}.png",
                    "ζ = ‖g_q − g_fp‖² / ‖g_fp‖² per module (same weights, same batch)",
                ),
                "Relative squared error of the MX gradient against the full-precision gradient "
                "at identical weights and batch, per module and step.",
                "GradientBiasMonitor logged nothing for this run",
            )
        )
    add(
        Section(
            "Total gradient bias",
            plots.total_curve(runs, "grad_bias", "zeta", out / "grad_bias_total.png", "total ζ"),
            "ζ over all monitored parameters.",
            "no run logged mx/grad_bias/total/zeta",
        )
    )
    add(
        Section(
            "Layer-norm affine weights",
            plots.per_module_lines(
                runs,
                "norm_affine",
                [
                    ("weight_saturation", "γ saturated fraction"),
                    ("weight_rel_bias", "mean signed rel. error of γ"),
                ],
                out / "norm_affine.png",
                "Norm-affine saturation and quantization bias per layer",
            ),
            "Fraction of γ elements clipped in their MX block and the mean signed relative "
            "error of quantized γ: the multiplicative bias behind the instability.",
            "NormAffineMonitor logged nothing",
        )
    )
    add(
        Section(
            "Activations",
            plots.per_module_lines(
                runs,
                "activations",
                [("saturation", "saturated fraction"), ("sqnr_db", "SQNR (dB)")],
                out / "activations.png",
                "Activation quantization per layer",
            ),
            "Fraction of GEMM-input elements clipped at the element max, and SQNR.",
            "ActivationMonitor logged nothing",
        )
    )
    rows = read_outcome_table(roots)
    axes = _map_axes(rows)
    add(
        Section(
            "Stability map",
            plots.stability_map(rows, *axes, out / "stability_map.png") if axes else None,
            "Outcome per configuration from the sweep/compare table: green stable, amber "
            "recovered spike, red diverged.",
            "no summary.csv / results.csv with several configurations",
        )
    )
    add(
        Section(
            "Why E4M3 blocks saturate",
            plots.e4m3_code_gaps(out / "e4m3_code_gaps.png"),
            "Relative gap between consecutive E4M3 codes; under the OCP floor scale a block "
            "max lands in [256, 512) after scaling, and (448, 512) has no code, so such maxima "
            "are clipped to 448 — γ values clustered near 1 hit this often.",
        )
    )
    _write_markdown(report, out / "report.md", first)
    _write_html(report, out / "report.html")
    return report


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "run"


def _run_line(run: Run) -> str:
    name = run.loss_name()
    if name is None:
        return f"- `{run.name}`: no loss logged"
    values = finite(run.series(name)[1])
    last = f"{values[-1]:.4g}" if values else "non-finite"
    return (
        f"- `{run.name}`: {len(run.series(name)[0])} loss points up to step {run.last_step}, "
        f"last finite loss {last}, {len(run.events)} event(s)"
    )


def _write_markdown(report: Report, path: Path, first: Run) -> None:
    lines = ["# mxprobe report", "", "## Runs", ""]
    lines += [_run_line(r) for r in report.runs]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    for section in report.sections:
        lines += ["", f"## {section.title}", ""]
        if section.image is None:
            lines.append(f"_Not drawn: {section.missing}._")
        else:
            lines += [f"![{section.title}]({section.image.name})", "", section.caption]
    path.write_text("\n".join(lines) + "\n")


def _write_html(report: Report, path: Path) -> None:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>mxprobe report</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
        "img{max-width:100%}</style></head><body><h1>mxprobe report</h1><h2>Runs</h2><ul>",
    ]
    parts += [f"<li>{html.escape(_run_line(r)[2:])}</li>" for r in report.runs]
    parts.append("</ul>")
    if report.notes:
        parts.append("<h2>Notes</h2><ul>")
        parts += [f"<li>{html.escape(n)}</li>" for n in report.notes]
        parts.append("</ul>")
    for section in report.sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.image is None:
            parts.append(f"<p><em>Not drawn: {html.escape(section.missing)}.</em></p>")
            continue
        data = base64.b64encode(section.image.read_bytes()).decode()
        parts.append(f"<img alt='{html.escape(section.title)}' src='data:image/png;base64,{data}'>")
        parts.append(f"<p>{html.escape(section.caption)}</p>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
