"""The bad-input corpus (issue 27): every user mistake is refused before any work, in a few lines
that name the bad value, with no traceback; the Python API raises the documented type, naming
the argument or value.

CLI cases run in-process through ``mxprobe.app.cli.main`` (fast); a few run as real processes
to check the exit status, the whole output, and ``--traceback`` / ``MXPROBE_DEBUG=1``.
"""

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import mxprobe
from mxprobe import atomic
from mxprobe.app.cli import main
from tests.proxy_tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
MAX_ERROR_LINES = 4

RULE = {
    "name": "spike-rewind",
    "trigger": {"kind": "spike", "signal": "loss"},
    "action": {"kind": "rewind", "steps": 5, "then": {"kind": "set_scheme", "scheme": "norm=bf16"}},
}


def _with_callbacks(*callbacks) -> dict:
    config = tiny_config(max_steps=2, batch_size=8)
    config["trainer"]["callbacks"] = list(callbacks)
    return config


def _intervention(rule: dict) -> dict:
    return {"class_path": "mxprobe.callbacks.PrecisionIntervention", "init_args": {"rules": [rule]}}


def _spec(**changes) -> dict:
    spec = {"config": "{tiny}", "out": "{tmp}/sweep", "grid": {"seed": [0, 1]}}
    spec.update(changes)
    return {k: v for k, v in spec.items() if v is not None}


# name -> YAML content (a dict, or raw text/bytes) written into the corpus folder.
FILES = {
    "tiny": tiny_config(max_steps=2, batch_size=8),
    "yaml_syntax": "trainer: [unclosed\n",
    "yaml_list": "- 1\n- 2\n",
    "yaml_unknown_key": {**tiny_config(max_steps=2, batch_size=8), "modle": {"width": 8}},
    "rule_kind": _with_callbacks(_intervention({**RULE, "trigger": {"kind": "spikey"}})),
    "rule_scheme": _with_callbacks(
        _intervention({**RULE, "action": {"kind": "set_scheme", "scheme": "norm=bf17"}})
    ),
    "rule_key": _with_callbacks(_intervention({**RULE, "triger": {"kind": "spike"}})),
    "rule_no_trigger": _with_callbacks(_intervention({"name": "r", "action": RULE["action"]})),
    "rule_action": _with_callbacks(_intervention({**RULE, "action": {"kind": "explode"}})),
    "detector_method": _with_callbacks(
        {"class_path": "mxprobe.callbacks.LossSpikeDetector", "init_args": {"method": "psychic"}}
    ),
    "callback_path": _with_callbacks({"class_path": "nowhere.NoSuchCallback"}),
    "callback_arg": _with_callbacks(
        {"class_path": "mxprobe.callbacks.LossSpikeDetector", "init_args": {"treshold": 3}}
    ),
    "sweep_empty_grid": _spec(grid={}),
    "sweep_grid_list": _spec(grid=[1, 2]),
    "sweep_grid_scalar": _spec(grid={"model.lr": 0.001}),
    "sweep_grid_empty_list": _spec(grid={"model.lr": []}),
    "sweep_duplicate": _spec(grid={"model.lr": [0.001, 1.0e-3]}),
    "sweep_duplicate_int_float": _spec(grid={"model.width": [16, 16.0]}),
    "sweep_unknown_key": _spec(grdi={"seed": [0]}),
    "sweep_factor": _spec(factor=-3),
    "sweep_factor_text": _spec(factor="abc"),
    "sweep_patience": _spec(patience=0),
    "sweep_patience_float": _spec(patience=1.5),
    "sweep_stop": _spec(stop_on_divergence="maybe"),
    "sweep_out_list": _spec(out=[1]),
    "sweep_config_missing": _spec(config="{tmp}/missing.yaml"),
    "sweep_config_number": _spec(config=5),
    "sweep_not_mapping": "- grid\n",
    "sweep_yaml_syntax": "grid: {seed: [0\n",
    "sweep_not_utf8": b"grid:\n  seed: [\xff]\n",
    "sweep_grid_scheme": _spec(grid={"model.scheme": ["fp32", "mxbogus"]}),
    "sweep_set_scheme": _spec(set={"model.scheme": "e4m3_bogus"}),
    "sweep_grid_lightning_key": _spec(grid={"model.widht": [8]}),
    "sweep_grid_width": _spec(grid={"model.width": [16, -8]}),
    "sweep_same_dir": _spec(grid={"model.scheme": ["a/b", "a_b"]}),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    """The corpus folder's files by name (and ``tmp``: the folder), for ``str.format``."""
    tmp = tmp_path_factory.mktemp("corpus")
    paths = {"tmp": str(tmp)}
    for name in FILES:
        paths[name] = str(tmp / f"{name}.yaml")
    for name, content in FILES.items():
        path = Path(paths[name])
        if isinstance(content, dict):
            content = yaml.safe_dump(json.loads(json.dumps(content).replace("{tiny}", paths["tiny"])
                                                .replace("{tmp}", str(tmp))))  # fmt: skip
        if isinstance(content, str):
            content = content.encode()
        path.write_bytes(content)
    (tmp / "empty").mkdir()
    (tmp / "empty.ckpt").write_bytes(b"")
    (tmp / "garbage.ckpt").write_bytes(b"PK\x03\x04" + os.urandom(200))
    paths["empty_dir"], paths["empty_ckpt"] = str(tmp / "empty"), str(tmp / "empty.ckpt")
    paths["garbage_ckpt"] = str(tmp / "garbage.ckpt")
    return paths


@pytest.fixture(autouse=True)
def _no_library_logging():
    # Lightning's log handlers keep the stream of the test that first logged; pytest closes it
    # after that test. What Lightning says is not what these tests read.
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)


