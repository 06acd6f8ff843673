"""all_reduce -> (residual add) -> RMSNorm or LayerNorm  ==>  reduce_scatter -> norm on the token shard -> all_gather

FlashComm v1 as a graph rewrite (vLLM <= 0.31's SequenceParallelismPass,
vllm-ascend's FlashComm linear ops, both gone from current releases):

    y = all_reduce(x)                        x: (tokens, hidden), every rank
    h, r = fused_add_rms_norm(y, residual)   and the rest of the residual chain
    z = mm(h, w_qkv)
        ==>
    s = reduce_scatter(pad(x, to a multiple of world_size))   (tokens / ws, hidden)
    h, r = fused_add_rms_norm(s, residual_shard)              1/ws of the norm work
    z = mm(all_gather(h)[:tokens], w_qkv)

The all_reduce's traffic splits into a reduce_scatter and an all_gather that
the fusion families then fuse into the matmuls on either side.

Pattern: every sum all_reduce of 2-D token rows (vLLM's ``all_reduce`` op
or functional ``all_reduce`` + ``wait_tensor``). Sharding then spreads
forward through row-local ops (vLLM's ``rms_norm``/``fused_add_rms_norm``
IR ops, their decomposed aten math, LayerNorm's (``var_mean`` over hidden, its weight
and bias), the residual adds) whose every
token-row input is sharded, so a residual becomes a shard only when all its
producers are (the embedding's all_reduce in the first layer, the norms
after it). Connected sharded nodes form a region; each region's
all_reduces are rewritten together.

Replacement: pad + reduce_scatter for each all_reduce; all_gather +
``[:tokens]`` for each sharded value read by anything that is not row-local
(a matmul, attention, the graph output after the final norm); size reads of
a shard read the unsharded token count instead.

Applies to a region when it contains a norm (otherwise the split buys
nothing), needs no more all_gathers than it had all_reduces (never more
traffic), its all_reduce's transport is not faster than the split's (vLLM's
CPU shared-memory all_reduce is; the split would run over gloo), and the graph is compiled only for token counts above
``sequence_parallel_threshold_tokens``: the rewrite changes activation
shapes, so it is decided per compiled graph (vLLM's compile range start,
else the token count's lower bound), unlike the fused ops' runtime guard.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fcpass.config import PassConfig
from fcpass.groups import resolve_group
from fcpass.vllm import state as vllm_state
from passes.collectives import ALL_GATHER, REDUCE_SCATTER, AllReduce, match_all_reduce
from passes.graph_edit import call, padding_to_multiple, refresh_val
from passes.nodes import bound_args, dim, fake_value, registered_op
from passes import report as outcomes
from passes.report import FAMILY_DISABLED, SPLIT, PassReport, Reason

FAMILY = "sequence_parallel"

logger = logging.getLogger(f"fcpass.{__name__}")
_warned_one_graph = False

aten, prims = torch.ops.aten, torch.ops.prims

_ELEMENTWISE = frozenset({
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor,
    aten.pow.Tensor_Scalar, aten.rsqrt.default, aten.sqrt.default, aten.neg.default, aten.clone.default,
    aten._to_copy.default, prims.convert_element_type.default, operator.getitem,
})
# over hidden only (checked per node): RMSNorm's mean of squares, LayerNorm's var_mean
_ROW_REDUCTIONS = frozenset({aten.mean.dim, aten.sum.dim_IntList, aten.var_mean.correction, aten.var.correction})


def _norm_ops() -> frozenset:
    """vLLM's IR norms (row-local: each token row normalized on its own), where vLLM is loaded."""
    return frozenset(op for name in ("rms_norm", "fused_add_rms_norm")
                     if (op := registered_op("vllm_ir", name)) is not None)


class _Region:
    """All_reduces whose results meet through row-local ops, and the nodes that become token shards."""

    def __init__(self, all_reduce: AllReduce) -> None:
        self.all_reduces = [all_reduce]
        self.sharded: list[fx.Node] = []
        self.everywhere_rows: set[fx.Node] = set()  # full rows every rank holds alike, read by sharded nodes

    def merge(self, other: "_Region") -> None:
        self.all_reduces += other.all_reduces
        self.sharded += other.sharded
        self.everywhere_rows |= other.everywhere_rows


