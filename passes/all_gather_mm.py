"""all_gather -> matmul(s)  ==>  fcpass.all_gather_mm

    g = all_gather(x, dim 0, group)
    y_i = mm(g, w_i)  (or addmm(b_i, g, w_i))   for every matmul reading g's rows
    z_j = mm(g[:end], v_j)                       the unpad slice before a matmul
    ... other users of g
        ==>
    fused = fcpass.all_gather_mm(x, [w_i, v_j], [b_i, c_j], group_name=group, world_size=world_size,
                                 config=config.runtime_text(), site=...)
    g = fused[0];  y_i = fused[1][i];  z_j = fused[1][j][:end]

A matmul reads g's rows directly, through the unpad slice, through views
that keep the rows (``unsqueeze``/``reshape`` to 3-D and back), or through
Ascend's row-wise ``npu_quantize`` (or vllm-ascend's ``vllm.quantize``): quantizing commutes with gathering rows,
so the quantize moves before the gather (which then moves int8, not floats)
and the matmuls become one ``fcpass.all_gather_scaled_mm``, as
``_scaled_mm`` consumers (one x_scale, one out_dtype) do.

The unpad slice moves after the matmul: (g @ v)[:end] == g[:end] @ v, row
by row, so the result is exact; the padded rows cost a few extra matmul rows.
vllm-ascend's gather drops its padding at run time: each result goes
through ``fcpass.drop_token_padding``; and it gathers only where its FlashComm
is on in that forward (``flash_comm=True``: with it off the op multiplies the
local rows, as the original then passes them through).

One gathered tensor often feeds several matmuls; a one-to-one traced
replacement cannot express that, so the rewrite is built by hand: one fused
op for all matmul users, its gathered output rewired to the other users.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from fcpass.backends.base import ALL_GATHER_MM
from fcpass.config import PassConfig
from fcpass.sites import site_text
from passes import report as outcomes
from passes.collectives import ALL_GATHER, Collective, group_problem, scan
from passes.fusion import Fusion
from passes.graph_edit import call, erase_unused, insert_fused
from passes.matmuls import KINDS, MatmulNode, match_matmul
from passes.naming import site_form
from passes.nodes import dim
from passes.report import Reason
from passes.rows import row_view_source, rowwise_quantize, unpad_end

@dataclass(frozen=True)
class Consumer:
    """A matmul reading the gathered rows, and the row-keeping steps in between."""

    mm: MatmulNode
    steps: tuple[fx.Node, ...]
    end: object = None  # the unpad slice's end, if any
    quantize: fx.Node | None = None

    def erase(self) -> None:
        """The matmul, then the steps no other matmul reads (consumers share the steps they pass through)."""
        graph = self.mm.output.graph
        self.mm.erase()
        erase_unused(graph, self.steps)


@dataclass(frozen=True)
class GatherSite:
    """An all_gather and the matmuls reading its rows: those a fused op can take, and why the others cannot."""

    ag: Collective
    consumers: tuple[Consumer, ...]  # the others keep reading the gathered rows
    matmul_problems: tuple[str, ...]
    form: str


# --------------------------------------------------------------------------- pattern

def _scan(graph: fx.Graph):
    collectives, undecoded = scan(graph, ALL_GATHER)
    return map(_site, collectives), undecoded


def _site(ag: Collective) -> GatherSite:
    found = _consumers(ag.output)
    consumers = tuple(c for c in found if not c.mm.problem)
    steps = [step for c in consumers for step in c.steps]
    form = site_form(ag, found[0].mm if found else None, "-", steps)
    return GatherSite(ag, consumers, tuple(c.mm.problem for c in found if c.mm.problem), form)


def _consumers(gathered: fx.Node) -> list[Consumer]:
    """Every matmul reading ``gathered``'s rows: directly, via ``[:end]``, row-keeping views, a row-wise quantize."""
    found = []

    def walk(node: fx.Node, steps: tuple, end, quantize) -> None:
        for user in list(node.users):
            mm = match_matmul(user)
            if mm is not None and mm.x is node and mm.w is not node and dim(node) == 2:
                found.append(Consumer(mm, steps, end, quantize))
                continue
            unpad = unpad_end(user, node) if not steps else None
            if unpad is not None:
                walk(user, (*steps, user), unpad, quantize)
            elif row_view_source(user) is node:
                walk(user, (*steps, user), end, quantize)
            elif quantize is None and rowwise_quantize(user) and user.args[0] is node:
                walk(user, (*steps, user), end, user)

    walk(gathered, (), None, None)
    return found


# --------------------------------------------------------------------------- condition

def _unfusable(site: GatherSite, config: PassConfig) -> str | Reason | None:
    ag, consumers, matmul_problems = site.ag, site.consumers, site.matmul_problems
    problem = group_problem(ag)
    if problem:
        return problem
    if not consumers:
        return Reason(outcomes.MATMUL_ARGUMENTS, matmul_problems[0]) if matmul_problems else outcomes.NO_MATMUL_CONSUMER
    matmuls = [c.mm for c in consumers]
    quantizes = {_quantize_key(c.quantize) for c in consumers}
    if len({(mm.kind, mm.x_scale, mm.out_dtype) for mm in matmuls}) > 1 or len(quantizes) > 1:
        return outcomes.MIXED_MATMULS
    if any(mm.x_scale is not None and dim(mm.x_scale) >= 2 for mm in matmuls):
        return outcomes.PER_TOKEN_SCALE
    return None


def _quantize_key(quantize: fx.Node | None):
    return None if quantize is None else (quantize.target, quantize.args[1:], tuple(quantize.kwargs.items()))


# --------------------------------------------------------------------------- replacement

def _replace(graph: fx.Graph, site: GatherSite, config_text: str) -> Reason | None:
    """Rewrite the site; None, or why the fused op rejects it (then the graph is left as it was)."""
    ag, consumers = site.ag, site.consumers
    matmuls = [c.mm for c in consumers]
    kind = KINDS[matmuls[0].kind]  # one kind for all: see _unfusable
    quantize = consumers[0].quantize

    def build():
        x = ag.input
        if quantize is not None:
            x = call(graph, quantize.target, (x, *quantize.args[1:]), dict(quantize.kwargs))
        return call(graph, kind.fused_op(ALL_GATHER_MM), (x, *kind.gather_operands(graph, matmuls)), {
            "group_name": ag.group_name, "world_size": ag.world_size,
            "config": config_text, "site": site_text(ag.form, [mm.form for mm in matmuls])})

    # Inserted before the first matmul; nodes defined later are put in order by the
    # pass's topological sort afterwards.
    fused = insert_fused(graph, matmuls[0].output, build)
    if isinstance(fused, Reason):
        return fused
    with graph.inserting_before(matmuls[0].output):
        if quantize is None:  # with a quantize, other users keep the float gather
            ag.replace_with(_unpadded(graph, ag, call(graph, operator.getitem, (fused, 0))))
        outs = call(graph, operator.getitem, (fused, 1))
        for i, c in enumerate(consumers):
            out = _unpadded(graph, ag, call(graph, operator.getitem, (outs, i)))
            if c.end is not None:
                out = call(graph, torch.ops.aten.slice.Tensor, (out, 0, 0, c.end))
            c.mm.replace_with(out)
    for c in consumers:
        c.erase()
    ag.erase()
    return None


def _unpadded(graph: fx.Graph, ag: Collective, rows: fx.Node) -> fx.Node:
    if not ag.pads_tokens:
        return rows
    return call(graph, torch.ops.fcpass.drop_token_padding.default, (rows,))


FUSION = Fusion(ALL_GATHER_MM, _scan, _unfusable, _replace)
