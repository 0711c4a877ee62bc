"""Files are complete or absent: a full disk mid-write leaves the previous file (or none) and
no temporary file, and says so in one line naming the path (issue 27)."""

import pytest

from mxprobe import atomic
from mxprobe.app.cli import main
from mxprobe.app.report import build_report
from mxprobe.app.results import SUMMARY_COLUMNS
from tests.helpers_faults import full_disk, leftovers
from tests.test_report_hostile import _legacy_run


def test_write_text_is_all_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    atomic.write_text(path, "old")
    full_disk(monkeypatch)
    with pytest.raises(atomic.WriteError) as failed:
        atomic.write_text(path, "new" * 1000)
    message = str(failed.value)
    assert str(path) in message and "No space left" in message and "\n" not in message
    monkeypatch.undo()
    assert path.read_text() == "old" and leftovers(tmp_path) == []


def test_a_full_disk_keeps_the_previous_summary(tmp_path, monkeypatch):
    path = tmp_path / "summary.csv"
    row = {"scheme": "fp32", "seed": 0, "final_loss": 1.0, "diverged": False}
    atomic.write_csv(path, [row], SUMMARY_COLUMNS)
    before = path.read_bytes()
    full_disk(monkeypatch)
    with pytest.raises(atomic.WriteError, match="previous file is unchanged"):
        atomic.write_csv(path, [row, {**row, "seed": 1}], SUMMARY_COLUMNS)
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_a_full_disk_keeps_the_previous_report(tmp_path, monkeypatch, capsys):
    _legacy_run(tmp_path / "runs")
    out = tmp_path / "report"
    build_report([tmp_path / "runs"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    full_disk(monkeypatch)
    assert main(["report", str(tmp_path / "runs"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left" in err and str(out) in err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
