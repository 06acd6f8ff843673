"""W8A8 and fp8 forms on real gloo ranks (generic backend), both sides of the threshold."""

import pytest
import torch

from support.multirank import shared
from support.scaled_runs import QUANT_TOLERANCE, run_scaled_all_gather, run_scaled_row_parallel


def _check(per_rank, fused):
    decisions = {r["decision"] for r in per_rank}
    assert len(decisions) == 1, decisions
    assert decisions.pop()[1] == ("fused" if fused else "unfused")
    for r in per_rank:
        assert r["error"] <= QUANT_TOLERANCE, r


DTYPES = {"w8a8": torch.int8, "fp8": torch.float8_e4m3fn}
FUSED = {"fused": True, "unfused": False}


def _cases():
    cases = {("per_token", kind): (run_scaled_row_parallel, (kind, torch.int8, 128, 64, 40, 0, True))
             for kind in ("rs", "ar")}
    for dtype_id, dtype in DTYPES.items():
        for fused_id, fused in FUSED.items():
            m = 256
            for kind in ("rs", "ar"):
                cases[(kind, dtype_id, fused_id)] = (run_scaled_row_parallel,
                                                     (kind, dtype, m, 64, 40, m - 1 if fused else m, False))
            m = 64
            cases[("ag", dtype_id, fused_id)] = (run_scaled_all_gather,
                                                 (dtype, m, 64, (40, 24), 2 * m - 1 if fused else 2 * m))
    return cases


SCALED = {key: shared(fn, *args) for key, (fn, args) in _cases().items()}


ROW_PARALLEL = {"mm_reduce_scatter": "rs", "mm_all_reduce": "ar"}


@pytest.mark.parametrize("op", ROW_PARALLEL)
@pytest.mark.parametrize("dtype_id", DTYPES)
@pytest.mark.parametrize("fused_id", FUSED)
def test_scaled_row_parallel_ops_rank0_bias(op, dtype_id, fused_id):
    _check(SCALED[(ROW_PARALLEL[op], dtype_id, fused_id)](), FUSED[fused_id])


@pytest.mark.parametrize("op", ROW_PARALLEL)
def test_w8a8_row_parallel_ops_per_token_scale(op):
    _check(SCALED[("per_token", ROW_PARALLEL[op])](), True)


@pytest.mark.parametrize("dtype_id", DTYPES)
@pytest.mark.parametrize("fused_id", FUSED)
def test_scaled_all_gather_mm_several_weights(dtype_id, fused_id):
    _check(SCALED[("ag", dtype_id, fused_id)](), FUSED[fused_id])
