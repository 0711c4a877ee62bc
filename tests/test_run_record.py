"""The run record as a user's run leaves it (any loggers, resume, a full disk) and the report
read from it: one run, every step once, outcomes that are true of the losses."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from mxprobe.callbacks import (
    GradientBiasMonitor,
    LossSpikeDetector,
    NormAffineMonitor,
    PrecisionIntervention,
    RunRecorder,
    read_record,
)

from mxprobe.app.report import build_report
from mxprobe.record import RECORD_FILE, RecordError, RecordWriter, find_records
from tests.helpers_lightning import TinyMx, subprocess_env, trainer
from tests.proxy_tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class BlowsUp(TinyMx):
    """A user's module whose loss jumps ×10⁴ from ``from_step`` on and stays there."""

    def __init__(self, from_step: int = 30) -> None:
        super().__init__()
        self.from_step = from_step

    def training_step(self, batch, batch_idx):
        loss = self.mse(batch)
        if self.trainer.global_step >= self.from_step:
            loss = loss * 1e4
        self.log("train/loss", loss)
        return loss


def _rule(at: int) -> dict:
    return {
        "name": f"norms-at-{at}",
        "trigger": {"kind": "step", "at": at},
        "action": {"kind": "set_scheme", "scheme": "norm=bf16"},
    }


def _callbacks(at: int) -> list:
    return [
        GradientBiasMonitor(every_n_steps=10),
        NormAffineMonitor(every_n_steps=10),
        LossSpikeDetector(window=5),
        PrecisionIntervention(rules=[_rule(at)]),
    ]


def _report_json(tmp_path) -> dict:
    build_report([tmp_path / "runs"], tmp_path / "report")
    return json.loads((tmp_path / "report" / "report.json").read_text())


def _check_blown_up_run(report: dict) -> None:
    (run,) = report["runs"]
    assert run["last_step"] == 59
    assert run["outcome"] != "stable"
    assert 30 <= run["divergence_step"] <= 35
    actions = [e for e in run["events"] if e["kind"] == "set_scheme"]
    assert [(e["step"], e["rule"]) for e in actions] == [(15, "norms-at-15")]


def test_two_loggers_one_run(tmp_path):
    root = tmp_path / "runs"
    loggers = [TensorBoardLogger(root, name="tb"), CSVLogger(root, name="csv")]
    trainer(root, 60, _callbacks(15), logger=loggers, log_every_n_steps=5).fit(BlowsUp())
    assert len(find_records(root)) == 1  # in the first logger's directory
    _check_blown_up_run(_report_json(tmp_path))


def test_no_logger_still_records(tmp_path):
    root = tmp_path / "runs"
    trainer(root, 60, _callbacks(15), logger=False).fit(BlowsUp())
    assert find_records(root) == [root / RECORD_FILE]
    report = _report_json(tmp_path)
    _check_blown_up_run(report)
    assert report["runs"][0]["model"] == "BlowsUp"


def test_a_run_with_no_monitor_records_its_losses(tmp_path):
    trainer(tmp_path, 7, [RunRecorder()]).fit(TinyMx())
    record = read_record(tmp_path)
    assert record.losses[0] == list(range(7)) and not record.readings and not record.events


def test_resume_continues_one_record(tmp_path):
    """Fit to 45 with checkpoints every 10, resume from 40 to 60 under the same logger (a new
    version directory): the step-42 event once, one loss series 0-59, the report one run."""
    root = tmp_path / "runs"
    ckpt = tmp_path / "ckpt"

    def run(max_steps, **fit):
        checkpoint = ModelCheckpoint(dirpath=ckpt, every_n_train_steps=10, save_top_k=-1)
        logger = CSVLogger(root, name="user")
        t = trainer(root, max_steps, [*_callbacks(42), checkpoint], logger=logger,
                    log_every_n_steps=5, enable_checkpointing=True)  # fmt: skip
        t.fit(TinyMx(), **fit)

    run(45)
    run(60, ckpt_path=ckpt / "epoch=0-step=40.ckpt")
    report = _report_json(tmp_path)
    (only,) = report["runs"]
    assert only["name"].endswith("version_1") and only["last_step"] == 59
    assert [e["step"] for e in only["events"] if e["kind"] == "set_scheme"] == [42]
    record = read_record(root / "user" / "version_1")
    assert record.losses[0] == list(range(60))
    steps = record.readings["mx/grad_bias/total/zeta"][0]
    assert steps == [0, 10, 20, 30, 40, 50]


