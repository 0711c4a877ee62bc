"""``report.md`` and a self-contained ``report.html`` (images embedded) from run directories.

The first screen is the answer: one headline per run (stable / diverged at step N / rescued:
what fired when, rewound to where), the detector's lead time, the loss of every run with its
events, then the mechanism before the divergence (γ block saturation per norm over time, ζ per
layer in the steps before it, the top layers named). Details follow. A panel with nothing to
show is left out or said in one line, so a partial or killed run still gets a report of what is
there.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from mxprobe.app import plots
from mxprobe.app.headlines import RunOutcome, headline, lead_time_line, outcome
from mxprobe.app.mechanism import Mechanism, find_mechanism
from mxprobe.app.runs import Run, find_runs

_TABLE_NAMES = ("summary.csv", "results.csv")


class NoRunsError(ValueError):
    """No run (no metrics.csv) under the given directories."""


@dataclass
class Section:
    """A figure (``image``) with what it shows, or the sentence saying why it is not drawn.
    ``points`` counts the finite values the figure draws."""

    title: str
    image: Path | None
    caption: str
    missing: str = ""
    points: int = 0
    details: bool = False  # below the first screen


@dataclass
class Report:
    runs: list[Run]
    outcomes: list[RunOutcome] = field(default_factory=list)
    headlines: dict[str, str] = field(default_factory=dict)
    framing: list[str] = field(default_factory=list)
    lead_times: list[str] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    mechanism: Mechanism | None = None
    sections: list[Section] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _outcome_label(row: dict) -> str:
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
                        rows.append({**row, "outcome": _outcome_label(row)})
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
    "cpu_s",
    "status",
    "run_dir",
    "steps",
    "seed",
}


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


def _saved_framing(roots: list[Path]) -> list[str]:
    """The framing a demo wrote into summary.json (``mxprobe report out/demo`` keeps it)."""
    for root in roots:
        for path in (root / "summary.json", root.parent / "summary.json"):
            if path.exists():
                try:
                    return list(json.loads(path.read_text()).get("framing", []))
                except (ValueError, AttributeError):
                    return []
    return []


def build_report(
    run_dirs: list[str | Path], out: str | Path, framing: list[str] | None = None
) -> Report:
    """Write the figures, report.md and report.html for ``run_dirs`` into ``out``.

    ``framing``: lines saying what the runs are (the demo: its seed and the base rates at its
    configuration); by default those a demo saved in a ``summary.json`` next to the runs.

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
    report = Report(runs, framing=list(framing) if framing is not None else _saved_framing(roots))
    for run in runs:
        report.notes += [f"{run.name}: {n}" for n in run.notes]
        o = outcome(run)
        if o is None:
            report.notes.append(f"{run.name}: no training loss logged (empty or just-started run)")
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
    _write_markdown(report, out / "report.md")
    _write_html(report, out / "report.html")
    return report


