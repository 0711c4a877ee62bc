"""ProductScope refuses what it cannot emulate instead of running it in full precision, and
leaves submodules' own code alone."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mxprobe


class Einsum(nn.Module):
    def forward(self, q, k):
        return torch.einsum("bik,bjk->bij", q, k)


class ThreeProducts(nn.Module):
    def forward(self, a, b):
        return (a @ b) @ b @ b


class ForeignLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.other = nn.Linear(4, 4)

    def forward(self, x):
        return F.linear(x, self.other.weight)


class WithChild(nn.Module):
    """Its child's forward computes a product too: the scope must not count it as its own."""

    def __init__(self):
        super().__init__()
        self.child = ThreeProducts()

    def forward(self, a, b):
        scores = a @ b.transpose(-1, -2)
        mixed = self.child(a, torch.eye(4).expand(2, 4, 4))
        return scores @ mixed


def _convert(module, registry):
    registry.register_adapter(type(module), "attention")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mxprobe.convert(module, "a=e4m3")
    return module


@pytest.mark.parametrize(
    "module, error, match",
    [
        (Einsum(), mxprobe.NotEmulatedError, "calls einsum"),
        (ThreeProducts(), RuntimeError, "more activation products"),
        (ForeignLinear(), mxprobe.NotEmulatedError, "not one of its own parameters"),
    ],
)
def test_what_the_scope_cannot_emulate_raises(module, error, match, registry):
    _convert(module, registry)
    x = torch.randn(2, 4, 4)
    with pytest.raises(error, match=match):
        module(x, x) if not isinstance(module, ForeignLinear) else module(x)
    with mxprobe.full_precision(module):  # unscoped: the module's own code as written
        module(x, x) if not isinstance(module, ForeignLinear) else module(x)


def test_a_submodules_products_are_not_the_scoped_modules(registry):
    registry.register_adapter(WithChild, "attention")
    module = WithChild()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mxprobe.convert(module, "a=e4m3")
    a, b = torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    qe = lambda t, axis: mxprobe.quantize_mx(t, "e4m3", axis=axis)  # noqa: E731
    eye = torch.eye(4).expand(2, 4, 4)
    want = qe(qe(a, -1) @ qe(b.transpose(-1, -2), -2), -1) @ qe(((a @ eye) @ eye) @ eye, -2)
    torch.testing.assert_close(module(a, b), want, rtol=1e-6, atol=1e-6)
