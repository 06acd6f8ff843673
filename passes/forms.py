"""How collectives and matmuls appear in a post-grad graph, as Inductor patterns.

A pattern family is written once over these forms: it asks "is this node a
reduce_scatter, in any form?" and "is that node a matmul, in any form?",
and gets back the same decoded record whatever the form was.

Inner nodes of a pattern match only when they have a single user (the
pattern matcher's default), so a matmul whose output is used elsewhere too
never matches: fusing it would compute it twice.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import MULTIPLE, CallFunction, KeywordArg, PatternExpr, is_match
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fcpass.groups import resolve_group, vllm_shm_group, vllm_tp_group
from fcpass.validate import FusedOpInputError
from passes import report as outcomes
from passes.report import Reason

aten = torch.ops.aten

# The fused ops' threshold_tokens argument that means "the config's" (the op resolves it from the config text
# it is given: the config's threshold, its table's bucket, the backend's default).
CONFIG_THRESHOLD = -1


def _functional(name: str):
    return getattr(torch.ops._c10d_functional, name).default


def registered_op(namespace: str, name: str):
    """``torch.ops.<namespace>.<name>.default``, or None where the library that registers it is not loaded
    (vLLM, vLLM's ``_C``, torch_npu: all optional)."""
    try:
        return getattr(getattr(torch.ops, namespace), name).default
    except (AttributeError, RuntimeError):
        return None


def _vllm(name: str):
    """vLLM's custom op (collectives, linears), or None when vLLM is not imported."""
    return registered_op("vllm", name)


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
    # vllm-ascend's FlashComm ops pad the tokens to a multiple of world_size before a
    # reduce_scatter and drop that padding (sized at run time) after an all_gather.
    pads_tokens: bool = False


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
    # vLLM's CPU oneDNN matmul: ``w`` is its handler (the weight is packed inside), this its output width.
    handler_n: int | None = None
    inner: tuple[fx.Node, ...] = ()  # nodes of the form besides the output, erased with it
    # A matmul whose arguments compute something the fused ops do not (addmm's beta, a result scale, ...):
    # recognised, so the report can say why, and never fused.
    problem: str | None = None

    @property
    def scaled(self) -> bool:
        return self.w_scale is not None

    @property
    def kind(self) -> str:
        """Which fused op family member takes it: "plain", "scaled" or "onednn"."""
        return "onednn" if self.handler_n is not None else "scaled" if self.scaled else "plain"

    def kn_weight(self, graph: fx.Graph) -> fx.Node:
        """The (k, n) weight node, transposing a stored (n, k) weight at the insertion point."""
        if not self.weight_is_nk:
            return self.w
        return call(graph, aten.permute.default, (self.w, [1, 0]))


def _wait(inner: PatternExpr) -> PatternExpr:
    return CallFunction(_functional("wait_tensor"), inner)


def _collective_forms(functional_op: str, functional_args: tuple, vllm_op: str) -> list[tuple[str, PatternExpr]]:
    """The functional-collective form (op + wait_tensor) and, when vLLM is loaded, vLLM's custom op on dim 0."""
    # The collective's handle may also have its size read (``sym_size``); see redirect_size_reads.
    issue = CallFunction(_functional(functional_op), KeywordArg("input"), *functional_args, _users=MULTIPLE)
    forms = [("c10d_functional", _wait(issue))]
    if _vllm(vllm_op) is not None:
        forms.append(("vllm", CallFunction(_vllm(vllm_op), KeywordArg("input"), 0,
                                           KeywordArg("world_size"), KeywordArg("group_name"))))
    return forms


def reduce_scatter_forms() -> list:
    return _collective_forms(
        "reduce_scatter_tensor", (KeywordArg("reduce_op"), KeywordArg("world_size"), KeywordArg("group_name")),
        "reduce_scatter",
    ) + [("vllm_ascend", functools.partial(_ascend_collective, "maybe_pad_and_reduce"))]


def all_gather_forms() -> list:
    return _collective_forms("all_gather_into_tensor", (KeywordArg("world_size"), KeywordArg("group_name")),
                             "all_gather") + [
        ("vllm_ascend", functools.partial(_ascend_collective, "maybe_all_gather_and_maybe_unpad"))]


def _ascend_collective(op_name: str, node: fx.Node) -> Collective | None:
    """vllm-ascend's ``maybe_pad_and_reduce(x)`` / ``maybe_all_gather_and_maybe_unpad(x, label)``.

    Both talk on vLLM's TP group and decide from vllm-ascend's forward
    context whether to communicate at all (else all_reduce / identity); the
    traced shape records that decision, so only a node whose output rows
    differ from its input rows is a scatter or gather. Without a vLLM TP
    group in this process the collective is returned with world_size 0.
    """
    target = _vllm(op_name)
    if target is None or node.op != "call_function" or node.target != target:
        return None
    args = bound_args(node)
    x = list(args.values())[0]
    if args.get("is_ep_comm") or args.get("label") is False or args.get("do_comm") is False:
        return None
    out, inp = fake_value(node), fake_value(x)
    if out is None or inp is None or statically_known_true(out.shape[0] == inp.shape[0]):
        return None
    tp = vllm_tp_group()
    name, size = tp if tp is not None else ("", 0)
    return Collective(form="vllm_ascend", output=node, input=x, world_size=size, group_name=name,
                      reduce_op="sum", nodes=(node,), pads_tokens=True)


@dataclass(frozen=True)
class AllReduce:
    """A decoded sum all_reduce: vLLM's ``all_reduce(x, group)`` or functional ``all_reduce`` + ``wait_tensor``."""

    form: str
    output: fx.Node
    input: fx.Node
    group_name: str
    nodes: tuple[fx.Node, ...]  # every node of the form, output last


def match_all_reduce(node: fx.Node) -> AllReduce | None:
    if node.op != "call_function":
        return None
    if node.target is not None and node.target == _vllm("all_reduce"):
        x, group_name = list(bound_args(node).values())[:2]
        return AllReduce("vllm", node, x, str(group_name), (node,))
    if node.target is operator.getitem:
        return _match_shm_all_reduce(node)
    if node.target != _functional("wait_tensor"):
        return None
    issue = node.args[0]
    if (not isinstance(issue, fx.Node) or issue.target != _functional("all_reduce")
            or issue.args[1] != "sum" or len(issue.users) != 1):
        return None
    return AllReduce("c10d_functional", node, issue.args[0], str(issue.args[2]), (issue, node))


def _match_shm_all_reduce(node: fx.Node) -> AllReduce | None:
    """vLLM's CPU shared-memory all_reduce (``_C`` builds with it, e.g. AVX-512), in place on its input:
    ``_C.shm_allreduce(handle, data)`` functionalized, ``auto_functionalized(..., handle=h, data=x)[1]``.

    The graph carries the communicator's handle, not a group: the group is the
    vLLM group whose communicator owns that handle, and the split emits
    functional collectives on its c10d device group.
    """
    target = registered_op("_C", "shm_allreduce")
    functionalized = node.args[0]
    if (target is None or node.args[1] != 1 or getattr(functionalized, "target", None) not in _AUTO_FUNCTIONALIZED
            or functionalized.args[0] is not target or len(functionalized.users) != 1):
        return None
    handle = functionalized.kwargs["handle"]
    group_name = vllm_shm_group(handle) or f"<vLLM shm handle {handle}: no vLLM group owns it>"
    return AllReduce("shm", node, _mutated_arg(functionalized, "data"), group_name, (functionalized, node))


def _mutated_arg(functionalized: fx.Node, name: str) -> fx.Node:
    """The tensor an ``auto_functionalized`` (v1: by name) or ``auto_functionalized_v2`` (v2: a base) mutates."""
    kwargs = functionalized.kwargs
    return kwargs[name] if name in kwargs else kwargs["_all_bases"][kwargs[f"_{name}_base_index"]]


def emit_reduce_scatter(graph: fx.Graph, form: str, x: fx.Node, world_size: int, group_name: str) -> fx.Node:
    """A sum reduce_scatter of ``x``'s rows, vLLM's op for form "vllm", else functional (as the families match it)."""
    if form == "vllm":
        return call(graph, _vllm("reduce_scatter"), (x, 0, world_size, group_name))
    issue = call(graph, _functional("reduce_scatter_tensor"), (x, "sum", world_size, group_name))
    return call(graph, _functional("wait_tensor"), (issue,))


def emit_all_gather(graph: fx.Graph, form: str, x: fx.Node, world_size: int, group_name: str) -> fx.Node:
    """An all_gather of ``x``'s rows, vLLM's op for form "vllm", else functional (as the families match it)."""
    if form == "vllm":
        return call(graph, _vllm("all_gather"), (x, 0, world_size, group_name))
    issue = call(graph, _functional("all_gather_into_tensor"), (x, world_size, group_name))
    return call(graph, _functional("wait_tensor"), (issue,))


def matmul_forms() -> list[tuple[str, PatternExpr]]:
    return [("mm", CallFunction(aten.mm.default, KeywordArg("x"), KeywordArg("w")))]


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


def unsupported_collectives(graph: fx.Graph, forms, kind: str):
    """(form, reason) for each ``kind`` collective ("reduce_scatter" or "all_gather") no form of ``forms`` decodes.

    So the report can say why a collective that looks fusable was not even a
    candidate (another dim, a functional handle used directly, ...).
    """
    decoded = {n for node in graph.nodes if (c := match_collective(node, forms)) is not None for n in c.nodes}
    functional_op, vllm_op = _COLLECTIVE_OPS[kind]
    for node in graph.nodes:
        if node.op != "call_function" or node in decoded:
            continue
        if node.target == _functional(functional_op):
            yield "c10d_functional", Reason(outcomes.UNSUPPORTED_FORM, "its handle is used other than by wait_tensor")
        elif node.target is not None and node.target == _vllm(vllm_op):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            yield "vllm", Reason(outcomes.UNSUPPORTED_FORM, f"{kind} along dim {dim}, not 0")


_COLLECTIVE_OPS = {
    "reduce_scatter": ("reduce_scatter_tensor", "reduce_scatter"),
    "all_gather": ("all_gather_into_tensor", "all_gather"),
}


def match_collective(node: fx.Node, forms) -> Collective | None:
    for form, pattern in forms:
        if not isinstance(pattern, PatternExpr):
            found = pattern(node)
            if found is not None:
                return found
            continue
        m = pattern.match(node)
        if is_match(m) and _only_waited_or_sized(m.nodes, node):
            return Collective(
                form=form, output=node, input=m.kwargs["input"], world_size=int(m.kwargs["world_size"]),
                group_name=str(m.kwargs["group_name"]), reduce_op=str(m.kwargs.get("reduce_op", "sum")),
                nodes=tuple(m.nodes),
            )
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
    try:
        group = resolve_group(collective.group_name)
    except ValueError:
        return None
    if group.size() != collective.world_size:
        return Reason(outcomes.GROUP_MISMATCH, f"world_size {collective.world_size}, group "
                                               f"{collective.group_name!r} of size {group.size()}")
    return None


def _only_waited_or_sized(nodes, output: fx.Node) -> bool:
    """Inner nodes of a matched collective are used by the form itself or have their size read only."""
    return all(user in nodes or user.target == aten.sym_size.int for n in nodes if n is not output for user in n.users)


def redirect_size_reads(collective: Collective, replacement: fx.Node) -> None:
    """Size reads of the collective's inner nodes read the same-shaped ``replacement`` instead."""
    for node in collective.nodes:
        for user in list(node.users):
            if user.target == aten.sym_size.int and node is not collective.output:
                user.replace_input_with(node, replacement)


def match_matmul(node: fx.Node, forms) -> MatmulNode | None:
    for form, pattern in forms:
        m = pattern.match(node)
        if is_match(m):
            return MatmulNode(form, node, m.kwargs["x"], m.kwargs["w"], m.kwargs.get("bias"))
    return (_match_addmm(node) or _match_scaled_mm(node) or _match_linear(node) or _match_npu_quant_matmul(node)
            or _match_onednn_mm(node))


def bound_args(node: fx.Node) -> dict:
    """The op's arguments by schema name, defaults filled in, however the call passed them."""
    schema_args = node.target._schema.arguments
    given = dict(zip((a.name for a in schema_args), node.args), **node.kwargs)
    return {a.name: given.get(a.name, a.default_value if a.has_default_value() else None) for a in schema_args}


def _match_addmm(node: fx.Node) -> MatmulNode | None:
    """``addmm(bias, x, w, beta=1, alpha=1)`` = ``x @ w + bias``: what the fused ops compute only with both 1."""
    if node.op != "call_function" or node.target != aten.addmm.default:
        return None
    args = bound_args(node)
    scaled = [f"{name}={args[name]}" for name in ("beta", "alpha") if args[name] != 1]
    problem = f"addmm with {', '.join(scaled)}; the fused ops compute x @ w + bias" if scaled else None
    return MatmulNode("addmm", node, args["mat1"], args["mat2"], args["self"], problem=problem)


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
    x, weight, bias = list(bound_args(node).values())[:3]  # (x, weight, bias) in every linear op's schema
    if dim(x) != 2:
        return None  # an opaque linear on 3-D rows: its output rows are not a plain view away
    return MatmulNode(form, node, x, weight, bias, weight_is_nk=True)


def _match_scaled_mm(node: fx.Node) -> MatmulNode | None:
    """fp8 ``aten._scaled_mm`` with the semantics fcpass's scaled ops implement.

    A result scale or fast accumulation changes the numbers, so such a node
    is not a match.
    """
    if node.op != "call_function" or node.target != aten._scaled_mm.default:
        return None
    args = bound_args(node)
    problem = _unsupported_arguments("_scaled_mm", args, scale_result=None, use_fast_accum=False)
    if args["out_dtype"] is None:
        problem = problem or "_scaled_mm without out_dtype (an fp8 result)"
    return MatmulNode("scaled_mm", node, args["self"], args["mat2"], args["bias"],
                      x_scale=args["scale_a"], w_scale=args["scale_b"], out_dtype=args["out_dtype"], problem=problem)


def _unsupported_arguments(op: str, args: dict, **expected) -> str | None:
    """Which of ``args`` differ from the value the fused ops' semantics need, named, or None."""
    wrong = [f"{name}={args.get(name)!r}" for name, value in expected.items() if args.get(name, value) != value]
    return f"{op} with {', '.join(wrong)}" if wrong else None


_AUTO_FUNCTIONALIZED = (torch.ops.higher_order.auto_functionalized, torch.ops.higher_order.auto_functionalized_v2)


def _match_onednn_mm(node: fx.Node) -> MatmulNode | None:
    """vLLM's CPU linear, ``out = empty(m, n); _C.onednn_mm(out, x, bias, handler)``, functionalized:
    ``auto_functionalized(_C.onednn_mm, c=empty, a=x, bias, handler_tensor)`` then ``[1]`` (``out``);
    vLLM compiles with that v1 form, torch's default is v2 (``_all_bases=[empty]``, ``_c_base_index=0``).

    Matched from either node: the reduce_scatter family walks back to the
    ``[1]``, the all_gather family forward to the ``auto_functionalized``.
    """
    target = registered_op("_C", "onednn_mm")
    if target is None or node.op != "call_function":
        return None
    if node.target is operator.getitem and node.args[1] == 1:
        functionalized, output = node.args[0], node
    else:
        functionalized = node
        output = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 1), None)
    if (getattr(functionalized, "target", None) not in _AUTO_FUNCTIONALIZED
            or functionalized.args[0] is not target or output is None or len(functionalized.users) != 1):
        return None
    args = functionalized.kwargs
    buffer = _mutated_arg(functionalized, "c")
    if buffer.target != aten.empty.memory_format or len(buffer.users) != 1 or dim(args["a"]) != 2:
        return None
    return MatmulNode("onednn_mm", output, args["a"], args["handler_tensor"], args["bias"],
                      handler_n=fake_value(output).shape[1], inner=(functionalized, buffer))


