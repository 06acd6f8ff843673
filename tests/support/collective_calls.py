"""Counting the collective calls a compiled graph makes: torch's profiler, and vLLM's device communicator."""

from __future__ import annotations

import collections
import os

import torch

# Op calls the profiler records that are collectives: vLLM's custom ops (vllm-ascend's included), torch's
# functional ones, c10d's ProcessGroup ops under both, vLLM's CPU shm kernel.
COLLECTIVE_EVENTS = ("vllm::", "_c10d_functional::", "c10d::", "_C::shm_allreduce")
NOT_COLLECTIVES = ("wait_tensor", "vllm::unquantized_gemm", "vllm::quantize")


def profiled():
    """torch's profiler, every op call it records (its Kineto start/stop lines to stderr silenced)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])


def collective_events(prof) -> dict:
    """{op name: calls} of the collectives ``prof`` recorded; read after its block (inside it, the profiler lists
    no event yet, and two empty counts would compare equal)."""
    events = prof.events()
    if not events:
        raise ValueError("the profiler recorded no event: read it after its `with` block")
    return dict(collections.Counter(e.name for e in events if e.name.startswith(COLLECTIVE_EVENTS)
                                    and not any(name in e.name for name in NOT_COLLECTIVES)))


def counting(tp) -> collections.Counter:
    """Counts the calls into vLLM group ``tp``'s device communicator (the implementation vLLM's ops run)."""
    calls = collections.Counter()
    communicator = tp.device_communicator
    for name in ("all_reduce", "reduce_scatter", "all_gather"):
        method = getattr(communicator, name)

        def counted(*args, _method=method, _name=name, **kwargs):
            calls[_name] += 1
            return _method(*args, **kwargs)

        setattr(communicator, name, counted)
    return calls
