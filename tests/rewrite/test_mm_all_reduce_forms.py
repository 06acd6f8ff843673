"""matmul -> all_reduce on hand-built graphs: every matmul form fuses, what must not fuse is left alone, saying why.

The graphs hold CPU tensors, where the generic backend never takes the fused path by default, so the
fusing cases give a threshold (as a config that wants the pipeline on CPU does)."""

import pytest
import torch

import fcpass
from passes import report as outcomes
from support.hand_graphs import count, mm_ar, npu_quant_mm_ar, apply_pass

fc = torch.ops.fcpass
functional = torch.ops._c10d_functional
THRESHOLD = {"threshold_tokens": 16}


def _kinds(p) -> list:
    """This family's (family, outcome) rows (sequence parallelism, off by default, reports each all_reduce too)."""
    return [row for row in p.last_report.kinds() if row[0] == "mm_all_reduce"]


def _all_reduces(gm) -> int:
    return count(gm, torch.ops.vllm.all_reduce.default) + count(gm, functional.all_reduce.default)


@pytest.mark.parametrize("form", ["vllm", "c10d_functional"])
@pytest.mark.parametrize("bias", [False, True], ids=["mm", "addmm"])
def test_the_row_parallel_matmul_and_its_all_reduce_become_one_op(form, bias):
    gm = mm_ar(form, bias=bias)
    p = apply_pass(gm, **THRESHOLD)
    assert count(gm, fc.mm_all_reduce.default) == 1 and _all_reduces(gm) == 0
    assert count(gm, torch.ops.aten.mm.default) == count(gm, torch.ops.aten.addmm.default) == 0
    assert p.matched == {"mm_all_reduce": {f"{form}/{'addmm' if bias else 'mm'}": 1}}
    (fused,) = [n for n in gm.graph.nodes if n.target == fc.mm_all_reduce.default]
    # x, w (k, n), this rank's bias, the group (no world size: the op reads the group's), the config (its
    # threshold: no threshold_tokens argument), the site (the ops the unfused path runs)
    assert (fused.args[2] is not None) == bias
    assert fused.kwargs == {"group_name": "tp:0",
                            "config": fcpass.PassConfig(**THRESHOLD).runtime_text(),
                            "site": f"{form}/{'addmm' if bias else 'mm'}"}
    assert tuple(fused.meta["val"].shape) == (16, 24)


def test_a_linear_on_3d_hidden_states_fuses_through_its_views():
    gm = mm_ar("vllm", bias=True, matmul="linear_3d")
    p = apply_pass(gm, **THRESHOLD)
    assert count(gm, fc.mm_all_reduce.default) == 1 and _all_reduces(gm) == 0
    assert p.matched == {"mm_all_reduce": {"vllm/addmm+view": 1}}  # make_fx decomposes the linear


def test_fp8_and_ascend_w8a8_matmuls_take_the_scaled_op():
    fp8, w8a8 = mm_ar("vllm", bias=True, matmul="scaled_mm"), npu_quant_mm_ar("vllm")
    p_fp8, p_w8a8 = apply_pass(fp8, **THRESHOLD), apply_pass(w8a8, **THRESHOLD)
    assert count(fp8, fc.mm_all_reduce_scaled.default) == count(w8a8, fc.mm_all_reduce_scaled.default) == 1
    assert _all_reduces(fp8) == _all_reduces(w8a8) == 0
    assert p_fp8.matched == {"mm_all_reduce": {"vllm/scaled_mm": 1}}
    assert p_w8a8.matched == {"mm_all_reduce": {"vllm/npu_quant_matmul": 1}}


@pytest.mark.parametrize("build, reason", [
    (lambda: mm_ar("vllm", extra_user=True), outcomes.MATMUL_OTHER_USERS),
    (lambda: mm_ar("vllm", bias=True, bias_shape=(16, 24)), outcomes.REJECTED_BY_OP),
], ids=["matmul_has_another_user", "bias_the_op_rejects"])
def test_a_site_that_cannot_fuse_is_left_as_it_was_with_its_reason(build, reason):
    gm = build()
    before = str(gm.graph)
    p = apply_pass(gm, **THRESHOLD)
    assert str(gm.graph) == before
    assert _kinds(p) == [("mm_all_reduce", reason)]


def test_an_all_reduce_of_something_else_than_a_matmul_says_so():
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda x: torch.ops.vllm.all_reduce(torch.relu(x), "tp:0"), tracing_mode="fake")(torch.randn(16, 8))
    p = apply_pass(gm, **THRESHOLD)
    assert _kinds(p) == [("mm_all_reduce", outcomes.NO_MATMUL_PRODUCER)]
    assert ["mm_all_reduce", "vllm/aten.relu.default", outcomes.NO_MATMUL_PRODUCER] in p.last_report.rows()


def test_the_family_flag_turns_it_off():
    gm = mm_ar("vllm")
    p = apply_pass(gm, fuse_mm_all_reduce=False, **THRESHOLD)
    assert count(gm, fc.mm_all_reduce.default) == 0 and _all_reduces(gm) == 1
    assert _kinds(p) == [("mm_all_reduce", outcomes.FAMILY_DISABLED)]


def test_the_defaults_on_cpu_leave_the_site_as_it_was_saying_the_fused_path_would_never_run():
    """No threshold, no table: the generic backend would run every call unfused on CPU tensors, so the op would
    only add a call; a table with an mm_all_reduce entry for the backend asks for it again."""
    gm = mm_ar("vllm", bias=True)
    before = str(gm.graph)
    p = apply_pass(gm)
    assert str(gm.graph) == before
    ((_, outcome),) = [(f, o) for f, _, o in p.last_report.rows() if f == "mm_all_reduce"]
    assert outcome.startswith(outcomes.NEVER_FUSED) and "CPU tensors" in outcome
    assert _kinds(p) == [("mm_all_reduce", outcomes.NEVER_FUSED)]


def test_a_threshold_table_with_an_all_reduce_entry_asks_for_the_fused_op(tmp_path):
    import json

    from fcpass import thresholds

    entry = {"op": "mm_all_reduce", "world_size": 2, "dtype": "float32", "k_log2": 5, "n_log2": 4,
             "threshold_tokens": 8}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(thresholds.table_dict("generic", [entry])))
    gm = mm_ar("vllm")
    p = apply_pass(gm, threshold_table=str(path))
    assert count(gm, fc.mm_all_reduce.default) == 1 and _kinds(p) == [("mm_all_reduce", outcomes.FUSED)]