def _npu(name: str):
    """torch_npu's op, or None where torch_npu is not loaded."""
    return registered_op("npu", name)


def _match_npu_quant_matmul(node: fx.Node) -> MatmulNode | None:
    """Ascend W8A8 ``npu_quant_matmul(x_int8, w_int8 (k, n), deq_scale, bias=int32, output_dtype)``.

    Its result is ``(x @ w + bias) * scale``, fcpass's W8A8 Matmul. Matched
    only with a float32 dequant scale (a scale packed into int64 by
    ``npu_trans_quant_param`` means something else), no offset and no
    ``pertoken_scale`` (1-D (m,) there, where a 1-D scale means per-tensor to
    the fused ops).
    """
    target = _npu("npu_quant_matmul")
    if target is None or node.op != "call_function" or node.target != target:
        return None
    args = bound_args(node)
    scale = fake_value(args["scale"])
    problem = _unsupported_arguments(
        "npu_quant_matmul", args, offset=None, pertoken_scale=None, group_sizes=None, y_scale=None,
        x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None)
    if args.get("output_dtype") is None:
        problem = problem or "npu_quant_matmul without output_dtype (an int8 result)"
    elif scale is None or scale.dtype != torch.float32:
        problem = problem or f"npu_quant_matmul with a {getattr(scale, 'dtype', None)} scale, not float32"
    return MatmulNode("npu_quant_matmul", node, args["x1"], args["x2"], args.get("bias"),
                      w_scale=args["scale"], out_dtype=args["output_dtype"], problem=problem)


