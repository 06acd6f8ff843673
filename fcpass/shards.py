"""This rank's token shard of rows every rank holds in full, for the sequence-parallel split.

A value every rank computes alike (OPT's learned position embeddings, read by
the residual add after the embedding's all_reduce) meets token shards there:
each rank then needs its own rows of it, padded like the reduce_scatter's
input. Which rows depends on the rank, so it is read when the op runs, never
baked into the graph (ranks share one compiled graph, and its cache).
"""

from __future__ import annotations

import torch

from fcpass import oplib
from fcpass.groups import resolve_group


@oplib.define("token_shard")
def token_shard(rows: torch.Tensor, group_name: str, world_size: int) -> torch.Tensor:
    """Rows [r * s, (r + 1) * s) of ``rows`` padded with zero rows to a multiple of ``world_size``; r: this
    rank in the group, s = ceil(m / world_size) (the shard of reduce_scatter(pad(x)))."""
    group = resolve_group(group_name)
    if group.size() != world_size:
        raise ValueError(f"fcpass::token_shard: world_size {world_size} does not match group {group_name!r} "
                         f"of size {group.size()}")
    shard = -(-rows.shape[0] // world_size)
    rank = group.rank()
    start, stop = rank * shard, min((rank + 1) * shard, rows.shape[0])
    out = rows.new_zeros((shard, *rows.shape[1:]))
    if stop > start:
        out[: stop - start] = rows[start:stop]
    return out


@oplib.fake("token_shard")
def _(rows, group_name, world_size):
    return rows.new_empty(((rows.shape[0] + world_size - 1) // world_size, *rows.shape[1:]))
