"""Row-wise collectives on a ProcessGroup, the unfused building blocks.

Both the unfused path and the generic pipeline use these, so "the same plain
collective" means the same call on every path. fp8 has no reduction and is
not a gloo dtype; it is gathered as bytes.
"""

from __future__ import annotations

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