# ---------------------------------------------------------------------------
# Row-preserving steps between a matmul and its collective.

_ROW_VIEWS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints,
})


def fake_value(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def dim(node) -> int:
    val = fake_value(node)
    return val.dim() if isinstance(val, torch.Tensor) else -1


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


def row_pad(node: fx.Node):
    """``p`` if ``node`` appends p zero rows to a 2-D tensor (``F.pad(t, (0, 0, 0, p))``), else None."""
    if node.op != "call_function" or node.target != aten.constant_pad_nd.default or dim(node.args[0]) != 2:
        return None
    args = bound_args(node)
    pad = list(args["pad"])
    if len(pad) != 4 or pad[:3] != [0, 0, 0] or args["value"] != 0:
        return None
    return pad[3]


def rowwise_quantize(node: fx.Node) -> bool:
    """Ascend static ``npu_quantize`` with a per-tensor or per-channel scale: each row on its own, so it
    commutes with gathering rows."""
    target = _npu("npu_quantize")
    if target is None or node.op != "call_function" or node.target != target:
        return False
    args = bound_args(node)
    scales = fake_value(args["scales"])
    along_k = args["axis"] in (-1, dim(args["input"]) - 1)
    return scales is not None and (scales.numel() == 1 or along_k)


def site_form(collective: Collective, mm: MatmulNode | None, other, steps) -> str:
    """How a site is named in reports: collective form / matmul form, plus the steps between them."""
    name = f"{collective.form}/{mm.form if mm else getattr(other, 'target', other)}"
    return "+".join([name, *sorted({_step_name(step) for step in steps})])


def _step_name(step: fx.Node) -> str:
    if step.target == aten.constant_pad_nd.default:
        return "pad"
    if step.target == aten.slice.Tensor:
        return "unpad"
    return "quantize" if rowwise_quantize(step) else "view"


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


def erase_unused(graph: fx.Graph, nodes) -> None:
    """Erase the matched nodes the rewrite left without users, consumers first."""
    for node in sorted(set(nodes), key=_position(graph), reverse=True):
        if not node.users:
            graph.erase_node(node)


def _position(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__
