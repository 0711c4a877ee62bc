"""``mxprobe sweep SPEC.yaml``: an ablation grid of proxy runs.

The spec names a base LightningCLI config, fixed settings and a grid; every combination of the
grid's values is one run::

    config: examples/configs/proxy_cpu.yaml   # base config (relative to the spec's folder or cwd)
    out: runs/ablation                        # results.csv and one folder per run
    set:                                      # fixed LightningCLI settings for every run
      trainer.max_steps: 2000
    grid:                                     # dotted LightningCLI keys; `seed` sets model+data
      model.activation: [gelu, relu]
      model.layer_norm: [true, false]
      model.scheme: [fp32, mxfp8_e4m3]
      seed: [0, 1]

- ``mxprobe sweep SPEC.yaml [--jobs N]`` runs the pending runs in N parallel processes. A run is
  finished when its ``result.json`` exists (written atomically at its end), so rerunning a
  killed sweep redoes only the unfinished runs; ``results.csv`` (one row per run) is rebuilt
  from the ``result.json`` files after every run, with ``rates.csv`` (each arm's divergence rate
  and its exact 95 % interval; an arm is a grid point less its seeds) and ``tests.csv`` (each
  pair of arms: exact McNemar over shared seeds, else Fisher's exact test).
- Before anything trains, the spec is checked: keys, divergence settings, every scheme, every
  run directory (unique, inside ``out``: ``model.lr: [0.001, 1.0e-3]`` is one run listed twice,
  refused), and each grid value built once by the LightningCLI. A mistake is one line.
- One sweep at a time per ``out`` (a lock file; a second sweep is refused with the first's
  pid), one process at a time per run directory, and the runs' processes end when the sweep
  process ends, ``kill -9`` included: rerun the sweep and it resumes.
- ``--emit-commands`` prints one command line per pending run (``mxprobe sweep SPEC.yaml
  --run-index K``) for a cluster scheduler, e.g. a SLURM array with ``K=$SLURM_ARRAY_TASK_ID``;
  ``--collect`` then rebuilds ``results.csv``.
- ``--list`` prints the runs and whether each is finished, pending or running (with its pid).
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.thread import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from mxprobe import atomic
from mxprobe.app.cli.children import child_env, end_with_parent, exclusive, holder
from mxprobe.app.cli.errors import ArgumentParser, inside, positive_int
from mxprobe.app.cli.proxy import check_config, check_divergence_rule
from mxprobe.app.parsing import UsageError
from mxprobe.app.rates import by_arm, write_tables
from mxprobe.app.results import RESULT_COLUMNS
from mxprobe.outcome import DIVERGENCE_FACTOR, DIVERGENCE_PATIENCE

if TYPE_CHECKING:
    from mxprobe.app.training import TrainJob

RESULT_FILE = "result.json"
SWEEP_LOCK = ".mxprobe-sweep.lock"  # in ``out``: held by the sweep that runs there
RUN_LOCK = ".mxprobe-run.lock"  # in a run's directory: held by the process training it
SEED_KEYS = ("seed", "model.seed", "data.seed")


@dataclass
class Spec:
    """A parsed sweep spec; ``runs`` lists every grid point as {dotted key: value}."""

    path: Path
    config: Path | None
    out: Path
    fixed: dict
    grid: dict[str, list]
    stop_on_divergence: bool = True
    factor: float = DIVERGENCE_FACTOR
    patience: int = DIVERGENCE_PATIENCE

    @classmethod
    def load(cls, path: str | Path) -> Spec:
        """The spec at ``path``, its keys and values checked (not yet its runs: :meth:`check`).

        Raises:
            UsageError: naming the spec, the bad key or value and what is expected.
        """
        path = Path(path)
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise UsageError(f"{path}: not a YAML sweep spec ({_yaml_problem(err)})") from None
        if not isinstance(raw, dict):
            raise UsageError(f"{path}: expected a mapping with a 'grid', got {_kind(raw)}")
        unknown = sorted(map(str, set(raw) - _SPEC_KEYS))
        if unknown:
            raise UsageError(
                f"{path}: unknown key(s) {unknown}; expected some of {sorted(_SPEC_KEYS)}"
            )
        grid = raw.get("grid")
        if not isinstance(grid, dict) or not grid:
            raise UsageError(
                f"{path}: 'grid' must map dotted keys to lists of values, got {grid!r}"
            )
        bad = [
            k for k, v in grid.items() if not isinstance(k, str) or not isinstance(v, list) or not v
        ]
        if bad:
            raise UsageError(f"{path}: grid values must be non-empty lists; not so for {bad}")
        for key, values in grid.items():
            repeated = [v for i, v in enumerate(values) if any(_same(v, w) for w in values[:i])]
            if repeated:
                raise UsageError(
                    f"{path}: grid {key!r} lists {repeated[0]!r} twice (as {values!r}): both "
                    "would be the same run"
                )
        fixed = raw.get("set") or {}
        if not isinstance(fixed, dict):
            raise UsageError(f"{path}: 'set' must map dotted keys to values, got {_kind(fixed)}")
        stop = raw.get("stop_on_divergence", True)
        if not isinstance(stop, bool):
            raise UsageError(f"{path}: stop_on_divergence must be true or false, got {stop!r}")
        factor = raw.get("factor", DIVERGENCE_FACTOR)
        patience = raw.get("patience", DIVERGENCE_PATIENCE)
        try:
            check_divergence_rule(factor, patience)
        except UsageError as err:
            raise UsageError(f"{path}: {err}") from None
        config, out = raw.get("config"), raw.get("out", f"runs/{path.stem}")
        if config is not None and not isinstance(config, str):
            raise UsageError(f"{path}: config must be a path, got {config!r}")
        if not isinstance(out, str) or not out:
            raise UsageError(f"{path}: out must be a directory path, got {out!r}")
        return cls(
            path=path,
            config=_resolve(path, config) if config else None,
            out=Path(out),
            fixed=dict(fixed),
            grid=grid,
            stop_on_divergence=stop,
            factor=float(factor),
            patience=patience,
        )

    def check(self) -> None:
        """Refuse, before any run starts, a spec whose runs cannot all be trained: a missing
        config, a bad scheme, two grid points sharing a run directory, a directory outside
        ``out``, and every grid value the LightningCLI would refuse (each value is built once,
        in as many runs as the longest list has values, and nothing is trained).

        Raises:
            UsageError (or the LightningCLI's own error): naming the bad value.
        """
        from mxprobe.app.training import check_run
        from mxprobe.scheme import parse_scheme

        check_config(str(self.config) if self.config else None)
        seen: dict[Path, dict] = {}
        for point in self.runs:
            run_dir = inside(self.out, self.run_dir(point), f"{self.path}: run directory")
            if run_dir in seen:
                raise UsageError(
                    f"{self.path}: grid points {seen[run_dir]} and {point} share the run "
                    f"directory {run_dir}"
                )
            seen[run_dir] = point
        schemes = self.grid.get("model.scheme", []) + (
            [self.fixed["model.scheme"]] if "model.scheme" in self.fixed else []
        )
        for scheme in schemes:
            try:
                parse_scheme(_text(scheme))
            except ValueError as err:
                raise UsageError(f"{self.path}: model.scheme: {err}") from None
        for i in range(max(map(len, self.grid.values()))):
            point = {k: v[i % len(v)] for k, v in self.grid.items()}
            check_run(self.job(point))

    @property
    def runs(self) -> list[dict]:
        keys = list(self.grid)
        combos = itertools.product(*self.grid.values())
        return [dict(zip(keys, values, strict=True)) for values in combos]

    def run_name(self, point: dict) -> str:
        return ",".join(f"{k.split('.')[-1]}={_text(v)}" for k, v in point.items()).replace(
            "/", "_"
        )

    def run_dir(self, point: dict) -> Path:
        return self.out / self.run_name(point)

    def job(self, point: dict) -> TrainJob:
        """The run of grid point ``point``, to train or to check."""
        from mxprobe.app.training import TrainJob  # Lightning from here

        return TrainJob(
            str(self.config) if self.config else None,
            str(self.run_dir(point)),
            tuple(self.cli_args(point)),
            self.stop_on_divergence,
            self.factor,
            self.patience,
        )

    def cli_args(self, point: dict) -> list[str]:
        args = []
        for key, value in {**self.fixed, **point}.items():
            keys = ("model.seed", "data.seed") if key == "seed" else (key,)
            args += [f"--{k}={_text(value)}" for k in keys]
        return args


_SPEC_KEYS = {"config", "out", "set", "grid", "stop_on_divergence", "factor", "patience"}


def _yaml_problem(err: Exception) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(err, 'problem', None) or err}{where}"


def _same(a, b) -> bool:
    """Whether two grid values configure the same run (0.001 and 1.0e-3 do; true and 1 not)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _kind(value) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"[:80]


def _resolve(spec_path: Path, config: str) -> Path:
    beside = spec_path.parent / config
    return beside if beside.exists() else Path(config)


def _text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def is_finished(spec: Spec, point: dict) -> bool:
    path = spec.run_dir(point) / RESULT_FILE
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def run_one(spec: Spec, index: int) -> dict:
    """Train run ``index`` of the grid and write its ``result.json`` (atomically)."""
    from mxprobe.app.training import train_run

    point = spec.runs[index]
    run_dir = spec.run_dir(point)
    with exclusive(run_dir / RUN_LOCK, f"run directory {run_dir}"):
        row = train_run(spec.job(point)).to_row()
        result = {"run": spec.run_name(point), **{k: _text(v) for k, v in point.items()}, **row}
        atomic.write_text(run_dir / RESULT_FILE, json.dumps(result, indent=1))
    return result


def collect(spec: Spec) -> Path:
    """Rebuild ``results.csv``: one row per grid point, finished or not."""
    rows = []
    for point in spec.runs:
        row = {"run": spec.run_name(point), **{k: _text(v) for k, v in point.items()}}
        finished = is_finished(spec, point)
        if finished:
            row.update(json.loads((spec.run_dir(point) / RESULT_FILE).read_text()))
        rows.append({**row, "finished": finished})
    spec.out.mkdir(parents=True, exist_ok=True)
    path = spec.out / "results.csv"
    atomic.write_csv(path, rows, ("run", *spec.grid, "finished", *RESULT_COLUMNS))
    # An arm is a grid point less its seeds: the arms' seeds pair up for the tests.
    seed_keys = [k for k in spec.grid if k in SEED_KEYS]
    arm_keys = [k for k in spec.grid if k not in SEED_KEYS]
    arms = by_arm(
        rows,
        lambda r: ",".join(f"{k}={r[k]}" for k in arm_keys) or "all",
        lambda r: ",".join(str(r[k]) for k in seed_keys),
    )
    write_tables(spec.out, arms)
    return path


def command(spec: Spec, index: int, executable: list[str] | None = None) -> list[str]:
    return [*(executable or ["mxprobe"]), "sweep", str(spec.path), "--run-index", str(index)]


def _local_executable() -> list[str]:
    return [sys.executable, "-c", "import sys; from mxprobe.app.cli import main; sys.exit(main())"]


def execute(spec: Spec, jobs: int) -> int:
    """Run every pending run in subprocesses, ``jobs`` at a time, holding the sweep directory's
    lock; returns the failure count. The children end when this process ends, however it ends.

    Raises:
        UsageError: when another sweep holds the directory, naming its pid.
    """
    with exclusive(spec.out / SWEEP_LOCK, f"sweep directory {spec.out}"):
        return _execute(spec, jobs)


def _running(spec: Spec, point: dict) -> int | None:
    return holder(spec.run_dir(point) / RUN_LOCK)


def _execute(spec: Spec, jobs: int) -> int:
    pending = [i for i, p in enumerate(spec.runs) if not is_finished(spec, p)]
    elsewhere = [i for i in pending if _running(spec, spec.runs[i])]
    for i in elsewhere:
        pid = _running(spec, spec.runs[i])
        print(f"skipped {spec.run_name(spec.runs[i])}: running in another process (pid {pid})")
    pending = [i for i in pending if i not in elsewhere]
    done = len(spec.runs) - len(pending) - len(elsewhere)
    print(f"{len(spec.runs)} runs, {done} finished, {len(pending)} to run with {jobs} job(s)")
    env = child_env(dict(os.environ))
    if jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    failures = 0

    def launch(index: int) -> tuple[int, int]:
        run_dir = spec.run_dir(spec.runs[index])
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "stdout.log", "w") as log:
            proc = subprocess.run(
                command(spec, index, _local_executable()),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return index, proc.returncode

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = {pool.submit(launch, i) for i in pending}
        while futures:
            finished, futures = wait(futures, return_when=FIRST_COMPLETED)
            for future in finished:
                index, code = future.result()
                name = spec.run_name(spec.runs[index])
                if code:
                    failures += 1
                    print(
                        f"FAILED ({code}) {name}: see {spec.run_dir(spec.runs[index])}/stdout.log"
                    )
                else:
                    print(f"done {name}")
                collect(spec)
    return failures


def run(argv: list[str], prog: str) -> int:
    parser = ArgumentParser(
        prog=prog,
        description="Train an ablation grid of proxy runs from a sweep spec (YAML: a base config, "
        "fixed settings and a grid); a rerun resumes, and results.csv, rates.csv and tests.csv "
        "are rebuilt after every run.",
    )
    parser.add_argument("spec", help="sweep spec YAML")
    parser.add_argument(
        "--jobs", type=positive_int, default=1, help="parallel local processes (default 1)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--emit-commands",
        action="store_true",
        help="print one command per pending run instead of running",
    )
    mode.add_argument("--run-index", type=int, help="run only grid point K (what commands do)")
    mode.add_argument("--collect", action="store_true", help="only rebuild results.csv")
    mode.add_argument("--list", action="store_true", help="list runs and their state")
    ns = parser.parse_args(argv)
    spec = Spec.load(ns.spec)
    runs = spec.runs
    if ns.run_index is not None:
        end_with_parent()  # started by a local sweep: end with it
        if not 0 <= ns.run_index < len(runs):
            print(
                f"{prog}: --run-index {ns.run_index} out of range 0..{len(runs) - 1}",
                file=sys.stderr,
            )
            return 2
        run_one(spec, ns.run_index)
        return 0
    if ns.emit_commands:
        spec.check()
        for i, point in enumerate(runs):
            if not is_finished(spec, point):
                print(shlex.join(command(spec, i)))
        return 0
    if ns.list:
        for i, point in enumerate(runs):
            pid = _running(spec, point)
            state = (
                "finished"
                if is_finished(spec, point)
                else f"running (pid {pid})"
                if pid
                else "pending"
            )
            print(f"{i:4d}  {state:8s}  {spec.run_name(point)}")
        return 0
    if ns.collect:
        print(collect(spec))
        return 0
    spec.check()  # before the lock: a refused spec leaves no directory behind
    start = time.perf_counter()
    failures = execute(spec, ns.jobs)
    path = collect(spec)
    print(f"results: {path} ({time.perf_counter() - start:.0f} s)")
    return 1 if failures else 0
