"""Test stand-in for torch_npu (tests only; fcpass never ships it).

It defines only names torch-npu 2.10.0.post4 has (the pin of vllm-ascend 0.23 and 0.30), with their
signatures: the fused communication kernels fcpass calls, the W8A8 linear ops vllm-ascend emits, the dtypes
vllm-ascend reads, and ``torch_npu.npu`` (registered as ``torch.npu``, as torch_npu does).
tests/runtime/test_npu_standin_schemas.py compares every name and signature with the wheel's source. Their
emulation on CPU tensors and gloo groups, and what tests read of it, is tests/standins/npu_kernels.py.
"""

import torch

from standins.npu_kernels import (npu_all_gather_base_mm, npu_mm_all_reduce_base, npu_mm_reduce_scatter_base,
                                  npu_trans_quant_param)
from torch_npu import npu

# torch_npu registers its device module as ``torch.npu``: vllm-ascend reads streams and events there
if not hasattr(torch, "npu"):
    torch.npu = npu
# torch_npu gives tensors ``.npu()`` (torch.utils.generate_methods_for_privateuse1_backend); vllm-ascend's
# FlashComm2 op moves its index tensor with it. No NPU here: the tensor stays where it is.
if not hasattr(torch.Tensor, "npu"):
    torch.Tensor.npu = lambda self, *args, **kwargs: self
# torch_npu's ops are attributes of the module too: vllm-ascend calls ``torch_npu.npu_quantize(...)``
npu_quantize, npu_quant_matmul = torch.ops.npu.npu_quantize, torch.ops.npu.npu_quant_matmul
# torch_npu's own dtypes (torch_npu._C._cd.DType, exported as module attributes): the numbers its torchair
# converter maps to GE types (torch_dtype_value_to_ge_type); vllm-ascend 0.30 reads them at import
hifloat8, float8_e8m0fnu, float4_e2m1fn_x2, float4_e1m2fn_x2 = 290, 293, 296, 297

__all__ = ["npu", "npu_all_gather_base_mm", "npu_mm_all_reduce_base", "npu_mm_reduce_scatter_base",
           "npu_quant_matmul", "npu_quantize", "npu_trans_quant_param", "hifloat8", "float8_e8m0fnu",
           "float4_e2m1fn_x2", "float4_e1m2fn_x2"]