def rewrite(graph: fx.Graph, config: PassConfig, report: PassReport) -> None:
    """Split every applicable all_reduce region; record each all_reduce with what was done or why not."""
    enabled, threshold_tokens = config.sequence_parallel, config.sequence_parallel_threshold_tokens
    all_reduces = [ar for node in list(graph.nodes) if (ar := match_all_reduce(node)) is not None]
    if not all_reduces:
        return
    if not enabled:
        for ar in all_reduces:
            report.add(FAMILY, ar.form, FAMILY_DISABLED)
        return
    candidates = []
    for ar in all_reduces:
        reason = _unsupported(ar) or _transport_does_not_pay(ar) or _below_threshold(ar, threshold_tokens)
        if reason:
            report.add(FAMILY, ar.form, reason)
            if isinstance(reason, Reason) and reason.kind == outcomes.SP_BELOW_THRESHOLD:
                _warn_one_graph_for_all_sizes(ar, threshold_tokens)
        else:
            candidates.append(ar)
    norms = _norm_ops()
    for region in _regions(graph, candidates, norms):
        reason = _unprofitable(region, norms)
        for ar in region.all_reduces:
            report.add(FAMILY, ar.form, reason or SPLIT)
        if not reason:
            _split(graph, region)


def _unsupported(ar: AllReduce) -> str | Reason | None:
    if dim(ar.input) != 2:
        return outcomes.ALL_REDUCE_NOT_2D_ROWS
    try:
        resolve_group(ar.group_name)
    except ValueError:
        return Reason(outcomes.UNKNOWN_GROUP, repr(ar.group_name))
    return None


def _transport_does_not_pay(ar: AllReduce) -> Reason | None:
    """vLLM's CPU shared-memory all_reduce moves the rows through one shared segment; the split's
    reduce_scatter and all_gather go through the group's gloo transport, which costs more than the
    all_reduce it replaces at every size (the real engine split there measured slower at every prefill
    and decode point; numbers in docs/DESIGN.md): splitting it only ever loses."""
    if ar.form != "shm":
        return None
    return Reason(outcomes.SP_TRANSPORT, "vLLM's shm all_reduce; reduce_scatter and all_gather would run over gloo")


def _below_threshold(ar: AllReduce, threshold_tokens: int) -> Reason | None:
    smallest = smallest_token_count(_rows(ar.input))
    if smallest > threshold_tokens:
        return None
    return Reason(outcomes.SP_BELOW_THRESHOLD, f"compiled for {smallest} tokens and up, threshold {threshold_tokens}")


def _warn_one_graph_for_all_sizes(ar: AllReduce, threshold_tokens: int) -> None:
    """Once per process, loudly: SP was asked for, but the graph serves decode sizes too (no compile ranges, as
    vLLM's CPU engine compiles), so nothing will be split; a report row alone would leave it a silent no-op."""
    global _warned_one_graph
    rows = _rows(ar.input)
    if _warned_one_graph or isinstance(rows, int) or vllm_state.compile_range_start() is not None:
        return
    _warned_one_graph = True
    smallest = smallest_token_count(rows)
    logger.warning(
        "fcpass: sequence_parallel is on, but this graph serves every token count from %d up (one graph for all "
        "sizes, no compile ranges: vLLM's CPU engine compiles so), not above sequence_parallel_threshold_tokens="
        "%d: the split stays off, as it would run at decode sizes too. matmul -> all_reduce fusion still applies "
        "(its guard decides per call); set sequence_parallel_threshold_tokens below %d to split anyway.",
        smallest, threshold_tokens, smallest)


def smallest_token_count(rows) -> int:
    """The fewest tokens a graph with ``rows`` token rows runs with: exact for a static count, else vLLM's
    compile range start where vLLM compiles, else the symbolic size's lower bound."""
    if isinstance(rows, int):
        return rows
    start = vllm_state.compile_range_start()
    if start is not None:
        return start
    lower = rows.node.shape_env.bound_sympy(rows.node.expr).lower
    return int(lower) if lower.is_finite else 0


# --------------------------------------------------------------------------- condition

def _regions(graph: fx.Graph, candidates: list[AllReduce], norms: frozenset) -> list[_Region]:
    """Spread sharding forward from the candidates through row-local ops; group what connects."""
    region_of: dict[fx.Node, _Region] = {}
    for ar in candidates:
        region_of[ar.output] = _Region(ar)
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


