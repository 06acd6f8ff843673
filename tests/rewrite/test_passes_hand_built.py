"""The pattern families on hand-built graphs: what matches, what must not."""

import pytest
import torch

from support.hand_graphs import M, N, ag_mm, apply_pass, count, mm_rs
from passes import report as outcomes

fc = torch.ops.fcpass
vllm_ops = torch.ops.vllm
functional = torch.ops._c10d_functional


@pytest.mark.parametrize("form", ["vllm", "c10d_functional"])
@pytest.mark.parametrize("bias", [False, True], ids=["mm", "addmm"])
def test_mm_reduce_scatter_forms_match(form, bias):
    gm = mm_rs(form, bias=bias)
    p = apply_pass(gm)
    assert count(gm, fc.mm_reduce_scatter.default) == 1
    assert count(gm, vllm_ops.reduce_scatter.default) == count(gm, functional.reduce_scatter_tensor.default) == 0
    assert count(gm, torch.ops.aten.mm.default) == count(gm, torch.ops.aten.addmm.default) == 0
    assert p.matched == {"mm_reduce_scatter": {f"{form}/{'addmm' if bias else 'mm'}": 1}}


@pytest.mark.parametrize("form", ["vllm", "c10d_functional"])
def test_all_gather_feeding_several_matmuls_becomes_one_op(form):
    gm = ag_mm(form, bias=True, num_matmuls=3, other_user=True)
    p = apply_pass(gm)
    assert count(gm, fc.all_gather_mm.default) == 1
    assert count(gm, torch.ops.aten.addmm.default) == 0
    assert count(gm, vllm_ops.all_gather.default) == count(gm, functional.all_gather_into_tensor.default) == 0
    assert p.matched == {"all_gather_mm": {f"{form}/addmm": 1}}
    (fused,) = [n for n in gm.graph.nodes if n.target == fc.all_gather_mm.default]
    assert len(fused.args[1]) == 3
    # the residual-like user now reads the fused op's gathered output
    add = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.add.Tensor)
    assert add.args[0].args == (fused, 0)


@pytest.mark.parametrize("scalars", [{"beta": 2.0}, {"alpha": 0.5}, {"beta": 0.0, "alpha": 3.0}])
def test_addmm_with_beta_or_alpha_is_left_alone(scalars):
    """x @ w + bias is all the fused ops compute: a scaled addmm stays (fusing it gave errors of 1.1 and 15)."""
    gm = mm_rs("c10d_functional", bias=True, addmm_scalars=scalars)
    p = apply_pass(gm)
    assert count(gm, fc.mm_reduce_scatter.default) == 0 and count(gm, torch.ops.aten.addmm.default) == 1
    (outcome,) = p.last_report.outcomes
    assert outcome.kind == outcomes.MATMUL_ARGUMENTS and all(f"{k}={v}" in outcome.outcome for k, v in scalars.items())


def test_a_scaled_addmm_consumer_keeps_the_gathered_rows_and_the_others_fuse():
    gm = ag_mm("vllm", bias=True, num_matmuls=3, addmm_scalars={"alpha": 2.0})
    p = apply_pass(gm)
    (fused,) = [n for n in gm.graph.nodes if n.target == fc.all_gather_mm.default]
    assert len(fused.args[1]) == 2  # the two plain addmms
    (scaled,) = [n for n in gm.graph.nodes if n.target == torch.ops.aten.addmm.default]
    assert scaled.args[1].args == (fused, 0) and scaled.kwargs == {"alpha": 2.0}  # reads the fused op's gather
    assert p.last_report.reasons() == [] and p.matched == {"all_gather_mm": {"vllm/addmm": 1}}


def test_all_gather_whose_only_matmul_is_scaled_says_why():
    gm = ag_mm("vllm", bias=True, num_matmuls=1, addmm_scalars={"beta": 0.5})
    p = apply_pass(gm)
    assert count(gm, fc.all_gather_mm.default) == 0
    (outcome,) = p.last_report.outcomes
    assert outcome.kind == outcomes.MATMUL_ARGUMENTS and "addmm with beta=0.5" in outcome.outcome


@pytest.mark.parametrize("bias_shape", [(M, N), (1, N)], ids=["per_row", "row_broadcast"])
def test_a_site_the_fused_op_rejects_is_left_alone_not_a_failed_compile(bias_shape):
    """A 2-D addmm bias is not the fused op's (n,) bias: its validation rejects the site, the graph stays."""
    gm = mm_rs("c10d_functional", bias=True, bias_shape=bias_shape)
    before = str(gm.graph)
    p = apply_pass(gm)
    assert str(gm.graph) == before
    (outcome,) = p.last_report.outcomes
    assert outcome.kind == outcomes.REJECTED_BY_OP and f"got {bias_shape}" in outcome.outcome


