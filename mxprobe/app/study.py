"""A controlled study over many seeds: arms trained from the same initial weights on the same
batches (model seed = data seed = ``seed_everything`` = the seed).

An *arm* (:class:`Arm`) is a precision scheme and, for a rule arm, a rule config. The built-in
arms (:data:`ARMS`) test the spike rule:

- ``fp32``: full precision; ``mx``: ``mxfp8_e4m3``; both carry the rule configs' loss-spike
  detector (it only watches), so their alarms are scored like the others'.
- ``mx_intervention``: the rule (spike -> rewind -> layer-norm affine to bf16), from
  ``<base>_intervention.yaml``; ``mx_rewind_only``: the same detector, rewind and counters, no
  precision change (``<base>_rewind_only.yaml``); ``mx_placebo``: the same trigger and rewind
  and a precision change of comparable size that leaves the norm-affine path in E4M3
  (``<base>_placebo.yaml``; docs/study_placebo.md says why it is comparable).

Other arms are defined by name (:func:`parse_arm`: ``NAME=SCHEME`` or ``NAME=SCHEME+RULE``),
e.g. ``nvfp4=nvfp4`` and ``nvfp4_rule=nvfp4+intervention`` to compare formats
(docs/nvfp4.md).

A rule arm whose rules all fire on the spike detector's alarms runs exactly as its *base arm*
(the arm without rules of the same scheme: ``mx`` for the ``mx_*`` arms) until its first alarm
(the same weights, batches and detector; its callbacks only watch and take snapshots). So on a
seed where the base arm raised no alarm at all, the rule arm's run *is* the base run: its cell
is written from the base cell with ``derived_from: <base arm>`` instead of being retrained
(rule cells of a seed wait for its base cell). docs/study_running.md says how this was checked.

Each arm's full config is written to ``configs/<arm>.yaml`` under the output folder; a rule
config must equal the base config apart from its callbacks (checked). A *cell* is one
(arm, seed): it trains into ``runs/<arm>/seed<S>`` with :func:`mxprobe.app.training.train_run`
and writes ``cells/<arm>/seed<S>.json`` atomically when it ends. A cell is finished when that
file exists and names the arm config's current hash, so a rerun skips finished cells and redoes
cells whose arm config changed. Cells run ``jobs`` at a time, each in a fresh process with one
thread, so no cell depends on what ran before it (compile caches, allocator state); a cell
trains the same losses as ``mxprobe demo``'s run of that arm and seed (tests/test_study.py).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import yaml

from mxprobe import atomic
from mxprobe.app.results import RunResult

MX_SCHEME = "mxfp8_e4m3"


@dataclass(frozen=True)
class Arm:
    """A study arm: the model's precision ``scheme`` (a ``PrecisionScheme`` string) and, for a
    rule arm, ``rule``: the suffix of its rule config beside the base config
    (``<base stem>_<rule>.yaml``), unless ``--rule ARM=FILE`` names another file."""

    scheme: str
    rule: str | None = None


ARMS: dict[str, Arm] = {
    "fp32": Arm("fp32"),
    "mx": Arm(MX_SCHEME),
    "mx_intervention": Arm(MX_SCHEME, "intervention"),
    "mx_rewind_only": Arm(MX_SCHEME, "rewind_only"),
    "mx_placebo": Arm(MX_SCHEME, "placebo"),
}
DETECTOR_CLASS = "mxprobe.callbacks.LossSpikeDetector"
INTERVENTION_CLASS = "mxprobe.callbacks.PrecisionIntervention"


def parse_seeds(text: str) -> list[int]:
    """``"1-40"``, ``"1,2,5"`` or a mix (``"1-3,7"``) -> sorted distinct seeds."""
    seeds: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                low, high = part.split("-", 1)
                seeds.update(range(int(low), int(high) + 1))
            elif part:
                seeds.add(int(part))
        except ValueError:
            raise ValueError(f"bad seed list {text!r}; expected e.g. 1-40 or 1,2,5") from None
    if not seeds:
        raise ValueError(f"bad seed list {text!r}; it names no seed")
    return sorted(seeds)


def parse_arm(text: str) -> tuple[str, Arm]:
    """``"NAME=SCHEME"`` or ``"NAME=SCHEME+RULE"`` -> (name, :class:`Arm`), e.g.
    ``"nvfp4_rule=nvfp4+intervention"``: scheme ``nvfp4`` with the rules of
    ``<base>_intervention.yaml``. The scheme is checked (``PrecisionScheme.parse``)."""
    from mxprobe.scheme import PrecisionScheme

    name, sep, rest = text.partition("=")
    scheme, _, rule = rest.rpartition("+") if "+" in rest else (rest, "", "")
    name, scheme, rule = name.strip(), scheme.strip(), rule.strip()
    if not sep or not name or not scheme or ("+" in rest and not rule):
        raise ValueError(
            f"bad arm {text!r}; expected NAME=SCHEME or NAME=SCHEME+RULE, e.g. nvfp4=nvfp4 or "
            "nvfp4_rule=nvfp4+intervention"
        )
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"bad arm name {name!r}; use letters, digits, _ and -")
    PrecisionScheme.parse(scheme)
    return name, Arm(scheme, rule or None)


def arms_named(names: list[str], defined: dict[str, Arm] | None = None) -> dict[str, Arm]:
    """The arms ``names`` (in that order) from the built-in :data:`ARMS` and ``defined``.

    Raises:
        ValueError: an unknown or repeated name, or a defined arm that redefines a built-in one
            (defining it as it is built in is allowed).
    """
    defined = defined or {}
    clash = sorted(a for a in set(defined) & set(ARMS) if defined[a] != ARMS[a])
    if clash:
        raise ValueError(f"arm(s) {clash} are built in otherwise; give defined arms other names")
    table = {**ARMS, **defined}
    unknown = [a for a in names if a not in table]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; expected some of {list(table)}")
    if len(set(names)) != len(names):
        raise ValueError(f"arms {names} repeat a name")
    return {a: table[a] for a in names}


def rule_paths(base: Path, arms: dict[str, Arm], given: dict[str, Path] | None = None) -> dict:
    """Each rule arm's config: ``given[arm]`` or ``<base stem>_<rule>.yaml`` beside ``base``."""
    return {
        name: Path((given or {}).get(name) or base.with_name(f"{base.stem}_{arm.rule}.yaml"))
        for name, arm in arms.items()
        if arm.rule is not None
    }


