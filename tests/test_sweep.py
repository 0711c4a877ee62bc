"""``mxprobe sweep``: grid expansion, local execution, resume after a kill, emitted commands."""

import csv
import json

import pytest
import yaml

from mxprobe.app.cli import sweep
from tests.proxy_tiny import tiny_config

TINY = tiny_config(max_steps=2, batch_size=8)


def _spec(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(TINY))
    spec = {
        "config": "base.yaml",
        "out": str(tmp_path / "out"),
        "set": {"trainer.max_steps": 2},
        "grid": {"model.scheme": ["fp32", "mxfp8_e4m3"], "seed": [0, 1]},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grid_expansion_and_arguments(tmp_path):
    spec = sweep.Spec.load(_spec(tmp_path))
    assert len(spec.runs) == 4
    assert spec.run_name(spec.runs[1]) == "scheme=fp32,seed=1"
    assert spec.cli_args(spec.runs[3]) == [
        "--trainer.max_steps=2",
        "--model.scheme=mxfp8_e4m3",
        "--model.seed=1",
        "--data.seed=1",
    ]


@pytest.mark.slow  # trains a sweep twice (about 12 s)
def test_sweep_resumes_without_redoing_finished_runs(tmp_path, capsys):
    path = _spec(tmp_path)
    spec = sweep.Spec.load(path)
    # A sweep killed part-way: runs 0 and 1 finished, run 1's result was then corrupted (killed
    # while writing), run 2 died mid-training (folder, no result), run 3 never started.
    sweep.run_one(spec, 0)
    sweep.run_one(spec, 1)
    (spec.run_dir(spec.runs[1]) / sweep.RESULT_FILE).write_text('{"run": "trunc')
    (spec.run_dir(spec.runs[2])).mkdir(parents=True)
    (spec.run_dir(spec.runs[2]) / "metrics.csv").write_text("epoch,step\n")
    finished_before = (spec.run_dir(spec.runs[0]) / sweep.RESULT_FILE).stat().st_mtime_ns

    assert sweep.run([str(path), "--emit-commands"], "mxprobe sweep") == 0
    emitted = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in emitted] == ["1", "2", "3"]
    assert emitted[0].startswith("mxprobe sweep ")

    assert sweep.run([str(path), "--jobs", "2"], "mxprobe sweep") == 0
    assert "4 runs, 1 finished, 3 to run" in capsys.readouterr().out
    after = (spec.run_dir(spec.runs[0]) / sweep.RESULT_FILE).stat().st_mtime_ns
    assert after == finished_before
    with open(spec.out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run"] for r in rows) == sorted(spec.run_name(p) for p in spec.runs)
    assert all(r["finished"] == "true" and r["steps"] == "2" for r in rows)
    assert {r["model.scheme"] for r in rows} == {"fp32", "mxfp8_e4m3"}
    result = json.loads((spec.run_dir(spec.runs[3]) / sweep.RESULT_FILE).read_text())
    assert result["diverged"] is False and result["divergence_step"] is None
    # One arm per scheme, its two seeds paired with the other arm's.
    with open(spec.out / "rates.csv") as f:
        rates = [(r["arm"], r["n"], r["diverged"]) for r in csv.DictReader(f)]
    assert rates == [("model.scheme=fp32", "2", "0"), ("model.scheme=mxfp8_e4m3", "2", "0")]
    with open(spec.out / "tests.csv") as f:
        (pair,) = list(csv.DictReader(f))
    assert pair["test"].startswith("exact McNemar") and pair["n"] == "2"

    # Everything finished: a rerun runs nothing and the table keeps one row per run.
    assert sweep.run([str(path)], "mxprobe sweep") == 0
    assert "0 to run" in capsys.readouterr().out
    with open(spec.out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_bad_spec_names_the_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"grid": {"model.lr": 0.1}}))
    try:
        sweep.Spec.load(path)
    except ValueError as exc:
        assert "non-empty lists" in str(exc) and "model.lr" in str(exc)
    else:
        raise AssertionError("expected ValueError")
