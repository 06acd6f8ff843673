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


def run_async_tp(rank, world_size, bias):
    """vLLM 0.31's AsyncTPPass on the same graphs. Its symmetric-memory replacements run on CUDA only,
    so the graphs are compiled, not run."""
    from vllm.compilation.passes.fusion.collective_fusion import AsyncTPPass

    return build_and_compare(rank, world_size, bias, (64,), make_pass=AsyncTPPass, run_compiled=False)["counts"]


FAMILY_OPS = {  # family: (vLLM AsyncTPPass's replacement, fcpass's)
    "mm_reduce_scatter": ("symm_mem.fused_matmul_reduce_scatter.default", "fcpass.mm_reduce_scatter.default"),
    "all_gather_mm": ("symm_mem.fused_all_gather_matmul.default", "fcpass.all_gather_mm.default"),
}


@pytest.mark.parametrize("bias", [False, True], ids=["llama", "llama_bias"])
def test_flashcomm_matches_every_site_async_tp_matches(bias):
    async_tp = run_ranks(run_async_tp, 2, bias, setup=rank_setup, timeout=300)
    flashcomm = run_ranks(run_with_flashcomm, 2, bias, setup=rank_setup, timeout=300)
    for rank in range(2):
        for family, (theirs, ours) in FAMILY_OPS.items():
            vllm_sites = async_tp[rank]["after"].get(theirs, 0)
            fcpass_sites = flashcomm[rank]["counts"]["after"].get(ours, 0)
            assert fcpass_sites >= vllm_sites, (family, rank, fcpass_sites, vllm_sites)
        # the shared baseline: both see the same SP graph
        assert async_tp[rank]["before"] == flashcomm[rank]["counts"]["before"]
    # fcpass rewrites a site the same way on every rank, whatever the rank's bias
    for _, ours in FAMILY_OPS.values():
        assert flashcomm[0]["counts"]["after"].get(ours) == flashcomm[1]["counts"]["after"].get(ours)