def _without_callbacks(config: dict) -> dict:
    config = copy.deepcopy(config)
    config.get("trainer", {}).pop("callbacks", None)
    config.pop("seed_everything", None)
    return config


def arm_configs(base: Path, arms: dict[str, Arm], rules: dict[str, Path]) -> dict[str, dict]:
    """The full LightningCLI config of every arm (seeds are set per cell).

    Raises:
        ValueError: a missing rule config, a rule config that differs from the base config
            outside its callbacks, or rule configs whose spike detectors differ.
    """
    if not Path(base).is_file():
        raise ValueError(f"base config {base} not found")
    base_config = yaml.safe_load(Path(base).read_text())
    rule_callbacks, detectors = {}, {}
    for arm, path in rules.items():
        if not path.is_file():
            raise ValueError(f"arm {arm}: rule config {path} not found")
        config = yaml.safe_load(path.read_text())
        if _without_callbacks(config) != _without_callbacks(base_config):
            raise ValueError(
                f"arm {arm}: {path} differs from {base} outside trainer.callbacks; a rule config "
                "must be the base config plus its callbacks"
            )
        rule_callbacks[arm] = config["trainer"].get("callbacks") or []
        detectors[arm] = [c for c in rule_callbacks[arm] if c.get("class_path") == DETECTOR_CLASS]
    distinct = {json.dumps(d, sort_keys=True) for d in detectors.values()}
    if len(distinct) > 1 or any(len(d) != 1 for d in detectors.values()):
        raise ValueError(f"the rule configs must share one {DETECTOR_CLASS}; found {detectors}")
    detector = next(iter(detectors.values()), None)
    if detector is None and any(arm.rule is None for arm in arms.values()):
        raise ValueError(
            "the arms without rules take their spike detector from a rule arm; name one"
        )
    out = {}
    for name, arm in arms.items():
        config = copy.deepcopy(base_config)
        config["trainer"]["callbacks"] = copy.deepcopy(rule_callbacks.get(name, detector))
        config["model"]["scheme"] = arm.scheme
        out[name] = config
    return out


