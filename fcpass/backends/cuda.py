"""CUDA: torch's symmetric-memory fused ops, else the generic pipeline.

``torch.ops.symm_mem.fused_matmul_reduce_scatter`` /
``fused_all_gather_matmul`` (and their fp8 ``scaled`` forms) need symmetric
memory enabled for the group; whether it is, is a property of the group and
so the same on every rank. They run only where the config asks for them too
(``PassConfig.cuda_symmetric_memory``): torch 2.15 reports every GPU group as
enabled. Otherwise the generic pipeline runs on NCCL.
Their symmetric-memory workspace (one per group) is sized when a call is
planned, which vLLM does eagerly for every size before it captures CUDA
graphs: torch cannot grow it during capture and raises there. A call first
planned during capture whose workspace is too small takes the pipeline.
torch's symmetric memory has no fused matmul + all_reduce, so mm_all_reduce
always runs the generic pipeline (row chunks, each chunk's NCCL all_reduce
on its stream while the next chunk multiplies).
"""

from __future__ import annotations

import functools

import torch

from fcpass.backends.base import ALL_GATHER_MM, MM_ALL_REDUCE, Backend, FusedCall
from fcpass.backends.generic import GenericBackend
from fcpass.guard import KernelLimits
from fcpass.matmuls import FLOAT_DTYPES, FP8_DTYPES, SumOfProducts, fold_bias

CUDA_DTYPES = FLOAT_DTYPES | FP8_DTYPES
# NVLink domain of one node; beyond it symmetric memory is not available.
CUDA_MAX_WORLD_SIZE = 8
CUDA_DEFAULT_THRESHOLD = 1024
# vLLM's custom all-reduce (one-shot / two-shot over NVLink IPC buffers, capturable in CUDA graphs) takes every
# all_reduce up to this size (its ``max_size``, vllm/distributed/device_communicators/custom_all_reduce.py; on
# some GPUs less) and beats NCCL there (vllm#2192: Llama-70B TP4 A100 16.4 s -> 14.6 s); above it vLLM
# all-reduces with NCCL itself (pynccl). So matmul -> all_reduce takes fcpass's pipeline on NCCL only where
# vLLM's own transport is NCCL too: from the token count whose product exceeds this size.
VLLM_CUSTOM_ALL_REDUCE_MAX_BYTES = 8192 * 1024


def symm_mem_enabled(group_name: str) -> bool:
    try:
        from torch.distributed._symmetric_memory import is_symm_mem_enabled_for_group
    except ImportError:
        return False
    return is_symm_mem_enabled_for_group(group_name)


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def symm_mem_workspace_bytes(family: str, call: FusedCall) -> int:
    """The most workspace torch's fused kernels ask for this call: the all_gather's whole gathered input (its
    multimem path), two of the reduce_scatter's output shards (its pipelined path)."""
    rows, k = call.x.shape
    if family == ALL_GATHER_MM:
        return rows * call.world_size * k * call.x.element_size()
    (mm,) = call.matmuls
    shard_rows = -(-rows // call.world_size)
    return 2 * shard_rows * mm.n * torch.empty((), dtype=mm.result_dtype).element_size()


class CudaBackend(Backend):
    name = "cuda"
    default_threshold_tokens = CUDA_DEFAULT_THRESHOLD
    _limits = KernelLimits(max_world_size=CUDA_MAX_WORLD_SIZE, dtypes=CUDA_DTYPES)

    def __init__(self) -> None:
        self._generic = GenericBackend()

    def default_threshold(self, family: str, facts) -> int:
        """1024 tokens; matmul -> all_reduce: also past vLLM's custom all-reduce (rank-equal: n and the dtype)."""
        if family != MM_ALL_REDUCE:
            return self.default_threshold_tokens
        bytes_per_token = facts.n * max(2, facts.dtype.itemsize)  # int8 / fp8 inputs: a 16-bit product
        return max(self.default_threshold_tokens, VLLM_CUSTOM_ALL_REDUCE_MAX_BYTES // bytes_per_token)

    def limits(self, family, call):
        if family == MM_ALL_REDUCE or self._uses_generic(call):
            return self._generic.limits(family, call)
        return self._limits

    def mm_all_reduce(self, call: FusedCall) -> torch.Tensor:
        return self._generic.mm_all_reduce(call)

    def options(self, config) -> bool:
        """Whether the config lets this backend use symmetric memory (``PassConfig.cuda_symmetric_memory``)."""
        return config.cuda_symmetric_memory

    def reserve(self, family, call) -> bool:
        """The group's symmetric-memory workspace, at least what the kernel of this call asks torch for; False
        (the NCCL pipeline) where it would have to grow during CUDA-graph capture."""
        if family == MM_ALL_REDUCE or self._uses_generic(call):
            return call.options
        from torch.distributed._symmetric_memory import get_symm_mem_workspace

        reserve = functools.partial(get_symm_mem_workspace, call.group.group_name,
                                    min_size=symm_mem_workspace_bytes(family, call))
        if not capturing():
            reserve()  # any failure here is an error, never a quiet switch of protocol on one rank
            return True
        try:
            reserve()
        except RuntimeError:  # it would have to grow during capture, which torch refuses (the same on every rank)
            return False
        return True

    def _uses_generic(self, call: FusedCall) -> bool:
        """Symmetric memory not asked for by the config, or not on the group, or W8A8 (no int8 kernel), or a sum of
        products (torch's kernels multiply one A by one B)."""
        return not call.options or not symm_mem_enabled(call.group.group_name) or any(
            isinstance(mm, SumOfProducts) or (mm.scaled and mm.w.dtype == torch.int8) for mm in call.matmuls
        )

    def mm_reduce_scatter(self, call: FusedCall) -> torch.Tensor:
        if self._uses_generic(call):
            return self._generic.mm_reduce_scatter(call)
        (mm,) = call.matmuls
        c10d_name = call.group.group_name
        if mm.scaled:
            x_scale = call.row_scale if call.row_scale is not None else mm.x_scale
            return torch.ops.symm_mem.fused_scaled_matmul_reduce_scatter(
                call.x, mm.w, x_scale, mm.w_scale, "sum", 0, 0, c10d_name, None,
                bias=mm.bias, out_dtype=mm.out_dtype,
            )
        x, w = (call.x, mm.w) if mm.bias is None else fold_bias(call.x, mm.w, mm.bias)
        return torch.ops.symm_mem.fused_matmul_reduce_scatter(x, w, "sum", 0, c10d_name)

    def all_gather_mm(self, call: FusedCall) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self._uses_generic(call):
            return self._generic.all_gather_mm(call)
        c10d_name = call.group.group_name
        mms = call.matmuls
        if mms[0].scaled:
            gathered, outs = torch.ops.symm_mem.fused_all_gather_scaled_matmul(
                call.x, [mm.w for mm in mms], mms[0].x_scale, [mm.w_scale for mm in mms], 0, c10d_name,
                [mm.bias for mm in mms], [None] * len(mms), [mm.out_dtype for mm in mms], [False] * len(mms),
            )
            return gathered, list(outs)
        gathered, outs = torch.ops.symm_mem.fused_all_gather_matmul(
            call.x, [mm.w for mm in mms], 0, c10d_name, return_A=True
        )
        # Column-parallel biases are every rank's own shard: adding after is exact.
        return gathered, [out if mm.bias is None else out + mm.bias for mm, out in zip(mms, outs)]
