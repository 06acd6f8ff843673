"""How collectives appear in a post-grad graph, one matcher per form, and how they are emitted again.

A pattern family is written once over these forms: it asks "is this node a
reduce_scatter, in any form?" and gets back the same decoded record
whatever the form was; the record replaces and erases itself.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from passes import process
from passes import report as outcomes
from passes.graph_edit import Match, call
from passes.nodes import (AUTO_FUNCTIONALIZED, aten, bound_args, fake_value, functional_op, mutated_arg,
                          registered_op, vllm_op)
from passes.report import Reason


@dataclass(frozen=True)
class Collective(Match):
    """A decoded reduce_scatter or all_gather along dim 0."""

    form: str
    output: fx.Node  # the node whose value is the collective's result
    input: fx.Node
    world_size: int
    group_name: str
    reduce_op: str
    nodes: tuple[fx.Node, ...]  # every node of the matched form, output last
    # vllm-ascend's FlashComm ops pad the tokens to a multiple of world_size before a
    # reduce_scatter and drop that padding (sized at run time) after an all_gather.
    pads_tokens: bool = False


@dataclass(frozen=True)
class CollectiveKind:
    """One collective's ops in each form: c10d functional, vLLM's custom op, vllm-ascend's padding op."""

    name: str
    functional: str
    vllm: str
    ascend: str
    reduces: bool  # takes a reduce op after its input (functional form)

    def matchers(self) -> tuple:
        """Every form of this collective, one matcher each (node -> Collective or None): torch's functional
        op and its ``wait_tensor`` chain, vLLM's custom op on dim 0, vllm-ascend's op."""
        return (functools.partial(_functional_collective, self), functools.partial(_vllm_collective, self),
                functools.partial(_ascend_collective, self.ascend))

    def emit(self, graph: fx.Graph, form: str, x: fx.Node, world_size: int, group_name: str) -> fx.Node:
        """This collective (a sum reduce_scatter) of ``x``'s rows, vLLM's op for form "vllm", else functional
        (as the families match it)."""
        if form == "vllm":
            return call(graph, vllm_op(self.vllm), (x, 0, world_size, group_name))
        reduce_op = ("sum",) if self.reduces else ()
        issue = call(graph, functional_op(self.functional), (x, *reduce_op, world_size, group_name))
        return call(graph, functional_op("wait_tensor"), (issue,))


REDUCE_SCATTER = CollectiveKind("reduce_scatter", "reduce_scatter_tensor", "reduce_scatter",
                                "maybe_pad_and_reduce", reduces=True)
ALL_GATHER = CollectiveKind("all_gather", "all_gather_into_tensor", "all_gather",
                            "maybe_all_gather_and_maybe_unpad", reduces=False)


# vllm-ascend's dense row-parallel linear with its reduction, one op that finds its layer by name at run time
ASCEND_ROW_PARALLEL_LINEAR = "matmul_and_reduce"
ASCEND_ROW_PARALLEL_LINEAR_DOES = ("vllm-ascend's matmul_and_reduce: with FlashComm v1 on it runs "
                                   "npu_mm_reduce_scatter_base itself (TP <= 8), off a matmul and an all_reduce")


def _ascend_collective(op_name: str, node: fx.Node) -> Collective | None:
    """vllm-ascend 0.23's FlashComm v1 ``maybe_pad_and_reduce(x)`` / ``maybe_all_gather_and_maybe_unpad(x, label)``.

    Both talk on vLLM's TP group (unless ``is_ep_comm``; 0.30's are EP only) and decide from vllm-ascend's forward
    context whether to communicate at all (else all_reduce / identity); the
    traced shape records that decision, so only a node whose output rows
    differ from its input rows is a scatter or gather. Without a vLLM TP
    group in this process the collective is returned with world_size 0.
    """
    target = vllm_op(op_name)
    if target is None or node.op != "call_function" or node.target != target or _ascend_ep_collective(node):
        return None
    args = bound_args(node)
    x = list(args.values())[0]
    if args.get("label") is False or args.get("do_comm") is False:
        return None
    out, inp = fake_value(node), fake_value(x)
    if out is None or inp is None or statically_known_true(out.shape[0] == inp.shape[0]):
        return None
    tp = process.current().tp_group()
    name, size = tp if tp is not None else ("", 0)
    return Collective(form="vllm_ascend", output=node, input=x, world_size=size, group_name=name,
                      reduce_op="sum", nodes=(node,), pads_tokens=True)


