"""Memory for quantized GEMM operands, owned by the code that quantizes them.

An MX training step quantizes six transient operands per linear layer. Written into fresh
memory, each one faults in new pages (a 4-16 MiB operand; glibc's heap trimming makes that
cost vary from step to step). An :class:`OperandBuffers` keeps, per thread, one buffer per
operand index and dtype, and its owner passes them as ``quantize_mx(..., out=...)``.

A buffer is handed out again only when nothing refers to its memory any more: a result its
owner kept, a view of one, a tensor autograd saved all count (torch's storage use count, the
test CUDA-graph trees apply before reusing their pooled outputs). When something still does,
the buffer is left to its holder and fresh memory is taken, so a result is never overwritten
while anyone can read it.
"""

from __future__ import annotations

import threading
import weakref

import torch

from mxprobe.kernels.dispatch import writes_in_place

# Every buffer any OperandBuffers holds, on any thread, by id (what status() counts; tensors
# compare elementwise, so they cannot be set members).
_HELD: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_HELD_LOCK = threading.Lock()  # threads add and drop buffers while status() counts them
_OWNERS: weakref.WeakSet = weakref.WeakSet()


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class OperandBuffers(threading.local):
    """Reusable memory for quantized operands; each thread sees buffers of its own.

    Example::

        buffers = OperandBuffers()
        xq = quantize_mx(x, "e4m3", out=buffers.out_for(0, x))
        wq = quantize_mx(w, "e4m3", out=buffers.out_for(1, w))
        y = xq @ wq.t()
    """

    def __init__(self) -> None:
        # (index, dtype) -> (flat buffer, its storage use count when nothing else holds it)
        self._buffers: dict[tuple[int, torch.dtype], tuple[torch.Tensor, int]] = {}
        _OWNERS.add(self)

    def out_for(self, index: int, like: torch.Tensor) -> torch.Tensor | None:
        """An ``out=`` for quantizing ``like`` as operand ``index``: a contiguous tensor of its
        shape and dtype on memory reused from this thread's last request of ``index``, unless
        anything still refers to that memory (then on fresh memory, kept from now on). None
        where a reused buffer saves nothing or cannot be used: off the native CPU kernel
        (CUDA's caching allocator, torch.compile, the torch path) and for an input autograd
        tracks (whose result autograd keeps)."""
        if (torch.is_grad_enabled() and like.requires_grad) or not writes_in_place(like):
            return None
        key = (index, like.dtype)
        held = self._buffers.get(key)
        if held is not None and (held[0].numel() < like.numel() or _use_count(held[0]) > held[1]):
            with _HELD_LOCK:
                _HELD.pop(id(held[0]), None)
            held = None
        if held is None:
            buf = torch.empty(like.numel(), dtype=like.dtype)
            held = self._buffers[key] = (buf, _use_count(buf))
            with _HELD_LOCK:
                _HELD[id(buf)] = buf
        return held[0][: like.numel()].view(like.shape)

    def clear(self) -> None:
        """Drop this thread's buffers (memory still referenced elsewhere stays with its holder)."""
        with _HELD_LOCK:
            for buf, _ in self._buffers.values():
                _HELD.pop(id(buf), None)
        self._buffers.clear()


def free_scratch() -> None:
    """Drop the calling thread's operand buffers, in every :class:`OperandBuffers` (the MX
    modules' among them); the next product allocates afresh."""
    for owner in list(_OWNERS):
        owner.clear()


def scratch_bytes() -> int:
    """Bytes of operand buffers held now, over every thread."""
    with _HELD_LOCK:
        held = list(_HELD.values())
    return sum(buf.numel() * buf.element_size() for buf in held)
