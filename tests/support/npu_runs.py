"""Rank bodies that run fcpass's NPU backend against the torch_npu stand-in."""

from __future__ import annotations

import os
import sys

STANDIN_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "standins", "npu")
NPU_GROUP_BACKEND = "cpu:gloo,npu:gloo"


def npu_setup():
    """Make ``import torch_npu`` find the stand-in, before the process group exists."""
    sys.path.insert(0, STANDIN_DIR)
    from standins import npu_kernels

    npu_kernels.install()


def with_standin_calls(body):
    """Run ``body`` and return (its result, the stand-in kernel calls it caused)."""
    from standins import npu_kernels

    del npu_kernels.calls[:]
    result = body()
    return result, list(npu_kernels.calls)


def run_npu_cases(rank, world_size, rs_cases, ag_cases, ar_cases=()):
    import fcpass
    from support.op_runs import run_cases

    config = fcpass.PassConfig(backend="npu")
    results, calls = with_standin_calls(lambda: run_cases(rank, world_size, rs_cases, ag_cases, config, ar_cases))
    return {"results": results, "calls": calls}


def run_npu_scaled(rank, world_size, kind, *args):
    import fcpass
    from support.scaled_runs import run_scaled_all_gather, run_scaled_row_parallel

    config = fcpass.PassConfig(backend="npu")
    if kind == "ag":
        result, calls = with_standin_calls(lambda: run_scaled_all_gather(rank, world_size, *args, config=config))
    else:
        result, calls = with_standin_calls(lambda: run_scaled_row_parallel(rank, world_size, kind, *args,
                                                                           config=config))
    return {**result, "calls": calls}
