"""The three fused ops on real gloo ranks (generic backend), both sides of the threshold.

Reference: float64, computed per rank from every rank's seeded inputs,
without fcpass and without a collective.
"""

import contextlib
import itertools

import pytest
import torch
import torch.distributed as dist

import fcpass
from support.cases import TOLERANCE, Case
from support.multirank import shared
from support.op_runs import run_cases, run_on_group


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


def _ar_cases(world_size):
    """Token counts world_size does not divide as well (an all_reduce shards nothing)."""
    cases = []
    for m, dtype, bias in itertools.product((1, 7, 129, 2048 + 3), (torch.float32, torch.bfloat16), (False, True)):
        for threshold in _threshold_sides(m):
            cases.append(Case(m=m, k=64, ns=(48,), dtype=dtype, bias=bias, threshold=threshold, seed=200 + len(cases)))
    return cases


def check_results(per_rank):
    for results in zip(*per_rank):
        case = results[0]["case"]
        decisions = {r["decision"] for r in results}
        assert len(decisions) == 1, f"ranks disagree on {case}: {decisions}"
        digests = {r.get("digest") for r in results}
        assert len(digests) == 1, f"ranks hold different all_reduce results for {case}"
        (op, path, reason) = decisions.pop()
        tokens = case.m * len(per_rank) if op.startswith("all_gather") else case.m + case.pad_rows
        assert path == ("fused" if tokens > case.threshold else "unfused"), (case, path, reason)
        for r in results:
            assert r["error"] <= TOLERANCE[case.dtype], f"{case}: error {r['error']:.2e} on some rank"


CHUNK_COUNTS = (1, 3, 8, 64)


def _two_rank_cases():
    """Chunk counts, the cuda backend without symmetric memory, and rows padded before the scatter."""
    import fcpass

    chunk_rs = [Case(m=2 * 37, k=40, threshold=0, seed=s) for s in range(2)]
    chunk_ag = [Case(m=37, k=40, ns=(24, 8), bias=True, threshold=0, seed=10 + s) for s in range(2)]
    chunk_ar = [Case(m=2 * 37 + 1, k=40, bias=True, dtype=dtype, threshold=0, seed=60 + s)
                for s, dtype in enumerate((torch.float32, torch.bfloat16))]
    cuda_rs = [Case(m=64, k=32, bias=True, threshold=0)]
    cuda_ag = [Case(m=16, k=32, ns=(8, 8), bias=True, threshold=0)]
    pad_rs = [
        Case(m=m, k=32, ns=(24,), dtype=dtype, bias=bias, threshold=threshold, pad_rows=pad, seed=seed)
        for seed, ((m, pad), dtype, bias, threshold) in enumerate(itertools.product(
            ((7, 1), (5, 3)), (torch.float32, torch.bfloat16), (False, True), (0, 64)))
    ]
    return {
        **{("chunks", c): shared(run_cases, chunk_rs, chunk_ag, fcpass.PassConfig(pipeline_chunks=c), chunk_ar)
           for c in CHUNK_COUNTS},
        "cuda": shared(run_cases, cuda_rs, cuda_ag, fcpass.PassConfig(backend="cuda"), chunk_ar),
        "pad_rows": shared(run_cases, pad_rs, []),
        "collectives": shared(_by_collectives, chunk_rs + pad_rs, chunk_ag, chunk_ar),
    }


def _by_collectives(rank, world_size, rs_cases, ag_cases, ar_cases):
    """The generic pipeline's per-chunk collectives (its way on device groups), forced on gloo, at 1-8 chunks."""
    from fcpass.backends.generic import collectives_everywhere

    with collectives_everywhere():
        return [result for chunks in (1, 3, 8)
                for result in run_cases(rank, world_size, rs_cases, ag_cases, fcpass.PassConfig(pipeline_chunks=chunks),
                                        ar_cases)]


def _on_subgroups(rank, world_size, rs_cases, ag_cases, ar_cases):
    """The cases on 2-rank subgroups of 4 ranks, [0, 2] and [1, 3]: group ranks differ from global ranks."""
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # every rank creates both, in the same order
    group = groups[rank % 2]
    group_rank, size = dist.get_rank(group), dist.get_world_size(group)
    fcpass.configure(fcpass.PassConfig())
    return run_on_group(group_rank, size, group.group_name, rs_cases, ag_cases, ar_cases)


