"""vLLM's and vllm-ascend's private state, as fcpass reads it: the one module that knows those names.

The runtime (group names -> ProcessGroups, vllm-ascend's padding) and the
rewrite (vLLM's compile range) read it, so it imports no fcpass module and
loads nothing: vLLM's modules are looked up in ``sys.modules`` (a process
that never imported vLLM has none of this state), vllm-ascend's only inside
the function that needs it. A vLLM release that renames any of these fails
here and nowhere else.
"""

from __future__ import annotations

import sys


def groups() -> dict:
    """vLLM's registry of its groups (unique name -> weakref of GroupCoordinator), empty without vLLM's
    parallel state."""
    return getattr(sys.modules.get("vllm.distributed.parallel_state"), "_groups", None) or {}


def coordinator(group_name: str):
    """vLLM's GroupCoordinator of that unique name ("tp:0"), or None."""
    ref = groups().get(group_name)
    return ref() if ref is not None else None


def tp_group() -> tuple[str, int] | None:
    """(unique name, world size) of vLLM's tensor-parallel group in this process, if it has one."""
    tp = getattr(sys.modules.get("vllm.distributed.parallel_state"), "_TP", None)
    return (tp.unique_name, tp.world_size) if tp is not None else None


def tp_device_group():
    """The c10d group of vLLM's tensor-parallel group in this process, or None."""
    tp = getattr(sys.modules.get("vllm.distributed.parallel_state"), "_TP", None)
    return tp.device_group if tp is not None else None


def shm_group_name(handle: int) -> str | None:
    """c10d name of the device group of the vLLM group whose CPU shared-memory communicator owns ``handle``."""
    for ref in groups().values():
        group = ref()
        dist_module = getattr(getattr(group, "device_communicator", None), "dist_module", None)
        if getattr(dist_module, "handle", None) == handle:
            return group.device_group.group_name
    return None


def compile_range_start() -> int | None:
    """The smallest token count of the graph vLLM's backend is compiling now, or None outside vLLM's backend."""
    module = sys.modules.get("vllm.compilation.passes.inductor_pass")
    try:
        return module.get_pass_context().compile_range.start if module is not None else None
    except (AssertionError, AttributeError):  # no pass context: compiled outside vLLM's backend
        return None


def ascend_device_type() -> str | None:
    """The Ascend chip vllm-ascend was built for ("A2", "A3", "_310P", "A5"), or None where it is not loaded.
    Its ``get_ascend_device_type``: ``vllm_ascend.utils`` (0.23), ``vllm_ascend.device.device_config`` (0.30)."""
    for name in ("vllm_ascend.device.device_config", "vllm_ascend.utils"):
        lookup = getattr(sys.modules.get(name), "get_ascend_device_type", None)
        if lookup is not None:
            return lookup().name
    return None


def ascend_flash_comm() -> tuple[bool, int] | None:
    """vllm-ascend's FlashComm v1 in this forward: (on, pad_size), as its collectives read them; None where
    vllm-ascend is not loaded (the traced form, the FlashComm one, then holds).

    vllm-ascend decides per forward, from rank-equal facts (the token count, and under DP the largest count
    across DP ranks, which sets ``pad_size``); outside its forward context its collectives all-reduce and do
    not gather, as FlashComm off."""
    context = sys.modules.get("vllm_ascend.ascend_forward_context")  # loaded wherever its collectives run
    if context is None:
        return None
    try:
        extra = context._EXTRA_CTX
        return bool(extra.flash_comm_v1_enabled), int(extra.pad_size or 0)
    except AssertionError:  # outside vLLM's forward context
        return False, 0


def ascend_pad_size() -> int:
    """The rows vllm-ascend pads the tokens with in this forward (0 where it is not loaded)."""
    flash_comm = ascend_flash_comm()
    return 0 if flash_comm is None else flash_comm[1]