def _functional_collective(kind: CollectiveKind, node: fx.Node) -> Collective | None:
    """``wait_tensor(...wait_tensor(issue)...)`` over torch's functional ``kind`` op: a chain of any length (a
    function that waits on a traced functional collective itself adds one), matched at its last wait."""
    chain = wait_chain(node)
    if chain is None or chain[0].target != functional_op(kind.functional):
        return None
    issue, waits = chain
    args = list(bound_args(issue).values())
    x, reduce_op = args[0], (args[1] if kind.reduces else "sum")
    world_size, group_name = args[-2:]
    return Collective(form="c10d_functional", output=node, input=x, world_size=int(world_size),
                      group_name=str(group_name), reduce_op=reduce_op_name(reduce_op), nodes=(issue, *waits))


def _vllm_collective(kind: CollectiveKind, node: fx.Node) -> Collective | None:
    """vLLM's ``reduce_scatter(x, 0, world_size, group)`` / ``all_gather(x, 0, world_size, group)``."""
    target = vllm_op(kind.vllm)
    if target is None or node.op != "call_function" or node.target != target:
        return None
    x, dim, world_size, group_name = list(bound_args(node).values())[:4]
    if dim != 0:
        return None
    return Collective(form="vllm", output=node, input=x, world_size=int(world_size), group_name=str(group_name),
                      reduce_op="sum", nodes=(node,))


def wait_chain(node: fx.Node) -> tuple[fx.Node, tuple[fx.Node, ...]] | None:
    """(issue, waits) where ``node`` is the last ``wait_tensor`` of a chain over one issue node whose handle
    only the chain uses (or reads its size, ``sym_size``; see Match.replace_with); else None."""
    wait = functional_op("wait_tensor")
    if node.op != "call_function" or node.target != wait or any(u.target == wait for u in node.users):
        return None
    waits, inner = [node], node.args[0]
    while isinstance(inner, fx.Node) and inner.target == wait:
        if len(inner.users) != 1:
            return None
        waits.append(inner)
        inner = inner.args[0]
    first = waits[-1]
    if not isinstance(inner, fx.Node) or inner.op != "call_function" or not all(
            user is first or user.target == aten.sym_size.int for user in inner.users):
        return None
    return inner, tuple(reversed(waits))


def reduce_op_name(reduce_op) -> str:
    """The reduction a functional collective names: a string ("sum") or, since torch 2.15, a ``ReduceOp``."""
    return str(reduce_op).rsplit(".", 1)[-1].lower()


def scan(graph: fx.Graph, kind: CollectiveKind) -> tuple[list[Collective], list[tuple[str, Reason]]]:
    """Every ``kind`` collective in ``graph`` in any form (a snapshot: the caller may rewrite as it goes), and
    (form, reason) for each one no form decodes, so the report can say why a collective that looks fusable was
    not even a candidate (another dim, a functional handle used directly, ...)."""
    return _scan(graph, kind.matchers(), functools.partial(_undecoded_collective, kind))


def _scan(graph: fx.Graph, matchers, undecoded) -> tuple[list, list[tuple[str, Reason]]]:
    found = [match for node in graph.nodes if (match := _first_match(matchers, node)) is not None]
    decoded = {n for match in found for n in match.nodes}
    return found, [why for node in graph.nodes
                   if node.op == "call_function" and node not in decoded and (why := undecoded(node)) is not None]


def _ascend_ep_collective(node: fx.Node) -> bool:
    """vllm-ascend's padding collective on its expert-parallel group (MoE prepare/finalize): 0.23's with
    ``is_ep_comm=True``, and every call of 0.30's, whose ops are EP only (their schema has no ``is_ep_comm``;
    they pad and unpad by the DP token layout, not FlashComm's ``pad_size``). The schema is the graph's."""
    args = bound_args(node)
    return "is_ep_comm" not in args or bool(args["is_ep_comm"])


def _undecoded_collective(kind: CollectiveKind, node: fx.Node) -> tuple[str, Reason] | None:
    if node.target is not None and node.target == vllm_op(kind.ascend) and _ascend_ep_collective(node):
        return "vllm_ascend", Reason(outcomes.EP_COLLECTIVE, f"vllm-ascend's {kind.ascend} on its EP group")
    if node.target == functional_op(kind.functional):
        return "c10d_functional", _handle_used_elsewhere(node)
    if node.target is not None and node.target == vllm_op(kind.vllm):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return "vllm", Reason(outcomes.UNSUPPORTED_FORM, f"{kind.name} along dim {dim}, not 0")
    if kind.reduces and node.target is not None and node.target == vllm_op(ASCEND_ROW_PARALLEL_LINEAR):
        return "vllm_ascend", Reason(outcomes.OPAQUE_MATMUL, ASCEND_ROW_PARALLEL_LINEAR_DOES)
    return None


