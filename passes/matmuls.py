"""How matmuls appear in a post-grad graph, as Inductor patterns and matchers.

A pattern family asks "is that node a matmul, in any form?" and gets back
the same decoded record whatever the form was; the record's ``kind`` is its
key in :data:`KINDS`: which fused ops take it (``fcpass.ops.FUSED_OPS``) and
how they are given its operands. A family looks the kind up there instead of
comparing names.

Inner nodes of a pattern match only when they have a single user (the
pattern matcher's default), so a matmul whose output is used elsewhere too
never matches: fusing it would compute it twice.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import CallFunction, KeywordArg, is_match

from fcpass.matmuls import SUM_ADDMM
from fcpass.ops import FUSED_OPS, SUM_FUSED_OPS
from passes import report as outcomes
from passes.graph_edit import Match, call
from passes.nodes import (AUTO_FUNCTIONALIZED, as_dtype, aten, bound_args, dim, fake_value, mutated_arg, npu_op,
                          registered_op, vllm_op)


@dataclass(frozen=True)
class MatmulNode(Match):
    """A decoded ``x @ w (+ bias)`` on 2-D rows; scaled forms also carry their scales."""

    form: str
    output: fx.Node
    x: fx.Node
    w: fx.Node
    bias: fx.Node | None
    # Which fused ops take it: its key in KINDS ("plain", "scaled", "onednn").
    kind: str = "plain"
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
    def nodes(self) -> tuple[fx.Node, ...]:
        return (*self.inner, self.output)

    def kn_weight(self, graph: fx.Graph) -> fx.Node:
        """The (k, n) weight node, transposing a stored (n, k) weight at the insertion point."""
        if not self.weight_is_nk:
            return self.w
        return call(graph, aten.permute.default, (self.w, [1, 0]))


@dataclass(frozen=True)
class MatmulSum(Match):
    """``mm_1 + mm_2 (+ ...)`` of the same rows, summed left to right: Falcon's attention and MLP outputs before
    their one collective. Each term is an ``aten.add`` of the sum so far and a matmul or, as Inductor's
    post-grad ``addmm`` pattern rewrites ``mm + t``, an ``addmm(sum so far, x, w)`` (the form
    :data:`SUM_ADDMM`). Its products' inputs and weights move into one fused op (no weight concatenated)."""

    output: fx.Node
    products: tuple[MatmulNode, ...]
    adds: tuple[fx.Node, ...] = ()  # the aten.add nodes

    @property
    def nodes(self) -> tuple[fx.Node, ...]:
        inner = [node for mm in self.products for node in mm.nodes if node is not self.output]
        return (*inner, *(add for add in self.adds if add is not self.output), self.output)

    @property
    def form(self) -> str:
        return f"sum({','.join(mm.form for mm in self.products)})"

    @property
    def kind(self) -> str:
        """The products' one kind, or "mixed"."""
        kinds = {mm.kind for mm in self.products}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def x(self) -> fx.Node:
        return self.products[0].x

    @property
    def problem(self) -> str | None:
        return next((mm.problem for mm in self.products if mm.problem), None)

    @property
    def inner_outputs(self) -> tuple[fx.Node, ...]:
        """The products and partial sums: only the next term may read them."""
        return tuple(node for node in (*(mm.output for mm in self.products), *self.adds) if node is not self.output)


def match_sum(node: fx.Node) -> MatmulSum | None:
    """A sum of matmuls ending at ``node``, or None: ``add(<sum or matmul>, <matmul>)`` (left-nested, as
    ``a + b + c`` traces) or ``addmm(<sum or matmul>, x, w)``. Any other tree adds in another order, which the
    fused op would not reproduce bit for bit."""
    if node.op != "call_function":
        return None
    if node.target == aten.addmm.default:
        args = bound_args(node)
        head = _sum_or_matmul(args["self"])
        if head is None or args["beta"] != 1 or args["alpha"] != 1:
            return None
        last = MatmulNode(SUM_ADDMM, node, args["mat1"], args["mat2"], None)
        return MatmulSum(node, (*head.products, last), head.adds)
    if node.target != aten.add.Tensor or node.kwargs or len(node.args) != 2:
        return None
    head, last = _sum_or_matmul(node.args[0]), _matmul_term(node.args[1])
    if head is None or last is None:
        return None
    return MatmulSum(node, (*head.products, last), (*head.adds, node))


def _matmul_term(node) -> MatmulNode | None:
    return match_matmul(node) if isinstance(node, fx.Node) else None


def _sum_or_matmul(node) -> MatmulSum | None:
    """The sum ending at ``node``, or a one-product 'sum' of its matmul."""
    if not isinstance(node, fx.Node):
        return None
    found = match_sum(node)
    if found is not None:
        return found
    mm = match_matmul(node)
    return None if mm is None else MatmulSum(node, (mm,))


