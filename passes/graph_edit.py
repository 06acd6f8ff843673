"""Editing the graph: inserting nodes with their fake values, a fused op that may reject its site, erasing.

Matched records (collectives, matmuls) replace and erase themselves through
``Match``, as torch's micro_pipeline_tp matches do, so a family's rewrite
reads as pattern, condition, replacement.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fcpass.validate import FusedOpInputError
from passes import report as outcomes
from passes.report import Reason

aten = torch.ops.aten


def call(graph: fx.Graph, target, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` with its fake value in ``meta["val"]``, as Inductor lowering expects.

    Computed from the inputs' fake values (or symbolic ints), never copied
    from the replaced node: that node's meta (``eager_input_vals`` and the
    like) describes another op's schema.
    """
    node = graph.call_function(target, args, kwargs or {})
    refresh_val(node)
    return node


def refresh_val(node: fx.Node) -> None:
    """Recompute ``meta["val"]`` of ``node`` from its inputs' (after the rewrite changed an input's shape)."""
    vals, kwvals = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    leaves = torch.utils._pytree.tree_leaves((vals, kwvals))
    fake_mode = torch._guards.detect_fake_mode(leaves)
    if fake_mode is not None:
        with fake_mode:
            node.meta["val"] = node.target(*vals, **kwvals)
    elif leaves and all(isinstance(v, (int, torch.SymInt)) for v in leaves):
        node.meta["val"] = node.target(*vals, **kwvals)  # size arithmetic


def padding_to_multiple(graph: fx.Graph, rows, world_size: int):
    """``(-rows) % world_size``, the zero rows that make ``rows`` a multiple of world_size: an int for a static
    count, else graph arithmetic on the symbolic count's node."""
    if isinstance(rows, int):
        return -rows % world_size
    return call(graph, operator.mod, (call(graph, operator.neg, (rows,)), world_size))


def insert_fused(graph: fx.Graph, before: fx.Node, build) -> fx.Node | Reason:
    """``build()``'s fused op node, inserted before ``before``; or, where the op's validation (run by its fake
    impl on the site's fake values) rejects the site, the reason, with every node ``build`` inserted erased
    again: a site the fused op cannot take is left as it was, never a failed compile."""
    last_before = before.prev
    with graph.inserting_before(before):
        try:
            return build()
        except FusedOpInputError as exc:
            while before.prev is not last_before:  # consumers first
                graph.erase_node(before.prev)
            return Reason(outcomes.REJECTED_BY_OP, str(exc))


def replace_site(graph: fx.Graph, collective: "Match", matmul: "Match", steps, build) -> Reason | None:
    """``build()``'s fused op in place of ``collective``, the row steps between them and ``matmul``; or, where the
    op rejects the site, its reason with the graph left as it was."""
    fused = insert_fused(graph, collective.output, build)
    if isinstance(fused, Reason):
        return fused
    collective.replace_with(fused)
    collective.erase()
    erase_unused(graph, steps)
    matmul.erase()
    return None


def erase_unused(graph: fx.Graph, nodes) -> None:
    """Erase the matched nodes the rewrite left without users, consumers first."""
    for node in sorted(set(nodes), key=_position(graph), reverse=True):
        if not node.users:
            graph.erase_node(node)


def _position(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__


class Match:
    """A decoded form in the graph: ``output`` holds its result, ``nodes`` is every node of the form, output last."""

    output: fx.Node
    nodes: tuple[fx.Node, ...]

    def replace_with(self, new_node: fx.Node) -> None:
        """Users of the result read ``new_node``; so do size reads of the form's inner nodes (a functional
        collective's handle may have its size read), which have the result's shape."""
        self.output.replace_all_uses_with(new_node)
        for node in self.nodes:
            for user in list(node.users):
                if user.target == aten.sym_size.int and node is not self.output:
                    user.replace_input_with(node, new_node)

    def erase(self) -> None:
        """Erase the nodes of the form the rewrite left without users, consumers first."""
        erase_unused(self.output.graph, self.nodes)
