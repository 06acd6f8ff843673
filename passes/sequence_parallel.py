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
(passes/sp_regions.py)
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

import torch
import torch.fx as fx

from fcpass.config import PassConfig
from passes.collectives import ALL_GATHER, REDUCE_SCATTER, AllReduce, scan_all_reduces
from passes.graph_edit import call, padding_to_multiple, refresh_val
from passes import process
from passes import report as outcomes
from passes.nodes import dim, fake_value
from passes.report import FAMILY_DISABLED, SPLIT, PassReport, Reason
from passes.sp_regions import Region, gathered, norm_ops, reads_token_count, regions, token_rows

FAMILY = "sequence_parallel"

logger = logging.getLogger(f"fcpass.{__name__}")
_warned_one_graph = False

aten = torch.ops.aten


def rewrite(graph: fx.Graph, config: PassConfig, report: PassReport) -> None:
    """Split every applicable all_reduce region; record each all_reduce with what was done or why not."""
    enabled, threshold_tokens = config.sequence_parallel, config.sequence_parallel_threshold_tokens
    all_reduces, _ = scan_all_reduces(graph)  # the undecoded ones: mm_all_reduce reports them
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
    norms = norm_ops()
    for region in regions(graph, candidates, norms):
        reason = _unprofitable(region, norms)
        for ar in region.all_reduces:
            report.add(FAMILY, ar.form, reason or SPLIT)
        if not reason:
            _split(graph, region)


def _unsupported(ar: AllReduce) -> str | Reason | None:
    if dim(ar.input) != 2:
        return outcomes.ALL_REDUCE_NOT_2D_ROWS
    if process.current().group_size(ar.group_name) is None:
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
    smallest = smallest_token_count(token_rows(ar.input))
    if smallest > threshold_tokens:
        return None
    return Reason(outcomes.SP_BELOW_THRESHOLD, f"compiled for {smallest} tokens and up, threshold {threshold_tokens}")


def _warn_one_graph_for_all_sizes(ar: AllReduce, threshold_tokens: int) -> None:
    """Once per process, loudly: SP was asked for, but the graph serves decode sizes too (no compile ranges, as
    vLLM's CPU engine compiles), so nothing will be split; a report row alone would leave it a silent no-op."""
    global _warned_one_graph
    rows = token_rows(ar.input)
    if _warned_one_graph or isinstance(rows, int) or process.current().compile_range_start() is not None:
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
    start = process.current().compile_range_start()
    if start is not None:
        return start
    lower = rows.node.shape_env.bound_sympy(rows.node.expr).lower
    return int(lower) if lower.is_finite else 0


# --------------------------------------------------------------------------- condition

def _unprofitable(region: Region, norms: frozenset) -> str | Reason | None:
    if len({(ar.form, ar.group_name) for ar in region.all_reduces}) > 1:
        return outcomes.SP_MIXED_REGION
    if not any(n.target in norms or n.target == aten.rsqrt.default for n in region.sharded):
        return outcomes.SP_NO_NORM
    readers = gathered(region)
    if len(readers) > len(region.all_reduces):
        why = f"{len(readers)} all_gathers for {len(region.all_reduces)} all_reduces"
        leaving = sum(any(user.op == "output" for user in users) for users in readers.values())
        if leaving:  # e.g. a pipeline-parallel stage hands its hidden states and residual on whole
            why += f"; {leaving} of them for tensors that leave the graph whole (a pipeline stage's outputs)"
        return Reason(outcomes.SP_TOO_MANY_GATHERS, why)
    return None


# --------------------------------------------------------------------------- replacement

def _split(graph: fx.Graph, region: Region) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    all_reduces = sorted(region.all_reduces, key=lambda ar: order[ar.output])
    world_size = process.current().group_size(all_reduces[0].group_name)
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
            if reads_token_count(user, node) and user.args[1] == 0:
                user.replace_input_with(node, token_source)
    for node, readers in gathered(region).items():
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
    rows = token_rows(x)
    if isinstance(rows, int):
        return rows
    for node in graph.find_nodes(op="placeholder"):
        val = fake_value(node)
        if isinstance(val, torch.SymInt) and val.node.expr == rows.node.expr:
            return node
    return call(graph, aten.sym_size.int, (x, 0))