def _first_screen(report: Report, out: Path) -> None:
    add = report.sections.append
    image, points = plots.loss_curves(report.outcomes, out / "loss.png")
    add(
        Section(
            "Loss",
            image,
            "Training loss per run on a log scale against the training batch (= optimizer "
            "step until a rewind; a rewind sends the step back, the batches go on). Detector "
            "alarms, rewinds and precision changes from events.jsonl are marked; × marks "
            "where a run's divergence begins.",
            "no run logged a training loss",
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
    image, points = plots.norm_saturation(mech, out / "norm_saturation.png")
    add(
        Section(
            f"γ block saturation per norm — {mech.run}",
            image,
            "Fraction of layer-norm γ elements clipped in their E4M3 block (NormAffineMonitor, "
            "format in force) over training; the dashed line is where the run's divergence "
            "begins.",
            "NormAffineMonitor logged no in-force saturation for this run",
            points,
        )
    )
    image, points = plots.zeta_heatmap(mech, out / "zeta_before.png")
    add(
        Section(
            f"Gradient bias ζ per layer before the divergence — {mech.run}",
            image,
            "ζ = ‖g_q − g_fp‖² / ‖g_fp‖² per module (GradientBiasMonitor: the MX gradient "
            "against the full-precision gradient at the same weights and batch) at the readings "
            f"of steps {mech.window[0]}–{mech.window[1]}.",
            "GradientBiasMonitor logged no non-zero ζ for this run",
            points,
        )
    )


def _details(report: Report, roots: list[Path], out: Path) -> None:
    add = report.sections.append
    quantized = [o.run for o in report.outcomes if _has_nonzero(o.run, "grad_bias", "zeta")]
    image, points = plots.total_curve(
        quantized, "grad_bias", "zeta", out / "grad_bias_total.png", "total ζ"
    )
    if image:
        add(
            Section(
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
            Section(
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
            Section(
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
    rows = read_outcome_table(roots)
    axes = _map_axes(rows)
    if axes:
        image, points = plots.stability_map(rows, *axes, out / "stability_map.png")
        add(
            Section(
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
        Section(
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
    if kind in ("spike", "nonfinite"):
        parts = [f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float)]
        return ", ".join(parts)
    if kind == "rewind":
        return f"to step {e.get('rewound_to')}"
    if kind == "set_scheme":
        return f"{e.get('scheme')} on {e.get('modules') or '*'}" + (
            " (snapped)" if e.get("snap") else ""
        )
    if kind == "scale_lr":
        return f"lr x{e.get('factor')}"
    return ""


def _event_rows(report: Report) -> list[tuple[str, ...]]:
    return [
        (
            e["run"],
            str(e["batch"]),
            str(e.get("step")),
            str(e.get("kind")),
            str(e.get("rule") or ""),
            _event_words(e),
        )
        for e in report.events
    ]


_EVENT_HEADER = ("run", "batch", "step", "kind", "rule", "detail")


def _first_screen_text(report: Report) -> dict[str, list[str]]:
    """The first screen's words, shared by the two formats."""
    mech = report.mechanism
    lines = {
        "framing": report.framing,
        "lead": report.lead_times
        or ["no run both diverged and had a detector alarm: no lead time to report"],
        "mechanism": mech.summary() if mech else [],
    }
    return lines


def _mechanism_title(report: Report) -> str:
    diverged = report.mechanism and report.mechanism.divergence is not None
    return "Before the divergence" if diverged else "What the monitors saw"


def _write_markdown(report: Report, path: Path) -> None:
    text = _first_screen_text(report)
    lines = ["# mxprobe report", "", "## What happened", ""]
    lines += [f"- **{name}**: {h}" for name, h in report.headlines.items()]
    if text["framing"]:
        lines += ["", "## What these runs are", ""] + [f"- {f}" for f in text["framing"]]
    lines += ["", "## Detector lead time", ""] + [f"- {x}" for x in text["lead"]]
    first, rest = _split(report)
    for section in first:
        lines += _md_section(section)
    lines += ["", "## Events", ""]
    if report.events:
        lines += ["| " + " | ".join(_EVENT_HEADER) + " |", "|" + "---|" * len(_EVENT_HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in _event_rows(report)]
    else:
        lines.append("No run logged an event (no detector alarm, no rewind, no precision change).")
    if text["mechanism"]:
        lines += ["", f"## {_mechanism_title(report)}", ""] + [f"- {m}" for m in text["mechanism"]]
    lines += ["", "# Details"]
    for section in rest:
        lines += _md_section(section)
    lines += ["", "## Run directories", ""] + [f"- `{r.name}`: {r.path}" for r in report.runs]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    path.write_text("\n".join(lines) + "\n")


def _split(report: Report) -> tuple[list[Section], list[Section]]:
    return [s for s in report.sections if not s.details], [s for s in report.sections if s.details]


def _md_section(section: Section) -> list[str]:
    lines = ["", f"## {section.title}", ""]
    if section.image is None:
        return lines + [f"_Not drawn: {section.missing}._"]
    return lines + [f"![{section.title}]({section.image.name})", "", section.caption]


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:auto;padding:0 1em;"
    "line-height:1.4}img{max-width:100%}h2{margin-top:1.4em;border-bottom:1px solid #ddd}"
    ".headlines{font-size:1.1em}.headlines li{margin:.3em 0}.run{font-family:monospace;"
    "font-weight:bold}.framing{color:#444;font-size:.9em}.caption{color:#555;font-size:.9em}"
    "table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:2px 6px}"
    "code{font-size:.85em}"
)


def _esc(text: str) -> str:
    """HTML-escaped, with `backquoted` spans as code."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html_section(section: Section) -> list[str]:
    parts = [f"<section data-title='{html.escape(section.title)}' data-points='{section.points}'>"]
    parts.append(f"<h2>{html.escape(section.title)}</h2>")
    if section.image is None:
        parts.append(f"<p><em>Not drawn: {html.escape(section.missing)}.</em></p>")
    else:
        data = base64.b64encode(section.image.read_bytes()).decode()
        parts.append(f"<img alt='{html.escape(section.title)}' src='data:image/png;base64,{data}'>")
        parts.append(f"<p class='caption'>{html.escape(section.caption)}</p>")
    parts.append("</section>")
    return parts


def _write_html(report: Report, path: Path) -> None:
    text = _first_screen_text(report)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>mxprobe report</title>",
        f"<style>{_CSS}</style></head><body><h1>mxprobe report</h1>",
        "<h2>What happened</h2><ul class='headlines'>",
    ]
    parts += [
        f"<li class='headline' data-run='{html.escape(name)}'><span class='run'>"
        f"{html.escape(name)}</span>: {html.escape(h)}</li>"
        for name, h in report.headlines.items()
    ]
    parts.append("</ul>")
    parts.append("<p><b>Detector lead time.</b> " + "; ".join(map(_esc, text["lead"])) + "</p>")
    if text["framing"]:
        # The case in one line; the rates with their commands folded (long command lines).
        parts.append(
            f"<p class='framing'><b>What these runs are.</b> {_esc(text['framing'][0])}</p>"
        )
        if len(text["framing"]) > 1:
            parts.append("<details class='framing'><summary>Base rates at this configuration")
            parts.append(" and the commands that measured them</summary><ul>")
            parts += [f"<li>{_esc(f)}</li>" for f in text["framing"][1:]]
            parts.append("</ul></details>")
    first, rest = _split(report)
    for section in first[:1]:
        parts += _html_section(section)
    parts.append("<section data-title='Events'><h2>Events</h2>")
    if report.events:
        parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in _EVENT_HEADER) + "</tr>")
        parts += [
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in _event_rows(report)
        ]
        parts.append("</table>")
    else:
        parts.append(
            "<p>No run logged an event (no detector alarm, no rewind, no precision change).</p>"
        )
    parts.append("</section>")
    if text["mechanism"]:
        parts.append(f"<h2>{_mechanism_title(report)}</h2><ul>")
        parts += [f"<li>{_esc(m)}</li>" for m in text["mechanism"]]
        parts.append("</ul>")
    for section in first[1:]:
        parts += _html_section(section)
    parts.append("<h1>Details</h1>")
    for section in rest:
        parts += _html_section(section)
    parts.append("<h2>Run directories</h2><ul>")
    parts += [
        f"<li><code>{html.escape(r.name)}</code>: {html.escape(str(r.path))}</li>"
        for r in report.runs
    ]
    parts.append("</ul>")
    if report.notes:
        parts.append("<h2>Notes</h2><ul>")
        parts += [f"<li>{html.escape(n)}</li>" for n in report.notes]
        parts.append("</ul>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
