"""FlashCommPass on real vLLM Llama graphs (TP=2, gloo) after vLLM 0.31's SequenceParallelismPass.

Expectation from the model (a decoder stack without the embedding, so the
first layer's input is replicated and has no all_reduce/SP split before it):
- mm -> reduce_scatter: o_proj and down_proj of every layer, 2 per layer;
- all_gather -> mm: gate_up_proj of every layer and qkv_proj of every layer
  but the first, 2 per layer - 1;
- one all_gather after the final norm restores the full token rows and feeds
  no matmul: left alone with "no matmul consumer".
"""

import pytest

from multirank import run_ranks
from vllm_tp_model import LAYERS, build_and_compare, rank_setup

THRESHOLD = 32
TOKENS = (8, 16, 32, 64, 256, 1024)  # 3 at or below the threshold, 3 above; all even (SP needs divisible)


def run_with_flashcomm(rank, world_size, bias):
    import fcpass
    from passes import FlashCommPass

    flashcomm = FlashCommPass(fcpass.PassConfig(threshold_tokens=THRESHOLD))
    fcpass.reset_decision_counts()
    result = build_and_compare(rank, world_size, bias, TOKENS, flashcomm)
    outcomes = [(o.family, o.outcome) for o in flashcomm.report.outcomes]
    return {**result, "matched": flashcomm.matched, "outcomes": outcomes, "decisions": fcpass.decision_counts()}


@pytest.mark.parametrize("bias", [False, True], ids=["llama", "llama_bias"])
def test_flashcomm_on_vllm_llama_after_sequence_parallelism(bias):
    per_rank = run_ranks(run_with_flashcomm, 2, bias, setup=rank_setup, timeout=300)
    for r in per_rank:
        before, after = r["counts"]["before"], r["counts"]["after"]
        assert before.get("vllm.reduce_scatter.default") == 2 * LAYERS
        assert before.get("vllm.all_gather.default") == 2 * LAYERS
        assert after.get("fcpass.mm_reduce_scatter.default") == 2 * LAYERS
        assert after.get("fcpass.all_gather_mm.default") == 2 * LAYERS - 1
        assert after.get("vllm.all_gather.default") == 1  # the final one, after the norm
        # the first layer's qkv_proj reads the replicated input: the one matmul left unfused
        assert after.get("aten.mm.default", 0) + after.get("aten.addmm.default", 0) == 1
        assert "vllm.reduce_scatter.default" not in after
        assert sorted(r["outcomes"]) == sorted(
            [("mm_reduce_scatter", "fused")] * (2 * LAYERS)
            + [("all_gather_mm", "fused")] * (2 * LAYERS - 1) + [("all_gather_mm", "no matmul consumer")])
        assert r["compilations"] == 1
        assert max(r["errors"]) <= 1e-5, r["errors"]
        paths = {(op, path) for (op, path, _) in r["decisions"]}
        assert {("mm_reduce_scatter", "fused"), ("mm_reduce_scatter", "unfused"),
                ("all_gather_mm", "fused"), ("all_gather_mm", "unfused")} <= paths
    assert per_rank[0]["decisions"] == per_rank[1]["decisions"]
    if bias:  # vLLM adds the row-parallel bias on rank 0 only: the ranks' graphs differ
        assert per_rank[0]["counts"]["before"] != per_rank[1]["counts"]["before"]
