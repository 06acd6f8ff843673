"""fcpass's sequence parallelism on vLLM's Llama (TP=2, gloo) with vLLM's own SP off (0.31) or gone (0.32).

Expectation from the model (embedding, 2 decoder layers, final norm; per rank):
the plain TP graph has 5 all_reduces, each before an RMSNorm: the
embedding's (layer 0's input_layernorm, and layer 0's residual), and
o_proj's and down_proj's of each layer (post_attention_layernorm, then the
next layer's input_layernorm or the final norm, each adding the residual).
SP splits all 5 into reduce_scatters and gathers the 5 norm outputs: before
qkv_proj and gate_up_proj of each layer and after the final norm. Fusion
then takes 2 mm->RS and 2 AG->mm per layer; left alone: the embedding's
reduce_scatter (no matmul before it) and the final all_gather (no matmul
after it). That is the structure vLLM 0.31's SequenceParallelismPass +
fcpass fusion produce; ``test_same_structure_as_vllm_sequence_parallelism``
compares the two op by op.
"""


import pytest

from support.multirank import shared
from devtools.vllm_cpu import LAYERS, compile_and_run, rank_setup
from passes.report import NO_MATMUL_CONSUMER, NO_MATMUL_PRODUCER, SP_BELOW_THRESHOLD, SPLIT

pytestmark = pytest.mark.e2e

THRESHOLD, SP_THRESHOLD = 16, 4
TOKENS = (7, 8, 33, 64)  # odd and even; fused path above 16

RS_FUSED = AG_FUSED = 2 * LAYERS
ALL_REDUCES = 2 * LAYERS + 1
COMPARED_OPS = ("fcpass.mm_reduce_scatter.default", "fcpass.all_gather_mm.default", "vllm.reduce_scatter.default",
                "vllm.all_gather.default", "vllm.all_reduce.default", "vllm_ir.rms_norm.default",
                "vllm_ir.fused_add_rms_norm.default", "aten.mm.default", "aten.addmm.default")


def _config(**overrides):
    import fcpass

    fields = dict(threshold_tokens=THRESHOLD, sequence_parallel=True, sequence_parallel_threshold_tokens=SP_THRESHOLD)
    return fcpass.PassConfig(**{**fields, **overrides})


class SPStructure:
    """FlashCommPass with SP only (families off), then the SP graph's structure as plain data.

    Set as the harness's extra pass; the harness returns ``last_report`` from the rank.
    """

    def __init__(self):
        from passes import FlashCommPass

        self.flashcomm = FlashCommPass(_config(fuse_mm_reduce_scatter=False, fuse_all_gather_mm=False))
        self.last_report = None

    def __call__(self, graph):
        self.flashcomm(graph)
        self.last_report = describe_sp_graph(graph)


def describe_sp_graph(graph):
    import torch

    ops = torch.ops
    norms = {ops.vllm_ir.rms_norm.default: "rms_norm", ops.vllm_ir.fused_add_rms_norm.default: "fused_add_rms_norm"}
    tokens = next(n for n in graph.find_nodes(op="placeholder") if isinstance(n.meta.get("val"), torch.SymInt))
    symbol = tokens.meta["val"].node.expr

    def name(node):
        if node.op != "call_function":
            return node.op
        if node.target.__name__ == "getitem":
            return f"{name(node.args[0])}[{node.args[1]}]"
        return norms.get(node.target, str(node.target))

    def rows(node):
        return str(node.meta["val"].shape[0])

    scatters, norm_calls, gathers = [], [], []
    for node in graph.nodes:
        if node.target == ops.vllm.reduce_scatter.default:
            pad = node.args[0]
            amount = pad.args[1][3].meta["val"].node.expr
            scatters.append({"input": name(pad), "padded": name(pad.args[0]), "shard_rows": rows(node),
                             "pad_at": [int(amount.subs(symbol, n)) for n in (7, 8)]})
        elif node.target in norms:
            norm_calls.append({"norm": norms[node.target], "x": name(node.args[0]), "x_rows": rows(node.args[0]),
                               "residual": name(node.args[1]) if norms[node.target] != "rms_norm" else None,
                               "residual_rows": rows(node.args[1]) if norms[node.target] != "rms_norm" else None})
        elif node.target == ops.vllm.all_gather.default:
            (unpad,) = node.users
            gathers.append({"of": name(node.args[0]), "unpad": (str(unpad.target), unpad.args[1:3], unpad.args[3] is tokens),
                            "then": sorted(name(u) for u in unpad.users)})
    return {"scatters": scatters, "norms": norm_calls, "gathers": gathers,
            "all_reduces": sum(n.target == ops.vllm.all_reduce.default for n in graph.nodes), "tokens": str(symbol)}


