"""``report.md``, a self-contained ``report.html`` (images embedded) and ``report.json`` from
the runs below some directories (each run's record; :mod:`mxprobe.app.runs`).

The first screen is the answer: one headline per run (what happened and nothing more), a table
naming each run's model, scheme, steps and losses, the detector's lead time, the loss of every
run with its events, then the mechanism (γ block saturation per norm, ζ per layer; "before the
divergence" only for a run that diverged). Details follow. A panel with nothing to show is left
out or said in one line, so a partial or killed run still gets a report of what is there. One
page model (:mod:`mxprobe.app.page`) is rendered to both formats, in the same order.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mxprobe import atomic
from mxprobe.app import plots
from mxprobe.app.headlines import RunOutcome, headline, lead_time_line, outcome
from mxprobe.app.mechanism import Mechanism, find_mechanism
from mxprobe.app.page import Block, Bullets, Figure, Heading, Paragraph, Table, html_page, markdown
from mxprobe.app.rates import by_arm, rates
from mxprobe.app.results import RESULT_COLUMNS
from mxprobe.app.runs import Run, find_runs
from mxprobe.events import plain
from mxprobe.names import GRAD_BIAS, NONFINITE, REWIND, SCALE_LR, SET_SCHEME, SPIKE
from mxprobe.outcome import read_diverged
from mxprobe.record import RECORD_FILE

_TABLE_NAMES = ("summary.csv", "results.csv")


class NoRunsError(ValueError):
    """No run (no run record, no metrics.csv) under the given directories."""


Section = Figure


@dataclass
class Report:
    runs: list[Run]
    outcomes: list[RunOutcome] = field(default_factory=list)
    headlines: dict[str, str] = field(default_factory=dict)
    framing: list[str] = field(default_factory=list)
    lead_times: list[str] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    mechanism: Mechanism | None = None
    sections: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rates: list[str] = field(default_factory=list)


def _rates(rows: list[dict]) -> list[str]:
    """Each arm's divergence rate in a summary/results table: ``arm: k/n (low–high %)``; an
    arm is a configuration less its seed."""
    if not rows:
        return []
    config = [k for k in rows[0] if k not in _RESULT_COLUMNS and k not in ("run", "finished")]
    varying = [k for k in config if len({r.get(k) for r in rows}) > 1] or config[:1]
    arms = by_arm(rows, lambda r: ",".join(f"{k}={r.get(k)}" for k in varying) or "all")
    return [f"{r.arm}: {r.words()}" for r in rates(arms)]


def _outcome_label(row: dict) -> str:
    if row.get("outcome"):
        return row["outcome"]
    if read_diverged(row.get("diverged")):
        return "diverged"
    try:
        if float(row.get("recovered_spikes") or 0) > 0:
            return "recovered spike"
    except ValueError:
        pass
    return "stable"


def read_outcome_table(paths: list[Path], notes: list[str] | None = None) -> list[dict]:
    """Rows of every summary.csv / results.csv at the top of ``paths``, with an ``outcome``; a
    table that cannot be read is left out with a note naming it and its line."""
    rows = []
    for root in paths:
        for name in _TABLE_NAMES:
            table = root / name
            if table.exists():
                rows += _table_rows(table, [] if notes is None else notes)
    return rows


def _table_rows(table: Path, notes: list[str]) -> list[dict]:
    data = table.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        notes.append(f"{table} line {line}: not UTF-8, table left out")
        return []
    rows = []
    reader = csv.DictReader(text.splitlines())
    try:
        for row in reader:
            if None in row or None in row.values():
                notes.append(f"{table} line {reader.line_num}: wrong number of fields, skipped")
                continue
            rows.append({**row, "outcome": _outcome_label(row)})
    except csv.Error as err:
        notes.append(f"{table} line {reader.line_num}: unreadable ({err}), table left out")
        return []
    return rows


# Columns that are results, not configuration: never an axis of the stability map (mxprobe's
# own, and the names other tools give a run's time and state).
_RESULT_COLUMNS = {*RESULT_COLUMNS, "outcome", "wall_time", "time_s", "status", "run_dir", "seed"}


def _map_axes(rows: list[dict]) -> tuple[str, str] | None:
    """(x, y) configuration columns for a stability map: scheme on y, lr (or the first other
    varying setting) on x, seed when nothing else varies; None for a single configuration."""
    if len(rows) < 2:
        return None
    config = [k for k in rows[0] if k not in _RESULT_COLUMNS]
    varying = [k for k in config if len({r[k] for r in rows}) > 1]
    y = "scheme" if "scheme" in config else (varying[0] if varying else None)
    others = [k for k in varying if k != y]
    preferred = [k for k in ("lr", "learning_rate", "width", "depth", "activation") if k in others]
    x = (preferred or others or (["seed"] if "seed" in rows[0] else []) or [None])[0]
    return (x, y) if x and y else None


def _saved_framing(roots: list[Path], notes: list[str]) -> list[str]:
    """The framing a demo wrote into summary.json (``mxprobe report out/demo`` keeps it): a
    list of lines; anything else is a note."""
    for root in roots:
        for path in (root / "summary.json", root.parent / "summary.json"):
            if path.exists():
                try:
                    framing = json.loads(path.read_bytes().decode("utf-8")).get("framing", [])
                except (ValueError, AttributeError, OSError) as err:
                    notes.append(f"{path}: not a JSON object ({type(err).__name__}), no framing")
                    return []
                if isinstance(framing, list) and all(isinstance(f, str) for f in framing):
                    return framing
                notes.append(f"{path}: 'framing' is not a list of lines, left out")
                return []
    return []


def build_report(
    run_dirs: list[str | Path], out: str | Path, framing: list[str] | None = None
) -> Report:
    """Write the figures, report.md, report.html and report.json for ``run_dirs`` into ``out``.

    ``framing``: lines saying what the runs are (the demo: its seed and the base rates at its
    configuration); by default those a demo saved in a ``summary.json`` next to the runs.

    Raises:
        NoRunsError: when no directory holds a run.
    """
    roots = [Path(p) for p in run_dirs]
    missing = [str(p) for p in roots if not p.exists()]
    if missing:
        raise NoRunsError(f"no such directory: {', '.join(missing)}")
    notes: list[str] = []
    runs = find_runs(roots, notes)
    if not runs:
        raise NoRunsError(
            f"no runs found under {', '.join(map(str, roots))}: expected a run record "
            f"({RECORD_FILE}, written by mxprobe's callbacks) or a metrics.csv"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = _saved_framing(roots, notes) if framing is None else list(framing)
    report = Report(runs, framing=saved)
    report.notes += notes
    for run in runs:
        report.notes += [f"{run.name}: {n}" for n in run.notes]
        o = outcome(run)
        if o is None:
            report.notes.append(
                f"{run.name}: no training loss recorded (empty or just-started run)"
            )
        else:
            report.outcomes.append(o)
    for o in report.outcomes:
        report.headlines[o.name] = headline(o, report.outcomes)
        line = lead_time_line(o)
        if line:
            report.lead_times.append(line)
        report.events += [{"run": o.name, **e} for e in o.events]
    _first_screen(report, out)
    _details(report, roots, out)
    blocks = _page(report)
    _write(out / "report.md", markdown(blocks))
    _write(out / "report.html", html_page(blocks))
    _write(out / "report.json", json.dumps(report_json(report), indent=1, allow_nan=False) + "\n")
    return report


def _write(path: Path, text: str) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one; a full disk
    leaves the old one (:mod:`mxprobe.atomic`)."""
    atomic.write_text(path, text)


