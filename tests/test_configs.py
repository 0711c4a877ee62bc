"""Every YAML shipped under examples/ parses against the code, so configs cannot drift.

Each file is matched to the command that reads it: ``llm_*.yaml`` to ``mxprobe llm`` (parsed by
its LightningCLI without building the trainer, since the paper config asks for GPUs; then the
model config, scheme, overrides and every callback are constructed), ``configs/proxy_*.yaml``
to ``mxprobe proxy`` (its LightningCLI with ``run=False``), and sweep specs (a ``grid`` key) to
``mxprobe sweep`` (every grid value parsed into the base config at least once). A proxy or sweep
file is skipped, with the reason, only when its command's modules do not import. A YAML no
rule matches fails: teach this test about it.
"""

import importlib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "examples").rglob("*.yaml")) + sorted((REPO / "examples").rglob("*.yml"))


def _kind(path: Path) -> str | None:
    if path.name.startswith("llm_"):
        return "llm"
    if path.parent.name == "configs" and path.name.startswith("proxy_"):
        return "proxy"
    if "grid" in (yaml.safe_load(path.read_text()) or {}):
        return "sweep"
    return None


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        pytest.skip(f"{module} does not import ({err}); its configs cannot be checked")


def _construct(class_path: str, init_args: dict):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)(**init_args)


def _check_llm(path: Path) -> None:
    from mxprobe.models.llm import LLMConfig, count_parameters

    from mxprobe.app.cli.llm import LLMCLI, llm_cli
    from mxprobe.scheme import PrecisionScheme, validate_overrides

    class ParseOnly(LLMCLI):
        def instantiate_classes(self) -> None:  # a GPU config must parse on a CPU machine too
            pass

    config = llm_cli(["--config", str(path)], run=False, cli_class=ParseOnly).config
    model = config.model
    llm_config = LLMConfig(**(model.config.as_dict() if model.config else {}))
    assert count_parameters(llm_config) > 0
    PrecisionScheme.parse(model.scheme)
    validate_overrides(model.overrides)
    for callback in config.trainer.callbacks or []:
        init_args = callback.init_args.as_dict() if callback.get("init_args") else {}
        _construct(callback.class_path, init_args)


def _check_proxy(path: Path, tmp_path: Path) -> None:
    training = _import("mxprobe.app.training")
    cli = training.proxy_cli(
        ["--config", str(path), f"--trainer.default_root_dir={tmp_path}"], run=False
    )
    assert cli.model is not None and cli.trainer is not None


def _check_sweep(path: Path, tmp_path: Path) -> None:
    sweep = _import("mxprobe.app.cli.sweep")
    training = _import("mxprobe.app.training")
    spec = sweep.Spec.load(path)
    base = ["--config", str(spec.config)] if spec.config else []
    cli = training.proxy_cli([*base, f"--trainer.default_root_dir={tmp_path}"], run=False)
    # Each grid value at least once: combining them adds no type information.
    keys = list(spec.grid)
    for i in range(max(len(values) for values in spec.grid.values())):
        point = {k: spec.grid[k][i % len(spec.grid[k])] for k in keys}
        cli.parser.parse_args([*base, *spec.cli_args(point)])


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_shipped_yaml_parses_against_the_code(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a constructor creates lands here
    kind = _kind(path)
    assert kind is not None, f"{path}: no known command reads this YAML; add it to test_configs.py"
    if kind == "llm":
        _check_llm(path)
    elif kind == "proxy":
        _check_proxy(path, tmp_path)
    else:
        _check_sweep(path, tmp_path)


def test_the_llm_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"llm_tiny_cpu.yaml", "llm_paper_gpu.yaml"} <= names
