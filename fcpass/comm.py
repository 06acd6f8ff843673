"""Row-wise collectives on a ProcessGroup: the unfused building blocks, and the exchange the pipeline reduces by.

Both the unfused path and the generic pipeline use these, so "the same plain
collective" means the same call on every path. fp8 has no reduction and is
not a gloo dtype; it is gathered as bytes.
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
    x = x.contiguous()
    if x.dtype in FP8_DTYPES:
        out, x = out.view(torch.uint8), x.view(torch.uint8)
    return all_gather_single(out, x, group=group, async_op=async_op)


def reduce_scatter_rows(out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False):
    """``out`` (m / world_size, ...) = this rank's block of the SUM over ranks of ``x`` (m, ...)."""
    return reduce_scatter_single(out, x, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


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
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    in_flight = [
        dist.irecv(incoming[step - 1, start:end], group=group, group_src=(rank - step) % world_size, tag=tag)
        for step in range(1, world_size) for tag, (start, end) in enumerate(chunks)
    ]
    sent = []  # each chunk stays alive until its send is done
    for tag, (start, end) in enumerate(chunks):
        for step in range(1, world_size):
            peer = (rank + step) % world_size
            sent.append(block_rows(peer, start, end).contiguous())
            in_flight.append(dist.isend(sent[-1], group=group, group_dst=peer, tag=tag))
    own = block_rows(rank, 0, incoming.shape[1])
    for work in in_flight:
        work.wait()
    out = own + incoming[0]  # a new tensor: the own block may be a view of the caller's
    for part in incoming[1:]:
        out.add_(part)
    return out