def base_arms(configs: dict[str, dict]) -> dict[str, str]:
    """Rule arm -> its base arm: the first arm without rules of the same scheme, for each rule arm
    whose rules fire on alarms only (so it trains as the base arm until its first alarm)."""
    plain = [a for a, c in configs.items() if not _rules(c)]
    bases = {}
    for arm, config in configs.items():
        if acts_only_on_alarms(config):
            scheme = config["model"]["scheme"]
            base = next((p for p in plain if configs[p]["model"]["scheme"] == scheme), None)
            if base is not None:
                bases[arm] = base
    return bases


@dataclass(frozen=True)
class Cell:
    """One (arm, seed) of a study whose output folder is ``out``."""

    out: Path
    arm: str
    seed: int

    @property
    def run_dir(self) -> Path:
        return self.out / "runs" / self.arm / f"seed{self.seed}"

    @property
    def result_path(self) -> Path:
        return self.out / "cells" / self.arm / f"seed{self.seed}.json"

    @property
    def config_path(self) -> Path:
        return self.out / "configs" / f"{self.arm}.yaml"

    def args(self, extra: list[str]) -> list[str]:
        s = self.seed
        return [f"--seed_everything={s}", f"--model.seed={s}", f"--data.seed={s}", *extra]

    def result(self) -> dict | None:
        try:
            return json.loads(self.result_path.read_text())
        except (OSError, ValueError):
            return None


def config_hash(path: Path, extra: list[str]) -> str:
    text = path.read_bytes() + json.dumps(extra).encode()
    return hashlib.sha256(text).hexdigest()[:16]


def is_finished(cell: Cell, extra: list[str]) -> bool:
    result = cell.result()
    return bool(result) and result.get("config_hash") == config_hash(cell.config_path, extra)


def _code_version() -> str:
    """The checkout's commit, with ``+modified`` when a tracked source file differs from it (a
    study run in a shared working tree must not pass uncommitted code off as the commit)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=30
        )
        return done.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--",
                      "mxprobe", "callbacks", "proxy_models")  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+modified" if changed else "")


def alarm_steps(run_dir: Path) -> tuple[list[int], int]:
    """The steps of the detector's alarms in the run record, and the count of rule actions."""
    from mxprobe.names import ACTION_KINDS, ALARM_KINDS, SCALER_SKIP
    from mxprobe.record import find_records, read_events

    records = find_records(run_dir)
    events = read_events(records[0]) if records else []
    alarms = [
        int(e["step"])
        for e in events
        if e.get("kind") in ALARM_KINDS and e.get("kind") != SCALER_SKIP
    ]
    return alarms, sum(e.get("kind") in ACTION_KINDS for e in events)


@dataclass(frozen=True)
class CellJob:
    """A cell to train with the study's settings: ``extra`` LightningCLI arguments and the
    divergence rule (``factor``, ``patience``); picklable, for the spawned workers."""

    cell: Cell
    extra: tuple[str, ...]
    factor: float
    patience: int


