"""Row-preserving steps between a matmul and its collective: views, a zero-row pad, the unpad, a quantize.

A family walks through these from the collective to the matmul; each
recognizer returns what the rewrite needs of the step, or None / False.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from passes.nodes import bound_args, dim, fake_value, npu_op, vllm_op

aten = torch.ops.aten

_ROW_VIEWS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints,
})


def row_view_source(node: fx.Node) -> fx.Node | None:
    """The input of a reshape-like ``node`` that keeps the rows (3-D <-> 2-D around a matmul), else None.

    Reshapes keep the element count and row-major order by definition, so an
    unchanged last dim means the same rows.
    """
    if node.op != "call_function" or node.target not in _ROW_VIEWS:
        return None
    out, source = fake_value(node), fake_value(node.args[0])
    if not isinstance(out, torch.Tensor) or not isinstance(source, torch.Tensor) or min(out.dim(), source.dim()) < 1:
        return None
    return node.args[0] if statically_known_true(out.shape[-1] == source.shape[-1]) else None


def through_row_views(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The node before any chain of row-keeping views ending at ``node``, and the views walked (last first)."""
    steps = []
    while isinstance(node, fx.Node) and (source := row_view_source(node)) is not None:
        steps.append(node)
        node = source
    return node, steps


def row_pad(node: fx.Node):
    """``p`` if ``node`` appends p zero rows to a 2-D tensor (``F.pad(t, (0, 0, 0, p))``), else None."""
    if node.op != "call_function" or node.target != aten.constant_pad_nd.default or dim(node.args[0]) != 2:
        return None
    args = bound_args(node)
    pad = list(args["pad"])
    if len(pad) != 4 or pad[:3] != [0, 0, 0] or args["value"] != 0:
        return None
    return pad[3]


def unpad_end(node: fx.Node, source: fx.Node):
    """``end`` if ``node`` is ``source[:end]`` along dim 0 (the unpad after a gather), else None."""
    if node.op != "call_function" or node.target != aten.slice.Tensor or node.args[0] is not source:
        return None
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
    if dim != 0 or start not in (0, None) or step != 1 or end is None:
        return None
    return end


def rowwise_quantize(node: fx.Node) -> bool:
    """Ascend static quantization, each row on its own, so it commutes with gathering rows: vllm-ascend's
    ``vllm.quantize(x, scale, scale_reciprocal, offset)`` (what its W8A8 linear emits: ``npu_quantize`` along
    the last axis inside), or ``npu_quantize`` with a per-tensor or per-channel scale."""
    if node.op != "call_function":
        return False
    vllm_quantize = vllm_op("quantize")
    if vllm_quantize is not None and node.target == vllm_quantize:
        return True
    target = npu_op("npu_quantize")
    if target is None or node.target != target:
        return False
    args = bound_args(node)  # torch-npu's schema: npu_quantize(Tensor self, Tensor scales, ..., int axis=1, ...)
    scales = fake_value(args["scales"])
    along_k = args["axis"] in (-1, dim(args["self"]) - 1)
    return scales is not None and (scales.numel() == 1 or along_k)


def step_name(step: fx.Node) -> str:
    """What a step walked through is called in a site's form."""
    if step.target == aten.constant_pad_nd.default:
        return "pad"
    if step.target == aten.slice.Tensor:
        return "unpad"
    return "quantize" if rowwise_quantize(step) else "view"
