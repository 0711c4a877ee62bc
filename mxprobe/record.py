"""The run record: what a monitored run leaves behind, in one SQLite file of its own
(:data:`RECORD_FILE`, in the run's directory), whatever the user's loggers are.

Why SQLite: it ships with Python, keeps a run in one file, and commits atomically. A step's
readings, loss and events go in one transaction, so a crash, a ``kill -9`` or a full disk leaves
the record as of the last committed step, never half a row; a resume deletes the rows from its
step on in one statement. WAL journal with ``synchronous=NORMAL``: a commit costs no fsync
(a power cut may lose the last commits, never consistency).

Tables (steps are ``trainer.global_step``, optimizer steps; a rewind never sends it back):

- ``meta(key, value)``: ``format``, ``model``, ``scheme``, ``started``, ``resumed_at``, ...
- ``losses(step, value)``: the training loss of each optimizer step (NaN stored as NULL).
- ``readings(step, name, value)``: every monitor reading, named by :mod:`mxprobe.names`.
- ``events(step, kind, body)``: every event as its JSON object (``body``), in order.

Core layer: reading a record needs no Lightning (:func:`read_record`, :func:`find_records`).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mxprobe.events import plain

RECORD_FILE = "mxprobe_record.sqlite"
FORMAT = "mxprobe-record-1"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT)",
    "CREATE TABLE IF NOT EXISTS losses(step INTEGER PRIMARY KEY, value REAL)",
    "CREATE TABLE IF NOT EXISTS readings(step INTEGER, name TEXT, value REAL)",
    "CREATE INDEX IF NOT EXISTS readings_step ON readings(step)",
    "CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY, step INTEGER, kind TEXT, body TEXT)",
)


class RecordError(OSError):
    """A run record could not be written or read; the message names the file."""


def _number(value: float | None) -> float | None:
    """SQLite stores NaN as NULL; ±Inf as they are."""
    return None if value is None or math.isnan(value) else float(value)


def _float(value: float | None) -> float:
    return math.nan if value is None else value


class RecordWriter:
    """Writes one run's record. Rows are buffered and written by :meth:`commit` in one
    transaction (the callbacks commit once per optimizer step).

    Raises:
        RecordError: when the file cannot be opened or a commit fails (disk full, read-only,
            not a record), naming the path; the record keeps its last committed state.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._losses: list[tuple[int, float | None]] = []
        self._readings: list[tuple[int, str, float | None]] = []
        self._events: list[tuple[int, str, str]] = []
        self._meta: dict[str, str] = {}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._connect()
            with self._db:
                for statement in _SCHEMA:
                    self._db.execute(statement)
                self._db.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('format', ?)", (json.dumps(FORMAT),)
                )
        except (OSError, sqlite3.Error) as err:
            raise RecordError(f"run record {self.path}: cannot open ({err})") from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def truncate(self, step: int) -> None:
        """Delete everything recorded at steps ``>= step`` (a resume from a checkpoint at
        ``step``; 0: a run that starts over), at once, with what is buffered."""
        self._losses = [r for r in self._losses if r[0] < step]
        self._readings = [r for r in self._readings if r[0] < step]
        self._events = [r for r in self._events if r[0] < step]
        self._transaction(
            [(f"DELETE FROM {table} WHERE step >= ?", [(step,)]) for table in _TABLES]
        )

    def meta(self, **values: Any) -> None:
        self._meta.update({k: json.dumps(plain(v)) for k, v in values.items()})

    def loss(self, step: int, value: float | None) -> None:
        self._losses.append((step, _number(value)))

    def readings(self, step: int, values: dict[str, float]) -> None:
        self._readings += [(step, name, _number(v)) for name, v in values.items()]

    def event(self, event: dict[str, Any]) -> None:
        body = json.dumps(plain(event), allow_nan=False)
        self._events.append((int(event["step"]), str(event["kind"]), body))

    def commit(self) -> None:
        """Write everything buffered in one transaction."""
        if not (self._losses or self._readings or self._events or self._meta):
            return
        self._transaction(
            [
                ("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(self._meta.items())),
                ("INSERT OR REPLACE INTO losses VALUES (?, ?)", self._losses),
                ("INSERT INTO readings VALUES (?, ?, ?)", self._readings),
                ("INSERT INTO events(step, kind, body) VALUES (?, ?, ?)", self._events),
            ]
        )
        self._losses, self._readings, self._events, self._meta = [], [], [], {}

    def _transaction(self, work: list[tuple[str, list[tuple]]]) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in work:
                    if rows:
                        self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            raise RecordError(f"run record {self.path}: write failed ({err})") from None

    def copy_from(self, other: str | os.PathLike, before: int) -> bool:
        """Take the rows of record ``other`` at steps ``< before`` (a run resumed into a new
        directory continues the record of the run its checkpoint came from); False when
        ``other`` is not a readable record."""
        try:
            source = sqlite3.connect(f"file:{other}?mode=ro", uri=True)
            try:
                rows = {
                    table: source.execute(
                        f"SELECT * FROM {table} WHERE step < ?", (before,)
                    ).fetchall()
                    for table in _TABLES
                }
            finally:
                source.close()
        except sqlite3.Error:
            return False
        self.truncate(0)
        self._transaction(
            [
                ("INSERT INTO losses VALUES (?, ?)", rows["losses"]),
                ("INSERT INTO readings VALUES (?, ?, ?)", rows["readings"]),
                (
                    "INSERT INTO events(step, kind, body) VALUES (?, ?, ?)",
                    [r[1:] for r in rows["events"]],
                ),
            ]
        )
        return True

    def rows_at(self, step: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The committed readings ``{name: value}`` and events of ``step``."""
        try:
            readings = self._db.execute(
                "SELECT name, value FROM readings WHERE step = ? ORDER BY rowid", (step,)
            ).fetchall()
            bodies = self._db.execute(
                "SELECT body FROM events WHERE step = ? ORDER BY id", (step,)
            ).fetchall()
        except sqlite3.Error as err:
            raise RecordError(f"run record {self.path}: unreadable ({err})") from None
        return {n: _float(v) for n, v in readings}, [json.loads(b) for (b,) in bodies]

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self._db.close()


_TABLES = ("losses", "readings", "events")

Series = tuple[list[int], list[float]]


@dataclass
class Record:
    """One run's record as read back: ``losses`` and each reading as ``(steps, values)``,
    the events in order (each with its ``step`` and ``kind``), and ``meta``."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    losses: Series = field(default_factory=lambda: ([], []))
    readings: dict[str, Series] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # rows skipped as unreadable


def read_record(path: str | os.PathLike) -> Record:
    """The record at ``path`` (a record file, or a directory holding one).

    Raises:
        RecordError: when it is missing or not a run record.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_FILE
    if not path.is_file():
        raise RecordError(f"run record {path}: no such file")
    record = Record(path=path)
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
            if meta.get("format") != FORMAT:
                raise RecordError(
                    f"run record {path}: format {meta.get('format')!r}, expected {FORMAT}"
                )
            record.meta = meta
            skipped = _Skipped(record.notes)
            rows = db.execute("SELECT step, value FROM losses ORDER BY step")
            for step, value in skipped.numbers(rows, "losses"):
                record.losses[0].append(step)
                record.losses[1].append(value)
            rows = db.execute("SELECT step, value, name FROM readings ORDER BY step, rowid")
            for step, value, name in skipped.numbers(rows, "readings"):
                steps, values = record.readings.setdefault(str(name), ([], []))
                steps.append(step)
                values.append(value)
            for row_id, body in db.execute("SELECT id, body FROM events ORDER BY id"):
                try:
                    record.events.append(json.loads(body))
                except (TypeError, ValueError):
                    skipped.note(f"events row {row_id}: not JSON")
        finally:
            db.close()
    except (sqlite3.Error, ValueError) as err:
        raise RecordError(f"run record {path}: unreadable, not a run record ({err})") from None
    return record


class _Skipped:
    """Rows of a record that a hand edit or a bad disk made unreadable: each is a note (a few
    per table), so one bad row never hides the rest of a run."""

    def __init__(self, notes: list[str]) -> None:
        self.notes, self.counts = notes, {}

    def note(self, text: str) -> None:
        table = text.split()[0]
        self.counts[table] = self.counts.get(table, 0) + 1
        if self.counts[table] <= 5:
            self.notes.append(f"{RECORD_FILE} {text}, skipped")

    def numbers(self, rows, table: str):
        """``(step, value, *rest)`` rows with an integer step and a numeric (or NULL) value."""
        for number, (step, value, *rest) in enumerate(rows, start=1):
            if type(step) is not int or not (value is None or type(value) in (int, float)):
                self.note(f"{table} row {number}: step {step!r:.30} value {value!r:.30}")
                continue
            yield (step, _float(None if value is None else float(value)), *rest)


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The events of the record at ``path`` (a record file or its run directory), in order."""
    return read_record(path).events


def find_records(root: str | os.PathLike) -> list[Path]:
    """Every record file below ``root`` (or ``root`` itself), sorted."""
    root = Path(root)
    if root.is_file():
        return [root] if root.name == RECORD_FILE else []
    return sorted(root.rglob(RECORD_FILE))