def _has_vllm_sequence_parallelism():
    try:
        import vllm.compilation.passes.fusion.sequence_parallelism  # noqa: F401
    except ImportError:
        return False
    return True


def run_sp(rank, world_size):
    import fcpass.vllm

    def summary(r):
        report = r["extra_pass_report"]
        return {"counts_before": r["counts_before"], "counts_after": r["counts_after"], "errors": r["max_rel_error"],
                "compilations": r["compilations"], "decisions": r["decisions"], "report": report}

    runs = {}
    for kind in ("llama", "llama_bias"):
        r = compile_and_run(rank, world_size, kind, TOKENS, vllm_sp=False,
                            compilation_config=fcpass.vllm.compilation_config(_config()))
        runs[kind] = summary(r)
        runs[kind]["report"] = sorted((o.family, o.form, o.kind) for o in r["extra_pass_report"].outcomes)
    runs["structure"] = summary(compile_and_run(rank, world_size, "llama", (7, 8), vllm_sp=False,
                                                extra_pass_factory=SPStructure))
    below = compile_and_run(rank, world_size, "llama", (8,), vllm_sp=False, run_compiled=False,
                            compilation_config=fcpass.vllm.compilation_config(
                                _config(sequence_parallel_threshold_tokens=1000)))
    runs["below"] = summary(below)
    runs["below"]["report"] = below["extra_pass_report"].reasons()
    if _has_vllm_sequence_parallelism():  # vLLM 0.31's own SP, then fcpass fusion only: the reference structure
        runs["vllm_sp"] = summary(compile_and_run(
            rank, world_size, "llama", TOKENS,
            compilation_config=fcpass.vllm.compilation_config(_config(sequence_parallel=False))))
    return runs


SP_RUNS = shared(run_sp, setup=rank_setup, timeout=420)


@pytest.fixture(scope="module")
def sp_runs():
    return SP_RUNS()


@pytest.mark.parametrize("kind", ["llama", "llama_bias"])
def test_sp_then_fusion_on_plain_tp_llama(sp_runs, kind):
    """All 5 all_reduces split; 2 mm->RS and 2 AG->mm fused per layer; outputs equal plain TP; one compilation.

    llama_bias: vLLM adds o_proj/down_proj biases on rank 0 only (addmm there, mm on rank 1): the same
    split and the same fused ops on both ranks.
    """
    per_rank = [runs[kind] for runs in sp_runs]
    for rank, r in enumerate(per_rank):
        before, after = r["counts_before"], r["counts_after"]
        assert before["vllm.all_reduce.default"] == ALL_REDUCES and before["vllm.reduce_scatter.default"] == 0
        assert after["vllm.all_reduce.default"] == 0
        assert after["fcpass.mm_reduce_scatter.default"] == RS_FUSED
        assert after["fcpass.all_gather_mm.default"] == AG_FUSED
        assert after["vllm.reduce_scatter.default"] == 1 and after["vllm.all_gather.default"] == 1
        assert after["aten.mm.default"] + after["aten.addmm.default"] == 0
        row_parallel = "addmm" if kind == "llama_bias" and rank == 0 else "mm"
        column_parallel = "addmm" if kind == "llama_bias" else "mm"
        assert r["report"] == sorted(
            [("sequence_parallel", "vllm", SPLIT)] * ALL_REDUCES
            + [("mm_reduce_scatter", f"vllm/{row_parallel}+pad", "fused")] * RS_FUSED
            + [("mm_reduce_scatter", "vllm/aten.where.self+pad", NO_MATMUL_PRODUCER)]
            + [("all_gather_mm", f"vllm/{column_parallel}+unpad", "fused")] * AG_FUSED
            + [("all_gather_mm", "vllm/-", NO_MATMUL_CONSUMER)])
        assert r["compilations"] == 1
        assert max(r["errors"]) <= 1e-5, r["errors"]
        for n, decisions in zip(TOKENS, r["decisions"]):
            path = "fused" if n > THRESHOLD else "unfused"
            calls = {(op, p): count for (op, p, _), count in decisions.items()}
            assert calls == {("mm_reduce_scatter", path): RS_FUSED, ("all_gather_mm", path): AG_FUSED}, n
    assert per_rank[0]["decisions"] == per_rank[1]["decisions"]