FIT = ["proxy", "fit", "--config", "{tiny}"]
COMPARE = ["proxy", "compare", "--config", "{tiny}", "--out", "{tmp}/compare"]

# (id, argv, a text the message must contain)
CLI_CASES = [
    ("unknown-command", ["frobnicate"], "frobnicate"),
    ("formats-block-0", ["formats", "--block-size", "0"], "'0'"),
    ("formats-block-negative", ["formats", "--block-size", "-4"], "'-4'"),
    ("formats-block-text", ["formats", "--block-size", "x"], "'x'"),
    ("formats-numel-0", ["formats", "--numel", "0"], "'0'"),
    ("formats-block-over-numel", ["formats", "--block-size", "64", "--numel", "32"], "64"),
    ("formats-block-2^40", ["formats", "--block-size", str(2**40)], str(2**40)),
    ("formats-seed-text", ["formats", "--seed", "x"], "'x'"),
    ("bench-size-0", ["bench", "--size", "0"], "'0'"),
    ("bench-size-negative", ["bench", "--size", "-3"], "'-3'"),
    ("bench-size-float", ["bench", "--size", "1.5"], "'1.5'"),
    ("bench-reps-0", ["bench", "--reps", "0"], "'0'"),
    ("bench-threads-0", ["bench", "--threads", "0"], "'0'"),
    ("bench-device-tpu", ["bench", "--device", "tpu"], "'tpu'"),
    ("bench-device-missing-gpu", ["bench", "--device", "cuda:7"], "cuda:7"),
    ("bench-unknown-flag", ["bench", "--bogus"], "--bogus"),
    ("llm-sizes-flops-nan", ["llm", "sizes", "--flops", "nan"], "'nan'"),
    ("llm-sizes-flops-negative", ["llm", "sizes", "--flops", "-1"], "'-1'"),
    ("llm-sizes-flops-0", ["llm", "sizes", "--flops", "0"], "'0'"),
    ("llm-sizes-flops-inf", ["llm", "sizes", "--flops", "inf"], "'inf'"),
    ("llm-sizes-flops-text", ["llm", "sizes", "--flops", "abc"], "'abc'"),
    ("llm-sizes-unknown", ["llm", "sizes", "huge"], "'huge'"),
    ("llm-sizes-L0", ["llm", "sizes", "L0"], "'L0'"),
    ("llm-unknown-subcommand", ["llm", "frobnicate"], "'frobnicate'"),
    ("llm-fit-lr", ["llm", "fit", "--model.lr=-1", "--trainer.max_steps=1"], "-1"),
    ("llm-fit-scheme", ["llm", "fit", "--model.scheme=mxbogus"], "mxbogus"),
    ("llm-fit-size", ["llm", "fit", "--model.config.size=huge"], "huge"),
    ("llm-fit-final-lr", ["llm", "fit", "--model.final_lr_fraction=2"], "final_lr_fraction"),
    ("report-missing-dir", ["report", "{tmp}/nowhere"], "nowhere"),
    ("report-no-runs", ["report", "{empty_dir}"], "no runs found"),
    ("report-no-args", ["report"], "runs"),
    ("demo-steps-0", ["demo", "--steps", "0"], "'0'"),
    ("demo-jobs-negative", ["demo", "--jobs", "-2"], "'-2'"),
    ("proxy-unknown-subcommand", ["proxy", "frobnicate"], "'frobnicate'"),
    ("fit-config-missing", ["proxy", "fit", "--config", "{tmp}/missing.yaml"], "missing.yaml"),
    ("fit-width-negative", [*FIT, "--model.width=-8"], "-8"),
    ("fit-width-text", [*FIT, "--model.width=abc"], "abc"),
    ("fit-unknown-key", [*FIT, "--model.widht=3"], "widht"),
    ("fit-scheme", [*FIT, "--model.scheme=mxfp9_bogus"], "mxfp9_bogus"),
    ("fit-scheme-format", [*FIT, "--model.scheme=w=e9m9"], "e9m9"),
    ("fit-activation", [*FIT, "--model.activation=foo"], "'foo'"),
    ("fit-init", [*FIT, "--model.init=foo"], "'foo'"),
    ("fit-schedule", [*FIT, "--model.schedule=foo"], "'foo'"),
    ("fit-lr-negative", [*FIT, "--model.lr=-1"], "-1"),
    ("fit-lr-nan", [*FIT, "--model.lr=nan"], "nan"),
    ("fit-lr-zero", [*FIT, "--model.lr=0"], "lr"),
    ("fit-betas", [*FIT, "--model.betas=[1.5,0.9]"], "1.5"),
    ("fit-eps", [*FIT, "--model.eps=-1"], "eps"),
    ("fit-depth-0", [*FIT, "--model.depth=0"], "depth=0"),
    ("fit-warmup", [*FIT, "--model.warmup_steps=-3"], "-3"),
    ("fit-min-lr-ratio", [*FIT, "--model.min_lr_ratio=2"], "min_lr_ratio"),
    ("fit-override", [*FIT, '--model.overrides={{"blocks.*.ln": "norm=bf17"}}'], "bf17"),
    ("fit-max-steps", [*FIT, "--trainer.max_steps=-5"], "-5"),
    ("fit-batch-0", [*FIT, "--data.batch_size=0"], "batch_size=0"),
    ("fit-data-seed", [*FIT, "--data.seed=-1"], "seed=-1"),
    ("fit-noise-text", [*FIT, "--data.noise=abc"], "abc"),
    ("fit-accelerator", [*FIT, "--trainer.accelerator=tpu"], "torch_xla"),  # Lightning says
    ("fit-yaml-syntax", ["proxy", "fit", "--config", "{yaml_syntax}"], "line 1"),
    ("fit-yaml-list", ["proxy", "fit", "--config", "{yaml_list}"], "- 1"),
    ("fit-yaml-unknown-key", ["proxy", "fit", "--config", "{yaml_unknown_key}"], "modle"),
    ("fit-rule-kind", ["proxy", "fit", "--config", "{rule_kind}"], "'spikey'"),
    ("fit-rule-scheme", ["proxy", "fit", "--config", "{rule_scheme}"], "bf17"),
    ("fit-rule-key", ["proxy", "fit", "--config", "{rule_key}"], "triger"),
    ("fit-rule-no-trigger", ["proxy", "fit", "--config", "{rule_no_trigger}"], "trigger"),
    ("fit-rule-action", ["proxy", "fit", "--config", "{rule_action}"], "'explode'"),
    ("fit-detector-method", ["proxy", "fit", "--config", "{detector_method}"], "psychic"),
    ("fit-callback-path", ["proxy", "fit", "--config", "{callback_path}"], "NoSuchCallback"),
    ("fit-callback-arg", ["proxy", "fit", "--config", "{callback_arg}"], "treshold"),
    ("fit-ckpt-missing", [*FIT, "--ckpt_path={tmp}/none.ckpt"], "none.ckpt"),
    ("fit-ckpt-empty", [*FIT, "--ckpt_path={empty_ckpt}"], "empty.ckpt"),
    ("fit-ckpt-garbage", [*FIT, "--ckpt_path={garbage_ckpt}"], "garbage.ckpt"),
    ("compare-bad-scheme", [*COMPARE, "--schemes", "fp32,mxbogus"], "mxbogus"),
    ("compare-escape", [*COMPARE, "--schemes", "../../escape_dir"], "escape_dir"),
    ("compare-seeds-text", [*COMPARE, "--schemes", "fp32", "--seeds", "a,b"], "'a'"),
    ("compare-seeds-repeated", [*COMPARE, "--schemes", "fp32", "--seeds", "0,0"], "'0,0'"),
    ("compare-seeds-empty", [*COMPARE, "--schemes", "fp32", "--seeds", ""], "''"),
    ("compare-schemes-repeated", [*COMPARE, "--schemes", "fp32,fp32"], "fp32"),
    ("compare-schemes-empty", [*COMPARE, "--schemes", ""], "''"),
    ("compare-schemes-trailing", [*COMPARE, "--schemes", "fp32;"], "'fp32;'"),
    ("compare-jobs-0", [*COMPARE, "--schemes", "fp32", "--jobs", "0"], "'0'"),
    ("compare-factor-negative", [*COMPARE, "--schemes", "fp32", "--factor", "-3"], "-3"),
    ("compare-factor-nan", [*COMPARE, "--schemes", "fp32", "--factor", "nan"], "nan"),
    ("compare-factor-1", [*COMPARE, "--schemes", "fp32", "--factor", "1"], "1.0"),
    ("compare-patience-0", [*COMPARE, "--schemes", "fp32", "--patience", "0"], "0"),
    ("compare-patience-text", [*COMPARE, "--schemes", "fp32", "--patience", "x"], "'x'"),
    (
        "compare-config-missing",
        ["proxy", "compare", "--config", "{tmp}/missing.yaml", "--schemes", "fp32"],
        "missing.yaml",
    ),
    ("compare-set-width", [*COMPARE, "--schemes", "fp32", "--set", "model.width=-8"], "-8"),
    ("compare-set-key", [*COMPARE, "--schemes", "fp32", "--set", "model.widht=3"], "widht"),
    ("compare-no-schemes", [*COMPARE], "--schemes"),
    ("sweep-empty-grid", ["sweep", "{sweep_empty_grid}"], "'grid'"),
    ("sweep-grid-list", ["sweep", "{sweep_grid_list}"], "[1, 2]"),
    ("sweep-grid-scalar", ["sweep", "{sweep_grid_scalar}"], "model.lr"),
    ("sweep-grid-empty-list", ["sweep", "{sweep_grid_empty_list}"], "model.lr"),
    ("sweep-duplicate-points", ["sweep", "{sweep_duplicate}"], "0.001"),
    ("sweep-duplicate-int-float", ["sweep", "{sweep_duplicate_int_float}"], "16"),
    ("sweep-unknown-key", ["sweep", "{sweep_unknown_key}"], "grdi"),
    ("sweep-factor-negative", ["sweep", "{sweep_factor}"], "-3"),
    ("sweep-factor-text", ["sweep", "{sweep_factor_text}"], "'abc'"),
    ("sweep-patience-0", ["sweep", "{sweep_patience}"], "0"),
    ("sweep-patience-float", ["sweep", "{sweep_patience_float}"], "1.5"),
    ("sweep-stop-text", ["sweep", "{sweep_stop}"], "'maybe'"),
    ("sweep-out-list", ["sweep", "{sweep_out_list}"], "[1]"),
    ("sweep-config-missing", ["sweep", "{sweep_config_missing}"], "missing.yaml"),
    ("sweep-config-number", ["sweep", "{sweep_config_number}"], "5"),
    ("sweep-not-mapping", ["sweep", "{sweep_not_mapping}"], "sweep_not_mapping"),
    ("sweep-yaml-syntax", ["sweep", "{sweep_yaml_syntax}"], "line 2"),
    ("sweep-not-utf8", ["sweep", "{sweep_not_utf8}"], "utf-8"),
    ("sweep-spec-missing", ["sweep", "{tmp}/nospec.yaml"], "nospec.yaml"),
    ("sweep-grid-scheme", ["sweep", "{sweep_grid_scheme}"], "mxbogus"),
    ("sweep-set-scheme", ["sweep", "{sweep_set_scheme}"], "e4m3_bogus"),
    ("sweep-grid-lightning-key", ["sweep", "{sweep_grid_lightning_key}"], "widht"),
    ("sweep-grid-width", ["sweep", "{sweep_grid_width}"], "-8"),
    ("sweep-same-run-dir", ["sweep", "{sweep_same_dir}"], "a_b"),
    ("sweep-jobs-0", ["sweep", "{tiny}", "--jobs", "0"], "'0'"),
    ("sweep-run-index", ["sweep", "{sweep_duplicate_int_float}", "--run-index", "99"], "16"),
    ("sweep-emit-bad-scheme", ["sweep", "{sweep_grid_scheme}", "--emit-commands"], "mxbogus"),
]


