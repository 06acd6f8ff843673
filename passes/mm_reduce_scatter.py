"""matmul -> reduce_scatter  ==>  fcpass.mm_reduce_scatter

    y = mm(x, w)            (or addmm(bias, x, w))
    [y = view(y, ...)]      row-keeping views (3-D hidden states), any number
    [y = pad(y, (0, 0, 0, p))]   zero rows up to a multiple of world_size
    out = reduce_scatter(y, dim 0, sum, group)
        ==>
    out = fcpass.mm_reduce_scatter(x, w, bias, group_name=group, world_size=world_size, pad_rows=p,
                                   config=config.runtime_text(), site="<collective>/<matmul>")

and the same from ``_scaled_mm`` and Ascend's ``npu_quant_matmul`` to
``fcpass.mm_reduce_scatter_scaled``; from a sum of matmuls of the same rows, ``mm(x1, w1) + mm(x2, w2)``
(Falcon's attention and MLP outputs), to ``fcpass.mm_sum_reduce_scatter([x1, x2], [w1, w2], ...)``; linear-style matmuls (``aten.linear``,
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

from dataclasses import dataclass

import torch
import torch.fx as fx

from fcpass.backends.base import MM_REDUCE_SCATTER
from fcpass.config import PassConfig
from fcpass.ops import SUM_FUSED_OPS
from fcpass.sites import site_text
from passes import report as outcomes
from passes.collectives import REDUCE_SCATTER, Collective, group_problem, scan
from passes.fusion import Fusion
from passes.graph_edit import call, padding_to_multiple, replace_site
from passes.matmuls import KINDS, MatmulNode, MatmulSum, match_matmul, match_sum, producer_problem
from passes.naming import site_form
from passes.nodes import dim
from passes.report import Reason
from passes.rows import row_pad, row_view_source


# --------------------------------------------------------------------------- pattern

@dataclass(frozen=True)
class ScatterSite:
    """A reduce_scatter, what its rows come from (the matmul, if one) and the steps in between."""

    rs: Collective
    mm: MatmulNode | MatmulSum | None
    producer: object
    pad: int  # zero rows an explicit pad adds
    steps: tuple[fx.Node, ...]
    form: str


def _scan(graph: fx.Graph):
    collectives, undecoded = scan(graph, REDUCE_SCATTER)
    return map(_site, collectives), undecoded


def _site(rs: Collective) -> ScatterSite:
    producer, pad, steps = _rows_source(rs.input)
    mm = match_sum(producer) or match_matmul(producer)  # a sum first: its last term may be an addmm
    return ScatterSite(rs, mm, producer, pad, tuple(steps), site_form(rs, mm, producer, steps))


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

def _unfusable(site: ScatterSite, config: PassConfig) -> str | Reason | None:
    rs, mm, pad = site.rs, site.mm, site.pad
    if rs.reduce_op != "sum":
        return Reason(outcomes.NOT_SUM, repr(rs.reduce_op))
    problem = group_problem(rs)
    if problem:
        return problem
    if dim(rs.input) != 2:
        return outcomes.NOT_2D_ROWS
    problem = producer_problem(mm, site.producer, site.steps)
    if problem:
        return problem
    if isinstance(mm, MatmulSum) and mm.kind not in SUM_FUSED_OPS:
        return Reason(outcomes.SUM_KIND, mm.form)
    if (pad or rs.pads_tokens) and mm.form == "scaled_mm":  # never on bias presence: it differs per rank
        return outcomes.FP8_PADDED
    if pad and rs.pads_tokens:
        return outcomes.PADDED_TWICE
    return None


# --------------------------------------------------------------------------- replacement

def _replace(graph: fx.Graph, site: ScatterSite, config_text: str) -> Reason | None:
    """Rewrite the site; None, or why the fused op rejects it (then the graph is left as it was)."""
    rs, mm, pad = site.rs, site.mm, site.pad
    kind = KINDS[mm.kind]

    def build():
        rows_pad = _pad_to_multiple(graph, mm.x, rs.world_size) if rs.pads_tokens else pad
        if isinstance(mm, MatmulSum):  # each product's x beside its weight: the gather's operands, per product
            products = list(mm.products)
            op, operands = kind.fused_sum_op(), ([p.x for p in products], *kind.gather_operands(graph, products))
        else:
            products = [mm]
            op, operands = kind.fused_op(MM_REDUCE_SCATTER), (mm.x, *kind.row_parallel_operands(graph, mm))
        return call(graph, op, operands, {
            "group_name": rs.group_name, "world_size": rs.world_size,
            "pad_rows": rows_pad, "config": config_text, "site": site_text(rs.form, [p.form for p in products])})

    return replace_site(graph, rs, mm, site.steps, build)


def _pad_to_multiple(graph: fx.Graph, x: fx.Node, world_size: int):
    """vllm-ascend's pad_size for ``x``'s token count (a size read where the count is symbolic)."""
    rows = x.meta["val"].shape[0]
    if not isinstance(rows, int):
        rows = call(graph, torch.ops.aten.sym_size.int, (x, 0))
    return padding_to_multiple(graph, rows, world_size)


FUSION = Fusion(MM_REDUCE_SCATTER, _scan, _unfusable, _replace)
