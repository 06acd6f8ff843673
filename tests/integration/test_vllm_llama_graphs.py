"""FlashCommPass on real vLLM Llama graphs (TP=2, gloo) after vLLM 0.31's SequenceParallelismPass.

The model is vLLM's LlamaModel (embedding, 2 decoder layers, final norm);
see devtools.vllm_cpu for how it is built and compiled. fcpass comes in as a user
turns it on: ``fcpass.vllm.compilation_config(...)`` in vLLM's config. Expectation from its
structure, per rank, whatever the rank's bias:
- 5 reduce_scatters: o_proj and down_proj of each layer (fused, 2 per
  layer) and the embedding's (no matmul before it: left alone);
- 5 all_gathers: before qkv_proj and gate_up_proj of each layer (fused, 2
  per layer) and after the final norm (no matmul after it: left alone);
- so no aten.mm/addmm is left: all 8 matmuls are inside fcpass ops.
"llama_3d" has the same sites with views around each matmul.
"""

import pytest

pytestmark = pytest.mark.e2e

# Compared with vLLM's own SequenceParallelismPass/AsyncTPPass, which vLLM >= 0.32 removed (on 0.32 fcpass's
# own split is tested instead: tests/integration/test_sequence_parallel.py).
pytest.importorskip("vllm.compilation.passes.fusion.sequence_parallelism",
                    reason="this vLLM has no SequenceParallelismPass (>= 0.32)")

from support.multirank import shared  # noqa: E402
from devtools.vllm_cpu import LAYERS, MODEL_KINDS, compile_and_run, rank_setup  # noqa: E402
from passes.report import FUSED, NO_MATMUL_CONSUMER, NO_MATMUL_PRODUCER  # noqa: E402

THRESHOLD = 32
TOKENS = (7, 32, 64, 256)  # padded to 8, 32 (at or below the threshold: unfused) and 64, 256 (fused)
RS_FUSED, AG_FUSED = 2 * LAYERS, 2 * LAYERS


def run_with_flashcomm(rank, world_size, kinds):
    import fcpass
    import fcpass.vllm

    results = {}
    for kind in kinds:
        config = fcpass.vllm.compilation_config(fcpass.PassConfig(threshold_tokens=THRESHOLD))
        r = compile_and_run(rank, world_size, kind, TOKENS, compilation_config=config)
        report = r["extra_pass_report"]
        results[kind] = {
            "counts_before": r["counts_before"], "counts_after": r["counts_after"],
            "errors": r["max_rel_error"], "compilations": r["compilations"], "matched": report.matched(),
            "outcomes": sorted(report.kinds()),
            "decisions": r["decisions"], "padded_counts": r["padded_counts"], "outputs": r["outputs"],
            "post_grad_calls": r["post_grad_calls"],
        }
    results["async_tp"] = run_async_tp(rank, world_size, kinds)  # same ranks: one spawn for both
    return results


FLASHCOMM_RUNS = shared(run_with_flashcomm, MODEL_KINDS, setup=rank_setup, timeout=480)


@pytest.fixture(scope="module")
def flashcomm_runs():
    return FLASHCOMM_RUNS()


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_flashcomm_on_vllm_llama_after_sequence_parallelism(flashcomm_runs, kind):
    per_rank = [results[kind] for results in flashcomm_runs]
    for r in per_rank:
        before, after = r["counts_before"], r["counts_after"]
        assert before["vllm.reduce_scatter.default"] == RS_FUSED + 1
        assert before["vllm.all_gather.default"] == AG_FUSED + 1
        assert after["fcpass.mm_reduce_scatter.default"] == RS_FUSED
        assert after["fcpass.all_gather_mm.default"] == AG_FUSED
        assert after["vllm.reduce_scatter.default"] == 1  # the embedding's
        assert after["vllm.all_gather.default"] == 1  # after the final norm
        assert after.get("aten.mm.default", 0) + after.get("aten.addmm.default", 0) == 0
        assert r["outcomes"] == sorted(
            [("mm_reduce_scatter", FUSED)] * RS_FUSED + [("mm_reduce_scatter", NO_MATMUL_PRODUCER)]
            + [("all_gather_mm", FUSED)] * AG_FUSED + [("all_gather_mm", NO_MATMUL_CONSUMER)])
        assert r["compilations"] == 1
        assert max(r["errors"]) <= 1e-5, r["errors"]
        for padded, decisions in zip(r["padded_counts"], r["decisions"]):  # the guard, per prefill size
            path = "fused" if padded > THRESHOLD else "unfused"
            calls = {(op, p): n for (op, p, _), n in decisions.items()}
            assert calls == {("mm_reduce_scatter", path): RS_FUSED, ("all_gather_mm", path): AG_FUSED}, padded
    assert per_rank[0]["decisions"] == per_rank[1]["decisions"]
    fused_per_family = [{family: sum(forms.values()) for family, forms in r["matched"].items()} for r in per_rank]
    assert fused_per_family[0] == fused_per_family[1] == {"mm_reduce_scatter": RS_FUSED, "all_gather_mm": AG_FUSED}
    if kind == "llama_3d":
        assert per_rank[0]["matched"] == {"mm_reduce_scatter": {"vllm/mm+view": RS_FUSED},
                                          "all_gather_mm": {"vllm/mm+view": AG_FUSED}}


