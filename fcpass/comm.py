"""Row-wise communication on a ProcessGroup: the unfused path's collectives, the generic pipeline's exchanges.

The unfused path runs the plain collectives the graph had (reduce_scatter,
all_gather, all_reduce); the generic pipeline moves the same rows by async point-to-point
sends, which it can overlap chunk by chunk, and which on gloo cost less than
its collectives. fp8 has no reduction and is not a gloo dtype; it moves as
bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from fcpass.matmuls import FP8_DTYPES

# torch >= 2.13 names them *_single and deprecates the *_tensor spellings (benchmarks call these too).
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_rows(out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False):
    """``out`` (world_size * m, ...) = every rank's ``x`` (m, ...) stacked in rank order."""
    return all_gather_single(as_sendable(out), as_sendable(x.contiguous()), group=group, async_op=async_op)


def reduce_scatter_rows(out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False):
    """``out`` (m / world_size, ...) = this rank's block of the SUM over ranks of ``x`` (m, ...)."""
    return reduce_scatter_single(out, x, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


def all_reduce_rows(x: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False):
    """``x`` (m, ...) = the SUM over ranks of every rank's ``x``, in place."""
    return dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


# ---- point-to-point: the generic pipeline's exchanges. Peers are group ranks; tag = chunk index, so every
# (peer, chunk) message of one call is told apart, and calls never overlap (each waits for all of its own).


def ring_peers(group: dist.ProcessGroup) -> list[int]:
    """Every other rank of ``group``, next first: at each step every rank sends to a different peer."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    return [(rank + step) % world_size for step in range(1, world_size)]


def send_rows(rows: torch.Tensor, peer: int, tag: int, group: dist.ProcessGroup):
    """Async send of contiguous ``rows`` to group rank ``peer``; keep ``rows`` alive until the Work is done."""
    return dist.isend(as_sendable(rows), group=group, group_dst=peer, tag=tag)


def receive_chunks(into: Callable[[int, int, int], torch.Tensor], chunks: list[tuple[int, int]], peers: list[int],
                   group: dist.ProcessGroup) -> list[tuple[int, int, int, dist.Work]]:
    """A receive posted for every peer's every chunk, into ``into(peer, start, end)``: (peer, start, end, Work),
    chunk by chunk, in the order the peers send them."""
    return [(peer, start, end, dist.irecv(as_sendable(into(peer, start, end)), group=group, group_src=peer, tag=tag))
            for tag, (start, end) in enumerate(chunks) for peer in peers]


def as_sendable(t: torch.Tensor) -> torch.Tensor:
    """fp8 rows as their bytes (gloo has no fp8; moving the bytes is exact), others as they are."""
    return t.view(torch.uint8) if t.dtype in FP8_DTYPES else t


def reduce_scatter_by_exchange(
    block_rows: Callable[[int, int, int], torch.Tensor], incoming: torch.Tensor, chunks: list[tuple[int, int]],
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """This rank's (shard_rows, n) shard of the SUM over ranks of P, by point-to-point exchange.

    ``block_rows(r, start, end)`` returns rows [start, end) of P's block r (the block reduced into rank r's
    shard), computed when asked (the fused path passes a matmul); ``incoming`` (world_size - 1, shard_rows, n)
    receives the peers' blocks; ``chunks`` splits a block's rows. Every peer's block is made first, chunk by
    chunk, each chunk sent the moment it exists; then this rank's own block, while those are in flight; then
    the peers' blocks, received in place (posted up front), are added. The same bytes as a ring
    reduce_scatter, in an order that overlaps each send with the next matmul; on gloo it is also ~2.5x
    cheaper than the reduce_scatter collective, which costs as much as an all_reduce (benchmarks/README.md).
    """
    peers = ring_peers(group)
    slot = {peer: i for i, peer in enumerate(peers)}
    in_flight = [work for *_, work in receive_chunks(lambda peer, s, e: incoming[slot[peer], s:e], chunks, peers,
                                                      group)]
    sent = []  # each chunk stays alive until its send is done
    for tag, (start, end) in enumerate(chunks):
        for peer in peers:
            sent.append(block_rows(peer, start, end).contiguous())
            in_flight.append(send_rows(sent[-1], peer, tag, group))
    own = block_rows(dist.get_rank(group), 0, incoming.shape[1])
    for work in in_flight:
        work.wait()
    if not peers:  # a one-rank group: the sum is this rank's own block
        return own.clone()  # a new tensor: the own block may be a view of the caller's
    out = own + incoming[0]
    for part in incoming[1:]:
        out.add_(part)
    return out


def all_gather_by_exchange(
    x: torch.Tensor, gathered_by_rank: torch.Tensor, chunks: list[tuple[int, int]], group: dist.ProcessGroup,
    meanwhile: Callable[[], object] = lambda: None, arrived: Callable[[int, int, int], object] = lambda *_: None,
) -> None:
    """``gathered_by_rank[r]`` (world_size, rows, ...) = rank r's contiguous ``x`` (rows, ...), by point-to-point
    exchange: every chunk sent to every peer and received in place, all posted up front; ``meanwhile()`` runs
    while they are in flight, then ``arrived(peer, start, end)`` as each peer's chunk is here, in send order."""
    peers = ring_peers(group)
    arriving = receive_chunks(lambda peer, start, end: gathered_by_rank[peer, start:end], chunks, peers, group)
    sent = [send_rows(x[start:end], peer, tag, group) for tag, (start, end) in enumerate(chunks) for peer in peers]
    gathered_by_rank[dist.get_rank(group)] = x
    meanwhile()
    for peer, start, end, work in arriving:
        work.wait()
        arrived(peer, start, end)
    for work in sent:
        work.wait()
