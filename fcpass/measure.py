"""Timing fcpass ops on real ranks: the variants of one point, measured interleaved.

Shared by ``python -m fcpass.calibrate`` and the checkout's benchmarks (ops.py, guard.py), so "fused",
"unfused", "matmul alone" and "the collective alone" mean the same calls in each of them. Runs in ranks of a
process group: local gloo ranks (``fcpass.local_ranks.run_ranks``), or the user's own (torchrun, on NPUs or
GPUs), with the tensors on that group's device.

Interleaved: every repeat times each variant once, in turn, so machine noise
(this machine is shared) lands on every variant alike; the median of the
repeats is reported. One sample is the slowest rank's time (all_reduce MAX)
between two barriers: a collective op is as slow as its slowest rank.
"""

from __future__ import annotations

import functools
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

import fcpass
# The collectives' non-deprecated spellings and the padding the ops themselves use.
from fcpass.comm import (
    all_gather_by_exchange, all_gather_single, all_reduce_rows, reduce_scatter_by_exchange, reduce_scatter_single,
)
from fcpass.backends.generic import collectives_everywhere
from fcpass.dispatch import CONFIG_THRESHOLD
from fcpass.families import FAMILIES
from fcpass.padding import append_zero_rows

logger = logging.getLogger(__name__)

OPS = tuple(FAMILIES)
CHUNK_CANDIDATES = (1, 2, 4, 8)
NEVER_FUSE, ALWAYS_FUSE = 1 << 24, 0


def rank_main(fn: Callable) -> Callable:
    """A benchmark's rank function ``fn(rank, ...)``: run in inference mode, as vLLM's model runner runs the
    model (no autograd layer on any op), with progress on stderr from rank 0 (spawned ranks start without the
    parent's logging)."""

    @functools.wraps(fn)
    def run(rank: int, *args):
        if rank == 0:
            logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
        with torch.inference_mode():
            return fn(rank, *args)

    return run


def synchronize(device: str) -> None:
    """Wait for ``device``'s queued work (a CPU runs its ops as they are called)."""
    if device != "cpu":
        getattr(torch, device).synchronize()


