"""Fused ops on any ProcessGroup: chunked matmuls overlapped with async point-to-point sends.

The algorithm of torch's symmetric-memory fused ops, with async sends and
receives (``fcpass.comm``) in place of remote writes, so it runs (and can be
measured) on gloo, nccl and hccl alike.

mm_reduce_scatter (``comm.reduce_scatter_by_exchange``), C chunks per block
of rows: the rows reduced into a peer's shard are multiplied first, each
chunk sent to that peer as soon as it exists, then this rank's own block
while those are in flight, then the peers' blocks are added:

    mm(peer, c0) | mm(peer, c1)  | ... | mm(own block)        | add received
                 | send c0 ...   | send c1 ...  ...   wait all |

Not one reduce_scatter per chunk (the naive pipeline): that issues C
collectives of every rank's rows, and gloo's reduce_scatter costs as much as
an all_reduce, ~2.5x the exchange of the same rows.

all_gather_mm (``comm.all_gather_by_exchange``): every chunk of the local
shard is sent to every peer and every peer's chunks are received in place,
all posted up front; the local shard's matmul runs while they are in
flight, then each peer's chunk is multiplied as soon as it has arrived.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fcpass.backends.base import Backend, FusedCall
from fcpass.comm import all_gather_by_exchange, reduce_scatter_by_exchange
from fcpass.guard import KernelLimits

# Rows per rank below which chunking only adds launch and copy overhead.
MIN_ROWS_PER_CHUNK = 128
DEFAULT_CHUNKS = 4


def chunk_bounds(rows: int, chunks: int) -> list[tuple[int, int]]:
    """Split ``rows`` into at most ``chunks`` near-equal non-empty ranges."""
    chunks = max(1, min(chunks, rows))
    base, extra = divmod(rows, chunks)
    bounds, start = [], 0
    for i in range(chunks):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def auto_chunks(rows_per_rank: int, requested: int) -> int:
    if requested:
        return requested
    return max(1, min(DEFAULT_CHUNKS, rows_per_rank // MIN_ROWS_PER_CHUNK))


class GenericBackend(Backend):
    name = "generic"
    # Between the crossovers measured on 2 gloo ranks (benchmarks/README.md: mm_reduce_scatter fuses ahead
    # from 64-512 tokens, all_gather_mm from 512-16384, by shape); a threshold table gives each shape its own.
    default_threshold_tokens = 2048
    _limits = KernelLimits()

    def limits(self, op, call):
        return self._limits

    def mm_reduce_scatter(self, call: FusedCall) -> torch.Tensor:
        (matmul,) = call.matmuls
        x, row_scale = call.x, call.row_scale
        shard_rows = x.shape[0] // call.world_size

        def block_rows(rank: int, start: int, end: int) -> torch.Tensor:
            rows = slice(rank * shard_rows + start, rank * shard_rows + end)
            return matmul(x[rows], None if row_scale is None else row_scale[rows])

        incoming = x.new_empty((call.world_size - 1, shard_rows, matmul.n), dtype=matmul.result_dtype)
        chunks = chunk_bounds(shard_rows, auto_chunks(shard_rows, call.pipeline_chunks))
        return reduce_scatter_by_exchange(block_rows, incoming, chunks, call.group)

    def all_gather_mm(self, call: FusedCall) -> tuple[torch.Tensor, list[torch.Tensor]]:
        ws, x = call.world_size, call.x.contiguous()
        shard_rows, k = x.shape
        gathered = x.new_empty((ws * shard_rows, k))
        gathered_by_rank = gathered.view(ws, shard_rows, k)
        outs = [x.new_empty((ws * shard_rows, mm.n), dtype=mm.result_dtype) for mm in call.matmuls]
        outs_by_rank = [out.view(ws, shard_rows, -1) for out in outs]

        def multiply_local_shard():  # needs no communication: hides the first chunks' transfers
            rank = dist.get_rank(call.group)
            for mm, out in zip(call.matmuls, outs_by_rank):
                out[rank] = mm(x)

        def multiply_arrived(peer: int, start: int, end: int):
            for mm, out in zip(call.matmuls, outs_by_rank):
                out[peer, start:end] = mm(gathered_by_rank[peer, start:end])

        chunks = chunk_bounds(shard_rows, auto_chunks(shard_rows, call.pipeline_chunks))
        all_gather_by_exchange(x, gathered_by_rank, chunks, call.group, multiply_local_shard, multiply_arrived)
        return gathered, outs
