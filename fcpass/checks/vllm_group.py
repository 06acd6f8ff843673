"""vLLM's TP group in a rank of a check, made as vLLM's worker makes it: the GPU check's part 4 runs vLLM's own
communicator at a site beside fcpass's op (the test suite's CPU ranks build on it, devtools/vllm_cpu/tp.py)."""

from __future__ import annotations

import contextlib
import os
import uuid


def agree_on_dist_ident() -> None:
    """vLLM's CPU shared-memory communicator names its segment from VLLM_DIST_IDENT: a fresh name per group,
    the same on every rank (rank 0's, broadcast), so that no run meets a segment an earlier one left."""
    import torch.distributed as dist

    name = [f"fcpass-{uuid.uuid4().hex[:12]}"]
    dist.broadcast_object_list(name, src=0)
    os.environ["VLLM_DIST_IDENT"] = name[0]


@contextlib.contextmanager
def vllm_tp_group(rank: int, world_size: int, backend: str, vllm_config=None, tensor_parallel_size=None):
    """vLLM's config (``vllm_config``, default VllmConfig()) current, and its distributed environment and
    model-parallel groups (TP of ``tensor_parallel_size``, default the world) in this rank of a torch world
    started from the environment (RANK, MASTER_ADDR..., as ``fcpass.local_ranks.run_ranks`` and torchrun set
    it): yields vLLM's TP GroupCoordinator; the groups are destroyed after."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    with set_current_vllm_config(vllm_config or VllmConfig()):
        parallel_state.init_distributed_environment(world_size=world_size, rank=rank, local_rank=rank,
                                                    backend=backend, distributed_init_method="env://")
        agree_on_dist_ident()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size or world_size)
        try:
            yield parallel_state.get_tp_group()
        finally:
            parallel_state.destroy_model_parallel()