def time_ms(fn: Callable[[], object], inner: int = 1, device: str = "cpu") -> float:
    """Milliseconds per call of ``fn`` (``inner`` calls back to back, the device's work included), on the
    slowest rank."""
    synchronize(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    synchronize(device)
    elapsed = torch.tensor([(time.perf_counter() - start) / inner], device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item() * 1e3


def sample(variants: dict[str, Callable[[], object]], repeats: int, inner: int = 1,
           device: str = "cpu") -> dict[str, list[float]]:
    """Every variant timed ``repeats`` times, interleaved, after one warm-up call each."""
    for fn in variants.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            samples[name].append(time_ms(fn, inner, device))
    return samples


def medians(variants: dict[str, Callable[[], object]], repeats: int, inner: int = 1,
            device: str = "cpu") -> dict[str, float]:
    return {name: statistics.median(values) for name, values in sample(variants, repeats, inner, device).items()}


@dataclass
class Point:
    """One op at one shape and token count: its inputs on this rank and its variants.

    tokens: rows entering the matmul (m for mm_reduce_scatter and
    mm_all_reduce, world_size x local rows for all_gather_mm), the guard's token count. ``pad_rows``
    (mm_reduce_scatter only) zero rows follow the product, as vLLM pads a
    token count that world_size does not divide.
    """

    op: str
    tokens: int
    k: int
    n: int
    world_size: int
    dtype: torch.dtype = torch.float32
    pad_rows: int = 0
    device: str = "cpu"  # the process group's device: "cpu" (gloo), "cuda" (nccl), "npu" (hccl)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        self.group_name = dist.group.WORLD.group_name
        g = torch.Generator().manual_seed(dist.get_rank())
        self.w = (torch.randn(self.k, self.n, generator=g) / self.k**0.5).to(self.dtype).to(self.device)
        if self.op != "all_gather_mm":
            self.x = torch.randn(self.tokens, self.k, generator=g).to(self.dtype).to(self.device)
            product = self.x @ self.w  # the collective's input: the product and its padded rows
            self.product = append_zero_rows(product, self.pad_rows) if self.pad_rows else product
            self.shard = self.x.new_empty(((self.tokens + self.pad_rows) // self.world_size, self.n))
        else:
            self.x = torch.randn(self.tokens // self.world_size, self.k, generator=g).to(self.dtype).to(self.device)
            self.gathered = self.x.new_empty((self.tokens, self.k))

    # ---- the variants: zero-argument callables on this point's tensors

    def op_args(self, threshold_tokens: int, group_name: str | None = None) -> tuple:
        """The fcpass op's arguments for this point (on ``group_name``, by default this point's c10d group)."""
        group_name = group_name or self.group_name
        if self.op == "mm_reduce_scatter":
            return self.x, self.w, None, group_name, self.world_size, threshold_tokens, self.pad_rows
        if self.op == "mm_all_reduce":
            return self.x, self.w, None, group_name, threshold_tokens
        return self.x, [self.w], [None], group_name, self.world_size, threshold_tokens

    def op_call(self, threshold_tokens: int) -> Callable[[], object]:
        """The fcpass op through torch.ops, as a compiled graph calls it."""
        op, args = getattr(torch.ops.fcpass, self.op), self.op_args(threshold_tokens)
        return lambda: op(*args)

    def configured(self, config: fcpass.PassConfig, threshold_tokens: int) -> Callable[[], object]:
        """The op under ``config`` (built once, outside the timing: configure is one assignment)."""
        run = self.op_call(threshold_tokens)

        def call():
            fcpass.configure(config)
            return run()

        return call

    def fused(self, chunks: int) -> Callable[[], object]:
        return self.configured(fcpass.PassConfig(pipeline_chunks=chunks), ALWAYS_FUSE)

    def unfused(self) -> Callable[[], object]:
        return self.op_call(NEVER_FUSE)

    def matmul(self) -> Callable[[], object]:
        if self.op == "all_gather_mm":
            return lambda: torch.mm(self.gathered, self.w)
        return lambda: torch.mm(self.x, self.w)

    def collective(self, async_op: bool = False) -> Callable[[], object]:
        if self.op == "mm_reduce_scatter":
            return lambda: reduce_scatter_single(self.shard, self.product, async_op=async_op)
        if self.op == "mm_all_reduce":  # in place, on zeros of the product's shape: repeated sums stay zero
            zeros = torch.zeros_like(self.product)
            return lambda: all_reduce_rows(zeros, dist.group.WORLD, async_op=async_op)
        return lambda: all_gather_single(self.gathered, self.x, async_op=async_op)

    def exchange(self) -> Callable[[], object]:
        """The other way to move the collective's bytes: the point-to-point exchange the fused path uses
        (``comm.reduce_scatter_by_exchange`` on the product / ``comm.all_gather_by_exchange`` of x), alone,
        one message per peer. mm_all_reduce moves its bytes by the all_reduce itself: the collective."""
        group = dist.group.WORLD
        if self.op == "mm_all_reduce":
            return self.collective()
        if self.op == "mm_reduce_scatter":
            product, shard_rows = self.product, self.shard.shape[0]
            incoming = product.new_empty((self.world_size - 1, shard_rows, self.n))

            def block_rows(rank, start, end):
                return product[rank * shard_rows + start:rank * shard_rows + end]

            return lambda: reduce_scatter_by_exchange(block_rows, incoming, [(0, shard_rows)], group)
        rows = self.x.shape[0]
        gathered_by_rank = self.gathered.view(self.world_size, rows, self.k)
        return lambda: all_gather_by_exchange(self.x, gathered_by_rank, [(0, rows)], group)

    def naive_pipeline(self, chunks: int) -> Callable[[], object]:
        """docs/DESIGN.md's baseline: C chunks, each holding every rank's c-th sub-slice of rows; a chunk's
        matmul, then its async reduce_scatter; wait for all at the end. It is the generic backend's pipeline on
        device groups, run here on gloo (``collectives_everywhere``)."""
        fused = self.fused(chunks)

        def call():
            with collectives_everywhere():
                return fused()

        return call

    def concurrent(self) -> Callable[[], object]:
        """The whole matmul while the whole collective (on inputs of its own) is in flight.

        Overlap with no dependency between the two, as this machine runs it: where this stays near matmul +
        collective (the two share the rank's core), max(matmul, collective) is not reachable here.
        """
        start_collective, matmul = self.collective(async_op=True), self.matmul()

        def call():
            work = start_collective()
            matmul()
            work.wait()

        return call

    def direct(self, reduce_scatter=None, all_gather=None, all_reduce=None) -> Callable[[], object]:
        """Matmul + collective called directly, allocating outputs as the op does: the op's floor.

        ``reduce_scatter(product)`` / ``all_gather(x)`` / ``all_reduce(product)``: another out-of-place collective
        in place of c10d's.
        """
        x, w, ws, pad = self.x, self.w, self.world_size, self.pad_rows
        if self.op == "mm_all_reduce":
            reduce = all_reduce or _c10d_all_reduce

            def call():
                return reduce(torch.mm(x, w))
            return call
        if self.op == "mm_reduce_scatter":
            scatter = reduce_scatter or _c10d_reduce_scatter(ws)

            def call():
                product = torch.mm(x, w)
                if pad:
                    product = append_zero_rows(product, pad)
                return scatter(product)
            return call

        gather = all_gather or _c10d_all_gather(ws)

        def call():
            gathered = gather(x)
            return gathered, [torch.mm(gathered, w)]
        return call

    def fused_variants(self, candidates=CHUNK_CANDIDATES) -> dict[str, Callable[[], object]]:
        return {fused_name(c): self.fused(c) for c in candidates}


def _c10d_reduce_scatter(world_size: int):
    def scatter(product):
        out = product.new_empty((product.shape[0] // world_size, product.shape[1]))
        reduce_scatter_single(out, product)
        return out
    return scatter


def _c10d_all_reduce(product):
    all_reduce_rows(product, dist.group.WORLD)
    return product


def _c10d_all_gather(world_size: int):
    def gather(x):
        gathered = x.new_empty((x.shape[0] * world_size, x.shape[1]))
        all_gather_single(gathered, x)
        return gathered
    return gather


def fused_name(chunks: int) -> str:
    return f"fused_{chunks}"


def best_fused(ms: dict[str, float], candidates=CHUNK_CANDIDATES) -> tuple[int, float, dict[str, float]]:
    """(winning chunk count, its ms, ms per candidate) from one point's medians."""
    fused = {str(c): ms[fused_name(c)] for c in candidates}
    best = min(fused, key=fused.get)
    return int(best), fused[best], fused


def crossover(series: list[tuple[int, float]]) -> int | None:
    """The smallest token count from which fused stays ahead, from (tokens, unfused/fused) pairs; None: never."""
    ahead = None
    for tokens, speedup in sorted(series, reverse=True):
        if speedup <= 1.0:
            break
        ahead = tokens
    return ahead