def train_cell(job: CellJob) -> dict:
    """Train one cell in this (fresh) process and write its result file atomically."""
    from mxprobe.app.training import TrainJob, quiet_lightning, train_run  # Lightning from here

    cell, extra = job.cell, list(job.extra)
    if is_finished(cell, extra):  # finished since the study listed it (another process)
        return cell.result()
    shutil.rmtree(cell.run_dir, ignore_errors=True)  # a killed cell's partial record goes
    cell.run_dir.mkdir(parents=True)
    quiet_lightning()
    train = TrainJob(
        str(cell.config_path),
        str(cell.run_dir),
        tuple(cell.args(extra)),
        stop_on_divergence=True,
        factor=job.factor,
        patience=job.patience,
        threads=1,
    )
    with (
        open(cell.run_dir / "stdout.log", "w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        result = train_run(train)
    alarms, actions = alarm_steps(cell.run_dir)
    return finish_cell(cell, result, alarms, actions, extra)


def finish_cell(
    cell: Cell, result: RunResult, alarms: list[int], actions: int, extra: list[str]
) -> dict:
    """Write the cell's result file atomically: the run's ``result``, its detector's alarms and
    its rules' actions, the arm config's hash and the code's version; returns what it wrote."""
    written = {
        "seed": cell.seed,
        "arm": cell.arm,
        **result.to_row(),
        "first_alarm_step": alarms[0] if alarms else None,
        "alarm_steps": alarms,
        "actions": actions,
        "config_hash": config_hash(cell.config_path, extra),
        "code": _code_version(),
    }
    cell.result_path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(cell.result_path, json.dumps(written, indent=1))
    return written


def _rules(config: dict) -> list[dict]:
    """The rules of an arm config's PrecisionIntervention callbacks."""
    return [
        rule
        for callback in config["trainer"].get("callbacks") or []
        if callback.get("class_path") == INTERVENTION_CLASS
        for rule in (callback.get("init_args") or {}).get("rules") or []
    ]


def acts_only_on_alarms(config: dict) -> bool:
    """Whether every rule of the arm's config fires on the spike detector's alarms only (so
    that, without an alarm, the arm trains exactly as its base arm)."""
    rules = _rules(config)
    return bool(rules) and all((r.get("trigger") or {}).get("kind") == "spike" for r in rules)


def describe_arm(config: dict) -> str:
    """One line for study.md: the arm's scheme and its rules' names."""
    names = [str(r.get("name") or "unnamed") for r in _rules(config)]
    return f"scheme `{config['model']['scheme']}`" + (
        f", rules {', '.join(names)}" if names else ", no rule (spike detector only)"
    )


def derive_cell(cell: Cell, base: str, found: dict, extra: list[str]) -> dict:
    """Write rule-arm ``cell`` from its seed's result ``found`` in the ``base`` arm (no alarm
    there, so no rule fired: the same run) atomically; returns what it wrote."""
    written = {
        **found,
        "arm": cell.arm,
        "wall_s": 0.0,
        "cpu_s": 0.0,
        "config_hash": config_hash(cell.config_path, extra),
        "code": _code_version(),
        "derived_from": base,
    }
    cell.result_path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(cell.result_path, json.dumps(written, indent=1))
    return written


def prepare(out: Path, configs: dict[str, dict]) -> None:
    """Write each arm's config to ``configs/<arm>.yaml``, leaving unchanged files untouched."""
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for arm, config in configs.items():
        path = out / "configs" / f"{arm}.yaml"
        text = yaml.safe_dump(config, sort_keys=False)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)


def execute(
    cells: list[Cell],
    extra: list[str],
    jobs: int,
    factor: float,
    patience: int,
    on_done: Callable[[Cell, dict | None, str | None], None],
    train: Callable[[CellJob], dict] = train_cell,
    ready: Callable[[Cell], bool] = lambda cell: True,
    derive: Callable[[Cell], dict | None] = lambda cell: None,
) -> int:
    """Train the cells ``jobs`` at a time, each in a fresh process (one thread), in order but
    each only once ``ready(cell)``; a cell that ``derive(cell)`` answers with a result is not
    trained. ``on_done`` after each with its result or error. Returns the number of failed
    cells. ``train`` (a module-level function, for the spawned workers) trains one
    :class:`CellJob`; ``jobs=0`` trains in this process, one cell after the other (for tests:
    cells then share torch.compile caches)."""
    failures = 0
    queue = list(cells)

    def next_cell() -> Cell | None:
        """The first ready cell, after writing every ready cell that can be derived."""
        while True:
            cell = next((c for c in queue if ready(c)), None)
            if cell is None:
                return None
            queue.remove(cell)
            derived = derive(cell)
            if derived is None:
                return cell
            on_done(cell, derived, None)

    def finished(cell: Cell, future) -> None:
        nonlocal failures
        try:
            result = future()
        except Exception as err:  # noqa: BLE001 - one failed cell must not stop the study
            failures += 1
            on_done(cell, None, f"{type(err).__name__}: {err}")
        else:
            on_done(cell, result, None)

    def never_ready() -> int:
        for cell in queue:  # its seed's base cell failed: a rerun retries both
            on_done(cell, None, "not run: its seed's base-arm cell did not finish")
        return failures + len(queue)

    if jobs < 1:
        while (cell := next_cell()) is not None:
            job = CellJob(cell, tuple(extra), factor, patience)
            finished(cell, lambda job=job: train(job))
        return never_ready()
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned workers
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max(1, jobs), mp_context=ctx, max_tasks_per_child=1) as pool:
        running: dict = {}
        while True:
            while len(running) < max(1, jobs) and (cell := next_cell()) is not None:
                job = CellJob(cell, tuple(extra), factor, patience)
                running[pool.submit(train, job)] = cell
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                finished(running.pop(future), future.result)
    return never_ready()


