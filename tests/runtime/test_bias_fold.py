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


def test_a_new_weight_at_a_used_address_gets_its_own_fold():
    """The fold cache must not serve another tensor's widened copy because it sits at the same address
    (memory reused after a free; here two tensors over one numpy buffer, each at version 0)."""
    import numpy as np

    x, b = torch.randn(4, 8), torch.randn(6)
    buffer = np.zeros((8, 6), dtype=np.float32)
    for seed in range(3):
        buffer[:] = np.random.default_rng(seed).standard_normal((8, 6))
        w = torch.from_numpy(buffer)  # a new tensor object, same data_ptr, version 0
        x_wide, w_wide = fold_bias(x, w, b)
        torch.testing.assert_close(x_wide @ w_wide, x @ w + b)