def test_avg_reduce_scatter_is_left_alone():
    gm = mm_rs("c10d_functional", reduce_op="avg")
    p = apply_pass(gm)
    assert count(gm, fc.mm_reduce_scatter.default) == 0
    assert p.last_report.reasons() == [outcomes.NOT_SUM]


def test_matmul_with_another_user_is_left_alone():
    gm = mm_rs("vllm", extra_user=True)
    p = apply_pass(gm)
    assert count(gm, fc.mm_reduce_scatter.default) == 0
    assert count(gm, vllm_ops.reduce_scatter.default) == 1
    assert p.last_report.reasons() == [outcomes.MATMUL_OTHER_USERS]


@pytest.mark.parametrize("flag", ["fuse_mm_reduce_scatter", "fuse_all_gather_mm"])
def test_disabled_family_matches_nothing(flag):
    rs, ag = mm_rs("vllm"), ag_mm("vllm")
    apply_pass(rs, **{flag: False})
    apply_pass(ag, **{flag: False})
    fused = {"fuse_mm_reduce_scatter": count(rs, fc.mm_reduce_scatter.default),
             "fuse_all_gather_mm": count(ag, fc.all_gather_mm.default)}
    assert fused == {name: int(name != flag) for name in fused}  # only the family left enabled fused, each its own


def test_the_config_travels_into_the_op():
    """The op's threshold argument says "the config's", and the config itself is the op's last argument."""
    import fcpass

    gm = mm_rs("vllm")
    config = fcpass.PassConfig(threshold_tokens=4096, backend="generic", pipeline_chunks=3)
    apply_pass(gm, **config.to_dict())
    (fused,) = [n for n in gm.graph.nodes if n.target == fc.mm_reduce_scatter.default]
    # group, world size, pad, the config (the threshold's one channel), the site (vLLM's reduce_scatter
    # after aten.mm)
    assert fused.kwargs == {"group_name": "tp:0", "world_size": 2, "pad_rows": 0,
                            "config": config.runtime_text(), "site": "vllm/mm"}
    assert fcpass.PassConfig.from_runtime_text(fused.kwargs["config"]) == config


def test_unpad_slice_before_the_matmuls_moves_after_the_fused_op():
    gm = ag_mm("vllm", bias=True, num_matmuls=2, other_user=False, unpad_to=13)
    p = apply_pass(gm)
    assert count(gm, fc.all_gather_mm.default) == 1
    assert count(gm, torch.ops.aten.addmm.default) == 0
    slices = [n for n in gm.graph.nodes if n.target == torch.ops.aten.slice.Tensor]
    assert len(slices) == 2 and all(n.args[0].target.__name__ == "getitem" and n.args[1:] == (0, 0, 13)
                                    for n in slices)
    assert p.matched == {"all_gather_mm": {"vllm/addmm+unpad": 1}}


@pytest.mark.parametrize("form", ["vllm", "c10d_functional"])
def test_fp8_scaled_mm_reduce_scatter_matches(form):
    from support.hand_graphs import scaled_mm_rs

    gm = scaled_mm_rs(form)
    p = apply_pass(gm)
    assert count(gm, fc.mm_reduce_scatter_scaled.default) == 1
    assert count(gm, torch.ops.aten._scaled_mm.default) == 0
    assert p.matched == {"mm_reduce_scatter": {f"{form}/scaled_mm": 1}}


def test_fp8_all_gather_scaled_mm_matches_and_mixed_out_dtypes_do_not():
    from support.hand_graphs import ag_scaled_mm

    gm = ag_scaled_mm("vllm")
    apply_pass(gm)
    assert count(gm, fc.all_gather_scaled_mm.default) == 1 and count(gm, torch.ops.aten._scaled_mm.default) == 0
    mixed = ag_scaled_mm("vllm", mixed=True)
    p = apply_pass(mixed)
    assert count(mixed, fc.all_gather_scaled_mm.default) == count(mixed, fc.all_gather_mm.default) == 0
    assert p.last_report.reasons() == [outcomes.MIXED_MATMULS]


@pytest.mark.parametrize("op", ["unquantized_gemm", "rocm_unquantized_gemm"])
def test_vllm_linear_ops_match_with_their_weight_transposed(op):
    from support.hand_graphs import LINEAR_OPS, ag_linear, linear_rs

    rs, ag = linear_rs(op), ag_linear(op)
    p_rs, p_ag = apply_pass(rs), apply_pass(ag)
    assert count(rs, fc.mm_reduce_scatter.default) == 1 and count(ag, fc.all_gather_mm.default) == 1
    assert count(rs, LINEAR_OPS[op]().default) == count(ag, LINEAR_OPS[op]().default) == 0
    assert count(rs, torch.ops.aten.permute.default) == 1 and count(ag, torch.ops.aten.permute.default) == 2
    assert p_rs.matched == {"mm_reduce_scatter": {f"vllm/{op}": 1}}
    assert p_ag.matched == {"all_gather_mm": {f"vllm/{op}": 1}}


