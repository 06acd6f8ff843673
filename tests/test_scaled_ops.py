"""W8A8 and fp8 forms on real gloo ranks (generic backend), both sides of the threshold."""

import pytest
import torch

from multirank import run_ranks
from scaled_runs import QUANT_TOLERANCE, run_scaled_all_gather, run_scaled_reduce_scatter


def _check(per_rank, fused):
    decisions = {r["decision"] for r in per_rank}
    assert len(decisions) == 1, decisions
    assert decisions.pop()[1] == ("fused" if fused else "unfused")
    for r in per_rank:
        assert r["error"] <= QUANT_TOLERANCE, r


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn], ids=["w8a8", "fp8"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_scaled_mm_reduce_scatter_rank0_bias(dtype, fused):
    m = 256
    per_rank = run_ranks(run_scaled_reduce_scatter, 2, dtype, m, 64, 40, m - 1 if fused else m, False)
    _check(per_rank, fused)


def test_w8a8_mm_reduce_scatter_per_token_scale():
    per_rank = run_ranks(run_scaled_reduce_scatter, 2, torch.int8, 128, 64, 40, 0, True)
    _check(per_rank, True)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn], ids=["w8a8", "fp8"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_scaled_all_gather_mm_several_weights(dtype, fused):
    m = 64
    per_rank = run_ranks(run_scaled_all_gather, 2, dtype, m, 64, (40, 24), 2 * m - 1 if fused else 2 * m)
    _check(per_rank, fused)
