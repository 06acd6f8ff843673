"""The three fusion families, each one record: what the runtime, the threshold table, the benchmarks and the
rewrite read of a family, written once.

    mm_reduce_scatter   reduce_scatter(x @ w + bias)   rows of x: every token (padded to a multiple of ws)
    all_gather_mm       all_gather(x) @ w_i + b_i      rows of x: this rank's shard of the tokens
    mm_all_reduce       all_reduce(x @ w + bias)       rows of x: every token; no shape depends on ws

A record holds the family's ``PassConfig`` flag, its token-count rule (what the guard compares with the
threshold), its input check (the real and the fake impls run it), its unfused path (the site's own ops,
``fcpass.sites``) and its backend method (the fused path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fcpass import sites, validate
from fcpass.backends.base import ALL_GATHER_MM, MM_ALL_REDUCE, MM_REDUCE_SCATTER, Backend, FusedCall
from fcpass.padding import append_zero_rows, with_zero_rows
from fcpass.vllm import state


@dataclass(frozen=True)
class Family:
    name: str
    config_flag: str  # the PassConfig field that turns the family on
    gathers: bool  # x is this rank's shard: the call's tokens are rows * world_size
    check: Callable[..., None]  # (op, x, mms, row_scale, world_size or None, pad_rows): FusedOpInputError
    unfused: Callable  # (site, x, mms, row_scale, world_size, group_name, pad_rows): what the graph did
    fused: Callable[[Backend, FusedCall], object]  # the backend's fused path

    def num_tokens(self, rows: int, world_size: int, pad_rows: int) -> int:
        return rows * world_size if self.gathers else rows + pad_rows


def _check_row_parallel(op, x, mms, row_scale, world_size, pad_rows=0, scatters=True) -> None:
    """reduce_scatter / all_reduce: one matmul of every token's rows (a per-token scale beside them)."""
    (mm,) = mms
    if world_size is not None:
        validate.check_world_size(op, world_size)
    validate.check_matmul(op, x, mm)
    if row_scale is not None:
        validate.check_row_scale(op, x, row_scale)
    if scatters:
        validate.check_pad_rows(op, mm, pad_rows)
        validate.check_divisible(op, x.shape[0] + pad_rows, world_size)


def _check_all_reduce(op, x, mms, row_scale, world_size, pad_rows=0) -> None:
    _check_row_parallel(op, x, mms, row_scale, world_size, scatters=False)


def _check_all_gather(op, x, mms, row_scale, world_size, pad_rows=0) -> None:
    validate.check_world_size(op, world_size)
    if not mms:
        raise validate.FusedOpInputError(f"fcpass::{op}: needs at least one weight")
    for i, mm in enumerate(mms):
        validate.check_matmul(op, x, mm, i)


def _unfused_reduce_scatter(site, x, mms, row_scale, world_size, group_name, pad_rows):
    (mm,) = mms
    product = mm(x, row_scale)
    if pad_rows and site.collective != sites.VLLM_ASCEND:  # vllm-ascend's op pads by its own pad_size
        product = append_zero_rows(product, pad_rows)
    return sites.reduce_scatter(site, product, world_size, group_name)


def _unfused_all_reduce(site, x, mms, row_scale, world_size, group_name, pad_rows):
    (mm,) = mms
    return sites.all_reduce(site, mm(x, row_scale), group_name)


def _unfused_all_gather(site, x, mms, row_scale, world_size, group_name, pad_rows):
    gathered = sites.all_gather(site, x, world_size, group_name)
    if gathered is x:  # vllm-ascend with FlashComm off: its op keeps the local rows; an op returns new tensors
        gathered = x.clone()
    outs = [mm(gathered) for mm in mms]
    if site.collective == sites.VLLM_ASCEND:  # its op dropped its pad rows: put back what drop_token_padding drops
        missing = x.shape[0] * world_size - gathered.shape[0]
        if 0 < missing == state.ascend_pad_size():
            gathered, outs = append_zero_rows(gathered, missing), [append_zero_rows(out, missing) for out in outs]
    return gathered, outs


FAMILIES: dict[str, Family] = {
    MM_REDUCE_SCATTER: Family(MM_REDUCE_SCATTER, "fuse_mm_reduce_scatter", False, _check_row_parallel,
                              _unfused_reduce_scatter,
                              lambda backend, call: backend.mm_reduce_scatter(with_zero_rows(call))),
    ALL_GATHER_MM: Family(ALL_GATHER_MM, "fuse_all_gather_mm", True, _check_all_gather, _unfused_all_gather,
                          lambda backend, call: backend.all_gather_mm(call)),
    MM_ALL_REDUCE: Family(MM_ALL_REDUCE, "fuse_mm_all_reduce", False, _check_all_reduce, _unfused_all_reduce,
                          lambda backend, call: backend.mm_all_reduce(call)),
}
