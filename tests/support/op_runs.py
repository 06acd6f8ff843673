"""Rank bodies shared by the op tests: call an op on a Case, compare to the reference.

Each returns plain data (errors, decisions) so the parent process can check
every rank, including that all ranks took the same path.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

import fcpass
from support.cases import (
    Case, rank_biases, rank_weights, rank_x, reference_all_gather_mm, reference_mm_all_reduce,
    reference_mm_reduce_scatter, rel_error,
)


def _decision_of(call):
    fcpass.reset_decision_counts()
    result = call()
    (decision,) = fcpass.decision_counts()
    return result, decision


def run_mm_reduce_scatter(case: Case, rank: int, world_size: int, group_name: str) -> dict:
    x = rank_x(case, rank)
    (w,) = rank_weights(case, rank, shared=False)
    (b,) = rank_biases(case, rank, rank0_only=True)
    out, decision = _decision_of(
        lambda: torch.ops.fcpass.mm_reduce_scatter(x, w, b, group_name, world_size, case.threshold, case.pad_rows)
    )
    ref = reference_mm_reduce_scatter(case, rank, world_size)
    assert out.shape == ref.shape and out.dtype == case.dtype, (out.shape, ref.shape, out.dtype)
    return {"case": case, "error": rel_error(out, ref), "decision": decision}


def run_mm_all_reduce(case: Case, rank: int, world_size: int, group_name: str) -> dict:
    """Also returns the result's bytes' digest: every rank must hold the same sum, bit for bit."""
    x = rank_x(case, rank)
    (w,) = rank_weights(case, rank, shared=False)
    (b,) = rank_biases(case, rank, rank0_only=True)
    out, decision = _decision_of(
        lambda: torch.ops.fcpass.mm_all_reduce(x, w, b, group_name, case.threshold)
    )
    ref = reference_mm_all_reduce(case, world_size)
    assert out.shape == ref.shape and out.dtype == case.dtype, (out.shape, ref.shape, out.dtype)
    digest = hashlib.sha256(out.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    return {"case": case, "error": rel_error(out, ref), "decision": decision, "digest": digest}


def run_all_gather_mm(case: Case, rank: int, world_size: int, group_name: str) -> dict:
    x = rank_x(case, rank)
    ws = rank_weights(case, rank, shared=True)
    bs = rank_biases(case, rank, rank0_only=False)
    (gathered, outs), decision = _decision_of(
        lambda: torch.ops.fcpass.all_gather_mm(x, ws, bs, group_name, world_size, case.threshold)
    )
    ref_gathered, ref_outs = reference_all_gather_mm(case, rank, world_size)
    assert torch.equal(gathered, ref_gathered), "gathered rows differ"
    assert len(outs) == len(ref_outs)
    error = max(rel_error(o, r) for o, r in zip(outs, ref_outs))
    return {"case": case, "error": error, "decision": decision}


def run_cases(rank: int, world_size: int, rs_cases, ag_cases, config=None, ar_cases=()) -> list[dict]:
    """The cases under ``config`` (default: PassConfig()), which stays this rank's runtime config."""
    fcpass.configure(config if config is not None else fcpass.PassConfig())
    return run_on_group(rank, world_size, dist.group.WORLD.group_name, rs_cases, ag_cases, ar_cases)


def run_on_group(rank: int, world_size: int, name: str, rs_cases, ag_cases, ar_cases=()) -> list[dict]:
    """Every case of each op on the group ``name``, where this rank is group rank ``rank``."""
    return ([run_mm_reduce_scatter(c, rank, world_size, name) for c in rs_cases]
            + [run_all_gather_mm(c, rank, world_size, name) for c in ag_cases]
            + [run_mm_all_reduce(c, rank, world_size, name) for c in ar_cases])
