"""vllm-ascend's FlashComm v1 collectives (TP path), registered as ``torch.ops.vllm.*``.

maybe_pad_and_reduce(x): FlashComm on: pad the tokens by pad_size, reduce_scatter over TP;
    off: all_reduce.
maybe_all_gather_and_maybe_unpad(x, label): FlashComm on and label: all_gather over TP, drop
    the last pad_size rows; else x. The fake impls follow vllm-ascend 0.23's: shapes from the
    context at trace time, the reduce's rows floored, the gather's not unpadded.
"""

import torch
import torch.nn.functional as F
from vllm.distributed import (
    get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce,
    tensor_model_parallel_reduce_scatter,
)

from vllm_ascend.ascend_forward_context import _EXTRA_CTX


@torch.library.custom_op("vllm::maybe_pad_and_reduce", mutates_args=())
def maybe_pad_and_reduce(x: torch.Tensor, is_ep_comm: bool = False) -> torch.Tensor:
    if not _EXTRA_CTX.flash_comm_v1_enabled:
        return tensor_model_parallel_all_reduce(x)
    if _EXTRA_CTX.pad_size > 0:
        x = F.pad(x, (0, 0, 0, _EXTRA_CTX.pad_size))
    return tensor_model_parallel_reduce_scatter(x, 0)


@maybe_pad_and_reduce.register_fake
def _(x, is_ep_comm=False):
    if not _EXTRA_CTX.flash_comm_v1_enabled:
        return x.new_empty(x.shape)
    # vllm-ascend 0.23's fake floors (its run-time pad rounds up): traced shapes are the floor, as in real graphs
    return x.new_empty((x.shape[0] // get_tensor_model_parallel_world_size(), *x.shape[1:]))


@torch.library.custom_op("vllm::maybe_all_gather_and_maybe_unpad", mutates_args=())
def maybe_all_gather_and_maybe_unpad(x: torch.Tensor, label: bool, is_ep_comm: bool = False) -> torch.Tensor:
    if not (_EXTRA_CTX.flash_comm_v1_enabled and label):
        return x.clone()
    x = tensor_model_parallel_all_gather(x, 0)
    if _EXTRA_CTX.pad_size > 0:
        x = x[: -_EXTRA_CTX.pad_size]
    return x


@maybe_all_gather_and_maybe_unpad.register_fake
def _(x, label, is_ep_comm=False):
    if not (_EXTRA_CTX.flash_comm_v1_enabled and label):
        return x.new_empty(x.shape)
    return x.new_empty((x.shape[0] * get_tensor_model_parallel_world_size(), *x.shape[1:]))
