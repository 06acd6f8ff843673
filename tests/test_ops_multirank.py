"""Both fused ops on real gloo ranks (generic backend), both sides of the threshold.

Reference: float64, computed per rank from every rank's seeded inputs,
without fcpass and without a collective.
"""

import itertools

import pytest
import torch

from cases import TOLERANCE, Case
from multirank import run_batch, run_ranks
from op_runs import run_cases


def _threshold_sides(m_tokens: int):
    """Just above (fused) and exactly at (unfused) the threshold."""
    return (m_tokens - 1, m_tokens)


def _rs_cases(world_size):
    cases = []
    for m, dtype, bias in itertools.product(
        (world_size, 8 * world_size, 4096), (torch.float32, torch.bfloat16), (False, True)
    ):
        for threshold in _threshold_sides(m):
            cases.append(Case(m=m, k=64, ns=(48,), dtype=dtype, bias=bias, threshold=threshold, seed=len(cases)))
    return cases


def _ag_cases(world_size):
    cases = []
    for m, dtype, bias in itertools.product((1, 7, 64, 2048), (torch.float32, torch.bfloat16), (False, True)):
        for threshold in _threshold_sides(m * world_size):
            cases.append(
                Case(m=m, k=64, ns=(48, 32, 16), dtype=dtype, bias=bias, threshold=threshold, seed=100 + len(cases))
            )
    return cases


def check_results(per_rank):
    for results in zip(*per_rank):
        case = results[0]["case"]
        decisions = {r["decision"] for r in results}
        assert len(decisions) == 1, f"ranks disagree on {case}: {decisions}"
        (op, path, reason) = decisions.pop()
        tokens = case.m * len(per_rank) if op.startswith("all_gather") else case.m + case.pad_rows
        assert path == ("fused" if tokens > case.threshold else "unfused"), (case, path, reason)
        for r in results:
            assert r["error"] <= TOLERANCE[case.dtype], f"{case}: error {r['error']:.2e} on some rank"


@pytest.mark.parametrize("world_size", [2, 4])
def test_ops_match_reference_on_both_sides_of_threshold(world_size):
    per_rank = run_ranks(run_cases, world_size, _rs_cases(world_size), _ag_cases(world_size), timeout=240)
    check_results(per_rank)
    assert len(per_rank[0]) == len(_rs_cases(world_size)) + len(_ag_cases(world_size))


def test_pipeline_chunk_counts_are_exact():
    """Every chunking of the generic pipeline gives the reference (uneven splits included)."""
    import fcpass

    rs = [Case(m=2 * 37, k=40, threshold=0, seed=s) for s in range(2)]
    ag = [Case(m=37, k=40, ns=(24, 8), bias=True, threshold=0, seed=10 + s) for s in range(2)]
    cases = {chunks: (run_cases, (rs, ag, fcpass.PassConfig(pipeline_chunks=chunks))) for chunks in (1, 3, 8, 64)}
    for per_rank in run_batch(cases, 2, timeout=180).values():
        check_results(per_rank)


def test_cuda_backend_without_symmetric_memory_runs_the_generic_pipeline():
    """backend="cuda" on a group without symmetric memory: still fused, via the generic pipeline."""
    import fcpass

    rs = [Case(m=64, k=32, bias=True, threshold=0)]
    ag = [Case(m=16, k=32, ns=(8, 8), bias=True, threshold=0)]
    check_results(run_ranks(run_cases, 2, rs, ag, fcpass.PassConfig(backend="cuda"), timeout=120))


def test_pad_rows_before_the_scatter_keep_the_rank0_bias_off_the_padded_rows():
    """vLLM pads the token count up to a multiple of world_size after the matmul: padded rows must stay 0."""
    rs = [
        Case(m=m, k=32, ns=(24,), dtype=dtype, bias=bias, threshold=threshold, pad_rows=pad, seed=seed)
        for seed, ((m, pad), dtype, bias, threshold) in enumerate(itertools.product(
            ((7, 1), (5, 3)), (torch.float32, torch.bfloat16), (False, True), (0, 64)))
    ]
    check_results(run_ranks(run_cases, 2, rs, [], timeout=120))
