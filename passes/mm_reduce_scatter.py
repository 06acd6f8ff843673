"""matmul -> reduce_scatter  ==>  fcpass.mm_reduce_scatter

    y = mm(x, w)            (or addmm(bias, x, w))
    out = reduce_scatter(y, dim 0, sum, group)
        ==>
    out = fcpass.mm_reduce_scatter(x, w, bias, group, world_size, threshold)

and the same from ``_scaled_mm(x, w, x_scale, w_scale, bias, out_dtype)`` to
``fcpass.mm_reduce_scatter_scaled``; linear-style matmuls (``aten.linear``,
``vllm.unquantized_gemm``) get their stored (n, k) weight transposed.

Applies when the reduction is a sum along dim 0 and the matmul's only user
is the collective (another user would need the unreduced product).
The rewrite depends only on the matmul form, never on whether this rank
holds a bias: a biased addmm on rank 0 and a plain mm on rank 1 both become
the same op, whose protocol does not depend on the bias.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from passes import forms
from passes.forms import erase_unused
from passes.report import FUSED, PassReport

FAMILY = "mm_reduce_scatter"


def rewrite(graph: fx.Graph, threshold_tokens: int, report: PassReport) -> None:
    mm_forms = forms.matmul_forms()
    for rs in forms.collectives(graph, forms.reduce_scatter_forms()):
        producer = rs.input
        mm = forms.match_matmul(producer, mm_forms)
        form = f"{rs.form}/{mm.form if mm else getattr(producer, 'target', producer)}"
        reason = _unfusable(rs, mm, producer)
        if reason:
            report.add(FAMILY, form, reason)
            continue
        collective_args = (rs.group_name, rs.world_size, threshold_tokens)
        with graph.inserting_before(rs.output):
            w = mm.kn_weight(graph)
            if mm.scaled:
                fused = forms.call(
                    graph, torch.ops.fcpass.mm_reduce_scatter_scaled.default,
                    (mm.x, w, mm.x_scale, mm.w_scale, mm.bias, mm.out_dtype, *collective_args),
                )
            else:
                fused = forms.call(
                    graph, torch.ops.fcpass.mm_reduce_scatter.default, (mm.x, w, mm.bias, *collective_args)
                )
        rs.output.replace_all_uses_with(fused)
        erase_unused(graph, [*rs.nodes, producer])
        report.add(FAMILY, form, FUSED)


def _unfusable(rs: forms.Collective, mm: forms.MatmulNode | None, producer) -> str | None:
    if rs.reduce_op != "sum":
        return f"reduce op {rs.reduce_op!r}, not sum"
    if mm is None:
        return "no matmul producer"
    if len(producer.users) > 1:
        return "matmul output has other users"
    return None
