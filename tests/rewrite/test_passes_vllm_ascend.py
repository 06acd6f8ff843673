"""vllm-ascend's padding collectives (``vllm.maybe_pad_and_reduce`` and
``vllm.maybe_all_gather_and_maybe_unpad``), on 2 real ranks with vLLM's TP group, on each release.

The ops are vllm-ascend's own (the release built for the vLLM under test): its registrations, fakes and
kernels (run on CPU tensors, tests/support/vllm_ascend_code.py), in its own forward context
(``set_ascend_forward_context``). On 0.23 they are FlashComm v1's on the TP group (on above 1000 tokens,
``pad_size`` up to the TP size, or under DP up to the largest count across DP ranks): they take their group and
padding from vLLM/vllm-ascend state rather than arguments, so the pass reads the TP group at compile time and
the fused ops read FlashComm's switch and ``pad_size`` at run time, as the originals do. Its MoE calls them with
``is_ep_comm=True`` (the EP group), and 0.30's are EP only (its MoE prepare/finalize; dense sequence
parallelism moved to vLLM's model-level SP): those are left alone with the reason, their numbers the same bits.
Unverified on Ascend hardware.
"""

import copy

import pytest
import torch

from support import vllm_ascend_code as ascend
from support.multirank import shared

K, N = 32, 24
THRESHOLDS = (16, 1536)  # FlashComm's forwards (> 1000 tokens) above the low one; on both sides of the high one
# (tokens, DP padded length). 0.23: FlashComm off (<= 1000 tokens), on with TP padding, on with DP padding.
# 0.30: its EP collectives (no padding without DP: token counts the world size divides)
RUNS = (((7, None), (700, None), (1000, None), (1001, None), (1002, None), (2047, None), (2048, None),
         (2047, 2052)) if ascend.TP_FLASHCOMM else ((8, None), (700, None), (1002, None), (2048, None)))


# vllm-ascend ops that support/hand_graphs.py registers itself (its form tests run where vllm-ascend is not loaded)
STANDIN_OPS = ("unquantized_gemm", "quantize")


def _graphs(rank):
    from torch.fx.experimental.proxy_tensor import make_fx

    def rs(x, w, b):
        y = torch.addmm(b, x, w.t()) if rank == 0 else torch.mm(x, w.t())  # rank-0-only row-parallel bias
        return torch.relu(ascend.pad_and_reduce(y))

    def ag(x, w1, w2):
        g = ascend.all_gather_and_unpad(x)
        return torch.mm(g, w1.t()), torch.mm(g, w2.t()), g + 1

    tokens = 2003 if ascend.TP_FLASHCOMM else 2004
    traced_rs = make_fx(rs, tracing_mode="symbolic")(torch.randn(tokens, K), torch.randn(N, K), torch.randn(N))
    traced_ag = make_fx(ag, tracing_mode="symbolic")(torch.randn(1002, K), torch.randn(N, K), torch.randn(N + 1, K))
    return traced_rs, traced_ag


