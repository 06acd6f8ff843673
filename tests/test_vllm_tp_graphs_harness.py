"""Smoke test of the vllm_tp_graphs harness: real vLLM 0.31 Llama at TP=2 on gloo, SP only, no extra pass."""

import torch

from fcpass.launch import run_ranks
from fcpass.vllm_cpu_llama import LAYERS, compile_and_run, rank_setup

KINDS = ("llama", "llama_bias")
TOKENS = (7, 8, 64, 2048)  # 7: the harness pads to 8 outside the graph, as vLLM's model runner does


def run_kinds(rank, world_size, kinds, tokens):
    return {kind: compile_and_run(rank, world_size, kind, tokens) for kind in kinds}


def test_harness_gives_sequence_parallel_graphs_equal_to_eager_tp():
    per_rank = run_ranks(run_kinds, 2, KINDS, TOKENS, setup=rank_setup, timeout=300)
    for rank, results in enumerate(per_rank):
        for kind, r in results.items():
            before = r["counts_before"]
            # SP split all 5 all_reduce->norm sites: the embedding's, and o_proj/down_proj of each layer
            assert before["vllm.reduce_scatter.default"] == 2 * LAYERS + 1, (kind, rank, before)
            # qkv/gate_up of each layer read an all_gather; one more after the final norm
            assert before["vllm.all_gather.default"] == 2 * LAYERS + 1, (kind, rank, before)
            assert "vllm.all_reduce.default" not in before
            assert r["counts_after"] == before  # no extra pass
            assert r["compilations"] == 1, (kind, rank, r["compilations"])
            assert r["post_grad_calls"] == 1
            assert len(r["outputs"]) == len(r["reference"]) == len(TOKENS)
            for n, got, want, err in zip(TOKENS, r["outputs"], r["reference"], r["max_rel_error"]):
                assert got.shape == want.shape == (n, 256)
                assert err <= 1e-5, (kind, rank, n, err)
                assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    # rank-0-only row-parallel bias: o_proj/down_proj are addmm on rank 0 and mm on rank 1
    mms = [{op: results["llama_bias"]["counts_before"].get(op, 0) for op in ("aten.mm.default", "aten.addmm.default")}
           for results in per_rank]
    assert mms[0] == {"aten.mm.default": 0, "aten.addmm.default": 4 * LAYERS}
    assert mms[1] == {"aten.mm.default": 2 * LAYERS, "aten.addmm.default": 2 * LAYERS}
    for results in per_rank:
        assert results["llama"]["counts_before"]["aten.mm.default"] == 4 * LAYERS
        assert "aten.addmm.default" not in results["llama"]["counts_before"]
    # same inputs on both ranks: TP outputs are replicated
    for kind in KINDS:
        for a, b in zip(per_rank[0][kind]["outputs"], per_rank[1][kind]["outputs"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
