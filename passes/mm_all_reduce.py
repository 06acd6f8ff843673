"""matmul -> all_reduce  ==>  fcpass.mm_all_reduce

    y = mm(x, w)            (or addmm(bias, x, w), the linear ops, the scaled and oneDNN matmuls)
    [y = view(y, ...)]      row-keeping views, any number
    out = all_reduce(y, sum, group)
        ==>
    out = fcpass.mm_all_reduce(x, w, bias, group_name=group, config=config.runtime_text(), site=...)

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

from dataclasses import dataclass

import torch.fx as fx

from fcpass.backends.base import MM_ALL_REDUCE
from fcpass.config import PassConfig
from fcpass.dispatch import never_fused
from fcpass.sites import site_text
from passes import report as outcomes
from passes.collectives import AllReduce, scan_all_reduces
from passes.fusion import Fusion
from passes.graph_edit import call, replace_site
from passes.matmuls import KINDS, MatmulNode, match_matmul, producer_problem
from passes.naming import site_form
from passes.nodes import dim, fake_value
from passes.report import Reason
from passes.rows import through_row_views


# --------------------------------------------------------------------------- pattern

@dataclass(frozen=True)
class AllReduceSite:
    """An all_reduce, what its rows come from (the matmul, if one) and the row-keeping views in between."""

    ar: AllReduce
    mm: MatmulNode | None
    producer: object
    steps: tuple[fx.Node, ...]
    form: str


def _scan(graph: fx.Graph):
    all_reduces, undecoded = scan_all_reduces(graph)
    return map(_site, all_reduces), undecoded


def _site(ar: AllReduce) -> AllReduceSite:
    producer, steps = through_row_views(ar.input)
    mm = match_matmul(producer)
    return AllReduceSite(ar, mm, producer, tuple(steps), site_form(ar, mm, producer, steps))


# --------------------------------------------------------------------------- condition

def _unfusable(site: AllReduceSite, config: PassConfig) -> str | Reason | None:
    # Below its threshold the op runs the site's own ops, so these declines are about the fused path: where it
    # cannot pay, the op would only add a call, and the graph stays as compiled without fcpass.
    ar = site.ar
    if ar.form == "shm" and config.keep_faster_transports:
        return Reason(outcomes.FASTER_TRANSPORT, "vLLM's shm all_reduce; the fused op's would run over gloo")
    val = fake_value(ar.input)
    never = never_fused(MM_ALL_REDUCE, val.device, config) if val is not None else None
    if never:
        return Reason(outcomes.NEVER_FUSED, never)
    if dim(ar.input) != 2:
        return outcomes.ALL_REDUCE_NOT_2D_ROWS
    return producer_problem(site.mm, site.producer, site.steps)


# --------------------------------------------------------------------------- replacement

def _replace(graph: fx.Graph, site: AllReduceSite, config_text: str):
    """Rewrite the site; None, or why the fused op rejects it (then the graph is left as it was)."""
    ar, mm = site.ar, site.mm
    kind = KINDS[mm.kind]

    def build():
        operands = kind.row_parallel_operands(graph, mm)
        return call(graph, kind.fused_op(MM_ALL_REDUCE), (mm.x, *operands), {
            "group_name": ar.group_name, "config": config_text, "site": site_text(ar.form, [mm.form], ar.handle)})

    return replace_site(graph, ar, mm, site.steps, build)


FUSION = Fusion(MM_ALL_REDUCE, _scan, _unfusable, _replace)
