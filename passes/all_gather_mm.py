"""all_gather -> matmul(s)  ==>  fcpass.all_gather_mm

    g = all_gather(x, dim 0, group)
    y_i = mm(g, w_i)  (or addmm(b_i, g, w_i))   for every matmul user of g
    z_j = mm(g[:end], v_j)                       the unpad slice before a matmul
    ... other users of g
        ==>
    fused = fcpass.all_gather_mm(x, [w_i, v_j], [b_i, c_j], group, world_size, threshold)
    g = fused[0];  y_i = fused[1][i];  z_j = fused[1][j][:end]

``_scaled_mm`` consumers (one x_scale, one out_dtype) become
``fcpass.all_gather_scaled_mm`` the same way.

The unpad slice moves after the matmul: (g @ v)[:end] == g[:end] @ v, row
by row, so the result is exact; the padded rows cost a few extra matmul rows.

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
        consumers = _matmul_consumers(gathered, mm_forms)
        matmuls = [mm for mm, _ in consumers]
        if not matmuls:
            report.add(FAMILY, f"{ag.form}/-", "no matmul consumer")
            continue
        form = f"{ag.form}/{'+'.join(sorted({mm.form for mm in matmuls}))}"
        if len({(mm.scaled, mm.x_scale, mm.out_dtype) for mm in matmuls}) > 1:
            report.add(FAMILY, form, "matmuls differ in scaling (one fused op needs one kind)")
            continue
        # Inserted before the first matmul; weights defined later are put in order by the
        # pass's topological sort afterwards.
        with graph.inserting_before(matmuls[0].output):
            weights = [mm.kn_weight(graph) for mm in matmuls]
            first, biases = matmuls[0], [mm.bias for mm in matmuls]
            if first.scaled:
                target = torch.ops.fcpass.all_gather_scaled_mm.default
                op_args = (ag.input, first.x_scale, weights, [mm.w_scale for mm in matmuls], biases, first.out_dtype)
            else:
                target = torch.ops.fcpass.all_gather_mm.default
                op_args = (ag.input, weights, biases)
            fused = forms.call(graph, target, (*op_args, ag.group_name, ag.world_size, threshold_tokens))
            new_gathered = forms.call(graph, operator.getitem, (fused, 0))
            outs = forms.call(graph, operator.getitem, (fused, 1))
            for i, (mm, end) in enumerate(consumers):
                out = forms.call(graph, operator.getitem, (outs, i))
                if end is not None:
                    out = forms.call(graph, torch.ops.aten.slice.Tensor, (out, 0, 0, end))
                mm.output.replace_all_uses_with(out)
        gathered.replace_all_uses_with(new_gathered)
        erase_unused(graph, [*ag.nodes, *(mm.output for mm in matmuls), *(mm.x for mm in matmuls)])
        report.add(FAMILY, form, FUSED)


def _matmul_consumers(gathered: fx.Node, mm_forms) -> list[tuple[forms.MatmulNode, object]]:
    """(matmul, unpad end or None) for every matmul reading the gathered rows, directly or via ``[:end]``."""
    consumers = []
    for user in list(gathered.users):
        end = forms.unpad_end(user, gathered)
        rows = user if end is not None else gathered
        for candidate in (list(user.users) if end is not None else [user]):
            mm = forms.match_matmul(candidate, mm_forms)
            if mm is not None and mm.x is rows and mm.w is not rows:
                consumers.append((mm, end))
    return consumers
