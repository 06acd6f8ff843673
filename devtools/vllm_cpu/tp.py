"""vLLM's config and TP group inside a gloo rank on CPU, with the fixes vLLM needs there (VLLM_CPU.md 1, 2)."""

from __future__ import annotations

import contextlib
from unittest import mock

from fcpass.checks.vllm_group import vllm_tp_group


def rank_setup():
    """run_ranks ``setup``: vLLM custom-op collectives on, before distributed init (VLLM_CPU.md step 1)."""
    _custom_op_collectives_on()


def _custom_op_collectives_on():
    from vllm.platforms import current_platform

    cls = type(current_platform)
    if not getattr(cls, "_fcpass_custom_op_collectives", False):
        cls.use_custom_op_collectives = classmethod(lambda cls: True)
        cls._fcpass_custom_op_collectives = True


@contextlib.contextmanager
def _all_reduce_clone_fix():
    """VLLM_CPU.md step 2: vLLM's CPU out-of-place all_reduce reduces its input in place; reduce a clone."""
    from vllm.distributed import parallel_state

    coordinator = parallel_state.GroupCoordinator
    out_of_place = coordinator._all_reduce_out_place
    if getattr(out_of_place, "_fcpass_clone_fix", False):  # already applied by an outer caller
        yield
        return

    def all_reduce_out_place(self, input_):
        return out_of_place(self, input_.clone())

    all_reduce_out_place._fcpass_clone_fix = True
    with mock.patch.object(coordinator, "_all_reduce_out_place", all_reduce_out_place):
        yield


def _parallel_config(rank: int, world_size: int, data_parallel_size: int | None):
    """vLLM's ParallelConfig for DP x TP ranks in one torch world (its external launcher reads RANK and
    WORLD_SIZE); None (vLLM's default config) where no size is given."""
    if data_parallel_size is None:
        return None
    import os

    from vllm.config import ParallelConfig

    if world_size % data_parallel_size:
        raise ValueError(f"data_parallel_size {data_parallel_size} does not divide world_size {world_size}")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    return ParallelConfig(tensor_parallel_size=world_size // data_parallel_size, data_parallel_size=data_parallel_size,
                          distributed_executor_backend="external_launcher")


@contextlib.contextmanager
def vllm_tp(rank, world_size, compilation_config=None, additional_config=None, model_config=None, backend="gloo",
            data_parallel_size=None, **config_fields):
    """vLLM's config and TP=world_size group in this rank (VLLM_CPU.md steps 1, 2): yields (vllm_config, tp_group).

    ``data_parallel_size`` given: DP x TP = world_size, all DP ranks in one torch world as vLLM's external
    launcher runs them (vllm-ascend's fine-grained TP groups are made across DP ranks); the VllmConfig's
    ParallelConfig then carries the TP and DP sizes (vllm-ascend's config reads them: 1 for TP only).

    Call inside a rank of ``run_ranks(..., setup=rank_setup)``. ``compilation_config``
    (a dict or vLLM CompilationConfig, e.g. from ``fcpass.vllm.compilation_config``)
    ``additional_config`` (a platform's settings, e.g. vllm-ascend's) and ``model_config``
    (vLLM's ModelConfig, for code that reads the model's architecture) go into the
    VllmConfig as a user's would, as do ``config_fields`` (any other VllmConfig field, e.g.
    ``kv_transfer_config``). ``backend``: "nccl" for vLLM's TP group on GPUs (its CUDA
    communicator).
    """
    from vllm.config import VllmConfig

    _custom_op_collectives_on()
    fields = {"compilation_config": compilation_config, "additional_config": additional_config,
              "model_config": model_config, "parallel_config": _parallel_config(rank, world_size, data_parallel_size),
              **config_fields}
    vllm_config = VllmConfig(**{name: value for name, value in fields.items() if value is not None})
    tp_size = world_size // (data_parallel_size or 1)
    with _all_reduce_clone_fix(), vllm_tp_group(rank, world_size, backend, vllm_config, tp_size) as tp_group:
        if not tp_group.use_custom_op_call:
            raise RuntimeError("vLLM TP group does not use custom-op collectives: pass setup=rank_setup to "
                               "run_ranks (VLLM_CPU.md step 1)")
        yield vllm_config, tp_group
