"""How collectives and matmuls appear in a post-grad graph, as Inductor patterns.

A pattern family is written once over these forms: it asks "is this node a
reduce_scatter, in any form?" and "is that node a matmul, in any form?",
and gets back the same decoded record whatever the form was.

Inner nodes of a pattern match only when they have a single user (the
pattern matcher's default), so a matmul whose output is used elsewhere too
never matches: fusing it would compute it twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import CallFunction, KeywordArg, PatternExpr, is_match

aten = torch.ops.aten


def _functional(name: str):
    return getattr(torch.ops._c10d_functional, name).default


def _vllm(name: str):
    """vLLM's custom-op collective, or None when vLLM is not imported (its ops are not registered)."""
    namespace = getattr(torch.ops, "vllm", None)
    try:
        return getattr(namespace, name).default
    except (AttributeError, RuntimeError):
        return None


@dataclass(frozen=True)
class Collective:
    """A decoded reduce_scatter or all_gather along dim 0."""

    form: str
    output: fx.Node  # the node whose value is the collective's result
    input: fx.Node
    world_size: int
    group_name: str
    reduce_op: str
    nodes: tuple[fx.Node, ...]  # every node of the matched form, output last


@dataclass(frozen=True)
class MatmulNode:
    """A decoded ``x @ w (+ bias)`` on 2-D rows; scaled forms also carry their scales."""

    form: str
    output: fx.Node
    x: fx.Node
    w: fx.Node
    bias: fx.Node | None
    x_scale: fx.Node | None = None
    w_scale: fx.Node | None = None
    out_dtype: torch.dtype | None = None
    # Linear-style ops take the weight as stored, (n, k); the fused ops want (k, n).
    weight_is_nk: bool = False

    @property
    def scaled(self) -> bool:
        return self.w_scale is not None

    def kn_weight(self, graph: fx.Graph) -> fx.Node:
        """The (k, n) weight node, transposing a stored (n, k) weight at the insertion point."""
        if not self.weight_is_nk:
            return self.w
        return call(graph, aten.permute.default, (self.w, [1, 0]))


def _wait(inner: PatternExpr) -> PatternExpr:
    return CallFunction(_functional("wait_tensor"), inner)


def _collective_forms(functional_op: str, functional_args: tuple, vllm_op: str) -> list[tuple[str, PatternExpr]]:
    """The functional-collective form (op + wait_tensor) and, when vLLM is loaded, vLLM's custom op on dim 0."""
    forms = [("c10d_functional",
              _wait(CallFunction(_functional(functional_op), KeywordArg("input"), *functional_args)))]
    if _vllm(vllm_op) is not None:
        forms.append(("vllm", CallFunction(_vllm(vllm_op), KeywordArg("input"), 0,
                                           KeywordArg("world_size"), KeywordArg("group_name"))))
    return forms


def reduce_scatter_forms() -> list[tuple[str, PatternExpr]]:
    return _collective_forms(
        "reduce_scatter_tensor", (KeywordArg("reduce_op"), KeywordArg("world_size"), KeywordArg("group_name")),
        "reduce_scatter",
    )


def all_gather_forms() -> list[tuple[str, PatternExpr]]:
    return _collective_forms("all_gather_into_tensor", (KeywordArg("world_size"), KeywordArg("group_name")),
                             "all_gather")


def matmul_forms() -> list[tuple[str, PatternExpr]]:
    x, w = KeywordArg("x"), KeywordArg("w")
    return [
        ("mm", CallFunction(aten.mm.default, x, w)),
        ("addmm", CallFunction(aten.addmm.default, KeywordArg("bias"), x, w)),
    ]


def unpad_end(node: fx.Node, source: fx.Node):
    """``end`` if ``node`` is ``source[:end]`` along dim 0 (the unpad after a gather), else None."""
    if node.op != "call_function" or node.target != aten.slice.Tensor or node.args[0] is not source:
        return None
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
    if dim != 0 or start not in (0, None) or step != 1 or end is None:
        return None
    return end


