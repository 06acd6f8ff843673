"""Ascend: torch_npu's fused MatmulReduceScatter / AllGatherMatmul / MatmulAllReduce kernels.

torch_npu is imported on first use, never at module import (it fails to
import without CANN). The kernels take no bias (the docs: "bias must be
None/zero"), so a row-parallel bias is folded into the matmul (see
fcpass.matmuls.fold_bias) and a column-parallel bias is added after the
gathered matmul, which is exact because every rank holds its own shard.
``npu_mm_all_reduce_base`` takes a bias (added on each rank before the sum:
vLLM's rank-0-only bias, as vllm-ascend's MatmulAllreduceRowParallelOp
passes it) and W8A8 dequant scales in the dtype combinations its docs list.
"""

from __future__ import annotations

import importlib

import torch
import torch.distributed as dist

from fcpass.backends.base import MM_ALL_REDUCE, Backend, FusedCall
from fcpass.guard import KernelLimits
from fcpass.matmuls import MAX_FOLD_COLUMNS, SumOfProducts, fold_bias
from fcpass.vllm import state as vllm_state

# Documented limits of npu_mm_reduce_scatter_base / npu_all_gather_base_mm
# (Atlas A2: 2, 4 or 8 ranks; k in [256, 65535)). The k limit keeps room for
# the bias fold columns on every rank, so a rank holding a bias never sees a
# different decision than the ranks without one.
NPU_WORLD_SIZES = frozenset({2, 4, 8})
NPU_K_MIN = 256
NPU_K_MAX_EXCLUSIVE = 65535 - MAX_FOLD_COLUMNS
NPU_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.int8})
# vllm-ascend fuses above 1000 tokens.
NPU_DEFAULT_THRESHOLD = 1000
# npu_mm_all_reduce_base: 1, 2, 4 or 8 ranks (HCCS full mesh), any m >= 1, k <= 65535 when quantized; its
# W8A8 output is float16 or bfloat16.
NPU_ALL_REDUCE_WORLD_SIZES = frozenset({1, 2, 4, 8})
NPU_ALL_REDUCE_QUANT_K_MAX_EXCLUSIVE = 65536
NPU_ALL_REDUCE_OUT_DTYPES = frozenset({torch.float16, torch.bfloat16})
# A sum of products (Falcon) would need its weights concatenated, a copy of both kept beside them.
SUM_ONE_MATMUL_KERNEL = "torch_npu's kernel multiplies one x by one weight, not a sum of products"
# "aiv" is the mode that supports both the plain and the quantized kernels.
COMM_MODE = "aiv"


class NpuBackend(Backend):
    name = "npu"
    default_threshold_tokens = NPU_DEFAULT_THRESHOLD
    _limits = KernelLimits(
        allowed_world_sizes=NPU_WORLD_SIZES,
        k_min=NPU_K_MIN,
        k_max_exclusive=NPU_K_MAX_EXCLUSIVE,
        dtypes=NPU_DTYPES,
    )

    def __init__(self) -> None:
        self._comm_names: dict[str, str] = {}

    _all_reduce_limits = KernelLimits(allowed_world_sizes=NPU_ALL_REDUCE_WORLD_SIZES, dtypes=NPU_DTYPES,
                                      shards_rows=False)
    _quant_all_reduce_limits = KernelLimits(allowed_world_sizes=NPU_ALL_REDUCE_WORLD_SIZES, dtypes=NPU_DTYPES,
                                            k_max_exclusive=NPU_ALL_REDUCE_QUANT_K_MAX_EXCLUSIVE, shards_rows=False)

    def limits(self, family, call):
        if family == MM_ALL_REDUCE:
            return self._quant_all_reduce_limits if call.matmuls[0].scaled else self._all_reduce_limits
        return self._limits

    def unsupported(self, family, call):
        (mm, *_) = call.matmuls
        if isinstance(mm, SumOfProducts):
            return SUM_ONE_MATMUL_KERNEL
        if family == MM_ALL_REDUCE and mm.scaled and mm.out_dtype not in NPU_ALL_REDUCE_OUT_DTYPES:
            return f"npu_mm_all_reduce_base's W8A8 output is float16 or bfloat16, not {mm.out_dtype}"
        return _another_communicator_on_a2(call.group)

    def mm_all_reduce(self, call: FusedCall) -> torch.Tensor:
        (mm,) = call.matmuls
        return _torch_npu().npu_mm_all_reduce_base(
            call.x, mm.w, self.comm_name(call), reduce_op="sum", bias=mm.bias, comm_turn=0,
            **_all_reduce_quant_kwargs(mm, call.row_scale),
        )

    def mm_reduce_scatter(self, call: FusedCall) -> torch.Tensor:
        torch_npu = _torch_npu()
        (mm,) = call.matmuls
        x, w = call.x, mm.w
        if mm.bias is not None:
            x, w = fold_bias(x, w, mm.bias)
        return torch_npu.npu_mm_reduce_scatter_base(
            x, w, self.comm_name(call), call.world_size,
            reduce_op="sum", comm_turn=0, comm_mode=COMM_MODE,
            **_quant_kwargs(mm, call.row_scale),
        )

    def all_gather_mm(self, call: FusedCall) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch_npu = _torch_npu()
        first, *rest = call.matmuls
        out, gathered = torch_npu.npu_all_gather_base_mm(
            call.x, first.w, self.comm_name(call), call.world_size,
            gather_index=0, gather_output=True, comm_turn=0, comm_mode=COMM_MODE,
            **_quant_kwargs(first, None),
        )
        if first.bias is not None:
            out = out + first.bias if not first.scaled else _add_int_bias_after(out, first)
        # The kernel takes one weight; the other consumers of the same gather
        # reuse its gathered output.
        return gathered, [out] + [mm(gathered) for mm in rest]

    def comm_name(self, call: FusedCall) -> str:
        """HCCL communicator name, looked up once per group.

        The lookup is a host call into HCCL, so it must not happen while an
        ACL graph is being captured; vLLM's eager warm-up run fills the cache
        before capture.
        """
        name = self._comm_names.get(call.group_name)
        if name is None:
            torch_npu = _torch_npu()
            capturing = getattr(getattr(torch_npu, "npu", None), "is_current_stream_capturing", None)
            if capturing is not None and capturing():
                raise RuntimeError(
                    f"fcpass: HCCL communicator name of group {call.group_name!r} first needed during "
                    "graph capture; run one eager step before capturing"
                )
            # torch_npu documents getHcclCommName's rankid as this process's global rank (not its group rank).
            name = call.group._get_backend(torch.device("npu")).get_hccl_comm_name(dist.get_rank())
            self._comm_names[call.group_name] = name
        return name