def test_rerun_in_the_same_directory_starts_clean(tmp_path):
    trainer(tmp_path, 20, _callbacks(15)).fit(TinyMx())
    trainer(tmp_path, 20, _callbacks(15)).fit(TinyMx())
    record = read_record(tmp_path)
    assert [e["step"] for e in record.events if e["kind"] == "set_scheme"] == [15]
    assert record.losses[0] == list(range(20))


def _full_writer(path, pages: int) -> RecordWriter:
    writer = RecordWriter(path)
    # A disk that fills up: SQLite's own page cap fails a write with SQLITE_FULL, as a full
    # disk does.
    writer._db.execute(f"PRAGMA max_page_count = {pages}")
    return writer


def test_a_full_disk_keeps_the_last_complete_step(tmp_path):
    path = tmp_path / RECORD_FILE
    writer = _full_writer(path, pages=12)
    writer.loss(0, 1.0)
    writer.readings(0, {"mx/grad_bias/total/zeta": 0.5})
    writer.commit()
    with pytest.raises(RecordError) as failed:
        for step in range(1, 10_000):
            writer.loss(step, 1.0 / step)
            writer.readings(step, {f"mx/grad_bias/m{i}/zeta": float(i) for i in range(50)})
            writer.commit()
    message = str(failed.value)
    assert str(path) in message and "full" in message and "\n" not in message
    record = read_record(path)
    last = record.losses[0][-1]
    assert record.losses[0] == list(range(last + 1))  # whole steps only
    per_step = {s: record.readings[f"mx/grad_bias/m{i}/zeta"][0].count(s) for i in range(50)
                for s in range(1, last + 1)}  # fmt: skip
    assert set(per_step.values()) <= {1}


def test_a_record_is_not_something_else(tmp_path):
    other = tmp_path / RECORD_FILE
    sqlite3.connect(other).execute("CREATE TABLE t(x)").connection.commit()
    with pytest.raises(RecordError, match="not a run record"):
        read_record(other)


def test_report_escapes_run_supplied_text(tmp_path):
    run_dir = tmp_path / "runs" / "<script>alert(1)<|script>"
    evil = {**_rule(3), "name": "<img src=x onerror=alert(1)>"}
    trainer(run_dir, 6, [PrecisionIntervention(rules=[evil])]).fit(TinyMx())
    build_report([tmp_path / "runs"], tmp_path / "report")
    for page in ("report.md", "report.html"):
        text = (tmp_path / "report" / page).read_text()
        assert "<script>" not in text and "<img src=x" not in text
        assert "&lt;img src=x onerror=alert(1)&gt;" in text


def _proxy_config(tmp_path, name: str, kill_at: int | None) -> Path:
    """A tiny monitored proxy run with a step rule at 70 and checkpoints every 50 steps."""
    callbacks = [
        {"class_path": "mxprobe.callbacks.GradientBiasMonitor", "init_args": {"every_n_steps": 10}},
        {"class_path": "mxprobe.callbacks.NormAffineMonitor", "init_args": {"every_n_steps": 10}},
        {"class_path": "mxprobe.callbacks.LossSpikeDetector", "init_args": {"window": 10}},
        {
            "class_path": "mxprobe.callbacks.PrecisionIntervention",
            "init_args": {"rules": [_rule(70)]},
        },
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(tmp_path / name / "ckpt"),
                "every_n_train_steps": 50,
                "save_top_k": -1,
            },
        },
    ]
    if kill_at is not None:
        callbacks.append(
            {"class_path": "tests.helpers_kill.KillAt", "init_args": {"step": kill_at}}
        )
    config = tiny_config(max_steps=160, batch_size=16)
    config["model"]["scheme"] = "mxfp8_e4m3"
    config["trainer"].update(
        callbacks=callbacks, logger=False, enable_checkpointing=True,
        default_root_dir=str(tmp_path / name),
    )  # fmt: skip
    path = tmp_path / f"{name}-{kill_at}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _proxy_fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = subprocess_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "mxprobe.app.cli", "proxy", "fit", f"--config={config}"]
    return subprocess.run([*command, *extra], env=env, capture_output=True, text=True, timeout=300)


