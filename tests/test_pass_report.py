"""The why-not-fused report: each negative case of the hand-built graphs gets its own reason.

(A world_size that disagrees with its group needs live process groups; that
reason is checked on 2 gloo ranks in test_passes_numerics.)
"""

import logging

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import hand_graphs as hg
from hand_graphs import K, M, N, WS, apply_pass

vllm_ops = torch.ops.vllm


def _traced(f, *inputs):
    return make_fx(f, tracing_mode="fake")(*inputs)


def _no_matmul_producer():
    return _traced(lambda x: vllm_ops.reduce_scatter(torch.relu(x), 0, WS, "tp:0"), torch.randn(M, N))


def _no_matmul_consumer():
    return _traced(lambda x: torch.relu(vllm_ops.all_gather(x, 0, WS, "tp:0")), torch.randn(M // WS, K))


def _scatter_along_dim_1():
    return _traced(lambda x, w: vllm_ops.reduce_scatter(torch.mm(x, w), 1, WS, "tp:0"),
                   torch.randn(M, K), torch.randn(K, N))


def _scatter_of_3d_rows():
    return _traced(lambda x, w: vllm_ops.reduce_scatter(torch.mm(x, w).view(2, M // 2, N), 0, WS, "tp:0"),
                   torch.randn(M, K), torch.randn(K, N))


def _fp8_before_a_padded_scatter():
    def f(x, w, x_scale, w_scale, b):
        y = torch._scaled_mm(x, w.t(), x_scale, w_scale, bias=b, out_dtype=torch.bfloat16)
        return vllm_ops.reduce_scatter(torch.nn.functional.pad(y, (0, 0, 0, 1)), 0, WS, "tp:0")

    return _traced(f, *hg._fp8_inputs(M - 1))


# (graph builder, config, {family: [reasons]})
NEGATIVE_CASES = {
    "avg reduce": (lambda: hg.mm_rs("c10d_functional", reduce_op="avg"), {},
                   {"mm_reduce_scatter": ["reduce op 'avg', not sum"]}),
    "matmul output used elsewhere": (lambda: hg.mm_rs("vllm", extra_user=True), {},
                                     {"mm_reduce_scatter": ["matmul output has other users"]}),
    "no matmul producer": (_no_matmul_producer, {}, {"mm_reduce_scatter": ["no matmul producer"]}),
    "no matmul consumer": (_no_matmul_consumer, {}, {"all_gather_mm": ["no matmul consumer"]}),
    "matmuls differ in scaling": (lambda: hg.ag_scaled_mm("vllm", mixed=True), {},
                                  {"all_gather_mm": ["matmuls differ in kind or scaling (one fused op needs one kind)"]}),
    "scatter along dim 1": (_scatter_along_dim_1, {},
                            {"mm_reduce_scatter": ["unsupported form (reduce_scatter along dim 1, not 0)"]}),
    "3-D rows": (_scatter_of_3d_rows, {}, {"mm_reduce_scatter": ["reduce_scatter input is not 2-D rows"]}),
    "fp8 before a padded scatter": (
        _fp8_before_a_padded_scatter, {},
        {"mm_reduce_scatter": ["fp8 matmul before a padded scatter (a bias could not be kept off the padded rows)"]}),
    "reduce_scatter family off": (lambda: hg.mm_rs("vllm"), {"fuse_mm_reduce_scatter": False},
                                  {"mm_reduce_scatter": ["family disabled (PassConfig flag off)"]}),
    "all_gather family off": (lambda: hg.ag_mm("vllm"), {"fuse_all_gather_mm": False},
                              {"all_gather_mm": ["family disabled (PassConfig flag off)"]}),
}


@pytest.mark.parametrize("case", NEGATIVE_CASES)
def test_report_names_the_reason_for_each_negative_case(case):
    build, config, want = NEGATIVE_CASES[case]
    gm = build()
    before = str(gm.graph)
    p = apply_pass(gm, **config)
    got = {}
    for o in p.last_report.outcomes:
        got.setdefault(o.family, []).append(o.outcome)
    assert got == want
    assert p.matched == {}
    assert str(gm.graph) == before  # left alone means left alone
    table = p.report()
    for family, reasons in want.items():
        assert all(family in table and reason in table for reason in reasons)


def test_report_is_a_table_of_every_site_logged_at_debug_with_one_info_summary_per_graph(caplog):
    """Under the "fcpass" logger like the runtime: one INFO line per compiled graph, the table at DEBUG."""
    gm = hg.ag_mm("vllm")
    with caplog.at_level(logging.DEBUG, logger="fcpass"):
        p = apply_pass(gm)
    lines = p.report().splitlines()
    assert lines[0].split() == ["family", "form", "outcome", "sites"]
    assert lines[1].split() == ["all_gather_mm", "vllm/mm", "fused", "1"]
    mine = [r for r in caplog.records if r.name == "fcpass.passes.manager"]
    (info,) = [r for r in mine if r.levelno == logging.INFO]
    assert "\n" not in info.getMessage() and info.getMessage().endswith("all_gather_mm 1; 0 of 1 sites left alone")
    (debug,) = [r for r in mine if r.levelno == logging.DEBUG]
    assert p.report() in debug.getMessage()


def test_report_of_a_graph_without_collectives_says_so():
    p = apply_pass(_traced(lambda x, w: torch.mm(x, w), torch.randn(M, K), torch.randn(K, N)))
    assert p.last_report.outcomes == [] and "no all_reduce, reduce_scatter or all_gather" in p.report()