def _torch_npu():
    return importlib.import_module("torch_npu")


def _quant_kwargs(mm, row_scale) -> dict:
    """The kernel's W8A8 arguments: per-channel x2_scale (1, n), per-token x1_scale (m, 1)."""
    if not mm.scaled:
        return {}
    kwargs = {"x2_scale": mm.channel_scale().reshape(1, -1), "output_dtype": mm.out_dtype}
    if row_scale is not None:
        kwargs["x1_scale"] = row_scale.to(torch.float32).reshape(-1, 1)
    return kwargs


def _all_reduce_quant_kwargs(mm, row_scale) -> dict:
    """npu_mm_all_reduce_base's W8A8 scales, in the combinations its docs list: a float32 dequant scale with a
    per-token scale (m,) (float16 out); packed into int64 by npu_trans_quant_param without one (float16 out);
    in bfloat16 for a bfloat16 output (the kernel's only form for it: the scale rounds to bfloat16)."""
    if not mm.scaled:
        return {}
    scale = mm.channel_scale()
    kwargs = {}
    if row_scale is not None:
        kwargs["pertoken_scale"] = row_scale.to(torch.float32).reshape(-1)
    if mm.out_dtype == torch.bfloat16:
        kwargs["dequant_scale"] = scale.to(torch.bfloat16)
    elif row_scale is not None:
        kwargs["dequant_scale"] = scale
    else:
        kwargs["dequant_scale"] = _torch_npu().npu_trans_quant_param(scale)
    return kwargs


def _add_int_bias_after(out, mm):
    """Column-parallel int32 quant bias: add its dequantized value (exact up to rounding)."""
    return (out.to(torch.float32) + mm.bias.to(torch.float32) * mm.channel_scale().reshape(1, -1)).to(out.dtype)


def _another_communicator_on_a2(group) -> str | None:
    """On Atlas A2 every fused compute-communication kernel of one model must use the same communicator
    (torch_npu's docs of all three): fcpass fuses on vLLM's TP group only, whose communicator vllm-ascend's own
    fused row-parallel linear (``matmul_and_reduce``) uses too. Rank-equal: a group is, or is not, the TP
    group of every one of its ranks. Without vLLM's parallel state (the ops called on their own) there is no
    model to share the communicator with."""
    tp_group = vllm_state.tp_device_group()
    if vllm_state.ascend_device_type() != "A2" or tp_group is None or group is tp_group:
        return None
    return ("Atlas A2 fuses on one communicator per model, vLLM's TP group's "
            f"({tp_group.group_name!r}); this group ({group.group_name!r}) is another")
