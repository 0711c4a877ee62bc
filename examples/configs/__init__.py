"""The shipped LightningCLI configs: the proxy's (``proxy_*.yaml``) and the LLM's (``llm_*``).

In the repository they live in ``examples/configs/``, where the docs point; an installed mxprobe
has the same files as the package data of ``mxprobe.configs`` (pyproject's ``package-dir``), so
``mxprobe demo`` trains the very configs the docs name, in a clone and from a wheel alike.
"""

from __future__ import annotations

from pathlib import Path

HOME = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """The shipped config ``name``, e.g. ``"proxy_cpu.yaml"``.

    Raises:
        FileNotFoundError: naming ``name`` and the configs that are shipped.
    """
    found = HOME / name
    if not found.is_file():
        shipped = sorted(p.name for p in HOME.glob("*.yaml"))
        raise FileNotFoundError(f"no shipped config {name!r}; expected one of {shipped}")
    return found
