"""The table of matmul kinds: which fused op takes a matmul of each kind, in each family, and its operands.

Every family looks a matmul's ``kind`` up here instead of comparing names,
so a new matmul form is one matcher (passes/matmuls.py) and, when no fused
op takes it yet, one entry here. The operands are the op's arguments after
the activation rows and before the collective's (group, world size, ...);
the row-parallel ops (reduce_scatter, all_reduce) take one matmul's operands
in one order, the gather ops a list per operand, so each entry builds both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from fcpass.ops import FUSED_OPS
from passes.matmuls import MatmulNode

# The fused ops' threshold_tokens argument that means "the config's" (the op resolves it from the config text
# it is given: the config's threshold, its table's bucket, the backend's default).
CONFIG_THRESHOLD = -1


@dataclass(frozen=True)
class MatmulKind:
    """How the fused ops of one kind of matmul are given the matmuls' operands; which ops they are is the
    runtime's table (``fcpass.ops.FUSED_OPS``)."""

    name: str
    row_parallel_operands: Callable[[fx.Graph, MatmulNode], tuple]  # both row-parallel ops take these
    gather_operands: Callable[[fx.Graph, list[MatmulNode]], tuple]  # every matmul of one gather, one kind

    def fused_op(self, family: str):
        """``torch.ops.fcpass.<op>.default`` of ``family`` over this kind, registered by ``import fcpass``."""
        return getattr(torch.ops.fcpass, FUSED_OPS[self.name][family]).default


def _each(matmuls: list[MatmulNode], field: str) -> list:
    return [getattr(mm, field) for mm in matmuls]


def _kn_weights(graph: fx.Graph, matmuls: list[MatmulNode]) -> list[fx.Node]:
    return [mm.kn_weight(graph) for mm in matmuls]


KINDS: dict[str, MatmulKind] = {
    # x @ w (+ bias): mm, addmm, the linear ops.
    "plain": MatmulKind(
        "plain",
        row_parallel_operands=lambda graph, mm: (mm.kn_weight(graph), mm.bias),
        gather_operands=lambda graph, mms: (_kn_weights(graph, mms), _each(mms, "bias")),
    ),
    # fp8 _scaled_mm, Ascend W8A8 npu_quant_matmul: the gathered rows have one x_scale and out_dtype.
    "scaled": MatmulKind(
        "scaled",
        row_parallel_operands=lambda graph, mm: (mm.kn_weight(graph), mm.x_scale, mm.w_scale, mm.bias, mm.out_dtype),
        gather_operands=lambda graph, mms: (mms[0].x_scale, _kn_weights(graph, mms), _each(mms, "w_scale"),
                                            _each(mms, "bias"), mms[0].out_dtype),
    ),
    # vLLM's CPU oneDNN linear: the op takes the handler (the weight packed inside) and its output width.
    "onednn": MatmulKind(
        "onednn",
        row_parallel_operands=lambda graph, mm: (mm.w, mm.handler_n, mm.bias),
        gather_operands=lambda graph, mms: (_each(mms, "w"), _each(mms, "handler_n"), _each(mms, "bias")),
    ),
}
