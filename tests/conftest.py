import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported (Lightning imports it while tests are
# collected), so the CPU interpreter must be chosen here, before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Deterministic, small thread count: the suite must behave the same on a 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# The compiled CPU path is tested on purpose in test_quantize_compiled.py; elsewhere it would
# only add compile time.
os.environ.setdefault("MXPROBE_COMPILE", "0")


@pytest.fixture
def registry():
    """Registrations made by a test are undone afterwards."""
    from mxprobe import adapters

    saved = dict(adapters._REGISTRY)
    yield adapters
    adapters._REGISTRY.clear()
    adapters._REGISTRY.update(saved)
    adapters._TWINS.clear()
