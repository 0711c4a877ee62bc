"""GEMM operands quantized into reused buffers (mxprobe.kernels.OperandBuffers, passed as
``quantize_mx(out=...)``): same results as fresh tensors, memory really reused, no sharing
between threads, and never a buffer that something still refers to."""

import threading

import pytest
import torch
from torch import nn

from mxprobe import convert, kernels, mx_matmul
from mxprobe.quantize import quantize_mx

pytestmark = pytest.mark.skipif(not kernels.status().native, reason="no native CPU quantizer here")


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


def test_buffered_operands_give_the_fresh_tensors_results(monkeypatch):
    kernels.free_scratch()
    net, x = _case(0)
    got = _grads(net, x)
    held = kernels.status().scratch_bytes
    assert held > 0
    again = _grads(net, x)  # a second step reuses the same memory
    assert kernels.status().scratch_bytes == held
    # The torch path takes no buffers: fresh tensors throughout, bitwise the same numerics.
    monkeypatch.setenv("MXPROBE_NATIVE", "0")
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


def test_a_result_autograd_keeps_is_never_a_buffer():
    # An input autograd tracks gets no buffer (autograd keeps what quantize_mx returns), and
    # quantize_mx refuses out= for it, as torch's own out= does.
    buffers = kernels.OperandBuffers()
    x = torch.randn(8, 64, requires_grad=True)
    assert buffers.out_for(0, x) is None
    with pytest.raises(RuntimeError, match="automatic differentiation"):
        quantize_mx(x, "e4m3", out=torch.empty(8, 64))
    with torch.no_grad():
        out = buffers.out_for(0, x)
        assert torch.equal(quantize_mx(x, "e4m3", out=out), quantize_mx(x, "e4m3"))


def test_a_kept_operand_keeps_its_values():
    # Whoever keeps a quantized operand must still hold its values after the next operand of
    # the same shape is quantized (the old per-slot scratch overwrote it silently).
    buffers = kernels.OperandBuffers()
    x, y = torch.randn(64, 96), torch.randn(64, 96)
    want = quantize_mx(x, "e4m3")
    kept = quantize_mx(x, "e4m3", out=buffers.out_for(0, x))
    view = quantize_mx(x, "e4m3", out=buffers.out_for(1, x)).t()  # a view keeps it too
    quantize_mx(y, "e4m3", out=buffers.out_for(0, y))
    quantize_mx(y, "e4m3", out=buffers.out_for(1, y))
    assert torch.equal(kept, want) and torch.equal(view.t(), want)


def test_a_buffer_nobody_holds_is_reused():
    buffers = kernels.OperandBuffers()
    x = torch.randn(64, 96)
    first = quantize_mx(x, "e4m3", out=buffers.out_for(0, x)).data_ptr()
    assert quantize_mx(x, "e4m3", out=buffers.out_for(0, x)).data_ptr() == first


def test_out_is_checked():
    x = torch.randn(4, 64)
    wrong_dtype, strided = torch.empty(4, 64, dtype=torch.bfloat16), torch.empty(64, 4).t()
    for bad in (torch.empty(4, 32), wrong_dtype, strided, x):
        with pytest.raises(ValueError, match="out"):
            quantize_mx(x, "e4m3", out=bad)
