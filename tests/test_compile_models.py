"""torch.compile of converted transformers models computes eager's logits bit for bit
(docs/models.md § torch.compile): dense attention with MX products, the per-expert MoE loop (its
data-dependent shapes recompile, then run eagerly) and Bloom's ALiBi attention in the scope."""

from __future__ import annotations

import warnings

import pytest
import torch

import mxprobe
from tests.helpers_hf import pair, tokens

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["llama", "mixtral", "bloom"])
def test_compiled_converted_model_equals_eager_bitwise(name):
    model, _ = pair(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # routers kept in full precision: said, not the subject
        mxprobe.convert(model, "mxfp8_e4m3")
    ids = tokens(seed=3)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        eager = model(ids).logits
        got = compiled(ids).logits
        again = compiled(tokens(seed=4)).logits
        eager_again = model(tokens(seed=4)).logits
    assert torch.equal(got, eager) and torch.equal(again, eager_again)
    # MX really ran: the converted logits differ from full precision's.
    with torch.no_grad(), mxprobe.full_precision(model):
        assert not torch.equal(model(ids).logits, eager)
