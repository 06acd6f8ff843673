"""matmul -> reduce_scatter  ==>  fcpass.mm_reduce_scatter

    y = mm(x, w)            (or addmm(bias, x, w))
    [y = view(y, ...)]      row-keeping views (3-D hidden states), any number
    [y = pad(y, (0, 0, 0, p))]   zero rows up to a multiple of world_size
    out = reduce_scatter(y, dim 0, sum, group)
        ==>
    out = fcpass.mm_reduce_scatter(x, w, bias, group, world_size, -1, p, config.runtime_text())

and the same from ``_scaled_mm`` and Ascend's ``npu_quant_matmul`` to
``fcpass.mm_reduce_scatter_scaled``; linear-style matmuls (``aten.linear``,
``vllm.unquantized_gemm``) get their stored (n, k) weight transposed.
vllm-ascend's ``maybe_pad_and_reduce(y)`` pads by ``(-m) % world_size``
itself (its ``pad_size``): the same rewrite with that pad computed in the graph,
and ``flash_comm=True``: vllm-ascend switches FlashComm per forward, and with it
off that op all-reduces, which the fused op then does too.

Applies when the reduction is a sum along dim 0 of 2-D rows, the group
agrees with the world size, and the matmul's only user is the collective
(another user would need the unreduced product).
The rewrite depends only on the matmul form, never on whether this rank
holds a bias: a biased addmm on rank 0 and a plain mm on rank 1 both become
the same op, whose protocol does not depend on the bias.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fcpass.backends.base import MM_REDUCE_SCATTER
from fcpass.config import PassConfig
from fcpass.sites import site_text
from passes import report as outcomes
from passes.collectives import REDUCE_SCATTER, Collective, find_collectives, group_problem, unsupported_collectives
from passes.graph_edit import call, padding_to_multiple, replace_site
from passes.matmul_kinds import CONFIG_THRESHOLD, KINDS
from passes.matmuls import MatmulNode, match_matmul, producer_problem
from passes.naming import site_form
from passes.nodes import dim
from passes.report import FAMILY_DISABLED, FUSED, PassReport, Reason
from passes.rows import row_pad, row_view_source

FAMILY = MM_REDUCE_SCATTER


def rewrite(graph: fx.Graph, config: PassConfig, report: PassReport) -> None:
    """Fuse every site; record each reduce_scatter seen with what was done or why not (disabled: record only)."""
    enabled = config.fuse_mm_reduce_scatter
    for form, reason in unsupported_collectives(graph, REDUCE_SCATTER):
        report.add(FAMILY, f"{form}/-", reason)
    for rs in find_collectives(graph, REDUCE_SCATTER):
        producer, pad, steps = _rows_source(rs.input)
        mm = match_matmul(producer)
        form = site_form(rs, mm, producer, steps)
        reason = _unfusable(rs, mm, producer, pad, steps) if enabled else FAMILY_DISABLED
        report.add(FAMILY, form, reason or _replace(graph, rs, mm, pad, steps, config.runtime_text()) or FUSED)


# --------------------------------------------------------------------------- pattern

def _rows_source(node: fx.Node):
    """Walk back from the scattered tensor through row-keeping views and one zero-row pad.

    Returns (the node before them, rows padded, the steps walked).
    """
    steps, pad, padded = [], 0, False
    while isinstance(node, fx.Node):
        source = row_view_source(node)
        if source is None and not padded:
            rows = row_pad(node)
            if rows is not None:
                source, pad, padded = node.args[0], rows, True
        if source is None:
            break
        steps.append(node)
        node = source
    return node, pad, steps


# --------------------------------------------------------------------------- condition

def _unfusable(rs: Collective, mm: MatmulNode | None, producer, pad, steps) -> str | Reason | None:
    if rs.reduce_op != "sum":
        return Reason(outcomes.NOT_SUM, repr(rs.reduce_op))
    problem = group_problem(rs)
    if problem:
        return problem
    if dim(rs.input) != 2:
        return outcomes.NOT_2D_ROWS
    problem = producer_problem(mm, producer, steps)
    if problem:
        return problem
    if (pad or rs.pads_tokens) and mm.form == "scaled_mm":  # never on bias presence: it differs per rank
        return outcomes.FP8_PADDED
    if pad and rs.pads_tokens:
        return outcomes.PADDED_TWICE
    return None


# --------------------------------------------------------------------------- replacement

def _replace(graph: fx.Graph, rs: Collective, mm: MatmulNode, pad, steps, config_text: str) -> Reason | None:
    """Rewrite the site; None, or why the fused op rejects it (then the graph is left as it was)."""
    kind = KINDS[mm.kind]

    def build():
        rows_pad = _pad_to_multiple(graph, mm.x, rs.world_size) if rs.pads_tokens else pad
        operands = kind.row_parallel_operands(graph, mm)
        return call(graph, kind.fused_op(FAMILY), (mm.x, *operands), {
            "group_name": rs.group_name, "world_size": rs.world_size, "threshold_tokens": CONFIG_THRESHOLD,
            "pad_rows": rows_pad, "config": config_text, "site": site_text(rs.form, [mm.form])})

    return replace_site(graph, rs, mm, steps, build)


def _pad_to_multiple(graph: fx.Graph, x: fx.Node, world_size: int):
    """vllm-ascend's pad_size for ``x``'s token count (a size read where the count is symbolic)."""
    rows = x.meta["val"].shape[0]
    if not isinstance(rows, int):
        rows = call(graph, torch.ops.aten.sym_size.int, (x, 0))
    return padding_to_multiple(graph, rows, world_size)
