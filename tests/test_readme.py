"""Every ```python block of README.md runs as written, with the small fixtures it names:
``model`` (a tiny GPT-2: it has an ``lm_head`` and ``ln_*`` norms), ``rules`` (one spike rule)
and ``Trainer`` (Lightning's). Blocks run in order in one namespace, as a reader would."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest

from tests.helpers_hf import gpt2

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.fixture(scope="module")
def namespace():
    rules = [
        {
            "name": "norms-bf16",
            "trigger": {"kind": "spike"},
            "action": {"kind": "set_scheme", "scheme": "norm=bf16"},
        }
    ]
    return {"model": gpt2().eval(), "rules": rules, "Trainer": pl.Trainer}


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(index, namespace):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), namespace)
