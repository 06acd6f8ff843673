"""Each form of issue 2/6 on a hand-built graph: matched, rewritten into the expected fcpass op.

(The plain mm/addmm, functional-collective, linear-op and fp8 forms and the
negative cases are in test_passes_hand_built; numerics of every form on two
real ranks in test_passes_numerics; vllm-ascend's collectives, which need
vLLM's TP group, in test_passes_vllm_ascend.)
"""

import pytest
import torch

from support.hand_graphs import (
    apply_pass, ag_3d_mm, ag_npu_quant_mm, ag_unpad_tokens_mm, count, mm_3d_rs, mm_pad_rs, npu_quant_mm_rs,
)
from passes import report as outcomes

fc = torch.ops.fcpass
aten = torch.ops.aten


def _fused(gm, op):
    (node,) = [n for n in gm.graph.nodes if n.target == op]
    return node


@pytest.mark.parametrize("bias", [False, True], ids=["mm", "addmm"])
@pytest.mark.parametrize("form", ["vllm", "c10d_functional"])
def test_pad_to_a_multiple_of_world_size_before_the_scatter(form, bias):
    gm = mm_pad_rs(form, bias=bias)
    p = apply_pass(gm)
    fused = _fused(gm, fc.mm_reduce_scatter.default)
    assert count(gm, aten.constant_pad_nd.default) == 0
    pad = fused.kwargs["pad_rows"]  # the pad amount stays graph arithmetic on the symbolic token count
    assert isinstance(pad, torch.fx.Node) and "Mod" in str(pad.meta["val"])
    assert p.matched == {"mm_reduce_scatter": {f"{form}/{'addmm' if bias else 'mm'}+pad": 1}}


@pytest.mark.parametrize("form", ["vllm", "c10d_functional"])
def test_all_gather_then_slice_to_the_token_count(form):
    gm = ag_unpad_tokens_mm(form)
    p = apply_pass(gm)
    fused = _fused(gm, fc.all_gather_mm.default)
    assert len(fused.args[1]) == 2 and count(gm, aten.mm.default) == 0
    assert count(gm, aten.slice.Tensor) == 2  # one per matmul result, after the fused op
    assert p.matched == {"all_gather_mm": {f"{form}/mm+unpad": 1}}


@pytest.mark.parametrize("bias", [False, True], ids=["mm", "addmm"])
def test_3d_hidden_states_views_around_the_matmul(bias):
    rs, ag = mm_3d_rs(bias=bias), ag_3d_mm()
    p_rs, p_ag = apply_pass(rs), apply_pass(ag)
    assert count(rs, fc.mm_reduce_scatter.default) == 1 and count(ag, fc.all_gather_mm.default) == 1
    assert count(rs, aten.mm.default) + count(rs, aten.addmm.default) + count(ag, aten.mm.default) == 0
    assert p_rs.matched == {"mm_reduce_scatter": {f"vllm/{'addmm' if bias else 'mm'}+view": 1}}
    assert p_ag.matched == {"all_gather_mm": {"vllm/mm+view": 1}}


def test_npu_quant_matmul_before_the_scatter():
    gm = npu_quant_mm_rs()
    p = apply_pass(gm)
    fused = _fused(gm, fc.mm_reduce_scatter_scaled.default)
    assert count(gm, torch.ops.npu.npu_quant_matmul.default) == 0
    assert fused.args[0].target == torch.ops.npu.npu_quantize.default  # int8 rows in
    assert fused.args[5] == torch.bfloat16
    assert p.matched == {"mm_reduce_scatter": {"vllm/npu_quant_matmul": 1}}


@pytest.mark.parametrize("quantize_op", ["npu", "vllm"])
def test_the_quantize_moves_before_the_gather_and_the_float_rows_stay_for_other_users(quantize_op):
    """npu.npu_quantize, and vllm-ascend's vllm.quantize (what its static W8A8 linear emits)."""
    gm = ag_npu_quant_mm(quantize=quantize_op)
    p = apply_pass(gm)
    fused = _fused(gm, fc.all_gather_scaled_mm.default)
    quantize = fused.args[0]
    target = torch.ops.npu.npu_quantize if quantize_op == "npu" else torch.ops.vllm.quantize
    assert quantize.target == target.default
    assert quantize.args[0].op == "placeholder"  # the local shard: int8 rows are gathered
    assert len(fused.args[2]) == 2 and count(gm, torch.ops.npu.npu_quant_matmul.default) == 0
    assert count(gm, torch.ops.vllm.all_gather.default) == 1  # the float rows' other user (g + 1)
    assert p.matched == {"all_gather_mm": {"vllm/npu_quant_matmul+quantize": 1}}


def test_npu_quant_forms_follow_the_family_flags():
    rs, ag = npu_quant_mm_rs(), ag_npu_quant_mm()
    apply_pass(rs, fuse_mm_reduce_scatter=False)
    apply_pass(ag, fuse_all_gather_mm=False)
    assert count(rs, fc.mm_reduce_scatter_scaled.default) == count(ag, fc.all_gather_scaled_mm.default) == 0