def _error_block(err: str) -> list[str]:
    """The lines from the first that says ``error`` on: what the user reads."""
    lines = err.strip().splitlines()
    first = next((i for i, line in enumerate(lines) if "error" in line.lower()), 0)
    return lines[first:]


@pytest.mark.parametrize("argv, named", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_the_cli_refuses_in_a_few_lines(argv, named, corpus, capsys, monkeypatch):
    monkeypatch.chdir(corpus["tmp"])
    code = main([a.format(**corpus) for a in argv])
    out, err = capsys.readouterr()
    block = _error_block(err)
    assert code != 0, out
    assert "Traceback" not in out + err
    assert 1 <= len(block) <= MAX_ERROR_LINES, err
    assert named in "\n".join(block), err


def test_nothing_was_trained_or_written_outside(corpus):
    tmp = Path(corpus["tmp"])
    assert not (tmp.parent / "escape_dir").exists() and not (tmp / "escape_dir").exists()
    assert not list(tmp.rglob("summary.csv")) and not list(tmp.rglob("results.csv"))
    assert not list(tmp.rglob("*.sqlite"))
    assert not (tmp / "sweep").exists() and not (tmp / "compare").exists()  # not even a folder


def _run(*argv: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mxprobe.app.cli", *argv],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, **env}, timeout=300,
    )  # fmt: skip
    return done, time.perf_counter() - start


def test_a_bad_scheme_in_compare_is_refused_before_training(corpus):
    done, _ = _run(
        "proxy", "compare", "--config", "examples/configs/proxy_cpu.yaml",
        "--schemes", "fp32,mxbogus", "--out", f"{corpus['tmp']}/cmp",
    )  # fmt: skip
    # Before training: no output folder (a timing bound would fail on a loaded machine).
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("mxprobe proxy: error: --schemes:")
    assert "'mxbogus'" in done.stderr and "Traceback" not in done.stderr
    assert not Path(corpus["tmp"], "cmp").exists()


def test_a_process_exits_2_with_one_line(corpus):
    done, _ = _run("proxy", "fit", "--config", corpus["tiny"], "--model.scheme=mxfp9_bogus")
    assert done.returncode == 2 and done.stdout == ""
    assert _error_block(done.stderr) == [done.stderr.strip().splitlines()[-1]]
    assert "'mxfp9_bogus'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "ask",
    [("--traceback",), pytest.param((), marks=pytest.mark.slow)],  # a second CLI process: 5 s
    ids=["flag", "env"],
)
def test_a_traceback_when_asked(ask):
    done, _ = _run("llm", "sizes", "L0", *ask, **({} if ask else {"MXPROBE_DEBUG": "1"}))
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "unknown size 'L0'" in done.stderr


