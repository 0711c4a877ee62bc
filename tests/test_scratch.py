"""GEMM operands quantized into per-thread scratch buffers (native.scratch): same results as
fresh tensors, memory really reused, and no sharing between threads."""

import threading

import pytest
import torch
from torch import nn

from mxprobe import convert, mx_matmul, native
from mxprobe import modules as mx_modules
from mxprobe.quantize import quantize_mx

pytestmark = pytest.mark.skipif(not native.available(), reason="no native CPU quantizer here")


class Net(nn.Module):
    """Linear layers of three widths (the slots' buffers grow and are reused) and an
    attention-style product of two activations."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(48, 96)
        self.down = nn.Linear(96, 40)
        self.act = nn.GELU()

    def forward(self, x):
        h = self.down(self.act(self.up(x)))  # (batch, seq, 40)
        scores = mx_matmul(h, h.transpose(-1, -2), self.down.mx_scheme)
        return (scores.softmax(-1) @ h).sum(-1)


def _grads(seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    net = convert(Net(), "mxfp8_e4m3")
    x = torch.randn(4, 24, 48, requires_grad=True)
    net(x).pow(2).sum().backward()
    return [x.grad] + [p.grad for p in net.parameters()]


def _fresh(x, fmt, *, slot, **kwargs):
    return quantize_mx(x, fmt, **kwargs)


def test_scratch_operands_give_the_fresh_tensors_results(monkeypatch):
    native.free_scratch()
    got = _grads(0)
    buffers = native._scratch.buffers
    assert {(0, torch.float32), (1, torch.float32)} <= set(buffers)
    ptrs = {k: b.data_ptr() for k, b in buffers.items()}
    again = _grads(0)  # a second step reuses the same memory
    assert {k: b.data_ptr() for k, b in native._scratch.buffers.items()} == ptrs
    monkeypatch.setattr(mx_modules, "quantize_operand", _fresh)
    want = _grads(0)
    for g, a, w in zip(got, again, want, strict=True):
        assert torch.equal(g, w) and torch.equal(a, w)


def test_threads_have_buffers_of_their_own():
    want = {seed: _grads(seed) for seed in (1, 2)}
    got, errors = {}, []

    def work(seed):
        try:
            for _ in range(3):
                got[seed] = _grads(seed)
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for seed in (1, 2):
        assert all(torch.equal(g, w) for g, w in zip(got[seed], want[seed], strict=True))


def test_a_result_autograd_keeps_is_never_a_scratch_buffer():
    # With grad enabled and an input that requires grad, quantize_operand must behave as
    # quantize_mx (a fresh tensor), since autograd may keep what it returns.
    from mxprobe.quantize import quantize_operand

    native.free_scratch()
    x = torch.randn(8, 64, requires_grad=True)
    y = quantize_operand(x, "e4m3", slot=0)
    assert y.requires_grad and not hasattr(native._scratch, "buffers")
    with torch.no_grad():
        z = quantize_operand(x, "e4m3", slot=0)
    assert z.data_ptr() == native._scratch.buffers[(0, torch.float32)].data_ptr()
    assert torch.equal(y.detach(), z)