def _moe_graph():
    """vllm-ascend's MoE prepare (gather of the tokens, then the experts' and the gate's matmuls) and finalize
    (reduce) on the EP group, as its prepare_finalize calls them."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def moe(x, w, gate):
        g = ascend.all_gather_and_unpad(x, ep=True)
        return ascend.pad_and_reduce(torch.mm(g, w.t()), ep=True), torch.mm(g, gate.t())

    return make_fx(moe, tracing_mode="symbolic")(torch.randn(1002, K), torch.randn(N, K), torch.randn(4, K))


def _opaque_linear_report():
    """The pass's report of vllm-ascend's dense row-parallel linear, ``matmul_and_reduce(x, layer_name)`` (its
    fake reads the layer from the forward context: the node is written by hand)."""
    import fcpass
    from passes import FlashCommPass

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.ops.vllm.matmul_and_reduce.default, (x, "model.layers.0.mlp.down_proj")))
    flashcomm = FlashCommPass(fcpass.PassConfig(threshold_tokens=THRESHOLDS[0]))
    flashcomm(graph)
    return flashcomm.last_report.rows(), len(graph.nodes)


def _report_rows(gm):
    """The pass's report rows of a copy of ``gm``, and whether it left the graph as it was."""
    import fcpass
    from passes import FlashCommPass

    rewritten = copy.deepcopy(gm)
    flashcomm = FlashCommPass(fcpass.PassConfig(threshold_tokens=THRESHOLDS[0]))
    flashcomm(rewritten.graph)
    return flashcomm.last_report.rows(), str(rewritten.graph) == str(gm.graph)


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def run_ascend_forms(rank, world_size):
    import fcpass
    from devtools.vllm_cpu import vllm_tp
    from passes import FlashCommPass

    results = {}
    # 0.30's padding collectives exist in MoE models only (they need vLLM's EP group)
    model = "llama" if ascend.TP_FLASHCOMM else "qwen3_moe"
    with vllm_tp(rank, world_size, additional_config=ascend.additional_config(),
                 model_config=ascend.model_config(model)) as (vllm_config, _):
        ascend.init_config(vllm_config)
        ascend.load_ops()
        results["schemas"] = {op: str(getattr(torch.ops.vllm, op).default._schema) for op in STANDIN_OPS}
        results["opaque linear"] = (_opaque_linear_report() if hasattr(torch.ops.vllm, "matmul_and_reduce")
                                    else None)
        with ascend.forward(vllm_config, 2004):  # traced as vllm-ascend compiles: in a forward, FlashComm on
            originals = dict(zip(("rs", "ag"), _graphs(rank)))
        g = torch.Generator().manual_seed(rank)
        w, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
        w1, w2 = torch.randn(N, K), torch.randn(N + 1, K)
        for threshold in THRESHOLDS:
            for name, original in originals.items():
                rewritten = copy.deepcopy(original)
                flashcomm = FlashCommPass(fcpass.PassConfig(threshold_tokens=threshold))
                flashcomm(rewritten.graph)
                rewritten.recompile()
                result = results[threshold, name] = {"matched": flashcomm.matched, "ops": {
                    op: _count(rewritten, getattr(torch.ops.fcpass, op).default)
                    for op in ("mm_reduce_scatter", "all_gather_mm", "drop_token_padding")}}
                for tokens, dp_padded_length in RUNS:
                    x = torch.randn(tokens, K, generator=torch.Generator().manual_seed(tokens))
                    with ascend.forward(vllm_config, tokens, dp_padded_length) as context:
                        on, pad = ascend.flash_comm(context)
                        padded = tokens + pad
                        shard = torch.randn(padded // world_size, K) if on else x
                        args = (x, w, b) if name == "rs" else (shard, w1, w2)
                        fcpass.reset_decision_counts()
                        got, want = rewritten(*args), original(*args)
                    got, want = (v if isinstance(v, tuple) else (v,) for v in (got, want))
                    assert all(a.shape == e.shape for a, e in zip(got, want, strict=True)), (name, tokens, dp_padded_length)
                    result[tokens, dp_padded_length] = {
                        "flash_comm": on, "padded": padded, "rows": want[0].shape[0],
                        "error": max(((a - e).abs().max() / e.abs().max()).item() for a, e in zip(got, want, strict=True)),
                        "same_bits": all(torch.equal(a, e) for a, e in zip(got, want, strict=True)),
                        "decisions": fcpass.decision_counts()}
    return results


ASCEND_FORMS = shared(run_ascend_forms, setup=ascend.setup, timeout=300)


def run_moe_collectives(rank, world_size):
    from devtools.vllm_cpu import vllm_tp

    with vllm_tp(rank, world_size, additional_config=ascend.additional_config(),
                 model_config=ascend.model_config("qwen3_moe")) as (vllm_config, _):
        ascend.init_config(vllm_config)
        ascend.load_ops()
        with ascend.forward(vllm_config, 1002):
            return _report_rows(_moe_graph())


MOE = shared(run_moe_collectives, setup=ascend.setup, timeout=300)


def run_a2_communicator_rule(rank, world_size):
    import torch.distributed as dist
    from devtools.vllm_cpu import vllm_tp

    from fcpass.backends.base import FusedCall
    from fcpass.backends.npu import NpuBackend
    from fcpass.matmuls import Matmul
    from fcpass.vllm import state

    with vllm_tp(rank, world_size, additional_config=ascend.additional_config(),
                 model_config=ascend.model_config()) as (vllm_config, tp):
        ascend.load_ops()  # vllm-ascend's utils, which read its build's chip
        other = dist.new_group(list(range(world_size)))
        x, mm = torch.randn(8, K), Matmul(torch.randn(K, N), None)

        def reason(op, group):
            return NpuBackend().unsupported(op, FusedCall(x=x, matmuls=(mm,), group=group, group_name=group.group_name,
                                                          world_size=world_size, row_scale=None, pad_rows=0))

        return {"chip": state.ascend_device_type(),
                **{(op, name): reason(op, group) for op in ("mm_reduce_scatter", "all_gather_mm", "mm_all_reduce")
                   for name, group in (("tp", tp.device_group), ("other", other))}}


A2_RULE = shared(run_a2_communicator_rule, setup=ascend.setup, timeout=300)


def test_on_atlas_a2_the_npu_kernels_fuse_on_vllms_tp_group_only():
    """torch_npu: on A2 all fused compute-communication ops of one model share one communicator; vllm-ascend's
    build info (the sdist's, written as its build writes it for ascend910b1) says A2."""
    for r in A2_RULE():
        assert r["chip"] == "A2"
        for op in ("mm_reduce_scatter", "all_gather_mm", "mm_all_reduce"):
            assert r[op, "tp"] is None
            assert "Atlas A2 fuses on one communicator" in r[op, "other"], r[op, "other"]


def test_vllm_ascends_own_forward_context_switches_flashcomm_and_pads():
    """What the runs below rest on: vllm-ascend's forward context, as its real code sets it (0.30's has no
    FlashComm v1 switch: its collectives always communicate)."""
    runs = ASCEND_FORMS()[0][THRESHOLDS[0], "rs"]
    if ascend.TP_FLASHCOMM:
        assert [runs[run]["flash_comm"] for run in RUNS] == [False, False, False, True, True, True, True, True]
        assert [runs[run]["padded"] for run in RUNS] == [7, 700, 1000, 1002, 1002, 2048, 2048, 2052]
    else:
        assert [(runs[run]["flash_comm"], runs[run]["padded"], runs[run]["rows"]) for run in RUNS] == [
            (True, 8, 4), (True, 700, 350), (True, 1002, 501), (True, 2048, 1024)]


def test_the_hand_built_graphs_stand_ins_have_vllm_ascends_schemas():
    from support import hand_graphs

    hand_graphs.register_vllm_ascend_standins()
    for op, schema in ASCEND_FORMS()[0]["schemas"].items():
        assert str(getattr(torch.ops.vllm, op).default._schema) == schema


def test_vllm_ascends_own_fused_row_parallel_linear_is_left_alone_with_the_reason():
    """0.23's ``matmul_and_reduce`` (its dense row-parallel linear as one op); 0.30 has no such op."""
    from passes import report

    if not ascend.TP_FLASHCOMM:
        assert ASCEND_FORMS()[0]["opaque linear"] is None
        return
    rows, nodes = ASCEND_FORMS()[0]["opaque linear"]
    assert nodes == 3  # unchanged
    assert [(family, form, report.outcome_kind(outcome)) for family, form, outcome in rows] == [
        ("mm_reduce_scatter", "vllm_ascend/-", report.OPAQUE_MATMUL)]
    assert "npu_mm_reduce_scatter_base" in rows[0][2]


def test_its_moe_prepare_and_finalize_collectives_are_left_alone_with_the_reason():
    """The EP group's collectives of vllm-ascend's MoE (0.23: ``is_ep_comm=True``; 0.30: every call): the
    gather before the experts and the gate, the reduce after them, untouched, each with the reason naming it."""
    from passes import report

    for rows, unchanged in MOE():
        assert unchanged
        assert sorted((family, form, report.outcome_kind(outcome)) for family, form, outcome in rows) == [
            ("all_gather_mm", "vllm_ascend/-", report.EP_COLLECTIVE),
            ("mm_reduce_scatter", "vllm_ascend/-", report.EP_COLLECTIVE)]
        assert sorted(outcome.split("vllm-ascend's ")[1] for _, _, outcome in rows) == [
            "maybe_all_gather_and_maybe_unpad on its EP group)", "maybe_pad_and_reduce on its EP group)"]


def test_vllm_ascend_flashcomm_collectives_fuse():
    """0.23's FlashComm v1 collectives fuse; 0.30's (EP only) are left alone."""
    for rank, results in enumerate(ASCEND_FORMS()):
        for threshold in THRESHOLDS:
            matmul_form = "addmm" if rank == 0 else "mm"
            rs, ag = results[threshold, "rs"], results[threshold, "ag"]
            if not ascend.TP_FLASHCOMM:
                assert rs["matched"] == ag["matched"] == {}
                assert rs["ops"] == ag["ops"] == {"mm_reduce_scatter": 0, "all_gather_mm": 0, "drop_token_padding": 0}
                continue
            assert rs["matched"] == {"mm_reduce_scatter": {f"vllm_ascend/{matmul_form}": 1}}
            assert rs["ops"] == {"mm_reduce_scatter": 1, "all_gather_mm": 0, "drop_token_padding": 0}
            assert ag["matched"] == {"all_gather_mm": {"vllm_ascend/mm": 1}}
            # the padding is dropped from both matmul results and from the gathered rows' other user
            assert ag["ops"] == {"mm_reduce_scatter": 0, "all_gather_mm": 1, "drop_token_padding": 3}


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("name", ["rs", "ag"])
def test_fused_vllm_ascend_sites_give_the_originals_numbers_as_flashcomm_switches(name, threshold):
    """FlashComm on: padded (TP or DP padding) and scattered / gathered and unpadded, fused above the
    threshold; off: the scatter's site runs as matmul -> all_reduce (fused above it), the gather's keeps the
    local rows and has no collective. The same decisions on every rank."""
    per_rank = ASCEND_FORMS()
    for results in per_rank:
        for run in RUNS:
            r = results[threshold, name][run]
            if not ascend.TP_FLASHCOMM:  # 0.30: left alone, the site's own ops
                assert r["same_bits"] and r["decisions"] == {}, (run, r)
                continue
            assert r["error"] <= 1e-5, (run, r["error"])
            tokens = run[0]
            if name == "ag" and not r["flash_comm"]:
                assert r["decisions"] == {} and r["rows"] == tokens
                continue
            (decision,) = r["decisions"]
            num_tokens = r["padded"] if r["flash_comm"] else tokens
            assert decision[1] == ("fused" if num_tokens > threshold else "unfused"), (run, decision)
            want_rows = (r["padded"] // 2 if r["flash_comm"] else tokens) if name == "rs" else tokens
            assert r["rows"] == want_rows, (run, r["rows"])
    for run in RUNS:
        assert per_rank[0][threshold, name][run]["decisions"] == per_rank[1][threshold, name][run]["decisions"]