def _first_match(matchers, node: fx.Node):
    for matcher in matchers:
        found = matcher(node)
        if found is not None:
            return found
    return None


def group_problem(collective: Collective) -> str | Reason | None:
    """Why the collective's group cannot be used as named, where the group exists at compile time.

    A world_size that disagrees with the named group's size is a graph the
    fused op would reject at run time; leaving it alone keeps the original
    error path. A group unknown here (graphs compiled away from their ranks)
    is checked by the op when it runs.
    """
    if collective.world_size < 1:
        return outcomes.NO_TP_GROUP
    size = process.current().group_size(collective.group_name)
    if size is not None and size != collective.world_size:
        return Reason(outcomes.GROUP_MISMATCH, f"world_size {collective.world_size}, group "
                                               f"{collective.group_name!r} of size {size}")
    return None


@dataclass(frozen=True)
class AllReduce(Match):
    """A decoded sum all_reduce: vLLM's ``all_reduce(x, group)`` or functional ``all_reduce`` + ``wait_tensor``."""

    form: str
    output: fx.Node
    input: fx.Node
    group_name: str
    nodes: tuple[fx.Node, ...]  # every node of the form, output last
    handle: int | None = None  # shm: the communicator's handle the graph passes


def _match_vllm_all_reduce(node: fx.Node) -> AllReduce | None:
    if node.op != "call_function" or node.target is None or node.target != vllm_op("all_reduce"):
        return None
    x, group_name = list(bound_args(node).values())[:2]
    return AllReduce("vllm", node, x, str(group_name), (node,))


def _match_functional_all_reduce(node: fx.Node) -> AllReduce | None:
    chain = wait_chain(node)
    if chain is None or chain[0].target != functional_op("all_reduce"):
        return None
    issue, waits = chain
    x, reduce_op, group_name = list(bound_args(issue).values())[:3]
    if reduce_op_name(reduce_op) != "sum":
        return None
    return AllReduce("c10d_functional", node, x, str(group_name), (issue, *waits))


def scan_all_reduces(graph: fx.Graph) -> tuple[list[AllReduce], list[tuple[str, Reason]]]:
    """Every sum all_reduce in ``graph`` in any form (a snapshot), and (form, reason) for each functional
    all_reduce no form decodes: another reduction, or a handle used other than by its wait chain."""
    return _scan(graph, ALL_REDUCE_MATCHERS, _undecoded_all_reduce)


def _undecoded_all_reduce(node: fx.Node) -> tuple[str, Reason] | None:
    if node.target != functional_op("all_reduce"):
        return None
    reduce_op = reduce_op_name(list(bound_args(node).values())[1])
    return "c10d_functional", (Reason(outcomes.NOT_SUM, repr(reduce_op)) if reduce_op != "sum" else
                               _handle_used_elsewhere(node))


def _handle_used_elsewhere(issue: fx.Node) -> Reason:
    """Why a functional collective's wait chain did not decode: the ops its handle goes to, named (e.g. torch
    2.15's ``wait_tensors``, one wait over several handles, which no form here decodes)."""
    wait = functional_op("wait_tensor")
    others = sorted({str(user.target) for user in issue.users if user.target != wait})
    return Reason(outcomes.UNSUPPORTED_FORM, "its handle is used other than by wait_tensor"
                  + (f": by {', '.join(others)}" if others else ""))


def _match_shm_all_reduce(node: fx.Node) -> AllReduce | None:
    """vLLM's CPU shared-memory all_reduce (``_C`` builds with it, e.g. AVX-512), in place on its input:
    ``_C.shm_allreduce(handle, data)`` functionalized, ``auto_functionalized(..., handle=h, data=x)[1]``.

    The graph carries the communicator's handle, not a group: the group is the
    vLLM group whose communicator owns that handle (its c10d device group's name).
    """
    target = registered_op("_C", "shm_allreduce")
    if target is None or node.op != "call_function" or node.target is not operator.getitem:
        return None
    functionalized = node.args[0]
    if (node.args[1] != 1 or getattr(functionalized, "target", None) not in AUTO_FUNCTIONALIZED
            or functionalized.args[0] is not target or len(functionalized.users) != 1):
        return None
    handle = functionalized.kwargs["handle"]
    group_name = process.current().shm_group_name(handle) or f"<vLLM shm handle {handle}: no vLLM group owns it>"
    return AllReduce("shm", node, mutated_arg(functionalized, "data"), group_name, (functionalized, node), handle)


# Every all_reduce form, one matcher each (a new form: its matcher here and its call in fcpass/sites.py).
ALL_REDUCE_MATCHERS = (_match_vllm_all_reduce, _match_functional_all_reduce, _match_shm_all_reduce)