@dataclass
class Plan:
    """A study to run or resume: its arms' configs, seeds, output folder and cell settings."""

    configs: dict[str, dict]
    seeds: list[int]
    out: Path
    extra: list[str]
    factor: float
    patience: int
    command: str
    machine: str

    @property
    def arms(self) -> list[str]:
        return list(self.configs)

    @property
    def cells(self) -> list[Cell]:
        return [Cell(self.out, a, s) for s in self.seeds for a in self.arms]

    def finished(self, cell: Cell) -> bool:
        return is_finished(cell, self.extra)

    def rebuild(self) -> None:
        """outcomes.csv, rates.csv, tests.csv and study.md from the finished cells."""
        from mxprobe.app import study_report

        found = study_report.load(
            self.out, self.arms, self.seeds, self.finished, base_arms(self.configs),
            {a: describe_arm(c) for a, c in self.configs.items()},
        )  # fmt: skip
        study_report.write(self.out, found, self.command, self.machine)

    def run(self, jobs: int, log: Callable[[str], None], train=train_cell) -> int:
        """Train the unfinished cells, rebuilding the tables after each; the failure count."""
        prepare(self.out, self.configs)
        pending = [c for c in self.cells if not self.finished(c)]
        log(f"{len(self.cells)} cells, {len(self.cells) - len(pending)} finished, "
            f"{len(pending)} to run with {jobs} job(s) -> {self.out}")  # fmt: skip

        def on_done(cell: Cell, result: dict | None, error: str | None) -> None:
            if error:
                log(f"FAILED {cell.arm} seed {cell.seed}: {error} "
                    f"(log: {cell.run_dir}/stdout.log)")  # fmt: skip
            else:
                state = f"diverged at {result['divergence_step']}" if result["diverged"] else "ok"
                log(f"done {cell.arm} seed {cell.seed}: {state} ({result.get('wall_s')} s)")
            self.rebuild()

        self.rebuild()
        return execute(
            pending, self.extra, jobs, self.factor, self.patience, on_done, train,
            ready=self._base_finished_first, derive=self._derived,
        )  # fmt: skip

    def _base_finished_first(self, cell: Cell) -> bool:
        """A rule cell that may be derived starts after its seed's base cell finished."""
        base = base_arms(self.configs).get(cell.arm)
        return base is None or self.finished(Cell(self.out, base, cell.seed))

    def _derived(self, cell: Cell) -> dict | None:
        """The cell written from its seed's base cell when that raised no alarm, else None."""
        base = base_arms(self.configs).get(cell.arm)
        if base is None:
            return None
        found = Cell(self.out, base, cell.seed).result()
        if found is None or found.get("alarm_steps") != []:
            return None
        return derive_cell(cell, base, found, self.extra)
