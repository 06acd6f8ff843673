"""The CUDA backend uses torch's symmetric-memory kernels only where the config asks for them.

torch 2.15's ``is_symm_mem_enabled_for_group`` is True for any GPU group, so "the group has symmetric memory"
no longer means anyone enabled it; the kernels also raise when their workspace must grow during CUDA-graph
capture, which vLLM does. Python level: the group's answer is stubbed as torch 2.15 gives it.
"""

import types

import pytest
import torch

import fcpass
from fcpass import ops
from fcpass.backends import cuda
from fcpass.backends.base import MM_REDUCE_SCATTER, FusedCall
from fcpass.matmuls import Matmul


@pytest.fixture
def every_group_enabled(monkeypatch):
    monkeypatch.setattr(cuda, "symm_mem_enabled", lambda group_name: True)


def _call(**fields) -> FusedCall:
    x, w = torch.randn(64, 32), torch.randn(32, 16)
    return FusedCall(x=x, matmuls=(Matmul(w),), group=types.SimpleNamespace(group_name="tp"), group_name="tp",
                     world_size=2, **fields)


@pytest.mark.parametrize("asked", [False, True])
def test_symmetric_memory_only_where_the_config_asks(every_group_enabled, asked):
    config = fcpass.PassConfig(backend="cuda", cuda_symmetric_memory=asked)
    planned = ops.plan("mm_reduce_scatter", MM_REDUCE_SCATTER, _call(), 0, config)
    assert planned.symmetric_memory is asked
    backend = planned.backend
    assert backend._uses_generic(_call(symmetric_memory=planned.symmetric_memory)) is not asked
    # the limits the guard applied are the kernel's when it runs (world size <= 8), the pipeline's otherwise
    assert backend.limits(MM_REDUCE_SCATTER, _call(symmetric_memory=asked)) == (
        backend._limits if asked else backend._generic.limits(MM_REDUCE_SCATTER, None))


def test_the_default_config_never_switches_kernels_on_its_own():
    assert fcpass.PassConfig().cuda_symmetric_memory is False
    with pytest.raises(ValueError, match="cuda_symmetric_memory must be a bool"):
        fcpass.PassConfig(cuda_symmetric_memory="yes")
