"""NVFP4 training's randomness: the weight-gradient GEMM's random Hadamard transform is the
explicit formula with this step's signs, and the signs and the stochastic rounding are keyed by
(step, micro-batch), so the same batch draws the same values and the next one new ones."""

from __future__ import annotations

import warnings

import pytest
import torch

import mxprobe
from mxprobe import nvfp4_random
from mxprobe.hadamard import random_hadamard


@pytest.fixture(autouse=True)
def _fresh_keys():
    nvfp4_random.seed(0)
    nvfp4_random.set_iteration(0)
    yield
    nvfp4_random.set_iteration(0)


def _linear(scheme: str) -> torch.nn.Linear:
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mxprobe.convert(layer, scheme)
    return layer


def _grads(layer, x, dy) -> torch.Tensor:
    layer.zero_grad()
    layer(x).backward(dy)
    return layer.weight.grad.clone()


def test_the_weight_gradient_is_the_formula_on_rotated_operands():
    layer = _linear("nvfp4,elem=fp32,nvrht=on")
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(40, 48, generator=g), torch.randn(40, 32, generator=g)
    nvfp4_random.set_iteration(3)
    got = _grads(layer, x, dy)
    signs = nvfp4_random.hadamard_signs()

    def q(t):
        return mxprobe.quantize_nvfp4(t, axis=0, tensor_scale="amax")

    want = q(random_hadamard(dy, signs)).t() @ q(random_hadamard(x, signs))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    without = _linear("nvfp4,elem=fp32")
    assert not torch.allclose(got, _grads(without, x, dy), rtol=1e-3, atol=1e-3)
    # the rotation changes what is quantized, not the product: its error stays NVFP4-sized
    exact = dy.t() @ x
    assert (got - exact).norm() < 0.2 * exact.norm()


def test_signs_are_one_per_step_and_rounding_one_stream_per_batch():
    nvfp4_random.set_iteration(5, 1)
    signs = nvfp4_random.hadamard_signs()
    draws = torch.rand(8, generator=nvfp4_random.rounding_generator())
    nvfp4_random.set_iteration(5, 1)
    assert torch.equal(nvfp4_random.hadamard_signs(), signs)
    assert torch.equal(torch.rand(8, generator=nvfp4_random.rounding_generator()), draws)
    nvfp4_random.set_iteration(5, 2)  # next micro-batch: same signs, new rounding noise
    assert torch.equal(nvfp4_random.hadamard_signs(), signs)
    assert not torch.equal(torch.rand(8, generator=nvfp4_random.rounding_generator()), draws)
    steps = {tuple(_signs_at(s).tolist()) for s in range(6, 14)}
    assert len(steps) > 1  # the signs are redrawn every step


def _signs_at(step: int) -> torch.Tensor:
    nvfp4_random.set_iteration(step)
    return nvfp4_random.hadamard_signs()


def test_stochastic_rounding_of_gradients_repeats_within_a_batch_key_and_not_across():
    layer = _linear("nvfp4_recipe")
    g = torch.Generator().manual_seed(2)
    x, dy = torch.randn(40, 48, generator=g), torch.randn(40, 32, generator=g)
    nvfp4_random.set_iteration(7)
    first = _grads(layer, x, dy)
    nvfp4_random.set_iteration(7)
    torch.manual_seed(123)  # torch's global generator plays no part
    assert torch.equal(_grads(layer, x, dy), first)
    nvfp4_random.set_iteration(8)
    assert not torch.equal(_grads(layer, x, dy), first)


def test_the_recipe_turns_the_transform_on_and_the_key_parses():
    recipe = mxprobe.PRESETS["nvfp4_recipe"]
    assert recipe.nvfp4_wgrad_rht == "on"
    rotated = mxprobe.PrecisionScheme.parse("nvfp4,nvrht=on")
    assert rotated.nvfp4_wgrad_rht == "on" and "nvrht=on" in str(rotated)
    assert mxprobe.PrecisionScheme.parse(str(rotated)) == rotated
    with pytest.raises(ValueError, match="nvfp4_wgrad_rht"):
        mxprobe.PrecisionScheme.parse("nvfp4,nvrht=yes")