def _on_one_rank_groups(rank, world_size, rs_cases, ag_cases, ar_cases):
    """The cases on a group of one rank (each rank its own), by exchange and by the per-chunk collectives."""
    from fcpass.backends.generic import collectives_everywhere

    groups = [dist.new_group([r]) for r in range(world_size)]  # every rank creates all, in the same order
    name = groups[rank].group_name
    results = []
    for pipeline in (contextlib.nullcontext, collectives_everywhere):
        fcpass.configure(fcpass.PassConfig(pipeline_chunks=3))
        with pipeline():
            results += run_on_group(0, 1, name, rs_cases, ag_cases, ar_cases)
    return results


ONE_RANK_GROUPS = shared(
    _on_one_rank_groups,
    [Case(m=37, k=40, bias=True, threshold=threshold, pad_rows=pad, seed=40 + i)
     for i, (threshold, pad) in enumerate(itertools.product((0, 1 << 20), (0, 2)))],
    [Case(m=37, k=40, ns=(24, 8), bias=True, threshold=threshold, seed=50 + i)
     for i, threshold in enumerate((0, 1 << 20))],
    [Case(m=37, k=40, bias=True, threshold=threshold, seed=70 + i) for i, threshold in enumerate((0, 1 << 20))],
)
SUBGROUPS = shared(
    _on_subgroups,
    [Case(m=2 * 37, k=40, dtype=dtype, bias=True, threshold=threshold, seed=20 + i)
     for i, (dtype, threshold) in enumerate(itertools.product((torch.float32, torch.bfloat16), (0, 1 << 20)))],
    [Case(m=37, k=40, ns=(24, 8), bias=True, threshold=threshold, seed=30 + i)
     for i, threshold in enumerate((0, 1 << 20))],
    [Case(m=37, k=40, bias=True, threshold=threshold, seed=80 + i) for i, threshold in enumerate((0, 1 << 20))],
    world_size=4,
)
BOTH_SIDES = {ws: shared(run_cases, _rs_cases(ws), _ag_cases(ws), None, _ar_cases(ws), world_size=ws, timeout=240)
              for ws in (2, 4)}
TWO_RANKS = _two_rank_cases()


@pytest.mark.parametrize("world_size", [2, 4])
def test_ops_match_reference_on_both_sides_of_threshold(world_size):
    per_rank = BOTH_SIDES[world_size]()
    check_results(per_rank)
    assert len(per_rank[0]) == len(_rs_cases(world_size)) + len(_ag_cases(world_size)) + len(_ar_cases(world_size))


def test_pipeline_chunk_counts_are_exact():
    """Every chunking of the generic pipeline gives the reference (uneven splits included)."""
    for chunks in CHUNK_COUNTS:
        check_results(TWO_RANKS[("chunks", chunks)]())


def test_cuda_backend_without_symmetric_memory_runs_the_generic_pipeline():
    """backend="cuda" on a group without symmetric memory: still fused, via the generic pipeline."""
    check_results(TWO_RANKS["cuda"]())


def test_pad_rows_before_the_scatter_keep_the_rank0_bias_off_the_padded_rows():
    """vLLM pads the token count up to a multiple of world_size after the matmul: padded rows must stay 0."""
    check_results(TWO_RANKS["pad_rows"]())


def test_ops_on_a_subgroup_address_peers_by_group_rank():
    """Fused and unfused on subgroups [0, 2] and [1, 3]: the pipeline's sends go to group ranks, not global ones."""
    per_rank = SUBGROUPS()
    for group_results in (per_rank[0::2], per_rank[1::2]):
        check_results(group_results)


def test_the_collective_pipeline_of_device_groups_is_exact():
    """nccl/hccl groups run one collective per chunk (no point-to-point): forced on gloo, it gives the reference."""
    check_results(TWO_RANKS["collectives"]())


def test_ops_on_a_one_rank_group_are_the_local_matmul():
    """World size 1 (a TP group of one): fused and unfused, every pipeline, exact (it used to raise IndexError)."""
    per_rank = ONE_RANK_GROUPS()
    for results in per_rank:
        check_results([results])