def _unprofitable(region: _Region, norms: frozenset) -> str | Reason | None:
    if len({(ar.form, ar.group_name) for ar in region.all_reduces}) > 1:
        return outcomes.SP_MIXED_REGION
    if not any(n.target in norms or n.target == aten.rsqrt.default for n in region.sharded):
        return outcomes.SP_NO_NORM
    gathers = len(_gathered(region))
    if gathers > len(region.all_reduces):
        return Reason(outcomes.SP_TOO_MANY_GATHERS, f"{gathers} all_gathers for {len(region.all_reduces)} all_reduces")
    return None


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


def _rows(node: fx.Node):
    return fake_value(node).shape[0]


def _same_rows(val, ar: AllReduce) -> bool:
    return val.dim() == 2 and statically_known_true(val.shape[0] == _rows(ar.input))


def _same_shape(val, ar: AllReduce) -> bool:
    """The all_reduced rows' shape: token rows of the full hidden width (a TP shard of columns is narrower)."""
    return _same_rows(val, ar) and statically_known_true(val.shape[1] == fake_value(ar.input).shape[1])


def _gathered(region: _Region) -> dict[fx.Node, list[fx.Node]]:
    """Sharded tensors read by something that needs all rows, with those readers."""
    inside = set(region.sharded)
    readers = {}
    for node in region.sharded:
        if isinstance(fake_value(node), torch.Tensor):
            outside = [u for u in node.users if u not in inside and not _reads_token_count(u, node)]
            if outside:
                readers[node] = outside
    return readers


def _reads_token_count(user: fx.Node, node: fx.Node) -> bool:
    return user.target == aten.sym_size.int and user.args[0] is node


# --------------------------------------------------------------------------- replacement

def _split(graph: fx.Graph, region: _Region) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    all_reduces = sorted(region.all_reduces, key=lambda ar: order[ar.output])
    world_size = resolve_group(all_reduces[0].group_name).size()
    sharded, shards = set(region.sharded), []
    for ar in all_reduces:
        with graph.inserting_before(ar.nodes[0]):
            padded = _pad_rows(graph, ar.input, world_size)
            shard = REDUCE_SCATTER.emit(graph, ar.form, padded, world_size, ar.group_name)
        ar.replace_with(shard)
        sharded.discard(ar.output)
        shards.append(shard)
        ar.erase()
    # The earliest all_reduce's input precedes every sharded value and has their unsharded row count.
    token_source = all_reduces[0].input
    derived = [n for n in graph.nodes if n in sharded]
    for rows in region.everywhere_rows:  # this rank's shard of it, for the sharded nodes that read it
        with graph.inserting_after(rows):
            shard = call(graph, torch.ops.fcpass.token_shard.default, (rows, all_reduces[0].group_name, world_size))
        for reader in [u for u in rows.users if u in sharded]:
            reader.replace_input_with(rows, shard)
    for node in derived:
        refresh_val(node)
    region.sharded = shards + derived
    for node in region.sharded:
        for user in list(node.users):
            if _reads_token_count(user, node) and user.args[1] == 0:
                user.replace_input_with(node, token_source)
    for node, readers in _gathered(region).items():
        with graph.inserting_before(node.next):
            full = ALL_GATHER.emit(graph, all_reduces[0].form, node, world_size, all_reduces[0].group_name)
            full = call(graph, aten.slice.Tensor, (full, 0, 0, _token_count(graph, token_source)))
        for reader in readers:
            reader.replace_input_with(node, full)


def _pad_rows(graph: fx.Graph, x: fx.Node, world_size: int) -> fx.Node:
    """``x`` with zero rows appended up to a multiple of world_size (as a graph op when the count is symbolic)."""
    pad = padding_to_multiple(graph, _token_count(graph, x), world_size)
    return x if pad == 0 else call(graph, aten.constant_pad_nd.default, (x, [0, 0, 0, pad]))  # 0: a static count


def _token_count(graph: fx.Graph, x: fx.Node):
    """``x``'s row count: an int, the graph's own size input (a symbolic token count is one), else a size read.

    Reading the size off the graph input keeps ``x`` (a matmul output) single-user, as fusion needs.
    """
    rows = _rows(x)
    if isinstance(rows, int):
        return rows
    for node in graph.find_nodes(op="placeholder"):
        val = fake_value(node)
        if isinstance(val, torch.SymInt) and val.node.expr == rows.node.expr:
            return node
    return call(graph, aten.sym_size.int, (x, 0))
