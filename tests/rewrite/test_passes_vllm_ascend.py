"""vllm-ascend's FlashComm v1 collectives (``vllm.maybe_pad_and_reduce`` and
``vllm.maybe_all_gather_and_maybe_unpad``), on 2 real ranks with vLLM's TP group.

The ops are vllm-ascend 0.23's own: its registrations, fakes and kernels (run on CPU tensors,
tests/support/vllm_ascend_code.py), in its own forward context (``set_ascend_forward_context``:
FlashComm on above 1000 tokens, ``pad_size`` up to the TP size, or under DP up to the largest
count across DP ranks). Both take their group and padding from vLLM/vllm-ascend state rather
than arguments, so the pass reads the TP group at compile time and the fused ops read
FlashComm's switch and ``pad_size`` at run time, as the originals do. Unverified on Ascend
hardware.
"""

import copy

import pytest
import torch

from support import vllm_ascend_code as ascend
from support.multirank import shared

K, N = 32, 24
THRESHOLDS = (16, 1536)  # FlashComm's forwards (> 1000 tokens) above the low one; on both sides of the high one
# (tokens, DP padded length): FlashComm off (<= 1000 tokens), on with TP padding, on with DP padding
RUNS = ((7, None), (700, None), (1000, None), (1001, None), (1002, None), (2047, None), (2048, None), (2047, 2052))


# vllm-ascend ops that support/hand_graphs.py registers itself (its form tests run where vllm-ascend is not loaded)
STANDIN_OPS = ("unquantized_gemm", "quantize")


def _graphs(rank):
    from torch.fx.experimental.proxy_tensor import make_fx

    def rs(x, w, b):
        y = torch.addmm(b, x, w.t()) if rank == 0 else torch.mm(x, w.t())  # rank-0-only row-parallel bias
        return torch.relu(torch.ops.vllm.maybe_pad_and_reduce(y))

    def ag(x, w1, w2):
        g = torch.ops.vllm.maybe_all_gather_and_maybe_unpad(x, True)
        return torch.mm(g, w1.t()), torch.mm(g, w2.t()), g + 1

    traced_rs = make_fx(rs, tracing_mode="symbolic")(torch.randn(2003, K), torch.randn(N, K), torch.randn(N))
    traced_ag = make_fx(ag, tracing_mode="symbolic")(torch.randn(1002, K), torch.randn(N, K), torch.randn(N + 1, K))
    return traced_rs, traced_ag


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


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def run_ascend_forms(rank, world_size):
    import fcpass
    from devtools.vllm_cpu import vllm_tp
    from passes import FlashCommPass

    results = {}
    with vllm_tp(rank, world_size, additional_config=ascend.ADDITIONAL_CONFIG,
                 model_config=ascend.model_config()) as (vllm_config, _):
        ascend.init_config(vllm_config)
        ascend.load_ops()
        results["schemas"] = {op: str(getattr(torch.ops.vllm, op).default._schema) for op in STANDIN_OPS}
        results["opaque linear"] = _opaque_linear_report()
        with ascend.forward(vllm_config, 2003):  # traced as vllm-ascend compiles: in a forward, FlashComm on
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
                        on, padded = context.flash_comm_v1_enabled, tokens + context.pad_size
                        shard = torch.randn(padded // world_size, K) if on else x
                        args = (x, w, b) if name == "rs" else (shard, w1, w2)
                        fcpass.reset_decision_counts()
                        got, want = rewritten(*args), original(*args)
                    got, want = (v if isinstance(v, tuple) else (v,) for v in (got, want))
                    assert all(a.shape == e.shape for a, e in zip(got, want, strict=True)), (name, tokens, dp_padded_length)
                    result[tokens, dp_padded_length] = {
                        "flash_comm": on, "padded": padded, "rows": want[0].shape[0],
                        "error": max(((a - e).abs().max() / e.abs().max()).item() for a, e in zip(got, want, strict=True)),
                        "decisions": fcpass.decision_counts()}
    return results


ASCEND_FORMS = shared(run_ascend_forms, setup=ascend.setup, timeout=300)


def run_a2_communicator_rule(rank, world_size):
    import torch.distributed as dist
    from devtools.vllm_cpu import vllm_tp

    from fcpass.backends.base import FusedCall
    from fcpass.backends.npu import NpuBackend
    from fcpass.matmuls import Matmul
    from fcpass.vllm import state

    with vllm_tp(rank, world_size, additional_config=ascend.ADDITIONAL_CONFIG,
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
    """What the runs below rest on: vllm-ascend's forward context, as its real code sets it."""
    runs = ASCEND_FORMS()[0][THRESHOLDS[0], "rs"]
    assert [runs[run]["flash_comm"] for run in RUNS] == [False, False, False, True, True, True, True, True]
    assert [runs[run]["padded"] for run in RUNS] == [7, 700, 1000, 1002, 1002, 2048, 2048, 2052]


def test_the_hand_built_graphs_stand_ins_have_vllm_ascends_schemas():
    from support import hand_graphs

    hand_graphs.register_vllm_ascend_standins()
    for op, schema in ASCEND_FORMS()[0]["schemas"].items():
        assert str(getattr(torch.ops.vllm, op).default._schema) == schema


def test_vllm_ascends_own_fused_row_parallel_linear_is_left_alone_with_the_reason():
    from passes import report

    rows, nodes = ASCEND_FORMS()[0]["opaque linear"]
    assert nodes == 3  # unchanged
    assert [(family, form, report.outcome_kind(outcome)) for family, form, outcome in rows] == [
        ("mm_reduce_scatter", "vllm_ascend/-", report.OPAQUE_MATMUL)]
    assert "npu_mm_reduce_scatter_base" in rows[0][2]


def test_vllm_ascend_flashcomm_collectives_fuse():
    for rank, results in enumerate(ASCEND_FORMS()):
        for threshold in THRESHOLDS:
            matmul_form = "addmm" if rank == 0 else "mm"
            rs, ag = results[threshold, "rs"], results[threshold, "ag"]
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