def _history(path) -> tuple:
    record = read_record(path)
    events = [{k: v for k, v in e.items() if k != "time"} for e in record.events]
    return record.losses, record.readings, events


@pytest.mark.slow  # a process killed and resumed
def test_kill_9_and_resume_gives_the_uninterrupted_record(tmp_path):
    whole = _proxy_fit(_proxy_config(tmp_path, "whole", None))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _proxy_fit(_proxy_config(tmp_path, "killed", kill_at=120))
    assert killed.returncode == -signal.SIGKILL
    before = read_record(tmp_path / "killed")
    assert before.losses[0][-1] == 119  # what the record held when the process died
    resumed = _proxy_fit(
        _proxy_config(tmp_path, "killed", None),
        f"--ckpt_path={tmp_path / 'killed' / 'ckpt' / 'epoch=0-step=100.ckpt'}",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses, readings, events = _history(tmp_path / "killed")
    assert losses[0] == list(range(160))
    assert [(e["step"], e["kind"]) for e in events if e["kind"] == "set_scheme"] == [
        (70, "set_scheme")
    ]
    assert (losses, readings, events) == _history(tmp_path / "whole")  # bit for bit


def test_a_full_disk_mid_run_stops_it_with_the_path(tmp_path, monkeypatch):
    connect = RecordWriter._connect

    def small_disk(self):
        db = connect(self)
        db.execute("PRAGMA max_page_count = 24")  # SQLITE_FULL, as a full disk gives
        return db

    monkeypatch.setattr(RecordWriter, "_connect", small_disk)
    callbacks = [GradientBiasMonitor(every_n_steps=1), NormAffineMonitor(every_n_steps=1)]
    with pytest.raises(RecordError) as failed:
        trainer(tmp_path, 200, callbacks).fit(TinyMx())
    assert str(tmp_path / RECORD_FILE) in str(failed.value) and "full" in str(failed.value)
    monkeypatch.undo()
    steps = read_record(tmp_path).losses[0]
    assert steps and steps == list(range(len(steps)))  # every complete step, nothing after


def test_validate_alone_writes_no_record(tmp_path):
    module = TinyMx()
    module.val_dataloader = module.train_dataloader
    module.validation_step = lambda batch, batch_idx: None
    trainer(tmp_path, 1, [RunRecorder()], limit_val_batches=1).validate(module)
    assert find_records(tmp_path) == []


class ManualNoLoss(TinyMx):
    """Manual optimization whose training_step steps the optimizer and returns nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(self.mse(batch))
        optimizer.step()


def test_a_run_whose_step_returns_no_loss_is_told_so(tmp_path):
    module = ManualNoLoss()
    with pytest.warns(UserWarning, match="returned no loss tensor at step 0"):
        trainer(tmp_path, 3, [RunRecorder()]).fit(module)
    assert read_record(tmp_path).losses == ([], [])


def test_a_subclassed_monitor_serves_a_metric_rule(tmp_path):
    class MyMonitor(GradientBiasMonitor):
        pass

    rule = {**_rule(99), "trigger": {"kind": "metric", "name": "mx/grad_bias/total/zeta",
                                     "op": "<", "value": -1.0}}  # fmt: skip
    callbacks = [MyMonitor(every_n_steps=2), PrecisionIntervention(rules=[rule])]
    trainer(tmp_path, 4, callbacks).fit(TinyMx())  # not refused: its monitor is there
    assert read_record(tmp_path).readings["mx/grad_bias/total/zeta"][0] == [0, 2]
