"""The randomness of NVFP4 training, drawn so that a resumed run draws what the uninterrupted run
drew: the random Hadamard transform's signs and the gradients' stochastic rounding come from
generators keyed by (seed, training step, micro-batch), not from torch's global generator (whose
state a Lightning checkpoint does not carry).

:func:`set_iteration` starts a batch: mxprobe's LightningModules and
:class:`~mxprobe.callbacks.PrecisionIntervention` call it from ``on_train_batch_start`` with
Lightning's ``global_step`` and ``batch_idx`` (both restored on resume); a loop of your own calls
it once per batch. Within a batch:

- :func:`hadamard_signs`: one sign vector per optimizer step, shared by every module (as NVIDIA's
  recipe shares one across layers), keyed by (seed, step);
- :func:`rounding_generator`: one generator per device, keyed by (seed, step, micro-batch, rank),
  consumed by the quantizations in the order the backward pass runs them (fixed for a model).

Without any call, the step stays 0: the signs never change (as Transformer Engine's fixed sign
vector) and each device's rounding generator is one stream from the process start.
"""

from __future__ import annotations

import hashlib
import threading

import torch

from mxprobe.hadamard import draw_signs

_lock = threading.Lock()
_seed = 0
_step = 0
_micro = 0
_signs: dict[torch.device, torch.Tensor] = {}
_rounding: dict[torch.device, torch.Generator] = {}


def _key(*parts: int) -> int:
    """A 63-bit generator seed from ``parts`` (distinct parts give unrelated streams)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def seed(value: int) -> None:
    """Set the seed every key starts from (default 0) and restart the current batch's draws."""
    global _seed
    with _lock:
        _seed = int(value)
        _signs.clear()
        _rounding.clear()


def set_iteration(step: int, micro_batch: int = 0) -> None:
    """Start training batch ``micro_batch`` of optimizer step ``step`` (idempotent: a second call
    with the same numbers before any draw changes nothing)."""
    global _step, _micro
    with _lock:
        _step, _micro = int(step), int(micro_batch)
        _signs.clear()
        _rounding.clear()


def iteration() -> tuple[int, int]:
    """(step, micro_batch) of the batch in progress."""
    return _step, _micro


def hadamard_signs(device: torch.device | str = "cpu") -> torch.Tensor:
    """The random Hadamard transform's 16 signs for this step, on ``device``."""
    device = torch.device(device)
    with _lock:
        if device not in _signs:
            generator = torch.Generator().manual_seed(_key(_seed, _step, 0x5167))
            _signs[device] = draw_signs(generator, device)
        return _signs[device]


def rounding_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """This batch's stochastic-rounding generator for ``device``."""
    device = torch.device(device)
    with _lock:
        if device not in _rounding:
            generator = torch.Generator(device=device)
            generator.manual_seed(_key(_seed, _step, _micro, _rank(), 0x5A))
            _rounding[device] = generator
        return _rounding[device]
