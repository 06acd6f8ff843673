"""Map the group name a graph carries to a ProcessGroup.

A matched collective names its group either the vLLM way ("tp:0", a
GroupCoordinator's unique name) or the c10d way (ProcessGroup.group_name,
as torch functional collectives do). Both resolve here, once per name.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from fcpass.vllm import state


def resolve_group(group_name: str) -> dist.ProcessGroup:
    """The ProcessGroup behind ``group_name``, or a ValueError naming it."""
    if not dist.is_initialized():
        raise ValueError(f"group {group_name!r}: torch.distributed is not initialized")
    coordinator = state.coordinator(group_name)
    if coordinator is not None:
        return coordinator.device_group
    try:
        return _resolve_process_group(group_name)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ValueError(
            f"unknown process group {group_name!r}: neither a vLLM group name (like 'tp:0') "
            f"nor a c10d group name"
        ) from exc

