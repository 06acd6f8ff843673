"""Map the group name a graph carries to a ProcessGroup.

A matched collective names its group either the vLLM way ("tp:0", a
GroupCoordinator's unique name) or the c10d way (ProcessGroup.group_name,
as torch functional collectives do). Both resolve here, once per name.
"""

from __future__ import annotations

import sys

import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group


def resolve_group(group_name: str) -> dist.ProcessGroup:
    """The ProcessGroup behind ``group_name``, or a ValueError naming it."""
    if not dist.is_initialized():
        raise ValueError(f"group {group_name!r}: torch.distributed is not initialized")
    coordinator = _vllm_coordinator(group_name)
    if coordinator is not None:
        return coordinator.device_group
    try:
        return _resolve_process_group(group_name)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ValueError(
            f"unknown process group {group_name!r}: neither a vLLM group name (like 'tp:0') "
            f"nor a c10d group name"
        ) from exc


def vllm_shm_group(handle: int) -> str | None:
    """c10d name of the device group of the vLLM group whose CPU shared-memory communicator owns ``handle``."""
    for ref in _vllm_groups().values():
        coordinator = ref()
        dist_module = getattr(getattr(coordinator, "device_communicator", None), "dist_module", None)
        if getattr(dist_module, "handle", None) == handle:
            return coordinator.device_group.group_name
    return None


def _vllm_coordinator(group_name: str):
    """vLLM's GroupCoordinator of that name, without importing vLLM ourselves."""
    ref = _vllm_groups().get(group_name)
    return ref() if ref is not None else None


def _vllm_groups() -> dict:
    """vLLM's registry of its groups (unique name -> weakref), empty when vLLM's parallel state is not loaded."""
    parallel_state = sys.modules.get("vllm.distributed.parallel_state")
    return getattr(parallel_state, "_groups", {}) if parallel_state is not None else {}


def vllm_tp_group() -> tuple[str, int] | None:
    """(unique name, world size) of vLLM's tensor-parallel group in this process, if it has one."""
    parallel_state = sys.modules.get("vllm.distributed.parallel_state")
    tp = getattr(parallel_state, "_TP", None) if parallel_state is not None else None
    return (tp.unique_name, tp.world_size) if tp is not None else None
