"""The random Hadamard transform: orthogonal, the weight gradient unchanged without
quantization, the token axis padded, and outliers spread over their 16-token group."""

from __future__ import annotations

import pytest
import torch

from mxprobe.hadamard import SIZE, draw_signs, hadamard_matrix, padded_length, random_hadamard


def test_the_matrix_is_symmetric_orthogonal_with_entries_a_quarter():
    h = hadamard_matrix(torch.float64)
    assert torch.equal(h.abs(), torch.full((SIZE, SIZE), 0.25, dtype=torch.float64))
    assert torch.equal(h, h.t())
    assert torch.equal(h @ h.t(), torch.eye(SIZE, dtype=torch.float64))


def test_signs_are_fair_and_reproducible():
    draws = torch.stack([draw_signs(torch.Generator().manual_seed(s)) for s in range(400)])
    assert set(draws.unique().tolist()) == {-1.0, 1.0}
    assert abs(draws.mean().item()) < 0.03  # 6400 fair signs: sd of the mean 0.0125
    assert torch.equal(
        draw_signs(torch.Generator().manual_seed(5)), draw_signs(torch.Generator().manual_seed(5))
    )


@pytest.mark.parametrize("tokens", [16, 37, 64])
def test_the_weight_gradient_is_unchanged_without_quantization(tokens):
    g = torch.Generator().manual_seed(tokens)
    dy = torch.randn(tokens, 24, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, 40, generator=g, dtype=torch.float64)
    signs = draw_signs(g)
    ty, tx = random_hadamard(dy, signs), random_hadamard(x, signs)
    assert ty.shape[0] == tx.shape[0] == padded_length(tokens)
    torch.testing.assert_close(ty.t() @ tx, dy.t() @ x, rtol=1e-12, atol=1e-12)
    # in fp32 the same identity holds to fp32 rounding
    y32 = random_hadamard(dy.float(), signs).t() @ random_hadamard(x.float(), signs)
    torch.testing.assert_close(y32, (dy.t() @ x).float(), rtol=1e-5, atol=1e-4)


def test_it_acts_along_the_axis_in_groups_of_16_and_spreads_an_outlier():
    x = torch.zeros(32, 3)
    x[5, 1] = 8.0
    signs = draw_signs(torch.Generator().manual_seed(0))
    y = random_hadamard(x, signs)
    assert torch.equal(y[:16, 1].abs(), torch.full((16,), 2.0))  # 8 spread as ±8/4 over 16 rows
    assert torch.count_nonzero(y[16:]) == 0 and torch.count_nonzero(y[:, [0, 2]]) == 0
    assert torch.equal(random_hadamard(x.t(), signs, axis=1), y.t())


def test_bad_signs_are_refused():
    with pytest.raises(ValueError, match=r"signs must have shape \(16,\)"):
        random_hadamard(torch.ones(16, 2), torch.ones(8))
