"""The study rates README.md quotes (its demo transcript's ``this is:`` line) are the ones the
demo computes from the shipped table (docs/study): README cannot keep a stale rate."""

from __future__ import annotations

import re
from pathlib import Path

from mxprobe.app.demo_case import framing

README = Path(__file__).resolve().parents[1] / "README.md"


def _parts(text: str) -> tuple[str, str, list[str]]:
    """(what the study's arms did on the seed, how far the study got, the k/n rates in order)."""
    cells = re.search(r"seed \d+ in the study: [^.]*", text).group(0)
    status = re.search(r"At this configuration \(([^)]*)\)", text).group(1)
    return cells, status, re.findall(r"\b\d+/\d+\b", text.split("At this configuration")[1])


def test_readme_quotes_the_study_as_the_demo_computes_it():
    line = next(x for x in README.read_text().splitlines() if x.startswith("this is:"))
    seed = int(re.search(r"seed (\d+) in the study", line).group(1))
    assert _parts(line) == _parts(framing(seed, quick=False)[0])
