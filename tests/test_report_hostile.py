"""``mxprobe report`` never stops for bad run data: every malformed line, row, field or name is
skipped or escaped, with a note naming the file and the line (issue 27)."""

import csv
import json
import sqlite3

import pytest

from mxprobe.app.cli import main
from mxprobe.app.report import build_report
from mxprobe.record import RECORD_FILE, RecordWriter


def _legacy_run(root, name="run", module="blocks.0.ln", events=None):
    """A 0.1.0-layout run (metrics.csv + events.jsonl) that diverges at step 50."""
    run = root / name
    run.mkdir(parents=True)
    columns = ["epoch", "step", "train/loss", f"mx/grad_bias/{module}/zeta",
               f"mx/norm_affine/{module}/weight_saturation", "mx/grad_bias/total/zeta"]  # fmt: skip
    with open(run / "metrics.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for s in range(60):
            readings = [0.1, 0.2, 0.3] if s % 10 == 0 else [""] * 3
            writer.writerow([0, s, 1.0 / (s + 1) if s < 50 else 1e6, *readings])
    if events is not None:
        with open(run / "events.jsonl", "wb") as fh:
            for line in events:
                fh.write(line if isinstance(line, bytes) else (line + "\n").encode())
    return run


def _event(**fields) -> str:
    return json.dumps({"step": 20, "kind": "spike", **fields})


GOOD = _event(rule=None)

EVENT_LINES = {
    "json-array": ["[1, 2]"],
    "json-string": ['"spike"'],
    "json-number": ["3"],
    "json-null": ["null"],
    "not-json": ['{"step": 19'],
    "not-utf8": [b"\xff\xfe{}\n"],
    "step-string": [_event(step="20")],
    "step-bool": [_event(step=True)],
    "step-float": [_event(step=1e300)],
    "step-missing": [json.dumps({"kind": "rewind", "rewound_to": 3})],
    "kind-list": [_event(kind=["spike"])],
    "kind-missing": [json.dumps({"step": 4})],
    "values-list": [_event(values=[1, 2])],
    "rule-number": [_event(rule=7)],
    "rewound-to-string": [_event(kind="rewind", rewound_to="x")],
    "modules-number": [_event(kind="set_scheme", modules=3, scheme="norm=bf16")],
    "scheme-dict": [_event(kind="set_scheme", scheme={"a": 1})],
    "factor-list": [_event(kind="scale_lr", factor=[1])],
    "snap-string": [_event(kind="set_scheme", scheme="norm=bf16", snap="yes")],
}


@pytest.mark.parametrize("case", list(EVENT_LINES))
def test_a_bad_event_line_is_skipped_with_its_line(tmp_path, case):
    _legacy_run(tmp_path / "runs", events=[GOOD, *EVENT_LINES[case], GOOD])
    report = build_report([tmp_path / "runs"], tmp_path / "report")
    bad = [n for n in report.notes if "events.jsonl" in n and "2" in n and "skipped" in n]
    assert len(bad) == 1, report.notes
    assert len(report.events) == 2  # the good lines on either side are kept


def test_many_bad_lines_are_a_few_notes(tmp_path):
    _legacy_run(tmp_path / "runs", events=["[]"] * 50)
    report = build_report([tmp_path / "runs"], tmp_path / "report")
    about = [n for n in report.notes if "events.jsonl line" in n or "more unreadable" in n]
    assert 1 < len(about) <= 6 and "45 more" in about[-1]


@pytest.mark.parametrize(
    "name, module",
    [
        ("run_$\\frac{a$_x", "blocks.0.ln"),
        ("run", "blocks.$\\bad{$.ln"),
        ("$x^$", "$$"),
        ("<script>alert(1)</script>", "<img src=x onerror=alert(1)>"),
    ],
)
def test_run_and_module_names_are_text(tmp_path, name, module):
    evil = _event(kind="set_scheme", rule="<img src=x onerror=alert(1)> $\\bad$",
                  scheme="<script>x</script>", modules=module)  # fmt: skip
    _legacy_run(tmp_path / "runs", name=name, module=module, events=[evil])
    report = build_report([tmp_path / "runs"], tmp_path / "report")
    assert any(s.image is not None for s in report.sections)
    for page in ("report.md", "report.html"):
        text = (tmp_path / "report" / page).read_text()
        assert "<script>" not in text and "<img src=x" not in text


TABLES = {
    "not-utf8": (b"scheme,seed,diverged\n\xff\xfe,0,true\nmx,1,false\n", "line 2"),
    "ragged": (b"scheme,seed,diverged\nfp32,0\nmx,1,false\n", "line 2"),
    "too-many-fields": (b"scheme,seed,diverged\nfp32,0,true,x\nmx,1,false\n", "line 2"),
}


@pytest.mark.parametrize("case", list(TABLES))
def test_a_bad_summary_table_is_a_note(tmp_path, case):
    data, line = TABLES[case]
    _legacy_run(tmp_path / "runs")
    (tmp_path / "runs" / "summary.csv").write_bytes(data)
    report = build_report([tmp_path / "runs"], tmp_path / "report")
    assert any("summary.csv" in n and line in n for n in report.notes), report.notes


@pytest.mark.parametrize("framing", [5, "abc", [1, {"a": 2}], {"x": 1}, None])
def test_a_bad_framing_is_left_out(tmp_path, framing):
    _legacy_run(tmp_path / "runs")
    (tmp_path / "runs" / "summary.json").write_text(json.dumps({"framing": framing}))
    report = build_report([tmp_path / "runs"], tmp_path / "report")
    assert report.framing == []
    assert any("summary.json" in n for n in report.notes)


def _record(path) -> None:
    writer = RecordWriter(path)
    writer.meta(model="TinyModel", scheme="fp32")
    for step in range(20):
        writer.loss(step, 1.0 / (step + 1))
        writer.readings(step, {"mx/grad_bias/total/zeta": 0.1})
    writer.event({"step": 5, "kind": "spike", "rule": None})
    writer.close()


RECORD_EDITS = {
    "event-not-json": ("UPDATE events SET body = '{\"step\": 5'", "events row 1"),
    "event-not-object": ("UPDATE events SET body = '[1, 2]'", "event 1"),
    "event-step-text": ("UPDATE events SET body = '{\"step\": \"5\", \"kind\": \"spike\"}'",
                        "event 1"),  # fmt: skip
    "loss-text": ("UPDATE losses SET value = 'abc' WHERE step = 3", "losses row 4"),
    "reading-step-text": ("UPDATE readings SET step = 'x' WHERE step = 3", "readings row"),
    "reading-blob": ("UPDATE readings SET value = x'00' WHERE step = 2", "readings row 3"),
    "meta-continued-number": ("INSERT OR REPLACE INTO meta VALUES ('continued_in', '5')", None),
}


@pytest.mark.parametrize("case", list(RECORD_EDITS))
def test_a_hand_edited_record_still_reports(tmp_path, case):
    edit, note = RECORD_EDITS[case]
    path = tmp_path / "runs" / "run" / RECORD_FILE
    _record(path)
    with sqlite3.connect(path) as db:
        db.execute(edit)
    report = build_report([tmp_path / "runs"], tmp_path / "report")
    assert len(report.runs) == 1
    if note:
        assert any(note in n and "skipped" in n for n in report.notes), report.notes


def test_the_cli_reports_hostile_runs_with_exit_0(tmp_path, capsys):
    _legacy_run(tmp_path / "runs", name="$\\frac{a$", events=["[1]", b"\xff\n", GOOD])
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "events.jsonl line 1" in out and "events.jsonl line 2" in out
