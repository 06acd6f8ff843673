"""The CUDA backend uses torch's symmetric-memory kernels only where the config asks for them.

torch 2.15's ``is_symm_mem_enabled_for_group`` is True for any GPU group, so "the group has symmetric memory"
no longer means anyone enabled it; the kernels also raise when their workspace must grow during CUDA-graph
capture, which vLLM does. Python level: the group's answer is stubbed as torch 2.15 gives it.
"""

import types

import pytest
import torch

import fcpass
from fcpass import dispatch
from fcpass.backends import cuda
from fcpass.backends.base import ALL_GATHER_MM, MM_REDUCE_SCATTER, FusedCall
from fcpass.matmuls import Matmul


class Workspace:
    """torch's ``get_symm_mem_workspace`` as it behaves on a GPU group: grows on request, raises where it would
    have to grow during CUDA-graph capture (``capturing``: what ``cuda.capturing`` answers)."""

    def __init__(self):
        self.size, self.capturing, self.requests = 0, False, []

    def __call__(self, group_name, min_size):
        self.requests.append((group_name, min_size))
        if min_size > self.size:
            if self.capturing:
                raise RuntimeError("get_symm_mem_workspace(): the requested size is greater than the size of the "
                                   "currently allocated workspace ... during graph capture")
            self.size = min_size


@pytest.fixture
def every_group_enabled(monkeypatch):
    """Symmetric memory on every group, as torch 2.15 answers for GPU groups; its workspace as on a GPU."""
    import torch.distributed._symmetric_memory as symmetric_memory

    workspace = Workspace()
    monkeypatch.setattr(cuda, "symm_mem_enabled", lambda group_name: True)
    monkeypatch.setattr(symmetric_memory, "get_symm_mem_workspace", workspace)
    monkeypatch.setattr(cuda, "capturing", lambda: workspace.capturing)
    return workspace


def _call(**fields) -> FusedCall:
    x, w = torch.randn(64, 32), torch.randn(32, 16)
    return FusedCall(x=x, matmuls=(Matmul(w),), group=types.SimpleNamespace(group_name="tp"), group_name="tp",
                     world_size=2, **fields)


@pytest.mark.parametrize("asked", [False, True])
def test_symmetric_memory_only_where_the_config_asks(every_group_enabled, asked):
    config = fcpass.PassConfig(backend="cuda", cuda_symmetric_memory=asked)
    planned = dispatch.plan("mm_reduce_scatter", MM_REDUCE_SCATTER, _call(), 0, config)
    assert planned.options is asked
    backend = planned.backend
    assert backend._uses_generic(_call(options=planned.options)) is not asked
    # the limits the guard applied are the kernel's when it runs (world size <= 8), the pipeline's otherwise
    assert backend.limits(MM_REDUCE_SCATTER, _call(options=asked)) == (
        backend._limits if asked else backend._generic.limits(MM_REDUCE_SCATTER, None))


def test_the_default_config_never_switches_kernels_on_its_own():
    assert fcpass.PassConfig().cuda_symmetric_memory is False
    with pytest.raises(ValueError, match="cuda_symmetric_memory must be a bool"):
        fcpass.PassConfig(cuda_symmetric_memory="yes")


def _rows(rows, family=MM_REDUCE_SCATTER):
    return dispatch.plan(family, family, _call()._replace(x=torch.randn(rows, 32)), 0,
                    fcpass.PassConfig(backend="cuda", cuda_symmetric_memory=True))


def test_the_workspace_is_sized_when_a_call_is_planned_and_a_capture_never_grows_it(every_group_enabled):
    workspace = every_group_enabled
    planned = _rows(64)  # reduce_scatter: two output shards of 32 rows x 16 fp32 columns
    assert planned.options and workspace.requests == [("tp", 2 * 32 * 16 * 4)]
    gathered = _rows(64, ALL_GATHER_MM)  # all_gather: 64 x 2 rows of 32 fp32 columns
    assert gathered.options and workspace.requests[-1] == ("tp", 64 * 2 * 32 * 4)
    workspace.capturing = True  # as vLLM captures: sizes it ran eagerly before fit, a larger one would not
    assert _rows(32).options
    larger = _rows(4096)
    assert larger.decision.fused and not larger.options  # the pipeline instead of an error
    assert larger.backend._uses_generic(_call(options=larger.options))


def test_a_failed_reservation_outside_capture_is_an_error_not_another_protocol(every_group_enabled, monkeypatch):
    import torch.distributed._symmetric_memory as symmetric_memory

    def out_of_memory(group_name, min_size):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(symmetric_memory, "get_symm_mem_workspace", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        _rows(64)
