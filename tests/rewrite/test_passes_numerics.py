"""Rewritten graphs compute what the originals compute, on 2 real gloo ranks.

Graphs are traced per rank, as vLLM compiles per rank: rank 0's row-parallel
graph has addmm (its bias) where rank 1's has mm. Both must become the same
op protocol: no hang, and the sum equals the unfused one. The fused path here
is forced on CPU by ``threshold_tokens`` (by default mm_all_reduce stays on
its plain path on CPU: benchmarks/README.md).
"""

import copy

import torch
import torch.distributed as dist

from support.multirank import shared
from passes import report as outcomes

THRESHOLD = 16


def run_rewritten_vs_original(rank, world_size):
    import fcpass
    from support.hand_graphs import (
        FP8, K, N, ag_3d_mm, ag_mm, ag_npu_quant_mm, ag_unpad_tokens_mm, count, linear_rs, mm_3d_rs, mm_ar, mm_pad_rs,
        mm_rs, mm_sum_rs, npu_quant_mm_ar, npu_quant_mm_rs, quant_inputs, scaled_mm_rs,
    )
    from passes import FlashCommPass

    group = dist.group.WORLD.group_name
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    w_wide = torch.randn(N, 2 * K, generator=g)  # a sum's second product: another k
    ws = [torch.randn(N + i, K, generator=g) for i in range(2)]
    bs = [torch.randn(N + i, generator=g) for i in range(2)]
    fp8_args = (w.to(FP8), torch.tensor(0.5), torch.tensor(0.25), b.to(torch.bfloat16))
    _, in_scale, quant_w = quant_inputs(1, num_weights=2, seed=rank)  # row-parallel: weights differ per rank
    rank0_bias = [(qw, scale, qb if rank == 0 else None) for qw, scale, qb in quant_w[:1]]

    def shard(x):
        return x[: x.shape[0] // world_size]

    graphs = {  # name: (graph, inputs from x, tolerance)
        "rs": (mm_rs("c10d_functional", bias=(rank == 0), group=group), lambda x: (x, w, b), 1e-5),
        "ag": (ag_mm("c10d_functional", bias=True, group=group), lambda x: (x[: x.shape[0] // world_size], ws, bs),
               1e-5),
        "ag_unpad": (ag_mm("c10d_functional", bias=True, group=group, unpad_to=5, other_user=False),
                     lambda x: (x[: x.shape[0] // world_size], ws, bs), 1e-5),
        "rs_vllm_ascend_gemm": (linear_rs("unquantized_gemm", "c10d_functional", bias=(rank == 0), group=group),
                                lambda x: (x, w, b), 1e-5),
        "rs_fp8": (scaled_mm_rs("c10d_functional", bias=(rank == 0), group=group),
                   lambda x: (x.to(FP8), *fp8_args), 2e-2),
        # vLLM MoE model-level SP: one token short of a multiple of world_size, padded by one zero row
        "rs_pad": (mm_pad_rs("c10d_functional", bias=(rank == 0), group=group), lambda x: (x[:-1], w, b), 1e-5),
        "ag_unpad_tokens": (ag_unpad_tokens_mm("c10d_functional", group=group),
                            lambda x: (shard(x), torch.arange(x.shape[0] - 1), *ws), 1e-5),
        # Falcon: two products of the same tokens summed, then scattered (rank 0's second product has the bias)
        "rs_sum": (mm_sum_rs("c10d_functional", bias=(rank == 0), group=group),
                   lambda x: (x, torch.cat([x.flip(0), x], 1), w, w_wide, b), 1e-5),
        "rs_sum_addmm": (mm_sum_rs("c10d_functional", bias=(rank == 0), group=group, addmm_term=True),
                         lambda x: (x, torch.cat([x.flip(0), x], 1), w, w_wide, b), 1e-5),
        "rs_sum_pad": (mm_sum_rs("c10d_functional", bias=(rank == 0), group=group, pad=True),
                       lambda x: (x[:-1], torch.cat([x.flip(0), x], 1)[:-1], w, w_wide, b), 1e-5),
        "rs_3d": (mm_3d_rs("c10d_functional", bias=(rank == 0), group=group), lambda x: (x, w, b), 1e-5),
        "ag_3d": (ag_3d_mm("c10d_functional", group=group), lambda x: (shard(x), *ws), 1e-5),
        "rs_npu_quant": (npu_quant_mm_rs("c10d_functional", bias=(rank == 0), group=group),
                         lambda x: (x, in_scale, rank0_bias), 2e-2),
        "ag_npu_quant": (ag_npu_quant_mm("c10d_functional", group=group),
                         lambda x: (shard(x), in_scale, quant_w), 2e-2),
        "ag_vllm_quantize": (ag_npu_quant_mm("c10d_functional", group=group, quantize="vllm"),
                             lambda x: (shard(x), in_scale, quant_w), 2e-2),
        # matmul -> all_reduce: token counts world_size need not divide (63 of them, from 64)
        "ar": (mm_ar("c10d_functional", bias=(rank == 0), group=group), lambda x: (x[1:], w, b), 1e-5),
        "ar_3d": (mm_ar("c10d_functional", bias=(rank == 0), matmul="linear_3d", group=group),
                  lambda x: (x, w, b), 1e-5),
        "ar_fp8": (mm_ar("c10d_functional", bias=(rank == 0), matmul="scaled_mm", group=group),
                   lambda x: ((x.to(FP8), fp8_args[1]), (fp8_args[0], fp8_args[2]), fp8_args[3]), 2e-2),
        "ar_npu_quant": (npu_quant_mm_ar("c10d_functional", bias=(rank == 0), group=group),
                         lambda x: (x, in_scale, rank0_bias), 2e-2),
    }
    results = {}
    for name, (original, make_args, tolerance) in graphs.items():
        rewritten = copy.deepcopy(original)
        FlashCommPass(fcpass.PassConfig(threshold_tokens=THRESHOLD))(rewritten.graph)
        rewritten.recompile()
        fused_ops = sum(count(rewritten, op.default) for op in (
            torch.ops.fcpass.mm_reduce_scatter, torch.ops.fcpass.all_gather_mm, torch.ops.fcpass.mm_reduce_scatter_scaled,
            torch.ops.fcpass.all_gather_scaled_mm, torch.ops.fcpass.mm_all_reduce, torch.ops.fcpass.mm_all_reduce_scaled,
            torch.ops.fcpass.mm_sum_reduce_scatter))
        for m in (8, 64):  # below and above the threshold
            x = torch.randn(m, K, generator=torch.Generator().manual_seed(rank + m))
            fcpass.reset_decision_counts()
            got, want = rewritten(*make_args(x)), original(*make_args(x))
            got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
            assert all(a.shape == e.shape for a, e in zip(got, want, strict=True)), name
            error = max(((a.double() - e.double()).abs().max() / e.double().abs().max()).item()
                        for a, e in zip(got, want, strict=True))
            results[(name, m)] = {"error": error, "tolerance": tolerance, "fused_ops": fused_ops,
                                  "decisions": fcpass.decision_counts()}
    return results


REWRITTEN = shared(run_rewritten_vs_original)


def test_rewritten_graphs_equal_originals_with_rank0_bias():
    per_rank = REWRITTEN()
    for key in per_rank[0]:
        decisions = [r[key]["decisions"] for r in per_rank]
        assert decisions[0] == decisions[1], key  # same protocol on both ranks
        (path,) = {p for (_, p, _) in decisions[0]}
        tokens = key[1] - (key[0] == "ar")  # rows entering the matmul on every rank, for every family here
        assert path == ("fused" if tokens > THRESHOLD else "unfused"), key
        for r in per_rank:
            assert r[key]["fused_ops"] == 1
            assert r[key]["error"] <= r[key]["tolerance"], (key, r[key]["error"])


def run_mismatched_group(rank, world_size):
    import fcpass
    from support.hand_graphs import count, mm_rs
    from passes import FlashCommPass

    gm = mm_rs("c10d_functional", group=dist.group.WORLD.group_name, world_size=2 * world_size)
    p = FlashCommPass(fcpass.PassConfig())
    p(gm.graph)
    return {"fused": count(gm, torch.ops.fcpass.mm_reduce_scatter.default),
            "outcomes": p.last_report.reasons(), "text": [o.outcome for o in p.last_report.outcomes],
            "group": dist.group.WORLD.group_name}


MISMATCHED = shared(run_mismatched_group)


def test_collective_whose_world_size_disagrees_with_its_group_is_left_alone():
    for r in MISMATCHED():
        assert r["fused"] == 0
        assert r["outcomes"] == [outcomes.GROUP_MISMATCH]
        assert f"world_size 4, group {r['group']!r} of size 2" in r["text"][0]
