"""Fused ops on any ProcessGroup: chunked matmuls overlapped with async communication.

The algorithm of torch's symmetric-memory fused ops, on plain async
communication, so it runs (and can be measured) on gloo, nccl and hccl
alike. Two ways to move the rows, by the tensors' device
(``EXCHANGE_DEVICE_TYPES``):

Point-to-point exchange (CPU, gloo; ``fcpass.comm``):
  mm_reduce_scatter: the rows reduced into a peer's shard are multiplied
  first, each chunk sent to that peer as soon as it exists, then this
  rank's own block while those are in flight, then the peers' blocks are
  added:

      mm(peer, c0) | mm(peer, c1)  | ... | mm(own block)        | add received
                   | send c0 ...   | send c1 ...  ...   wait all |

  all_gather_mm: every chunk of the local shard sent to every peer and
  every peer's chunks received in place, all posted up front; the local
  shard's matmul runs while they are in flight, then each peer's chunk is
  multiplied as soon as it has arrived.

mm_all_reduce (every device): row chunks of x, each chunk's all_reduce in
flight while the next chunk multiplies (no shapes change, so the rows need
no exchange order; gloo's all_reduce costs no more than the exchange would
for the same bytes):

      mm(c0) | mm(c1)        | mm(c2)        | ... wait all, concatenate
             | all_reduce c0 | all_reduce c1 |

One collective per chunk (device groups):
  mm_reduce_scatter: chunk c holds every rank's c-th sub-slice of rows; its
  async reduce_scatter overlaps the next chunk's matmul.
  all_gather_mm: every chunk's all_gather issued up front, the local
  shard's matmul while they are in flight, then each chunk's remote rows.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from fcpass.backends.base import MM_ALL_REDUCE, MM_REDUCE_SCATTER, Backend, FusedCall
from fcpass.comm import (all_gather_by_exchange, all_gather_rows, all_reduce_rows, reduce_scatter_by_exchange,
                         reduce_scatter_rows)
from fcpass.guard import GuardFacts, KernelLimits
from fcpass.limits import MAX_THRESHOLD_TOKENS

# Where the pipeline moves rows by point-to-point exchange: CPU tensors, which travel over gloo, where the
# exchange is the cheaper way (its reduce_scatter costs as much as an all_reduce; benchmarks/README.md).
# Device groups (nccl, hccl) keep one collective per chunk: their collectives are efficient, and their
# point-to-point sends open extra communicators and cannot be captured into a CUDA graph
# (pytorch/pytorch#133984), where vLLM runs the model.
EXCHANGE_DEVICE_TYPES = frozenset({"cpu"})


@contextlib.contextmanager
def collectives_everywhere():
    """Within: the per-chunk collective pipeline on every device, so it can be checked and timed on gloo."""
    global EXCHANGE_DEVICE_TYPES
    saved, EXCHANGE_DEVICE_TYPES = EXCHANGE_DEVICE_TYPES, frozenset()
    try:
        yield
    finally:
        EXCHANGE_DEVICE_TYPES = saved


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
    # From the crossovers measured on 2 gloo ranks (a threshold table gives each shape its own): over the
    # exchange, mm_reduce_scatter fuses ahead from 64-512 tokens by shape, all_gather_mm from 512-16384
    # (benchmarks/README.md); the per-chunk collective pipeline lost at 1k tokens and won from 4k (DESIGN.md).
    default_threshold_tokens = 2048
    EXCHANGE_REDUCE_SCATTER_THRESHOLD = 512
    # CPU mm_all_reduce: gloo's transport is CPU work on the cores the matmuls need, so there is nothing for
    # the chunks to overlap with; on 2 gloo ranks the pipeline measured level or slower at every shape up to
    # 16k tokens (benchmarks/README.md), so on CPU it runs only where a config or table asks for it.
    EXCHANGE_ALL_REDUCE_NEVER_PAYS = "generic pipeline on CPU tensors: no gain measured, benchmarks/README.md"
    _limits = KernelLimits()
    _all_reduce_limits = KernelLimits(shards_rows=False)

    def default_threshold(self, family: str, facts: GuardFacts) -> int:
        if self.never_pays(family, facts.device_type):
            return MAX_THRESHOLD_TOKENS
        if family == MM_REDUCE_SCATTER and facts.device_type in EXCHANGE_DEVICE_TYPES:
            return self.EXCHANGE_REDUCE_SCATTER_THRESHOLD
        return self.default_threshold_tokens

    def never_pays(self, family: str, device_type: str) -> str | None:
        if family == MM_ALL_REDUCE and device_type in EXCHANGE_DEVICE_TYPES:
            return self.EXCHANGE_ALL_REDUCE_NEVER_PAYS
        return None

    def limits(self, family, call):
        return self._all_reduce_limits if family == MM_ALL_REDUCE else self._limits

    def mm_reduce_scatter(self, call: FusedCall) -> torch.Tensor:
        if call.x.device.type in EXCHANGE_DEVICE_TYPES:
            return _mm_reduce_scatter_by_exchange(call)
        return _mm_reduce_scatter_by_collectives(call)

    def all_gather_mm(self, call: FusedCall) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if call.x.device.type in EXCHANGE_DEVICE_TYPES:
            return _all_gather_mm_by_exchange(call)
        return _all_gather_mm_by_collectives(call)

    def mm_all_reduce(self, call: FusedCall) -> torch.Tensor:
        return _mm_all_reduce_by_chunks(call)


def _mm_all_reduce_by_chunks(call: FusedCall) -> torch.Tensor:
    """Each row chunk's product all-reduced in place, asynchronously, while the next chunk multiplies.

    A rank-0-only bias is added by that rank's matmul to every chunk, so the sum carries it once, as the
    unfused path's does; every rank runs the same chunks (their bounds read the shape only).
    """
    (matmul,) = call.matmuls
    x, row_scale = call.x, call.row_scale
    parts, pending = [], []
    for start, end in _chunks(call, x.shape[0]):
        parts.append(matmul(x[start:end], None if row_scale is None else row_scale[start:end]))
        pending.append(all_reduce_rows(parts[-1], call.group, async_op=True))
    for work in pending:
        work.wait()
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _mm_reduce_scatter_by_exchange(call: FusedCall) -> torch.Tensor:
    (matmul,) = call.matmuls
    x, row_scale = call.x, call.row_scale
    shard_rows = x.shape[0] // call.world_size

    def block_rows(rank: int, start: int, end: int) -> torch.Tensor:
        rows = slice(rank * shard_rows + start, rank * shard_rows + end)
        return matmul(x[rows], None if row_scale is None else row_scale[rows])

    incoming = x.new_empty((call.world_size - 1, shard_rows, matmul.n), dtype=matmul.result_dtype)
    return reduce_scatter_by_exchange(block_rows, incoming, _chunks(call, shard_rows), call.group)


def _all_gather_mm_by_exchange(call: FusedCall) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = call.x.contiguous()
    gathered, gathered_by_rank, outs, outs_by_rank = _gather_outputs(call, x)

    def multiply_local_shard():  # needs no communication: hides the first chunks' transfers
        _multiply_into(call, outs_by_rank, dist.get_rank(call.group), x)

    def multiply_arrived(peer: int, start: int, end: int):
        _multiply_into(call, outs_by_rank, peer, gathered_by_rank[peer, start:end], start, end)

    chunks = _chunks(call, x.shape[0])
    all_gather_by_exchange(x, gathered_by_rank, chunks, call.group, multiply_local_shard, multiply_arrived)
    return gathered, outs


def _mm_reduce_scatter_by_collectives(call: FusedCall) -> torch.Tensor:
    """Chunk c holds every rank's c-th sub-slice of rows, so its reduce_scatter yields rows c of this rank's shard."""
    (matmul,) = call.matmuls
    ws, x = call.world_size, call.x
    shard_rows = x.shape[0] // ws
    # View rows as (rank, row-in-shard) so a chunk can pick the same rows of every rank's shard.
    x_by_rank = x.unflatten(0, (ws, shard_rows))
    scale_by_rank = None if call.row_scale is None else call.row_scale.unflatten(0, (ws, shard_rows))
    out = x.new_empty((shard_rows, matmul.n), dtype=matmul.result_dtype)
    pending = []
    for start, end in _chunks(call, shard_rows):
        rows = x_by_rank[:, start:end].flatten(0, 1)
        scale = None if scale_by_rank is None else scale_by_rank[:, start:end].flatten(0, 1)
        partial = matmul(rows, scale)
        work = reduce_scatter_rows(out[start:end], partial, call.group, async_op=True)
        pending.append((work, partial))  # keep `partial` alive until its collective is done
    for work, _ in pending:
        work.wait()
    return out


def _all_gather_mm_by_collectives(call: FusedCall) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Every chunk's all_gather issued up front; the local shard's matmul runs while they are in flight."""
    x = call.x
    gathered, gathered_by_rank, outs, outs_by_rank = _gather_outputs(call, x)
    ws, (shard_rows, k) = call.world_size, x.shape
    rank = dist.get_rank(call.group)
    in_flight = []
    for start, end in _chunks(call, shard_rows):
        buf = x.new_empty((ws * (end - start), k))
        in_flight.append((start, end, buf, all_gather_rows(buf, x[start:end], call.group, async_op=True)))
    gathered_by_rank[rank] = x
    _multiply_into(call, outs_by_rank, rank, x)
    for start, end, buf, work in in_flight:
        work.wait()
        buf_by_rank = buf.view(ws, end - start, k)
        gathered_by_rank[:, start:end] = buf_by_rank
        for peer in range(ws):
            if peer != rank:
                _multiply_into(call, outs_by_rank, peer, buf_by_rank[peer], start, end)
    return gathered, outs


def _multiply_into(call: FusedCall, outs_by_rank: list[torch.Tensor], rank: int, rows: torch.Tensor,
                   start: int = 0, end: int | None = None) -> None:
    """Each matmul of ``rows`` (rank ``rank``'s shard, rows start:end) into its output's rows for them."""
    for mm, out in zip(call.matmuls, outs_by_rank):
        out[rank, start:end] = mm(rows)


def _chunks(call: FusedCall, shard_rows: int) -> list[tuple[int, int]]:
    return chunk_bounds(shard_rows, auto_chunks(shard_rows, call.pipeline_chunks))


def _gather_outputs(call: FusedCall, x: torch.Tensor):
    """all_gather_mm's outputs, and their views as (rank, rows of that rank's shard, ...)."""
    ws, (shard_rows, k) = call.world_size, x.shape
    gathered = x.new_empty((ws * shard_rows, k))
    outs = [x.new_empty((ws * shard_rows, mm.n), dtype=mm.result_dtype) for mm in call.matmuls]
    return gathered, gathered.view(ws, shard_rows, k), outs, [out.view(ws, shard_rows, -1) for out in outs]
