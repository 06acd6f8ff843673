"""The why-not-fused report: each negative case of the hand-built graphs gets its own reason.

(A world_size that disagrees with its group needs live process groups; that
reason is checked on 2 gloo ranks in test_passes_numerics.)
"""

import logging

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from support import hand_graphs as hg
from support.hand_graphs import K, M, N, WS, apply_pass
from passes import report as outcomes

RS, AG = "mm_reduce_scatter", "all_gather_mm"

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


# (graph builder, config, {family: [outcome constants]})
NEGATIVE_CASES = {
    "avg reduce": (lambda: hg.mm_rs("c10d_functional", reduce_op="avg"), {}, {RS: [outcomes.NOT_SUM]}),
    "matmul output used elsewhere": (lambda: hg.mm_rs("vllm", extra_user=True), {},
                                     {RS: [outcomes.MATMUL_OTHER_USERS]}),
    "no matmul producer": (_no_matmul_producer, {}, {RS: [outcomes.NO_MATMUL_PRODUCER]}),
    "no matmul consumer": (_no_matmul_consumer, {}, {AG: [outcomes.NO_MATMUL_CONSUMER]}),
    "matmuls differ in scaling": (lambda: hg.ag_scaled_mm("vllm", mixed=True), {}, {AG: [outcomes.MIXED_MATMULS]}),
    "scatter along dim 1": (_scatter_along_dim_1, {}, {RS: [outcomes.UNSUPPORTED_FORM]}),
    "3-D rows": (_scatter_of_3d_rows, {}, {RS: [outcomes.NOT_2D_ROWS]}),
    "fp8 before a padded scatter": (_fp8_before_a_padded_scatter, {}, {RS: [outcomes.FP8_PADDED]}),
    "reduce_scatter family off": (lambda: hg.mm_rs("vllm"), {"fuse_mm_reduce_scatter": False},
                                  {RS: [outcomes.FAMILY_DISABLED]}),
    "all_gather family off": (lambda: hg.ag_mm("vllm"), {"fuse_all_gather_mm": False},
                              {AG: [outcomes.FAMILY_DISABLED]}),
}


@pytest.mark.parametrize("case", NEGATIVE_CASES)
def test_report_names_the_reason_for_each_negative_case(case):
    build, config, want = NEGATIVE_CASES[case]
    gm = build()
    before = str(gm.graph)
    p = apply_pass(gm, **config)
    got = {}
    for family, kind in p.last_report.kinds():
        got.setdefault(family, []).append(kind)
    assert got == want
    assert p.matched == {}
    assert str(gm.graph) == before  # left alone means left alone
    table = p.report()
    for family, kinds in want.items():
        assert all(family in table and kind in table for kind in kinds)


def test_report_is_a_table_of_every_site_logged_at_debug_with_one_info_summary_per_graph(caplog):
    """Under the "fcpass" logger like the runtime: one INFO line per compiled graph, the table at DEBUG."""
    gm = hg.ag_mm("vllm")
    with caplog.at_level(logging.DEBUG, logger="fcpass"):
        p = apply_pass(gm)
    lines = p.report().splitlines()
    assert lines[0].split() == ["family", "form", "outcome", "sites"]
    assert lines[1].split() == ["all_gather_mm", "vllm/mm", "fused", "1"]
    mine = [r for r in caplog.records if r.name == "fcpass.passes.flashcomm"]
    (info,) = [r for r in mine if r.levelno == logging.INFO]
    assert "\n" not in info.getMessage() and info.getMessage().endswith("all_gather_mm 1; 0 of 1 sites left alone")
    (debug,) = [r for r in mine if r.levelno == logging.DEBUG]
    assert p.report() in debug.getMessage()


def test_report_of_a_graph_without_collectives_says_so():
    p = apply_pass(_traced(lambda x, w: torch.mm(x, w), torch.randn(M, K), torch.randn(K, N)))
    assert p.last_report.outcomes == [] and "no all_reduce, reduce_scatter or all_gather" in p.report()


def test_rows_read_back_in_another_process_keep_their_constants():
    """Reports cross processes as text rows (vLLM workers, graph dumps); read back, each outcome names its constant
    again, details and constants with parentheses of their own included."""
    report = outcomes.PassReport()
    report.add("sequence_parallel", "shm", outcomes.Reason(outcomes.SP_TRANSPORT, "shm (handle 3) vs gloo"))
    report.add("sequence_parallel", "vllm", outcomes.SPLIT)
    report.add("mm_reduce_scatter", "vllm/mm", outcomes.FAMILY_DISABLED)
    assert outcomes.PassReport.from_rows(report.rows()).kinds() == report.kinds() == [
        ("sequence_parallel", outcomes.SP_TRANSPORT), ("sequence_parallel", outcomes.SPLIT),
        ("mm_reduce_scatter", outcomes.FAMILY_DISABLED)]


def test_a_pipeline_stages_outputs_leaving_whole_stop_the_split_and_the_reason_says_so():
    """Under pipeline parallelism a stage's graph ends with its hidden states and residual, which leave it whole
    for the next stage: splitting its last all_reduce would gather both back (2 all_gathers for 1 all_reduce),
    and the reason names them. The group's size comes from the process's facts (a recorded one here)."""
    from passes import process

    def last_layer_of_a_stage(x, w, residual, norm_w):
        hidden = vllm_ops.all_reduce(torch.mm(x, w), "tp:0") + residual
        normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_w
        return normed, hidden

    gm = _traced(last_layer_of_a_stage, torch.randn(M, K), torch.randn(K, N), torch.randn(M, N), torch.randn(N))
    facts = {"groups": {"tp:0": WS}, "tp_group": ["tp:0", WS], "compile_range_start": M, "shm_groups": {}}
    with process.reading(process.RecordedProcess(facts)):
        p = apply_pass(gm, sequence_parallel=True, sequence_parallel_threshold_tokens=1)
    (split,) = [outcome for family, _, outcome in p.last_report.rows() if family == "sequence_parallel"]
    assert outcomes.outcome_kind(split) == outcomes.SP_TOO_MANY_GATHERS
    assert "2 all_gathers for 1 all_reduces; 2 of them for tensors that leave the graph whole" in split, split
