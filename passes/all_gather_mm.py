"""all_gather -> matmul(s)  ==>  fcpass.all_gather_mm

    g = all_gather(x, dim 0, group)
    y_i = mm(g, w_i)  (or addmm(b_i, g, w_i))   for every matmul user of g
    ... other users of g
        ==>
    fused = fcpass.all_gather_mm(x, [w_i], [b_i], group, world_size, threshold)
    g = fused[0];  y_i = fused[1][i]

One gathered tensor often feeds several matmuls; a one-to-one traced
replacement cannot express that, so the rewrite is built by hand: one fused
op for all matmul users, its gathered output rewired to the other users.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from passes import forms
from passes.forms import erase_unused
from passes.report import FUSED, PassReport

FAMILY = "all_gather_mm"


def rewrite(graph: fx.Graph, threshold_tokens: int, report: PassReport) -> None:
    mm_forms = forms.matmul_forms()
    for ag in forms.collectives(graph, forms.all_gather_forms()):
        gathered = ag.output
        matmuls = [
            mm for mm in (forms.match_matmul(user, mm_forms) for user in gathered.users)
            if mm is not None and mm.x is gathered and mm.w is not gathered
        ]
        if not matmuls:
            report.add(FAMILY, f"{ag.form}/-", "no matmul consumer")
            continue
        form = f"{ag.form}/{'+'.join(sorted({mm.form for mm in matmuls}))}"
        # Inserted before the first matmul; weights defined later are put in order by the
        # pass's topological sort afterwards.
        with graph.inserting_before(matmuls[0].output):
            fused = graph.call_function(
                torch.ops.fcpass.all_gather_mm.default,
                (ag.input, [mm.w for mm in matmuls], [mm.bias for mm in matmuls],
                 ag.group_name, ag.world_size, threshold_tokens),
            )
            new_gathered = graph.call_function(operator.getitem, (fused, 0))
            new_gathered.meta.update(gathered.meta)
            outs = graph.call_function(operator.getitem, (fused, 1))
            for i, mm in enumerate(matmuls):
                out = graph.call_function(operator.getitem, (outs, i))
                out.meta.update(mm.output.meta)
                mm.output.replace_all_uses_with(out)
        gathered.replace_all_uses_with(new_gathered)
        erase_unused(graph, [*ag.nodes, *(mm.output for mm in matmuls)])
        report.add(FAMILY, form, FUSED)