def collectives(graph: fx.Graph, forms):
    """Every collective of ``forms`` in ``graph`` (a snapshot: the caller may rewrite as it goes)."""
    for node in list(graph.nodes):
        found = match_collective(node, forms)
        if found is not None:
            yield found


def match_collective(node: fx.Node, forms) -> Collective | None:
    for form, pattern in forms:
        m = pattern.match(node)
        if is_match(m):
            return Collective(
                form=form, output=node, input=m.kwargs["input"], world_size=int(m.kwargs["world_size"]),
                group_name=str(m.kwargs["group_name"]), reduce_op=str(m.kwargs.get("reduce_op", "sum")),
                nodes=tuple(m.nodes),
            )
    return None


def match_matmul(node: fx.Node, forms) -> MatmulNode | None:
    for form, pattern in forms:
        m = pattern.match(node)
        if is_match(m):
            return MatmulNode(form, node, m.kwargs["x"], m.kwargs["w"], m.kwargs.get("bias"))
    return _match_scaled_mm(node) or _match_linear(node)


def _linear_targets() -> dict:
    """``y = x @ weight.T + bias`` ops, by form name: aten's and vLLM's (vllm-ascend's on NPU)."""
    targets = {aten.linear.default: "linear"}
    for name in ("unquantized_gemm", "rocm_unquantized_gemm"):
        op = _vllm(name)
        if op is not None:
            targets[op] = name
    return targets


def _match_linear(node: fx.Node) -> MatmulNode | None:
    if node.op != "call_function":
        return None
    form = _linear_targets().get(node.target)
    if form is None:
        return None
    args = dict(zip(("x", "weight", "bias"), node.args))
    args.update(node.kwargs)
    x = args["x"]
    if getattr(x.meta.get("val"), "dim", lambda: 0)() != 2:
        return None  # 3-D activations: not matched yet
    return MatmulNode(form, node, x, args["weight"], args.get("bias"), weight_is_nk=True)


def _match_scaled_mm(node: fx.Node) -> MatmulNode | None:
    """fp8 ``aten._scaled_mm`` with the semantics fcpass's scaled ops implement.

    Its arguments come positionally or by keyword, so it is decoded through
    the op schema rather than a fixed-arity pattern. A result scale or fast
    accumulation changes the numbers, so such a node is not a match.
    """
    if node.op != "call_function" or node.target != aten._scaled_mm.default:
        return None
    names = (  # aten::_scaled_mm's schema order
        "self", "mat2", "scale_a", "scale_b", "bias", "scale_result", "out_dtype", "use_fast_accum")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    if args.get("scale_result") is not None or args.get("use_fast_accum", False) or args.get("out_dtype") is None:
        return None
    return MatmulNode("scaled_mm", node, args["self"], args["mat2"], args.get("bias"),
                      x_scale=args["scale_a"], w_scale=args["scale_b"], out_dtype=args["out_dtype"])


def call(graph: fx.Graph, target, args: tuple) -> fx.Node:
    """Insert ``target(*args)`` with its fake value in ``meta["val"]``, as Inductor lowering expects.

    Computed from the inputs' fake values, never copied from the replaced
    node: that node's meta (``eager_input_vals`` and the like) describes
    another op's schema.
    """
    node = graph.call_function(target, args)
    vals = torch.fx.node.map_arg(args, lambda n: n.meta.get("val"))
    fake_mode = torch._guards.detect_fake_mode(torch.utils._pytree.tree_leaves(vals))
    if fake_mode is not None:
        with fake_mode:
            node.meta["val"] = target(*vals)
    return node


def erase_unused(graph: fx.Graph, nodes) -> None:
    """Erase the matched nodes the rewrite left without users, consumers first."""
    for node in sorted(set(nodes), key=_position(graph), reverse=True):
        if not node.users:
            graph.erase_node(node)


def _position(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__
