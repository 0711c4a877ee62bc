"""GEMM operands quantized into per-thread scratch buffers (native.scratch): same results as
fresh tensors, memory really reused, and no sharing between threads."""

import threading
import types

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


def _case(seed: int) -> tuple[nn.Module, torch.Tensor]:
    # Built from the global generator, so only ever called from the main thread: two threads
    # drawing from it at once would interleave their draws and get other weights.
    torch.manual_seed(seed)
    return convert(Net(), "mxfp8_e4m3"), torch.randn(4, 24, 48)


def _grads(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """One forward/backward: draws nothing from any generator, so it is safe on any thread."""
    net.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    net(x).pow(2).sum().backward()
    return [x.grad] + [p.grad for p in net.parameters()]


def _fresh(x, fmt, *, slot, **kwargs):
    return quantize_mx(x, fmt, **kwargs)


def test_scratch_operands_give_the_fresh_tensors_results(monkeypatch):
    native.free_scratch()
    net, x = _case(0)
    got = _grads(net, x)
    buffers = native._scratch.buffers
    assert {(0, torch.float32), (1, torch.float32)} <= set(buffers)
    ptrs = {k: b.data_ptr() for k, b in buffers.items()}
    again = _grads(net, x)  # a second step reuses the same memory
    assert {k: b.data_ptr() for k, b in native._scratch.buffers.items()} == ptrs
    monkeypatch.setattr(mx_modules, "quantize_operand", _fresh)
    want = _grads(net, x)
    for g, a, w in zip(got, again, want, strict=True):
        assert torch.equal(g, w) and torch.equal(a, w)


def _grads_on_two_threads() -> tuple[dict, dict]:
    """Each seed's gradients computed alone on the main thread, and again (three times) on two
    threads at once. Models and inputs are built here, before the threads start; the threads
    only run forward/backward, each on its own model, so whatever they share is the quantizer."""
    cases = {seed: _case(seed) for seed in (1, 2)}
    want = {seed: _grads(*case) for seed, case in cases.items()}
    start = threading.Barrier(len(cases))
    got, errors = {seed: [] for seed in cases}, []

    def work(seed):
        try:
            start.wait()
            for _ in range(3):
                got[seed].append(_grads(*cases[seed]))
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    return want, got


def _same(want: dict, got: dict) -> bool:
    return all(
        torch.equal(g, w)
        for seed in want
        for step in got[seed]
        for g, w in zip(step, want[seed], strict=True)
    )


def test_threads_have_buffers_of_their_own():
    want, got = _grads_on_two_threads()
    assert _same(want, got)


def test_one_buffer_shared_by_threads_is_caught(monkeypatch):
    # The check above can fail: with one scratch store for every thread (the bug it guards
    # against) the threads overwrite each other's operands and some gradient comes out wrong.
    monkeypatch.setattr(native, "_scratch", types.SimpleNamespace())
    # A race, so try until it shows: each try caught it 36 times in 40 here (2 cores).
    assert any(not _same(*_grads_on_two_threads()) for _ in range(20))


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