# (id, call, exception type, a text the message must contain)
X = torch.ones(4, 64)
API_CASES = [
    ("quantize-list", lambda: mxprobe.quantize_mx([1.0], "e4m3"), TypeError, "list"),
    ("quantize-format", lambda: mxprobe.quantize_mx(X, "fp9"), ValueError, "'fp9'"),
    ("quantize-format-int", lambda: mxprobe.quantize_mx(X, 5), ValueError, "5"),
    ("quantize-block-0", lambda: mxprobe.quantize_mx(X, "e4m3", block_size=0), ValueError, "0"),
    (
        "quantize-block-negative",
        lambda: mxprobe.quantize_mx(X, "e4m3", block_size=-32),
        ValueError,
        "-32",
    ),
    (
        "quantize-block-float",
        lambda: mxprobe.quantize_mx(X, "e4m3", block_size=1.5),
        ValueError,
        "1.5",
    ),
    (
        "quantize-block-bool",
        lambda: mxprobe.quantize_mx(X, "e4m3", block_size=True),
        ValueError,
        "True",
    ),
    (
        "quantize-block-text",
        lambda: mxprobe.quantize_mx(X, "e4m3", block_size="32"),
        ValueError,
        "'32'",
    ),
    (
        "quantize-block-2^40-torch",
        lambda: mxprobe.quantize_mx(X, "e4m3", block_size=2**40, backend="torch"),
        ValueError,
        str(2**40),
    ),
    (
        "quantize-block-2^40-auto",
        lambda: mxprobe.quantize_mx(X, "e4m3", block_size=2**40),
        ValueError,
        str(2**40),
    ),
    ("quantize-axis-range", lambda: mxprobe.quantize_mx(X, "e4m3", axis=3), IndexError, "3"),
    ("quantize-axis-float", lambda: mxprobe.quantize_mx(X, "e4m3", axis=0.5), TypeError, "0.5"),
    (
        "quantize-scale-mode",
        lambda: mxprobe.quantize_mx(X, "e4m3", scale_mode="up"),
        ValueError,
        "'up'",
    ),
    (
        "quantize-rounding",
        lambda: mxprobe.quantize_mx(X, "e4m3", rounding="sideways"),
        ValueError,
        "'sideways'",
    ),
    (
        "quantize-backend",
        lambda: mxprobe.quantize_mx(X, "e4m3", backend="tpu"),
        ValueError,
        "'tpu'",
    ),
    ("quantize-sparse", lambda: mxprobe.quantize_mx(X.to_sparse(), "e4m3"), TypeError, "sparse"),
    ("quantize-int32", lambda: mxprobe.quantize_mx(X.to(torch.int32), "e4m3"), TypeError, "int32"),
    (
        "quantize-complex",
        lambda: mxprobe.quantize_mx(X.to(torch.complex64), "e4m3"),
        TypeError,
        "complex64",
    ),
    (
        "quantize-float64",
        lambda: mxprobe.quantize_mx(X.to(torch.float64), "e4m3"),
        TypeError,
        "float64",
    ),
    ("quantize-0d", lambda: mxprobe.quantize_mx(torch.tensor(1.0), "e4m3"), ValueError, "0-d"),
    ("convert-string", lambda: mxprobe.convert("hello", "fp32"), TypeError, "str"),
    ("convert-scheme-int", lambda: mxprobe.convert(torch.nn.Linear(4, 4), 123), TypeError, "int"),
    (
        "convert-scheme-unknown",
        lambda: mxprobe.convert(torch.nn.Linear(4, 4), "mxbogus"),
        ValueError,
        "mxbogus",
    ),
    ("scheme-format", lambda: mxprobe.PrecisionScheme.parse("w=e9m9"), ValueError, "e9m9"),
    ("scheme-key", lambda: mxprobe.PrecisionScheme.parse("q=e4m3"), ValueError, "q"),
    ("atomic-mode", lambda: atomic.atomic_open("x", "a").__enter__(), ValueError, "'a'"),
]


