"""Deterministic per-rank inputs and float64 references computed without fcpass.

Every rank can build every other rank's inputs from the seed, so the
reference needs no collective at all: it cannot share a bug with the code
under test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TOLERANCE = {  # relative to max |reference|
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,  # 8 mantissa bits, plus one rounding per reduction step
    torch.float16: 4e-3,
}


@dataclass(frozen=True)
class Case:
    """One op call: ``m`` rows per rank, weights (k, n_i), bias per weight."""

    m: int
    k: int
    ns: tuple[int, ...] = (48,)
    dtype: torch.dtype = torch.float32
    bias: bool = False
    threshold: int = 0
    seed: int = 0
    pad_rows: int = 0  # mm_reduce_scatter: zero rows after the product, before the scatter
    extra: dict = field(default_factory=dict, hash=False, compare=False)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rank_x(case: Case, rank: int) -> torch.Tensor:
    return torch.randn(case.m, case.k, generator=_gen(case.seed * 1000 + rank)).to(case.dtype)


def rank_weights(case: Case, rank: int, shared: bool) -> list[torch.Tensor]:
    """Row-parallel weights differ per rank; column-parallel (``shared``) ones are this rank's shard."""
    base = case.seed * 1000 + 500 + (0 if shared else rank)
    return [
        (torch.randn(case.k, n, generator=_gen(base + 7 * i)) / case.k**0.5).to(case.dtype)
        for i, n in enumerate(case.ns)
    ]


def rank_biases(case: Case, rank: int, rank0_only: bool) -> list[torch.Tensor | None]:
    """vLLM's RowParallelLinear adds its bias on rank 0 only (``rank0_only``)."""
    if not case.bias or (rank0_only and rank != 0):
        return [None] * len(case.ns)
    return [torch.randn(n, generator=_gen(case.seed * 1000 + 900 + i)).to(case.dtype) for i, n in enumerate(case.ns)]


def reference_mm_all_reduce(case: Case, world_size: int) -> torch.Tensor:
    """The row-parallel product summed over the ranks, rank 0's bias once: what every rank's all_reduce holds."""
    total = 0
    for r in range(world_size):
        (w,) = rank_weights(case, r, shared=False)
        (b,) = rank_biases(case, r, rank0_only=True)
        y = rank_x(case, r).double() @ w.double()
        total = total + (y if b is None else y + b.double())
    return total


def reference_mm_reduce_scatter(case: Case, rank: int, world_size: int) -> torch.Tensor:
    total = reference_mm_all_reduce(case, world_size)
    total = torch.cat([total, total.new_zeros((case.pad_rows, total.shape[1]))])
    shard = (case.m + case.pad_rows) // world_size
    return total[rank * shard:(rank + 1) * shard]


def reference_all_gather_mm(case: Case, rank: int, world_size: int):
    gathered = torch.cat([rank_x(case, r) for r in range(world_size)])
    outs = []
    for w, b in zip(rank_weights(case, rank, shared=True), rank_biases(case, rank, rank0_only=False)):
        y = gathered.double() @ w.double()
        outs.append(y if b is None else y + b.double())
    return gathered, outs


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item() or 1.0
    return (actual.double() - expected.double()).abs().max().item() / scale
