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


def ascend_flash_comm_enabled() -> bool:
    """Whether vllm-ascend runs its FlashComm v1 collectives as reduce_scatter / all_gather in this forward
    (it decides per forward from the token count; off: all_reduce / no gather). True outside vllm-ascend's
    forward context (the traced form is the FlashComm one)."""
    context = sys.modules.get("vllm_ascend.ascend_forward_context")  # loaded wherever its collectives run
    try:
        return bool(context._EXTRA_CTX.flash_comm_v1_enabled)
    except (AttributeError, AssertionError):  # no vllm-ascend, or outside its forward context
        return True


def ascend_pad_size() -> int:
    """vllm-ascend's current FlashComm ``pad_size``: its extra-context proxy (newer), else vLLM's forward
    context."""
    try:
        from vllm_ascend.ascend_forward_context import _EXTRA_CTX

        return int(_EXTRA_CTX.pad_size or 0)
    except (ImportError, AttributeError):
        from vllm.forward_context import get_forward_context

        return int(getattr(get_forward_context(), "pad_size", 0) or 0)