def report_json(report: Report) -> dict:
    """``{"runs": [{"name", "last_step", "outcome", "divergence_step", "events", ...}]}``;
    steps are optimizer steps; a run with no loss has outcome ``null``."""
    by_name = {o.name: o for o in report.outcomes}
    runs = []
    for run in report.runs:
        o = by_name.get(run.name)
        runs.append(
            {
                "name": run.name,
                "path": str(run.path),
                "model": run.meta.get("model"),
                "scheme": run.meta.get("scheme"),
                "last_step": run.last_step,
                "outcome": o.outcome if o else None,
                "divergence_step": o.divergence_step if o else None,
                "rule": o.rule if o else None,
                "headline": report.headlines.get(run.name),
                "final_loss": plain(o.summary["final_loss"]) if o else None,
                "min_loss": plain(o.summary["min_loss"]) if o else None,
                "events": plain(o.events if o else run.events),
            }
        )
    return {"runs": runs}


def _first_screen(report: Report, out: Path) -> None:
    add = report.sections.append
    image, points = plots.loss_curves(report.outcomes, out / "loss.png")
    add(
        Figure(
            "Loss",
            image,
            "Training loss per run on a log scale against the optimizer step. Detector "
            "alarms, rewinds and precision changes from the run record are marked; × marks "
            "where a run's divergence begins.",
            "no run recorded a training loss",
            points,
        )
    )
    mech = report.mechanism = find_mechanism(report.outcomes)
    if mech is None:
        report.notes.append(
            "no MX monitor readings (NormAffineMonitor in force, GradientBiasMonitor ζ > 0) "
            "in any run: no mechanism panels"
        )
        return
    diverged = mech.divergence is not None
    image, points = plots.norm_saturation(mech, out / "norm_saturation.png")
    add(
        Figure(
            f"γ block saturation per norm — {mech.run}",
            image,
            "Fraction of layer-norm γ elements clipped in their E4M3 block (NormAffineMonitor, "
            "at readings where the norm's MX format is in force; a dotted line marks a precision "
            "switch, after which a norm moved off MX has no line) over training"
            + ("; the dashed line is where the run's divergence begins." if diverged else "."),
            "NormAffineMonitor logged no in-force saturation for this run",
            points,
        )
    )
    image, points = plots.zeta_heatmap(mech, out / "zeta_before.png")
    lo, hi = mech.window
    add(
        Figure(
            f"Gradient bias ζ per layer {'before the divergence' if diverged else 'over the run'}"
            f" — {mech.run}",
            image,
            "ζ = ‖g_q − g_fp‖² / ‖g_fp‖² per module (GradientBiasMonitor: the MX gradient "
            "against the full-precision gradient at the same weights and batch) at the readings "
            f"of steps {lo}–{hi}.",
            "GradientBiasMonitor logged no non-zero ζ for this run",
            points,
        )
    )