def _proxy_module(**kwargs):
    from mxprobe.models.lit import ProxyLitModule

    return ProxyLitModule(depth=1, width=8, **kwargs)


def _llm_module(**kwargs):
    from mxprobe.models.lit_llm import LLMModule

    return LLMModule(**kwargs)


def _detector(**kwargs):
    from mxprobe.callbacks import LossSpikeDetector

    return LossSpikeDetector(**kwargs)


def _intervention_of(rule):
    from mxprobe.callbacks import PrecisionIntervention

    return PrecisionIntervention(rules=[rule])


def _checkpoint(tmp_path, data: bytes):
    from mxprobe.callbacks.checkpoint_io import load_verified

    (tmp_path / "c.ckpt").write_bytes(data)
    return load_verified(tmp_path / "c.ckpt")


def _sweep_spec(tmp_path, **spec):
    from mxprobe.app.cli.sweep import Spec

    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"grid": {"seed": [0]}, **spec}))
    return Spec.load(tmp_path / "s.yaml")


def _record(tmp_path):
    from mxprobe.record import read_record

    return read_record(tmp_path / "nothing")


API_CASES_WITH_FILES = [
    ("proxy-lr", lambda t: _proxy_module(lr=-1), ValueError, "-1"),
    ("proxy-lr-nan", lambda t: _proxy_module(lr=math.nan), ValueError, "nan"),
    ("proxy-betas", lambda t: _proxy_module(betas=(1.0, 0.5)), ValueError, "1.0"),
    ("proxy-schedule", lambda t: _proxy_module(schedule="step"), ValueError, "'step'"),
    ("proxy-scheme", lambda t: _proxy_module(scheme="mxbogus"), ValueError, "mxbogus"),
    ("llm-lr", lambda t: _llm_module(lr=math.inf), ValueError, "inf"),
    ("llm-warmup", lambda t: _llm_module(warmup_fraction=2.0), ValueError, "warmup_fraction"),
    ("llm-weight-decay", lambda t: _llm_module(weight_decay=-0.1), ValueError, "-0.1"),
    ("detector-method", lambda t: _detector(method="psychic"), ValueError, "psychic"),
    (
        "rule-kind",
        lambda t: _intervention_of({**RULE, "trigger": {"kind": "x"}}),
        ValueError,
        "'x'",
    ),
    ("rule-not-mapping", lambda t: _intervention_of("spike->rewind"), ValueError, "spike->rewind"),
    ("checkpoint-empty", lambda t: _checkpoint(t, b""), ValueError, "empty"),
    ("checkpoint-garbage", lambda t: _checkpoint(t, b"not a zip"), ValueError, "c.ckpt"),
    ("sweep-spec-factor", lambda t: _sweep_spec(t, factor=0.5), ValueError, "0.5"),
    ("sweep-spec-grid", lambda t: _sweep_spec(t, grid={"seed": 3}), ValueError, "seed"),
    ("record-missing", _record, OSError, "nothing"),
]


@pytest.mark.parametrize(
    "call, error, named", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES]
)
def test_the_api_refuses_naming_the_value(call, error, named):
    with pytest.raises(error) as refused:
        call()
    assert named in str(refused.value)
    assert len(str(refused.value).splitlines()) <= 2


@pytest.mark.parametrize(
    "call, error, named",
    [c[1:] for c in API_CASES_WITH_FILES],
    ids=[c[0] for c in API_CASES_WITH_FILES],
)
def test_the_api_refuses_naming_the_value_in_files(call, error, named, tmp_path):
    with pytest.raises(error) as refused:
        call(tmp_path)
    assert named in str(refused.value)
    assert len(str(refused.value).splitlines()) <= 2


def test_the_corpus_has_at_least_100_cases():
    assert len(CLI_CASES) + len(API_CASES) + len(API_CASES_WITH_FILES) >= 100