def test_npu_quant_matmul_with_a_per_token_scale_is_not_matched():
    """torch_npu's pertoken_scale is 1-D (m,); the fused ops' per-token scale is (m, 1), and a 1-D scale
    there means per-tensor. Such a matmul is left alone rather than rewritten with the wrong meaning."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from support.hand_graphs import BF16_SCALAR_TYPE, K, M, N, WS

    def f(x, w, scale, token_scale):
        y = torch.ops.npu.npu_quant_matmul(x, w, scale, pertoken_scale=token_scale, output_dtype=BF16_SCALAR_TYPE)
        return torch.ops.vllm.reduce_scatter(y, 0, WS, "tp:0")

    npu_quant_mm_rs()  # loads the torch_npu stand-in ops
    gm = make_fx(f, tracing_mode="fake")(torch.zeros(M, K, dtype=torch.int8), torch.zeros(K, N, dtype=torch.int8),
                                         torch.ones(N), torch.ones(M))
    p = apply_pass(gm)
    assert count(gm, fc.mm_reduce_scatter_scaled.default) == 0
    (outcome,) = p.last_report.outcomes
    assert outcome.kind == outcomes.MATMUL_ARGUMENTS and "npu_quant_matmul with pertoken_scale=" in outcome.outcome


@pytest.mark.parametrize("variant, problem", [
    ({"bias": torch.zeros(24, dtype=torch.bfloat16)}, "torch.bfloat16 bias, not int32"),
    ({"scale": torch.ones(24, dtype=torch.int64)}, "torch.int64 scale, not float32"),
    ({"x1_dtype": 1}, "x1_dtype=1"),
    ({"output_dtype": 99}, "output_dtype 99, not a known dtype"),
], ids=["bf16_bias", "int64_scale", "dtype_override", "unknown_output_dtype"])
def test_a_real_npu_quant_matmul_the_fused_ops_cannot_take_is_left_alone_saying_why(variant, problem):
    """torch-npu's npu_quant_matmul takes bf16/fp16/fp32 biases, int64 (packed) and bf16 scales and dtype
    overrides; fcpass's W8A8 op computes only (x @ w + int32 bias) * float32 scale: any other site stays."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from support.hand_graphs import BF16_SCALAR_TYPE, K, M, N, WS

    assert N == 24
    args = {"scale": torch.ones(N), "bias": torch.zeros(N, dtype=torch.int32), "output_dtype": BF16_SCALAR_TYPE,
            **variant}

    def f(x, w, scale, bias):
        extra = {k: v for k, v in args.items() if k not in ("scale", "bias")}
        y = torch.ops.npu.npu_quant_matmul(x, w, scale, bias=bias, **extra)
        return torch.ops.vllm.reduce_scatter(y, 0, WS, "tp:0")

    npu_quant_mm_rs()  # loads the torch_npu stand-in ops
    gm = make_fx(f, tracing_mode="fake")(torch.zeros(M, K, dtype=torch.int8), torch.zeros(K, N, dtype=torch.int8),
                                         args["scale"], args["bias"])
    before = str(gm.graph)
    p = apply_pass(gm)
    assert str(gm.graph) == before
    (outcome,) = [o for o in p.last_report.outcomes if o.family == "mm_reduce_scatter"]
    assert outcome.kind == outcomes.MATMUL_ARGUMENTS and problem in outcome.outcome, outcome


def test_a_wait_chain_of_any_length_is_one_functional_collective():
    """A function that waits on a traced functional collective itself adds a second ``wait_tensor``: the
    gather and the all_reduce are still one collective each (the gather used to be "no matmul consumer")."""
    from torch.fx.experimental.proxy_tensor import make_fx

    functional = torch.ops._c10d_functional

    def waited_twice(handle):
        return functional.wait_tensor(functional.wait_tensor(handle))

    def f(x, w, w2):
        gathered = waited_twice(functional.all_gather_into_tensor(x, 2, "tp:0"))
        return waited_twice(functional.all_reduce(gathered @ w, "sum", "tp:0")), gathered @ w2

    gm = make_fx(f, tracing_mode="fake")(torch.randn(4, 16), torch.randn(16, 8), torch.randn(16, 8))
    assert count(gm, functional.wait_tensor.default) == 4
    p = apply_pass(gm, threshold_tokens=16)
    assert p.matched == {"all_gather_mm": {"c10d_functional/mm": 1}}
    assert count(gm, fc.all_gather_mm.default) == 1 and count(gm, functional.all_gather_into_tensor.default) == 0


def test_an_all_reduce_of_another_reduction_is_reported_not_skipped():
    from torch.fx.experimental.proxy_tensor import make_fx

    functional = torch.ops._c10d_functional
    gm = make_fx(lambda x, w: functional.wait_tensor(functional.all_reduce(x @ w, "max", "tp:0")),
                 tracing_mode="fake")(torch.randn(4, 16), torch.randn(16, 8))
    p = apply_pass(gm, threshold_tokens=16)
    assert ["mm_all_reduce", "c10d_functional/-", outcomes.NOT_SUM + " ('max')"] in p.last_report.rows()