def _details(report: Report, roots: list[Path], out: Path) -> None:
    add = report.sections.append
    quantized = [o.run for o in report.outcomes if _has_nonzero(o.run, GRAD_BIAS, "zeta")]
    image, points = plots.total_curve(
        quantized, "grad_bias", "zeta", out / "grad_bias_total.png", "total ζ"
    )
    if image:
        add(
            Figure(
                "Total gradient bias", image, "ζ over all monitored parameters.", "", points, True
            )
        )
    image, points = plots.per_module_lines(
        [o.run for o in report.outcomes],
        "norm_affine",
        [
            ("weight_rel_bias", "mean signed rel. error of γ"),
            ("weight_floor_overflow", "blocks whose max saturates"),
        ],
        out / "norm_affine.png",
        "Norm-affine quantization bias per layer (format in force)",
    )
    if image:
        add(
            Figure(
                "Layer-norm affine weights",
                image,
                "Mean signed relative error of quantized γ (negative: γ shrinks, the "
                "multiplicative bias behind the instability) and the fraction of blocks whose "
                "max saturates under the OCP floor scale.",
                "",
                points,
                True,
            )
        )
    image, points = plots.per_module_lines(
        [o.run for o in report.outcomes],
        "activations",
        [("saturation", "saturated fraction"), ("sqnr_db", "SQNR (dB)")],
        out / "activations.png",
        "Activation quantization per layer",
    )
    if image:
        add(
            Figure(
                "Activations",
                image,
                "Fraction of GEMM-input elements clipped at the element max, and SQNR.",
                "",
                points,
                True,
            )
        )
    else:
        report.notes.append("ActivationMonitor logged nothing: no activation panel")
    rows = read_outcome_table(roots, report.notes)
    report.rates = _rates(rows)
    axes = _map_axes(rows)
    if axes:
        image, points = plots.stability_map(rows, *axes, out / "stability_map.png")
        add(
            Figure(
                "Stability map",
                image,
                "Outcome per configuration from the sweep/compare table: green stable, amber "
                "recovered spike, red diverged.",
                "no summary.csv / results.csv with several configurations",
                points,
                True,
            )
        )
    image, points = plots.e4m3_code_gaps(out / "e4m3_code_gaps.png")
    add(
        Figure(
            "Why E4M3 blocks saturate",
            image,
            "Relative gap between consecutive E4M3 codes; under the OCP floor scale a block "
            "max lands in [256, 512) after scaling, and (448, 512) has no code, so such maxima "
            "are clipped to 448 — γ values clustered near 1 hit this often.",
            "",
            points,
            True,
        )
    )


