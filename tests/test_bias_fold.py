"""Exact bias folding for kernels without a bias input."""

import pytest
import torch

from fcpass.matmuls import MAX_FOLD_COLUMNS, fold_bias


def test_float_fold_is_the_biased_matmul():
    x, w, b = torch.randn(6, 32, dtype=torch.float64), torch.randn(32, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x2, w2 = fold_bias(x, w, b)
    assert x2.shape == (6, 33) and w2.shape == (33, 5)
    torch.testing.assert_close(x2 @ w2, x @ w + b)


def test_int8_fold_is_exact_in_int32():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (32, 64), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (64, 16), dtype=torch.int8, generator=g)
    b = torch.randint(-200000, 200000, (16,), dtype=torch.int32, generator=g)
    b[:3] = torch.tensor([127 * 127 * 13, -(2**17), 0], dtype=torch.int32)
    x2, w2 = fold_bias(x, w, b)
    assert x2.dtype == w2.dtype == torch.int8 and x2.shape[1] - 64 <= MAX_FOLD_COLUMNS
    assert torch.equal(torch._int_mm(x2, w2), torch._int_mm(x, w) + b)


def test_int8_fold_refuses_a_bias_it_cannot_hold():
    x, w = torch.zeros(4, 8, dtype=torch.int8), torch.zeros(8, 2, dtype=torch.int8)
    with pytest.raises(ValueError, match="MAX_FOLD_COLUMNS"):
        fold_bias(x, w, torch.tensor([2**30, 0], dtype=torch.int32))
