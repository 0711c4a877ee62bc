"""A sweep's processes: children end with the sweep (kill -9 included), one sweep per directory,
and a rerun after a kill resumes with each run once in results.csv (issue 27)."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mxprobe.app.cli import main, sweep
from mxprobe.app.cli.children import PARENT_ENV, exclusive, holder
from tests.helpers_lightning import subprocess_env
from tests.proxy_tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# A parent that starts a child the way a sweep does, then waits; the child arms
# end_with_parent() and sleeps.
_PARENT = """
import os, subprocess, sys, time
from mxprobe.app.cli.children import child_env
child = subprocess.Popen([sys.executable, "-c", "from mxprobe.app.cli.children import "
    "end_with_parent; end_with_parent(); open(sys.argv[1], 'w').close(); import time; "
    "time.sleep(120)", sys.argv[1]], env=child_env(dict(os.environ)))
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.slow  # starts, kills and waits for processes (about 5 s)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_child_ends_when_its_parent_is_killed(tmp_path):
    armed = tmp_path / "armed"
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT.replace("sys.argv[1]", repr(str(armed)))],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env=subprocess_env(),
    )  # fmt: skip
    child = int(parent.stdout.readline())
    try:
        assert _wait_for(armed.exists, 30)
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_for(lambda: not _alive(child), 5), "the child outlived its parent"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_process_started_otherwise_is_left_alone(monkeypatch):
    from mxprobe.app.cli.children import end_with_parent

    monkeypatch.delenv(PARENT_ENV, raising=False)
    end_with_parent()  # no parent recorded: nothing armed, nothing killed


def _spec(tmp_path, callbacks=()) -> Path:
    config = tiny_config(max_steps=3, batch_size=8)
    config["trainer"]["callbacks"] = list(callbacks)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(config))
    spec = {"config": "base.yaml", "out": str(tmp_path / "out"), "grid": {"seed": [0, 1]}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_second_sweep_on_a_directory_is_refused(tmp_path, capsys):
    path = _spec(tmp_path)
    out = tmp_path / "out"
    with exclusive(out / sweep.SWEEP_LOCK, "test"):
        assert holder(out / sweep.SWEEP_LOCK) == os.getpid()
        assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"in use by pid {os.getpid()}" in err and str(out) in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert holder(out / sweep.SWEEP_LOCK) is None  # released with its holder


def test_a_run_in_use_is_refused_and_listed(tmp_path, capsys):
    spec = sweep.Spec.load(_spec(tmp_path))
    lock = spec.run_dir(spec.runs[1]) / sweep.RUN_LOCK
    with exclusive(lock, "test"):
        with pytest.raises(ValueError, match=f"in use by pid {os.getpid()}"):
            sweep.run_one(spec, 1)
        assert main(["sweep", str(spec.path), "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "pending" in listed[0] and f"running (pid {os.getpid()})" in listed[1]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_a_sweep_then_a_rerun_resumes(tmp_path, monkeypatch):
    # The runs import tests.helpers_kill, while jsonargparse reads their config from its folder.
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    hold, marker = tmp_path / "hold", tmp_path / "paused"
    pause = {"class_path": "tests.helpers_kill.PauseAt",
             "init_args": {"step": 1, "hold": str(hold), "marker": str(marker)}}  # fmt: skip
    path = _spec(tmp_path, [pause])
    spec = sweep.Spec.load(path)
    sweep.run_one(spec, 0)  # finished before the sweep; no hold: it passes its pause at once
    marker.unlink()
    hold.touch()  # run 1 is caught mid-training when the sweep is killed
    try:
        parent = subprocess.Popen(
            [sys.executable, "-m", "mxprobe.app.cli", "sweep", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
            env=subprocess_env(),
        )  # fmt: skip
        assert _wait_for(marker.exists, 120), "run 1 never started"
        child = holder(spec.run_dir(spec.runs[1]) / sweep.RUN_LOCK)
        assert child and child != parent.pid and _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_for(lambda: not _alive(child), 5), "the run outlived its sweep"
        assert holder(spec.out / sweep.SWEEP_LOCK) is None
    finally:
        hold.unlink(missing_ok=True)
    done_before = (spec.run_dir(spec.runs[0]) / sweep.RESULT_FILE).stat().st_mtime_ns
    assert sweep.run([str(path)], "mxprobe sweep") == 0
    assert (spec.run_dir(spec.runs[0]) / sweep.RESULT_FILE).stat().st_mtime_ns == done_before
    with open(spec.out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run"] for r in rows) == ["seed=0", "seed=1"]
    assert all(r["finished"] == "true" and r["steps"] == "3" for r in rows)
