"""matmul -> all_reduce  ==>  fcpass.mm_all_reduce

    y = mm(x, w)            (or addmm(bias, x, w), the linear ops, the scaled and oneDNN matmuls)
    [y = view(y, ...)]      row-keeping views, any number
    out = all_reduce(y, sum, group)
        ==>
    out = fcpass.mm_all_reduce(x, w, bias, group, -1, config.runtime_text())

Every row-parallel linear of a dense model on current vLLM ends in this
form (vLLM's ``all_reduce`` op or the functional ``all_reduce`` +
``wait_tensor``). Unlike sequence parallelism it changes no shapes, so the
op's runtime guard alone decides, per call, between the plain matmul +
all_reduce (decode sizes) and the backend's fused kernel or pipeline: one
compiled graph serves every token count. It runs after sequence
parallelism and sees the all_reduces the split left.

Applies when the all_reduce is a sum over 2-D rows (of any group: the op
reads the group's size when it runs, no shape depends on it), its input is a matmul
whose only user is the all_reduce (another user would need the unreduced
product), its transport is not faster than the fused op's (vLLM's CPU
shared-memory all_reduce moves the rows through one segment, while the
fused op's collectives run over the group's gloo), and the op could take
its fused path at all: on CPU tensors the generic backend never does by
default (no overlap to gain there), so with no threshold or table asking
for it the site stays as compiled without fcpass, not an op call that only
ever runs the plain path. Like the other families
the rewrite reads the matmul's form, never whether this rank holds a bias
(vLLM passes it on rank 0 only).
"""

from __future__ import annotations

import torch.fx as fx

from fcpass.backends.base import MM_ALL_REDUCE
from fcpass.config import PassConfig
from fcpass.dispatch import never_fused
from fcpass.sites import site_text
from passes import report as outcomes
from passes.collectives import AllReduce, match_all_reduce, unsupported_all_reduces
from passes.graph_edit import call, replace_site
from passes.matmul_kinds import CONFIG_THRESHOLD, KINDS
from passes.matmuls import MatmulNode, match_matmul, producer_problem
from passes.naming import site_form
from passes.nodes import dim, fake_value
from passes.report import FAMILY_DISABLED, FUSED, PassReport, Reason
from passes.rows import through_row_views

FAMILY = MM_ALL_REDUCE


def rewrite(graph: fx.Graph, config: PassConfig, report: PassReport) -> None:
    """Fuse every site; record each all_reduce seen with what was done or why not (disabled: record only)."""
    for form, reason in unsupported_all_reduces(graph):
        report.add(FAMILY, f"{form}/-", reason)
    for ar in [ar for node in list(graph.nodes) if (ar := match_all_reduce(node)) is not None]:
        producer, steps = through_row_views(ar.input)
        mm = match_matmul(producer)
        form = site_form(ar, mm, producer, steps)
        if not config.fuse_mm_all_reduce:
            report.add(FAMILY, form, FAMILY_DISABLED)
            continue
        reason = _unfusable(ar, mm, producer, steps, config)
        report.add(FAMILY, form, reason or _replace(graph, ar, mm, steps, config.runtime_text()) or FUSED)


# --------------------------------------------------------------------------- condition

def _unfusable(ar: AllReduce, mm: MatmulNode | None, producer, steps, config: PassConfig) -> str | Reason | None:
    # Below its threshold the op runs the site's own ops, so these declines are about the fused path: where it
    # cannot pay, the op would only add a call, and the graph stays as compiled without fcpass.
    if ar.form == "shm" and config.keep_faster_transports:
        return Reason(outcomes.FASTER_TRANSPORT, "vLLM's shm all_reduce; the fused op's would run over gloo")
    val = fake_value(ar.input)
    never = never_fused(FAMILY, val.device, config) if val is not None else None
    if never:
        return Reason(outcomes.NEVER_FUSED, never)
    if dim(ar.input) != 2:
        return outcomes.ALL_REDUCE_NOT_2D_ROWS
    return producer_problem(mm, producer, steps)


# --------------------------------------------------------------------------- replacement

def _replace(graph: fx.Graph, ar: AllReduce, mm: MatmulNode, steps, config_text: str):
    """Rewrite the site; None, or why the fused op rejects it (then the graph is left as it was)."""
    kind = KINDS[mm.kind]

    def build():
        operands = kind.row_parallel_operands(graph, mm)
        return call(graph, kind.fused_op(FAMILY), (mm.x, *operands), {
            "group_name": ar.group_name, "threshold_tokens": CONFIG_THRESHOLD, "config": config_text,
            "site": site_text(ar.form, [mm.form], ar.handle)})

    return replace_site(graph, ar, mm, steps, build)
