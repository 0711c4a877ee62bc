"""``mxprobe report RUN_DIR [RUN_DIR ...] --out DIR``: figures, report.md and report.html."""

from __future__ import annotations

import sys

from mxprobe.app.cli.errors import ArgumentParser
from mxprobe.app.report import NoRunsError, build_report


def run(argv: list[str], prog: str = "mxprobe report") -> int:
    parser = ArgumentParser(
        prog=prog,
        description="Write figures, report.md and report.html for the runs below the given "
        "directories.",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        help="directories searched for run records (a trainer's default_root_dir, or above)",
    )
    parser.add_argument("--out", default="report", help="output directory (default: report)")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.runs, args.out)
    except NoRunsError as err:
        print(f"mxprobe report: {err}", file=sys.stderr)
        return 1
    drawn = sum(s.image is not None for s in report.sections)
    figures = f"{drawn}/{len(report.sections)} figures"
    print(f"{len(report.runs)} run(s), {figures} -> {args.out}/report.md, {args.out}/report.html")
    for note in report.notes:
        print(f"note: {note}")
    return 0