def test_rank0_only_bias_gives_different_graphs_and_the_same_protocol(flashcomm_runs):
    """vLLM adds the row-parallel bias on rank 0 only: addmm there, mm on rank 1, the same fused ops."""
    rank0, rank1 = (results["llama_bias"] for results in flashcomm_runs)
    assert rank0["counts_before"]["aten.addmm.default"] == 4 * LAYERS
    assert rank1["counts_before"]["aten.mm.default"] == 2 * LAYERS
    assert rank0["matched"]["mm_reduce_scatter"] == {"vllm/addmm": RS_FUSED}
    assert rank1["matched"]["mm_reduce_scatter"] == {"vllm/mm": RS_FUSED}


def test_tp_outputs_are_replicated_and_the_pass_ran_once_per_rank(flashcomm_runs):
    """Same inputs on both ranks: TP outputs are the same tensors; one graph, one post-grad pass call."""
    import torch

    for kind in MODEL_KINDS:
        rank0, rank1 = (results[kind] for results in flashcomm_runs)
        assert rank0["post_grad_calls"] == rank1["post_grad_calls"] == 1
        for a, b in zip(rank0["outputs"], rank1["outputs"], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert [tuple(o.shape) for o in rank0["outputs"]] == [(n, 256) for n in TOKENS]


def _async_tp_factory():
    from vllm.compilation.passes.fusion.collective_fusion import AsyncTPPass
    from vllm.config import get_current_vllm_config

    return AsyncTPPass(get_current_vllm_config())


def run_async_tp(rank, world_size, kinds):
    """vLLM 0.31's AsyncTPPass on the same graphs. Its symmetric-memory replacements run on CUDA only,
    so the graphs are compiled, not run."""
    return {kind: compile_and_run(rank, world_size, kind, (64,), _async_tp_factory, run_compiled=False)
            for kind in kinds}


FAMILY_OPS = {  # family: (vLLM AsyncTPPass's replacement, fcpass's)
    "mm_reduce_scatter": ("symm_mem.fused_matmul_reduce_scatter.default", "fcpass.mm_reduce_scatter.default"),
    "all_gather_mm": ("symm_mem.fused_all_gather_matmul.default", "fcpass.all_gather_mm.default"),
}


def test_flashcomm_matches_every_site_async_tp_matches(flashcomm_runs):
    table = []
    for kind in MODEL_KINDS:
        for rank in range(2):
            theirs_run, ours_run = flashcomm_runs[rank]["async_tp"][kind], flashcomm_runs[rank][kind]
            assert theirs_run["counts_before"] == ours_run["counts_before"]  # the same SP graph
            for family, (theirs, ours) in FAMILY_OPS.items():
                vllm_sites = theirs_run["counts_after"].get(theirs, 0)
                fcpass_sites = ours_run["counts_after"].get(ours, 0)
                table.append((kind, rank, family, vllm_sites, fcpass_sites))
                assert fcpass_sites >= vllm_sites, (kind, rank, family, fcpass_sites, vllm_sites)
    print("\nkind rank family AsyncTPPass fcpass")
    for row in table:
        print(*row)
