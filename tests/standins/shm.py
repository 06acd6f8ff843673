"""Stand-in for vLLM's CPU shared-memory collectives where vLLM's kernel library lacks them (its AVX2 build).

Registers ``_C::init_shm_manager``, ``_C::join_shm_manager`` and
``_C::shm_allreduce`` with the schemas of vLLM's kernels (read from the
AVX-512 ``_C`` library), so vLLM's own ``CpuCommunicator`` picks its
shared-memory mode (``_CPUSHMDistributed``) and its all_reduce reaches
``torch.ops._C.shm_allreduce(handle, data)``, in place, as on such machines.
The reduction itself is a gloo all_reduce over the whole world: the stand-in
refuses any other group size rather than reduce over the wrong ranks.
Tests only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from support import vllm_kernels

_managers: dict[int, tuple[str, int, int]] = {}  # handle -> (name, group size, rank)
_library = None


def register() -> None:
    """Define the three ops once per process, unless the ``_C`` vLLM loads on this CPU has them.

    vLLM's own choice of kernel library is loaded first (``import_kernels``: the AVX-512 builds define these
    ops, and defining them twice aborts the process); where it has them, the real kernels are used.
    """
    global _library
    if _library is not None or vllm_kernels.all_reduce_form() == "shm":
        return
    _library = torch.library.Library("_C", "FRAGMENT")
    _library.define("init_shm_manager(str name, int group_size, int rank, int thread_num) -> int")
    _library.define("join_shm_manager(int handle, str name) -> str")
    _library.define("shm_allreduce(int handle, Tensor! data) -> ()")
    _library.impl("init_shm_manager", _init_shm_manager, "CompositeExplicitAutograd")
    _library.impl("join_shm_manager", _join_shm_manager, "CompositeExplicitAutograd")
    _library.impl("shm_allreduce", _shm_allreduce, "CPU")
    _library.impl("shm_allreduce", lambda handle, data: None, "Meta")


def real_kernels_loaded() -> bool:
    """After :func:`register`: whether the shm ops are vLLM's own (else this stand-in's)."""
    return _library is None and hasattr(torch.ops._C, "shm_allreduce")


def _init_shm_manager(name: str, group_size: int, rank: int, thread_num: int) -> int:
    if group_size != dist.get_world_size():
        raise NotImplementedError(f"shm stand-in reduces over the whole world ({dist.get_world_size()} ranks), "
                                  f"not a group of {group_size}")
    handle = 1000 + len(_managers)
    _managers[handle] = (name, group_size, rank)
    return handle


def _join_shm_manager(handle: int, name: str) -> str:
    return _managers[handle][0]


def _shm_allreduce(handle: int, data: torch.Tensor) -> None:
    if handle not in _managers:
        raise ValueError(f"shm stand-in: unknown handle {handle}")
    dist.all_reduce(data)
