"""The ``site`` argument: what the rewrite writes, what the runtime reads back, and a clear error otherwise."""

import pytest
import torch

import fcpass  # noqa: F401  (registers the ops)
from fcpass import sites
from fcpass.matmuls import MATMUL_FORMS
from fcpass.validate import FusedOpInputError


@pytest.mark.parametrize("collective, forms, handle", [
    ("vllm", ("addmm",), None), ("c10d_functional", ("mm", "linear"), None), ("shm", ("onednn_mm",), 0),
    ("vllm_ascend", ("npu_quant_matmul",), None),
])
def test_the_text_the_rewrite_writes_reads_back(collective, forms, handle):
    text = sites.site_text(collective, forms, handle)
    assert sites.parse("op", text) == sites.Site(collective, handle, forms)


def test_an_eager_call_is_the_functional_collectives_and_atens_matmuls():
    assert sites.parse("op", "") == sites.EAGER and sites.EAGER.matmul(0) == ""


@pytest.mark.parametrize("text, problem", [
    ("vllm", "no '/'"), ("nccl/mm", "unknown collective form 'nccl'"), ("shm/mm", "needs its handle"),
    ("vllm:3/mm", "needs its handle"), ("shm:x/mm", "not an int"), ("vllm/gemm", "unknown matmul form 'gemm'"),
])
def test_a_site_the_runtime_does_not_know_is_a_clear_error(text, problem):
    with pytest.raises(FusedOpInputError, match=problem):
        sites.parse("mm_all_reduce", text)


def test_every_matmul_form_the_rewrite_matches_is_one_the_runtime_runs():
    from passes.matmuls import _linear_targets

    assert set(_linear_targets().values()) <= set(MATMUL_FORMS)
    assert {"mm", "addmm", "scaled_mm", "npu_quant_matmul", "onednn_mm"} <= set(MATMUL_FORMS)


def test_the_fake_impl_rejects_a_site_naming_another_number_of_matmuls():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.empty(4, 8), torch.empty(8, 6)
        with pytest.raises(FusedOpInputError, match="names 2 matmul forms for 1 matmuls"):
            torch.ops.fcpass.all_gather_mm(x, [w], [None], "tp:0", 2, -1, "", "vllm/mm,mm")


def test_every_fused_op_of_the_kind_table_is_registered_with_its_family_schema():
    """fcpass.ops.FUSED_OPS is what the rewrite emits (passes/matmuls.py, KINDS): each entry an op of this
    process, and the gather ops of the gather family (their schemas take lists of weights)."""
    from fcpass.families import FAMILIES
    from fcpass.ops import FUSED_OPS
    from passes.matmuls import KINDS

    assert set(KINDS) == set(FUSED_OPS)
    for kind, ops in FUSED_OPS.items():
        assert set(ops) == set(FAMILIES), kind
        for family, name in ops.items():
            schema = getattr(torch.ops.fcpass, name).default._schema
            assert schema.arguments[-1].name == "site" and schema.arguments[-2].name == "config", name
            assert (len(schema.returns) == 2) == FAMILIES[family].gathers, name  # (gathered, [outs])