def test_first_layer_residual_and_last_layer(sp_runs):
    """Embedding all_reduce -> scattered (it is layer 0's residual too); every norm on shards; final norm gathered."""
    for runs in sp_runs:
        s = runs["structure"]["report"]
        assert s["all_reduces"] == 0
        shard = s["scatters"][0]["shard_rows"]
        assert shard != s["tokens"]
        # first layer: the embedding's masked lookup is padded and scattered, no matmul before it
        assert s["scatters"][0]["padded"] == "aten.where.self"
        assert [sc["padded"] for sc in s["scatters"][1:]] == ["aten.mm.default"] * (ALL_REDUCES - 1)
        assert s["norms"][0] == {"norm": "rms_norm", "x": "vllm.reduce_scatter.default", "x_rows": shard,
                                 "residual": None, "residual_rows": None}
        # residual: layer 0's first residual is the embedding's shard, then each norm's residual output
        residuals = [n["residual"] for n in s["norms"][1:]]
        assert residuals == ["vllm.reduce_scatter.default"] + ["fused_add_rms_norm[1]"] * (len(residuals) - 1)
        assert all(n["x"] == "vllm.reduce_scatter.default" for n in s["norms"][1:])
        assert {n["x_rows"] for n in s["norms"]} == {n["residual_rows"] for n in s["norms"][1:]} == {shard}
        # gathers: before qkv/gate_up (matmuls), and the last layer's final norm before the graph output
        assert [g["of"] for g in s["gathers"]] == ["rms_norm"] + ["fused_add_rms_norm[0]"] * (ALL_REDUCES - 1)
        assert [g["then"] for g in s["gathers"]] == [["aten.mm.default"]] * (ALL_REDUCES - 1) + [["output"]]
        assert all(g["unpad"] == ("aten.slice.Tensor", (0, 0), True) for g in s["gathers"])
        assert max(runs["structure"]["errors"]) <= 1e-5


def test_padding_to_a_multiple_of_world_size(sp_runs):
    """Each reduce_scatter's input is padded by (-tokens) % 2: one row at 7 tokens, none at 8."""
    for runs in sp_runs:
        scatters = runs["structure"]["report"]["scatters"]
        assert len(scatters) == ALL_REDUCES
        assert all(sc["input"] == "aten.constant_pad_nd.default" and sc["pad_at"] == [1, 0] for sc in scatters)


def test_compile_range_below_the_threshold_is_left_unsplit_and_its_all_reduces_fused(sp_runs):
    """A graph of vLLM's compile range below the SP threshold is not split; matmul -> all_reduce takes its
    row-parallel sites instead (no shape changes: its guard decides per call); the embedding's all_reduce has
    no matmul before it."""
    for runs in sp_runs:
        below = runs["below"]
        after = below["counts_after"]
        assert after["vllm.all_reduce.default"] == 1 and after.get("vllm.reduce_scatter.default", 0) == 0
        assert after["fcpass.mm_all_reduce.default"] == 2 * LAYERS
        assert sorted(below["report"]) == sorted([SP_BELOW_THRESHOLD] * ALL_REDUCES + [NO_MATMUL_PRODUCER])


@pytest.mark.skipif(not _has_vllm_sequence_parallelism(), reason="vLLM >= 0.32 has no SequenceParallelismPass")
def test_same_structure_as_vllm_sequence_parallelism(sp_runs):
    """vLLM 0.31's SP + fcpass fusion vs fcpass SP + fusion: the same collectives, fused ops, norms, matmuls."""
    for runs in sp_runs:
        ours, theirs = runs["llama"], runs["vllm_sp"]
        ours_counts = {op: ours["counts_after"][op] for op in COMPARED_OPS}
        assert ours_counts == {op: theirs["counts_after"][op] for op in COMPARED_OPS}
        assert ours_counts["fcpass.mm_reduce_scatter.default"] == RS_FUSED
        assert max(theirs["errors"]) <= 1e-5
