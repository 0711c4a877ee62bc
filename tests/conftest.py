import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported (Lightning imports it while tests are
# collected), so the CPU interpreter must be chosen here, before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Deterministic, small thread count: the suite must behave the same on a 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality with every NaN equal to every NaN (sign of zero counts)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return False
    ia = a.masked_fill(nan_a, 0).contiguous().view(_int_of(a.dtype))
    ib = b.masked_fill(nan_b, 0).contiguous().view(_int_of(b.dtype))
    return torch.equal(ia, ib)


def _int_of(dtype: torch.dtype) -> torch.dtype:
    return {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[
        dtype
    ]


# The compiled CPU path is tested on purpose in test_quantize_compiled.py; elsewhere it would
# only add compile time.
os.environ.setdefault("MXPROBE_COMPILE", "0")