def producer_problem(mm: "MatmulNode | MatmulSum | None", producer: fx.Node, steps) -> "str | outcomes.Reason | None":
    """Why the matmul (or sum of matmuls) before a row-parallel collective (through ``steps``) cannot move into a
    fused op: none there, arguments that change what the op computes, or another user of its product (it
    would need the unreduced rows)."""
    if mm is None:
        return outcomes.NO_MATMUL_PRODUCER
    if mm.problem:
        return outcomes.Reason(outcomes.MATMUL_ARGUMENTS, mm.problem)
    if any(len(node.users) > 1 for node in [producer, *steps, *getattr(mm, "inner_outputs", ())]):
        return outcomes.MATMUL_OTHER_USERS
    return None


def match_matmul(node: fx.Node) -> MatmulNode | None:
    """The matmul ``node`` is, in whichever form of :data:`MATMUL_MATCHERS`, or None."""
    for matcher in MATMUL_MATCHERS:
        found = matcher(node)
        if found is not None:
            return found
    return None


_MM = CallFunction(aten.mm.default, KeywordArg("x"), KeywordArg("w"))


def _match_mm(node: fx.Node) -> MatmulNode | None:
    m = _MM.match(node)
    return MatmulNode("mm", node, m.kwargs["x"], m.kwargs["w"], None) if is_match(m) else None


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
        op = vllm_op(name)
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
    return MatmulNode("scaled_mm", node, args["self"], args["mat2"], args["bias"], kind="scaled",
                      x_scale=args["scale_a"], w_scale=args["scale_b"], out_dtype=args["out_dtype"], problem=problem)


def _unsupported_arguments(op: str, args: dict, **expected) -> str | None:
    """Which of ``args`` differ from the value the fused ops' semantics need, named, or None."""
    wrong = [f"{name}={args.get(name)!r}" for name, value in expected.items() if args.get(name, value) != value]
    return f"{op} with {', '.join(wrong)}" if wrong else None


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
    if (getattr(functionalized, "target", None) not in AUTO_FUNCTIONALIZED
            or functionalized.args[0] is not target or output is None or len(functionalized.users) != 1):
        return None
    args = functionalized.kwargs
    buffer = mutated_arg(functionalized, "c")
    if buffer.target != aten.empty.memory_format or len(buffer.users) != 1 or dim(args["a"]) != 2:
        return None
    return MatmulNode("onednn_mm", output, args["a"], args["handler_tensor"], args["bias"], kind="onednn",
                      handler_n=fake_value(output).shape[1], inner=(functionalized, buffer))


def _match_npu_quant_matmul(node: fx.Node) -> MatmulNode | None:
    """Ascend W8A8 ``npu_quant_matmul(x_int8, w_int8 (k, n), deq_scale, bias=int32, output_dtype=15)``, with
    torch-npu's schema (its dtypes are c10 ScalarType numbers: 15 bfloat16, 5 float16).

    Its result is ``(x @ w + bias) * scale``, fcpass's W8A8 Matmul. Matched
    only with a float32 dequant scale (a scale packed into int64 by
    ``npu_trans_quant_param`` means something else), an int32 bias, no offset, no
    dtype overrides and no ``pertoken_scale`` (1-D (m,) there, where a 1-D
    scale means per-tensor to the fused ops); any other is recognised and
    left alone with what differs.
    """
    target = npu_op("npu_quant_matmul")
    if target is None or node.op != "call_function" or node.target != target:
        return None
    args = bound_args(node)
    scale, bias = fake_value(args["scale"]), fake_value(args.get("bias"))
    out_dtype = as_dtype(args.get("output_dtype"))
    problem = _unsupported_arguments(
        "npu_quant_matmul", args, offset=None, pertoken_scale=None, group_sizes=None, y_scale=None,
        x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None)
    if args.get("output_dtype") is None:
        problem = problem or "npu_quant_matmul without output_dtype (an int8 result)"
    elif out_dtype is None:
        problem = problem or f"npu_quant_matmul with output_dtype {args['output_dtype']!r}, not a known dtype"
    elif scale is None or scale.dtype != torch.float32:
        problem = problem or f"npu_quant_matmul with a {getattr(scale, 'dtype', None)} scale, not float32"
    elif bias is not None and bias.dtype != torch.int32:
        problem = problem or f"npu_quant_matmul with a {bias.dtype} bias, not int32"
    return MatmulNode("npu_quant_matmul", node, args["x1"], args["x2"], args.get("bias"), kind="scaled",
                      w_scale=args["scale"], out_dtype=out_dtype, problem=problem)


# Every matmul form, one matcher each (a new form: its matcher here, its op call in fcpass.matmuls.Matmul, and an
# entry in KINDS below when no fused op takes its kind yet).
MATMUL_MATCHERS = (_match_mm, _match_addmm, _match_scaled_mm, _match_linear, _match_npu_quant_matmul,
                   _match_onednn_mm)


# --------------------------------------------------------------------------- kinds: the fused ops' operands

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

    def fused_sum_op(self):
        """The op fusing a reduce_scatter after a sum of this kind's products; it takes every product's x, then
        what :attr:`gather_operands` gives of their weights."""
        return getattr(torch.ops.fcpass, SUM_FUSED_OPS[self.name]).default


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
