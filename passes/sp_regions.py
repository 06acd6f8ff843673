"""Sequence parallelism's regions: which nodes become token shards when an all_reduce's result is split.

Sharding spreads forward from the split all_reduces through row-local ops
(elementwise, a norm, a reduction over hidden) whose every token-row input is
a shard, a replicated tensor (a norm weight) or rows every rank holds alike
(OPT's learned positions); connected sharded nodes form one region, whose
all_reduces are rewritten together. What reads a shard but needs every row
(a matmul, attention, the graph output) gets an all_gather.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from passes.collectives import AllReduce
from passes.nodes import bound_args, dim, fake_value, registered_op

aten, prims = torch.ops.aten, torch.ops.prims

_ELEMENTWISE = frozenset({
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor,
    aten.pow.Tensor_Scalar, aten.rsqrt.default, aten.sqrt.default, aten.neg.default, aten.clone.default,
    aten._to_copy.default, prims.convert_element_type.default, operator.getitem,
})
# over hidden only (checked per node): RMSNorm's mean of squares, LayerNorm's var_mean
_ROW_REDUCTIONS = frozenset({aten.mean.dim, aten.sum.dim_IntList, aten.var_mean.correction, aten.var.correction})


def norm_ops() -> frozenset:
    """vLLM's IR norms (row-local: each token row normalized on its own), where vLLM is loaded."""
    return frozenset(op for name in ("rms_norm", "fused_add_rms_norm")
                     if (op := registered_op("vllm_ir", name)) is not None)


class Region:
    """All_reduces whose results meet through row-local ops, and the nodes that become token shards."""

    def __init__(self, all_reduce: AllReduce) -> None:
        self.all_reduces = [all_reduce]
        self.sharded: list[fx.Node] = []
        self.everywhere_rows: set[fx.Node] = set()  # full rows every rank holds alike, read by sharded nodes

    def merge(self, other: "Region") -> None:
        self.all_reduces += other.all_reduces
        self.sharded += other.sharded
        self.everywhere_rows |= other.everywhere_rows


def regions(graph: fx.Graph, candidates: list[AllReduce], norms: frozenset) -> list[Region]:
    """Spread sharding forward from the candidates through row-local ops; group what connects."""
    region_of: dict[fx.Node, Region] = {}
    for ar in candidates:
        region_of[ar.output] = Region(ar)
        region_of[ar.output].sharded.append(ar.output)
    for node in graph.nodes:
        if node in region_of or not _row_local(node, norms):
            continue
        inputs = [i for i in node.all_input_nodes if isinstance(fake_value(i), (torch.Tensor, tuple))]
        sharded = [i for i in inputs if i in region_of]
        if not sharded:
            continue
        region = region_of[sharded[0]]
        everywhere = [i for i in inputs if i not in region_of and not _replicated(i)]
        if not all(_same_shape(fake_value(i), region.all_reduces[0]) and _same_on_every_rank(i) for i in everywhere):
            continue
        if not all(_same_rows(v, region.all_reduces[0]) for v in _tensors(fake_value(node))):
            continue
        region.everywhere_rows.update(everywhere)
        for other in {id(region_of[i]): region_of[i] for i in sharded}.values():
            if other is not region:
                region.merge(other)
                for n in other.sharded:
                    region_of[n] = region
        region.sharded.append(node)
        region_of[node] = region
    return list({id(r): r for r in region_of.values()}.values())


def _row_local(node: fx.Node, norms: frozenset) -> bool:
    """Each output row depends on the same input row only (elementwise, a norm, a reduction over hidden)."""
    if node.op != "call_function":
        return False
    if node.target in _ELEMENTWISE or node.target in norms:
        return True
    if node.target in _ROW_REDUCTIONS:
        args = bound_args(node)
        dims = [d % 2 for d in (args["dim"] or [])]
        return dim(node.args[0]) == 2 and bool(dims) and 0 not in dims and bool(args["keepdim"])
    return False


def _replicated(node: fx.Node) -> bool:
    """A tensor without token rows (a norm weight, a scalar): it broadcasts over a shard as over all rows."""
    val = fake_value(node)
    return isinstance(val, torch.Tensor) and (val.dim() < 2 or statically_known_true(val.shape[0] == 1))


# What a value every rank computes alike may be made of: lookups and arithmetic on the graph's inputs (token
# ids and positions are every rank's; replicated tables) and on ranges of the token count. No matmul (a TP
# linear's output is a shard or a partial sum) and no collective; vLLM's vocab-parallel embedding masks with
# `where`, not listed.
_SAME_ON_EVERY_RANK = _ELEMENTWISE | {aten.embedding.default, aten.arange.default, aten.arange.start,
                                     aten.arange.start_step, prims.iota.default}
_SAME_ON_EVERY_RANK_MAX_NODES = 64


def _same_on_every_rank(node: fx.Node) -> bool:
    """Token rows every rank holds in full and alike (OPT's learned positions): made only of graph inputs,
    lookups and arithmetic (a bounded walk back)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or n.op == "placeholder":
            continue
        seen.add(n)
        if n.op != "call_function" or n.target not in _SAME_ON_EVERY_RANK or len(seen) > _SAME_ON_EVERY_RANK_MAX_NODES:
            return False
        stack.extend(n.all_input_nodes)
    return True


def _tensors(val):
    return [v for v in (val if isinstance(val, tuple) else (val,)) if isinstance(v, torch.Tensor)]


def token_rows(node: fx.Node):
    return fake_value(node).shape[0]


def _same_rows(val, ar: AllReduce) -> bool:
    return val.dim() == 2 and statically_known_true(val.shape[0] == token_rows(ar.input))


def _same_shape(val, ar: AllReduce) -> bool:
    """The all_reduced rows' shape: token rows of the full hidden width (a TP shard of columns is narrower)."""
    return _same_rows(val, ar) and statically_known_true(val.shape[1] == fake_value(ar.input).shape[1])


def gathered(region: Region) -> dict[fx.Node, list[fx.Node]]:
    """Sharded tensors read by something that needs all rows, with those readers."""
    inside = set(region.sharded)
    readers = {}
    for node in region.sharded:
        if isinstance(fake_value(node), torch.Tensor):
            outside = [u for u in node.users if u not in inside and not reads_token_count(u, node)]
            if outside:
                readers[node] = outside
    return readers


def reads_token_count(user: fx.Node, node: fx.Node) -> bool:
    return user.target == aten.sym_size.int and user.args[0] is node