@pytest.mark.parametrize("bias, addmm_term, forms", [
    (False, False, "mm,mm"), (True, False, "mm,addmm"), (False, True, "mm,sum_addmm"), (True, True, "addmm,sum_addmm")])
def test_a_scatter_after_a_sum_of_matmuls_becomes_one_sum_op(bias, addmm_term, forms):
    """Falcon's attention + MLP, as traced (``mm + mm``) and as Inductor's post-grad leaves it (``addmm(first,
    x, w)``): each product's x and weight go into the op, in the order the graph added them."""
    from support.hand_graphs import mm_sum_rs

    gm = mm_sum_rs("vllm", bias=bias, addmm_term=addmm_term)
    p = apply_pass(gm)
    assert p.matched == {"mm_reduce_scatter": {f"vllm/sum({forms})": 1}}
    (fused,) = [n for n in gm.graph.nodes if n.target == fc.mm_sum_reduce_scatter.default]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # the xs in the order the graph added the products (addmm(second, x1, w1) adds x1's last)
    x1, x2 = placeholders[:2]
    assert fused.args[0] == ([x2, x1] if addmm_term else [x1, x2]) and fused.kwargs["site"] == f"vllm/{forms}"
    assert count(gm, torch.ops.aten.mm.default) == count(gm, torch.ops.aten.addmm.default) == 0
    assert count(gm, torch.ops.aten.add.Tensor) == 0 and count(gm, vllm_ops.reduce_scatter.default) == 0


def test_a_sum_whose_product_has_another_user_or_another_order_is_left_alone():
    from torch.fx.experimental.proxy_tensor import make_fx

    def other_user(x1, x2, w1, w2):
        a, b = torch.mm(x1, w1), torch.mm(x2, w2)
        return vllm_ops.reduce_scatter(a + b, 0, 2, "tp:0"), a * 2

    def right_nested(x1, x2, w1, w2):  # a + (b + c): not the left-to-right sum the op computes
        return vllm_ops.reduce_scatter(torch.mm(x1, w1) + (torch.mm(x2, w2) + torch.mm(x1, w1)), 0, 2, "tp:0")

    inputs = (torch.randn(M, 8), torch.randn(M, 4), torch.randn(8, N), torch.randn(4, N))
    for f, kind in ((other_user, outcomes.MATMUL_OTHER_USERS), (right_nested, outcomes.NO_MATMUL_PRODUCER)):
        gm = make_fx(f, tracing_mode="fake")(*inputs)
        p = apply_pass(gm)
        (outcome,) = p.last_report.outcomes
        assert outcome.kind == kind and count(gm, fc.mm_sum_reduce_scatter.default) == 0, f.__name__


def test_torch_2_15_forms_a_reduce_op_object_decodes_and_a_multi_wait_is_named():
    """torch 2.15's functional collectives may carry a ``ReduceOp`` object where earlier ones carry "sum", and
    add ``wait_tensors`` (one wait over several handles): the first is the same site, the second is named in
    the reason (written into hand-built graphs: this torch has neither)."""
    import operator

    import torch.distributed as dist

    gm = mm_rs("c10d_functional")
    (issue,) = [n for n in gm.graph.nodes if n.target == functional.reduce_scatter_tensor.default]
    issue.args = (issue.args[0], dist.ReduceOp.SUM, *issue.args[2:])
    assert apply_pass(gm).matched == {"mm_reduce_scatter": {"c10d_functional/mm": 1}}

    gm = mm_rs("c10d_functional")
    (wait,) = [n for n in gm.graph.nodes if n.target == functional.wait_tensor.default]
    lib = torch.library.Library("fcpass_test_forms", "FRAGMENT")
    lib.define("wait_tensors(Tensor[] tensors) -> Tensor[]")
    with gm.graph.inserting_before(wait):
        waits = gm.graph.call_function(torch.ops.fcpass_test_forms.wait_tensors.default, ([wait.args[0]],))
        first = gm.graph.call_function(operator.getitem, (waits, 0))
    first.meta["val"] = wait.meta["val"]
    wait.replace_all_uses_with(first)
    gm.graph.erase_node(wait)
    p = apply_pass(gm)
    (outcome,) = p.last_report.outcomes
    assert outcome.kind == outcomes.UNSUPPORTED_FORM and outcome.outcome.endswith(
        "by fcpass_test_forms.wait_tensors.default)"), outcome.outcome
