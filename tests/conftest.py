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


class _Registrations:
    """``register_adapter`` that remembers what it registered, to undo it after the test."""

    def __init__(self) -> None:
        self.made: list = []

    def register_adapter(self, cls, kind: str, **kwargs) -> None:
        from mxprobe import adapters

        adapters.register_adapter(cls, kind, **kwargs)
        self.made.append(cls)

    def undo(self) -> None:
        from mxprobe import adapters

        for cls in dict.fromkeys(reversed(self.made)):
            adapters.unregister_adapter(cls)
        self.made.clear()


@pytest.fixture
def registry():
    """Registrations made through it by a test are undone afterwards (user classes only: a
    built-in class registered again would be unregistered too)."""
    made = _Registrations()
    yield made
    made.undo()
