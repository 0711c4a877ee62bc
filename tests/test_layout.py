"""The package layout: one ``mxprobe`` namespace, layers that import only downward, and no
top-level name that collides with a user's own module."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Source folder -> (import prefix, layer); a layer may import only layers <= its own.
LAYERS = {
    "mxprobe/app": ("mxprobe.app", 3),
    "proxy_models": ("mxprobe.models", 2),
    "callbacks": ("mxprobe.callbacks", 1),
    "mxprobe": ("mxprobe", 0),
}
LAYER_PREFIXES = {prefix for prefix, _ in LAYERS.values()}
LAYER_NAMES = {0: "core", 1: "callbacks", 2: "models", 3: "application"}
# Third-party packages the core layer must not import anywhere (not even lazily).
CORE_FORBIDDEN = ("lightning", "pytorch_lightning", "matplotlib")


def _layer_of_module(name: str) -> int | None:
    for prefix, layer in sorted(LAYERS.values(), key=lambda p: -len(p[0])):
        if name == prefix or name.startswith(prefix + "."):
            return layer
    return None


def _source_files() -> list[tuple[Path, str, int]]:
    """(path, dotted module name, layer) of every source file of the package."""
    out = []
    for folder, (prefix, layer) in LAYERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            if layer == 0 and rel.parts[0] == "app":
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            out.append((path, ".".join([prefix, *parts]), layer))
    return out


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, function bodies included."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module
            found.append((node.lineno, name))
            # ``from mxprobe import callbacks`` imports a layer's package too.
            found += [
                (node.lineno, f"{name}.{alias.name}")
                for alias in node.names
                if f"{name}.{alias.name}" in LAYER_PREFIXES
            ]
    return found


def test_layers_import_only_downward():
    violations = []
    for path, module, layer in _source_files():
        for line, name in _imports(path, module):
            target = _layer_of_module(name)
            if target is not None and target > layer:
                violations.append(
                    f"{path.relative_to(REPO)}:{line} ({LAYER_NAMES[layer]}) imports {name} "
                    f"({LAYER_NAMES[target]})"
                )
            if layer == 0 and name.split(".")[0] in CORE_FORBIDDEN:
                violations.append(f"{path.relative_to(REPO)}:{line} (core) imports {name}")
    assert not violations, "\n".join(violations)


# The quantizer backends' room: code outside it imports only the package's public names.
ROOM = "mxprobe.kernels"


def _room_violations(path: Path, module: str) -> list[str]:
    if module == ROOM or module.startswith(ROOM + "."):
        return []
    backends = {p.stem for p in (REPO / "mxprobe" / "kernels").glob("*.py")} - {"__init__"}
    found = [(line, name) for line, name in _imports(path, module) if name.startswith(ROOM + ".")]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == ROOM:
            found += [(node.lineno, f"{ROOM}.{a.name}") for a in node.names if a.name in backends]
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return [f"{where}:{line} imports {name}" for line, name in found]


def test_only_the_kernels_room_reaches_into_its_backends():
    """Everything outside ``mxprobe/kernels/`` (the package, the benchmarks, the examples)
    imports from ``mxprobe.kernels`` itself, never from one of its backend modules."""
    files = [(path, module) for path, module, _ in _source_files()]
    for folder in ("benchmarks", "examples"):
        files += [(path, f"{folder}.{path.stem}") for path in sorted((REPO / folder).rglob("*.py"))]
    violations = [v for path, module in files for v in _room_violations(path, module)]
    assert not violations, "\n".join(violations)


def test_the_room_check_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from mxprobe.kernels import native\nfrom mxprobe.kernels.native import x\n")
    assert len(_room_violations(bad, "mxprobe.bad")) == 2
    assert _room_violations(bad, "mxprobe.kernels.dispatch") == []


def test_the_layer_check_sees_a_violation(tmp_path):
    """The check above must fail on an upward import (here: core importing callbacks)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from mxprobe.callbacks import GradientBiasMonitor\n")
    (name,) = [n for _, n in _imports(bad, "mxprobe.bad") if n.count(".") == 1]
    assert _layer_of_module(name) == 1


# The command-line interface sits on top of the application: the application (training, the
# reports, the study) is what the CLI calls, and never imports the CLI back.
CLI = "mxprobe.app.cli"


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _cli_violations(path: Path, module: str) -> list[str]:
    if _inside(module, CLI) or not _inside(module, "mxprobe.app"):
        return []
    found = [(line, name) for line, name in _imports(path, module) if _inside(name, CLI)]
    # ``from mxprobe.app import cli`` names the package as an imported name.
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "mxprobe.app" and not node.level:
            found += [(node.lineno, f"mxprobe.app.{a.name}") for a in node.names if a.name == "cli"]
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return [f"{where}:{line} imports {name}" for line, name in found]


def test_the_application_does_not_import_the_cli():
    """Nothing under ``mxprobe/app/`` outside ``mxprobe/app/cli/`` imports ``mxprobe.app.cli``
    (function bodies included)."""
    violations = [v for path, module, _ in _source_files() for v in _cli_violations(path, module)]
    assert not violations, "\n".join(violations)


def test_the_cli_check_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from mxprobe.app.cli.errors import UsageError\n"
        "from mxprobe.app import cli\n"
        "def f():\n"
        "    import mxprobe.app.cli.llm\n"
        "    from .cli import errors\n"
    )
    assert len(_cli_violations(bad, "mxprobe.app.bad")) == 4
    assert _cli_violations(bad, "mxprobe.app.cli.bad") == []
    assert _cli_violations(bad, "mxprobe.bad") == []


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_importing_mxprobe_loads_neither_lightning_nor_matplotlib(tmp_path):
    done = _run(
        "import mxprobe, sys; print([m for m in ('lightning', 'matplotlib') if m in sys.modules])",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_users_own_callbacks_module_and_ours_coexist(tmp_path):
    (tmp_path / "callbacks.py").write_text("MINE = True\n")
    (tmp_path / "proxy_models.py").write_text("MINE = True\n")
    done = _run(
        "import callbacks, proxy_models\n"
        "from mxprobe.callbacks import GradientBiasMonitor, PrecisionIntervention\n"
        "from mxprobe.models.student_teacher import ProxyConfig\n"
        "assert callbacks.MINE and proxy_models.MINE\n"
        "print(GradientBiasMonitor.__module__)\n",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "mxprobe.callbacks.grad_bias"


@pytest.mark.parametrize("name", ["callbacks", "proxy_models"])
def test_no_top_level_package_of_ours_shadows_a_user_module(tmp_path, name):
    done = _run(f"import {name}", tmp_path)
    assert done.returncode != 0
    assert "ModuleNotFoundError" in done.stderr