def _has_nonzero(run: Run, monitor: str, stat: str) -> bool:
    return any(v != 0 for _, values in run.mx_metrics(monitor, stat).values() for v in values)


def _event_words(e: dict) -> str:
    values = e.get("values") or {}
    kind = e.get("kind")
    if kind in (SPIKE, NONFINITE):
        parts = [f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float)]
        return ", ".join(parts)
    if kind == REWIND:
        return f"to step {e.get('rewound_to')}"
    if kind == SET_SCHEME:
        return f"{e.get('scheme')} on {e.get('modules') or '*'}" + (
            " (snapped)" if e.get("snap") else ""
        )
    if kind == SCALE_LR:
        return f"lr x{e.get('factor')}"
    return ""


_EVENT_HEADER = ("run", "step", "kind", "rule", "detail")
_RUN_HEADER = ("run", "model", "scheme", "steps", "final loss", "min loss", "outcome")


def _number(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def _run_rows(report: Report) -> list[tuple[str, ...]]:
    rows = []
    for o in report.outcomes:
        meta = o.run.meta
        rows.append(
            (
                o.name,
                str(meta.get("model") or "?"),
                str(meta.get("scheme") or "?"),
                f"{o.steps[0]}–{o.steps[-1]}",
                _number(o.summary["final_loss"]),
                _number(o.summary["min_loss"]),
                f"{o.outcome} ({o.rule})",
            )
        )
    return rows


def _page(report: Report) -> list[Block]:
    """The report as blocks, first screen first; both renderings follow this order."""
    blocks: list[Block] = [Heading("mxprobe report", 1), Heading("What happened")]
    blocks.append(Bullets([f"{n}: {h}" for n, h in report.headlines.items()], strong_prefix=True))
    blocks += [Heading("Runs"), Table(_RUN_HEADER, _run_rows(report))]
    if report.rates:
        blocks += [
            Heading("Divergence rates (summary/results table, 95 % exact interval)"),
            Bullets(report.rates),
        ]
    if report.framing:
        blocks += [Heading("What these runs are"), Bullets(report.framing)]
    lead = report.lead_times or [
        "no run both diverged and had a detector alarm: no lead time to report"
    ]
    blocks += [Heading("Detector lead time"), Bullets(lead)]
    first = [s for s in report.sections if not s.details]
    blocks += first[:1]
    blocks.append(Heading("Events"))
    if report.events:
        rows = [
            (e["run"], str(e.get("step")), str(e.get("kind")), str(e.get("rule") or ""),
             _event_words(e))
            for e in report.events
        ]  # fmt: skip
        blocks.append(Table(_EVENT_HEADER, rows))
    else:
        blocks.append(
            Paragraph(
                "No run recorded an event (no detector alarm, no rewind, no precision change)."
            )
        )
    mech = report.mechanism
    if mech and mech.summary():
        title = "Before the divergence" if mech.divergence is not None else "What the monitors saw"
        blocks += [Heading(title), Bullets(mech.summary())]
    blocks += first[1:]
    blocks.append(Heading("Details", 1))
    blocks += [s for s in report.sections if s.details]
    blocks += [
        Heading("Run directories"),
        Bullets([f"`{r.name}`: {r.path}" for r in report.runs]),
    ]
    if report.notes:
        blocks += [Heading("Notes"), Bullets(report.notes)]
    return blocks
