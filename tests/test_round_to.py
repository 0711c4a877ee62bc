"""round_to saturates at the format's largest finite value, as the quantizer promises."""

import pytest
import torch

import mxprobe


@pytest.mark.parametrize("fmt, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_round_to_saturates_instead_of_overflowing(fmt, dtype):
    top = torch.finfo(dtype).max
    big = torch.finfo(torch.float32).max  # finite in fp32, past both formats' range
    x = torch.tensor([top, big, -big, float("inf"), -float("inf"), 1.0])
    got = mxprobe.round_to(x, fmt)
    want = torch.tensor([top, top, -top, float("inf"), -float("inf"), 1.0])
    assert torch.equal(got, want)
    assert torch.isnan(mxprobe.round_to(torch.tensor([float("nan")]), fmt)).all()


def test_round_to_below_the_range_is_the_plain_cast():
    x = torch.randn(4096) * 1000
    assert torch.equal(mxprobe.round_to(x, "fp16"), x.half().float())
    assert torch.equal(mxprobe.round_to(x, "bf16"), x.bfloat16().float())


def test_round_to_bf16_on_fp16_input_saturates_within_fp16():
    """fp16 -> bf16 -> fp16 (bf16 elementwise under 16-mixed): bf16 rounds 65504 up to 65536,
    past fp16, so the saturation point is 65280, the largest value both formats hold."""
    x = torch.tensor([65504.0, 65400.0, -65504.0, 1.0], dtype=torch.float16)
    want = torch.tensor([65280.0, 65280.0, -65280.0, 1.0], dtype=torch.float16)
    assert torch.equal(mxprobe.round_to(x, "bf16"), want)
