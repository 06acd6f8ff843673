"""The torch_npu stand-in's emulation (tests only; fcpass never ships it): torch_npu's three fused
communication kernels, its W8A8 linear ops and its HCCL comm-name lookup, on CPU tensors and gloo groups. The
``torch_npu`` package of tests/standins/npu exports from here only the names the real one has; what tests read
of the emulation (its calls, its error, ``install()``) is here.

It has the documented signatures of ``npu_mm_reduce_scatter_base``,
``npu_all_gather_base_mm`` and ``npu_mm_all_reduce_base`` (torch-npu
2.10.0.post4's op yaml and ``_op_plugin_docs.py``, CANN 8.x), raises on
every documented constraint a real kernel would reject, and computes the
documented result over the gloo group behind the communicator name.
``install()`` makes "npu" a device type and gives gloo backends the HCCL
``get_hccl_comm_name`` lookup.

Documented constraints enforced here:
- x1 (m, k), x2 (k, n), both 2-D, same dtype in {float16, bfloat16, int8};
- k in [256, 65535); for reduce_scatter m divisible by world_size;
- world_size in {2, 4, 8} (Atlas A2);
- reduce_op "sum"; comm_turn 0; gather_index 0;
- bias must be None (the kernels do not support a bias);
- quantized (int8): x2_scale float32 (1, n), x1_scale float32 (m, 1) or None,
  output_dtype bfloat16/float16, comm_mode "aiv";
- hcom must be a name handed out by get_hccl_comm_name.

npu_mm_all_reduce_base (its own table in the docs):
- x1 (m, k) with m >= 1 (no empty tensors), x2 (k, n); communicator of 1, 2,
  4 or 8 ranks; reduce_op "sum"; comm_turn 0;
- float: x1, x2 float16 or bfloat16 alike; bias (n,) of their dtype;
- W8A8: x1, x2 int8, k <= 65535, bias int32 (n,), dequant_scale (n,) or
  (1, n) of: int64 (``npu_trans_quant_param``'s packing of a float32 scale;
  float16 out), bfloat16 (bfloat16 out), float32 only with a float32
  ``pertoken_scale`` (m,) (float16 out);
- antiquant (weight-only quant), x3 and communication quant: not emulated
  (must be None).
The bias is added on each rank before the sum, as vllm-ascend's
MatmulAllreduceRowParallelOp relies on (it passes the bias on rank 0 only).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

WORLD_SIZES = (2, 4, 8)
K_MIN, K_MAX_EXCLUSIVE = 256, 65535
DTYPES = (torch.float16, torch.bfloat16, torch.int8)
OUT_DTYPES = (torch.bfloat16, torch.float16)

# Every accepted call, for tests to inspect: (kernel, dict of facts).
calls: list[tuple[str, dict]] = []
_groups_by_comm_name: dict[str, dist.ProcessGroup] = {}

class KernelArgumentError(RuntimeError):
    """What the real kernel's TORCH_CHECKs raise."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise KernelArgumentError(message)


def _check_common(kernel, x1, x2, hcom, world_size, bias, comm_turn, x1_scale, x2_scale, output_dtype, comm_mode):
    _check(x1.dim() == 2 and x2.dim() == 2, f"{kernel}: inputs must be 2-D")
    _check(x1.dtype == x2.dtype, f"{kernel}: x1 {x1.dtype} and x2 {x2.dtype} must match")
    _check(x1.dtype in DTYPES, f"{kernel}: dtype {x1.dtype} not supported")
    _check(x1.shape[1] == x2.shape[0], f"{kernel}: k mismatch {x1.shape[1]} vs {x2.shape[0]}")
    _check(K_MIN <= x1.shape[1] < K_MAX_EXCLUSIVE, f"{kernel}: k={x1.shape[1]} outside [{K_MIN}, {K_MAX_EXCLUSIVE})")
    _check(world_size in WORLD_SIZES, f"{kernel}: world_size {world_size} not in {WORLD_SIZES}")
    _check(bias is None, f"{kernel}: bias is not supported")
    _check(comm_turn == 0, f"{kernel}: comm_turn must be 0")
    _check(hcom in _groups_by_comm_name, f"{kernel}: unknown hcom {hcom!r}")
    group = _groups_by_comm_name[hcom]
    _check(group.size() == world_size, f"{kernel}: world_size {world_size} != communicator size {group.size()}")
    if x1.dtype == torch.int8:
        _check(comm_mode == "aiv", f"{kernel}: quantized kernel needs comm_mode='aiv'")
        _check(x2_scale is not None and x2_scale.dtype == torch.float32 and tuple(x2_scale.shape) == (1, x2.shape[1]),
               f"{kernel}: x2_scale must be float32 (1, n)")
        _check(x1_scale is None or (x1_scale.dtype == torch.float32 and tuple(x1_scale.shape) == (x1.shape[0], 1)),
               f"{kernel}: x1_scale must be float32 (m, 1)")
        _check(output_dtype in OUT_DTYPES, f"{kernel}: output_dtype {output_dtype} not supported")
    else:
        _check(x1_scale is None and x2_scale is None and output_dtype is None,
               f"{kernel}: scales/output_dtype are for the int8 kernel only")
    _check(comm_mode in (None, "aiv", "ai_cpu"), f"{kernel}: comm_mode {comm_mode!r}")
    return group


def _matmul(x1, x2, x1_scale, x2_scale, output_dtype):
    if x1.dtype != torch.int8:
        return torch.mm(x1.float(), x2.float()).to(x1.dtype)
    acc = torch._int_mm(x1, x2).to(torch.float32) * x2_scale
    if x1_scale is not None:
        acc = acc * x1_scale
    return acc.to(output_dtype)


def npu_mm_reduce_scatter_base(input, x2, hcom, world_size, *, reduce_op="sum", bias=None, x1_scale=None,
                               x2_scale=None, comm_turn=0, output_dtype=None, comm_mode=None):
    kernel = "npu_mm_reduce_scatter_base"
    group = _check_common(kernel, input, x2, hcom, world_size, bias, comm_turn, x1_scale, x2_scale,
                          output_dtype, comm_mode)
    _check(reduce_op == "sum", f"{kernel}: reduce_op must be 'sum'")
    _check(input.shape[0] % world_size == 0, f"{kernel}: m={input.shape[0]} not divisible by {world_size}")
    calls.append((kernel, {"m": input.shape[0], "k": input.shape[1], "dtype": input.dtype,
                           "quant": input.dtype == torch.int8, "x1_scale": x1_scale is not None}))
    product = _matmul(input, x2, x1_scale, x2_scale, output_dtype)
    out = product.new_empty((product.shape[0] // world_size, product.shape[1]))
    dist.reduce_scatter_tensor(out, product, group=group)
    return out


def npu_all_gather_base_mm(input, x2, hcom, world_size, *, bias=None, x1_scale=None, x2_scale=None, gather_index=0,
                           gather_output=True, comm_turn=0, output_dtype=None, comm_mode=None):
    kernel = "npu_all_gather_base_mm"
    group = _check_common(kernel, input, x2, hcom, world_size, bias, comm_turn, x1_scale, x2_scale,
                          output_dtype, comm_mode)
    _check(gather_index == 0, f"{kernel}: gather_index must be 0")
    calls.append((kernel, {"m": input.shape[0], "k": input.shape[1], "dtype": input.dtype,
                           "quant": input.dtype == torch.int8, "x1_scale": x1_scale is not None}))
    gathered = _gather(input, world_size, group)
    gathered_scale = None if x1_scale is None else _gather(x1_scale, world_size, group)
    out = _matmul(gathered, x2, gathered_scale, x2_scale, output_dtype)
    return out, (gathered if gather_output else input.new_empty(0))


AR_WORLD_SIZES = (1, 2, 4, 8)
AR_QUANT_K_MAX = 65535


def npu_trans_quant_param(scale, offset=None, round_mode=0):
    """A float32 dequant scale packed into int64 for the quantized kernels: its bits in the low 32 bits."""
    _check(scale.dtype == torch.float32, f"npu_trans_quant_param: scale must be float32, got {scale.dtype}")
    _check(offset is None, "npu_trans_quant_param: offset is not emulated")
    return scale.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _unpack_quant_param(packed):
    return (packed & 0xFFFFFFFF).to(torch.int32).view(torch.float32)


def npu_mm_all_reduce_base(x1, x2, hcom, *, reduce_op="sum", bias=None, antiquant_scale=None, antiquant_offset=None,
                           x3=None, dequant_scale=None, pertoken_scale=None, comm_quant_scale_1=None,
                           comm_quant_scale_2=None, antiquant_group_size=0, comm_turn=0, group_sizes=None,
                           y_dtype=None, x1_dtype=None, x2_dtype=None, dequant_scale_dtype=None,
                           pertoken_scale_dtype=None, comm_quant_mode=0, comm_mode=None):
    kernel = "npu_mm_all_reduce_base"
    overrides = (group_sizes, y_dtype, x1_dtype, x2_dtype, dequant_scale_dtype, pertoken_scale_dtype, comm_mode)
    _check(all(a is None for a in overrides) and antiquant_group_size == 0 and comm_quant_mode == 0,
           f"{kernel}: group_sizes, the *_dtype overrides, comm_mode and the quant modes are not emulated")
    _check(x1.dim() == 2 and x2.dim() == 2, f"{kernel}: x1 and x2 must be 2-D here")
    _check(x1.numel() > 0 and x2.numel() > 0, f"{kernel}: x1 and x2 must not be empty")
    _check(x1.shape[1] == x2.shape[0], f"{kernel}: k mismatch {x1.shape[1]} vs {x2.shape[0]}")
    _check(reduce_op == "sum", f"{kernel}: reduce_op must be 'sum'")
    _check(comm_turn == 0, f"{kernel}: comm_turn must be 0")
    _check(all(t is None for t in (antiquant_scale, antiquant_offset, x3, comm_quant_scale_1, comm_quant_scale_2)),
           f"{kernel}: antiquant, x3 and communication quant are not emulated")
    n = x2.shape[1]
    if x1.dtype == torch.int8:
        _check(x2.dtype == torch.int8, f"{kernel}: quantized x2 must be int8, got {x2.dtype}")
        _check(x1.shape[1] <= AR_QUANT_K_MAX, f"{kernel}: quantized k={x1.shape[1]} > {AR_QUANT_K_MAX}")
        _check(bias is None or (bias.dtype == torch.int32 and tuple(bias.shape) == (n,)), f"{kernel}: bias int32 (n,)")
        _check(dequant_scale is not None and dequant_scale.numel() == n and dequant_scale.dim() in (1, 2),
               f"{kernel}: dequant_scale (n,) or (1, n) required")
        if dequant_scale.dtype == torch.float32:
            _check(pertoken_scale is not None, f"{kernel}: a float32 dequant_scale needs a pertoken_scale "
                                               "(else pack it with npu_trans_quant_param)")
            scale, out_dtype = dequant_scale, torch.float16
        elif dequant_scale.dtype == torch.int64:
            _check(pertoken_scale is None, f"{kernel}: an int64 dequant_scale takes no pertoken_scale")
            scale, out_dtype = _unpack_quant_param(dequant_scale), torch.float16
        else:
            _check(dequant_scale.dtype == torch.bfloat16, f"{kernel}: dequant_scale {dequant_scale.dtype}")
            scale, out_dtype = dequant_scale.float(), torch.bfloat16
        _check(pertoken_scale is None or (pertoken_scale.dtype == torch.float32
                                          and tuple(pertoken_scale.shape) == (x1.shape[0],)),
               f"{kernel}: pertoken_scale float32 (m,)")
        product = _dequantized_matmul(x1, x2, bias, scale, pertoken_scale, out_dtype)
    else:
        _check(x1.dtype in (torch.float16, torch.bfloat16) and x2.dtype == x1.dtype,
               f"{kernel}: x1 {x1.dtype} and x2 {x2.dtype}: float16 or bfloat16 alike")
        _check(dequant_scale is None and pertoken_scale is None, f"{kernel}: dequant scales are for int8 inputs")
        _check(bias is None or (bias.dtype == x1.dtype and tuple(bias.shape) == (n,)), f"{kernel}: bias {x1.dtype} (n,)")
        product = torch.mm(x1.float(), x2.float())
        if bias is not None:
            product = product + bias.float()
        product = product.to(x1.dtype)
    _check(hcom in _groups_by_comm_name, f"{kernel}: unknown hcom {hcom!r}")
    group = _groups_by_comm_name[hcom]
    _check(group.size() in AR_WORLD_SIZES, f"{kernel}: {group.size()} ranks, not in {AR_WORLD_SIZES}")
    calls.append((kernel, {"m": x1.shape[0], "k": x1.shape[1], "dtype": x1.dtype, "quant": x1.dtype == torch.int8,
                           "bias": bias is not None, "pertoken_scale": pertoken_scale is not None,
                           "dequant_dtype": None if dequant_scale is None else dequant_scale.dtype}))
    dist.all_reduce(product, group=group)
    return product


def _gather(t, world_size, group):
    gathered = t.new_empty((t.shape[0] * world_size, *t.shape[1:]))
    dist.all_gather_into_tensor(gathered, t.contiguous(), group=group)
    return gathered


comm_name_ranks: list[int] = []  # the rankid of every comm-name lookup


def _get_hccl_comm_name(backend, rank):
    """The HCCL backend's comm-name lookup, on a gloo backend registered for "npu". torch_npu's docs: rankid
    is the global rank."""
    _check(rank == dist.get_rank(), f"get_hccl_comm_name: rankid {rank} is not this process's global rank "
                                    f"{dist.get_rank()}")
    comm_name_ranks.append(rank)
    for group in dist.distributed_c10d._world.pg_map:
        try:
            if group._get_backend(torch.device("npu")) is backend:
                name = f"standin_hccl_{group.group_name}"
                _groups_by_comm_name[name] = group
                return name
        except RuntimeError:
            continue
    raise KernelArgumentError("no process group owns this backend")


def install() -> None:
    """Make "npu" a device type whose process-group backend answers HCCL names (``import torch_npu`` finds the
    stand-in package where tests/standins/npu is on sys.path).

    Groups must then be created with backend "cpu:gloo,npu:gloo".
    """
    if torch._C._get_privateuse1_backend_name() != "npu":
        torch.utils.rename_privateuse1_backend("npu")
    dist.ProcessGroupGloo.get_hccl_comm_name = _get_hccl_comm_name


# ---------------------------------------------------------------------------
# The static W8A8 linear as vllm-ascend emits it: npu_quantize, then
# npu_quant_matmul, registered under torch_npu's qualified names
# (torch.ops.npu.*) with the schemas of torch-npu 2.10.0.post4's op yaml, verbatim
# (tests/runtime/test_npu_standin_schemas.py checks them against the wheel's):
# dtypes travel as c10 ScalarType numbers (``int``), as in real traced graphs.
# Emulated:
# - npu_quantize: y = round(x * scales + zero_points) (div_mode False) or
#   round(x / scales + zero_points) (div_mode True), saturated to int8;
#   scales per tensor or per channel along ``axis``; dtype qint8 (12) or int8 (1);
# - npu_quant_matmul: (x1 @ x2 in int32 + bias) * scale [* pertoken_scale],
#   cast to output_dtype (bf16 15 / fp16 5); x1, x2 int8; bias int32 (n,); scale
#   float32 (1,) or (n,) (the int64 form packed by npu_trans_quant_param and
#   bf16 scales are not emulated); pertoken_scale float32 (m,); offset, the
#   *_dtype overrides, group_sizes and y_scale not emulated.

SCALAR_TYPES = {1: torch.int8, 3: torch.int32, 5: torch.float16, 6: torch.float32, 12: torch.qint8,
                15: torch.bfloat16}  # c10::ScalarType numbers torch_npu's int dtype arguments carry
_npu_lib = torch.library.Library("npu", "FRAGMENT")
SCHEMAS = {
    "npu_quantize": "npu_quantize(Tensor self, Tensor scales, Tensor? zero_points, int dtype, int axis=1, "
                    "bool div_mode=True) -> Tensor",
    "npu_quant_matmul": "npu_quant_matmul(Tensor x1, Tensor x2, Tensor scale, *, Tensor? offset=None, "
                        "Tensor? pertoken_scale=None, Tensor? bias=None, int? output_dtype=None, int? x1_dtype=None, "
                        "int? x2_dtype=None, int? pertoken_scale_dtype=None, int? scale_dtype=None, "
                        "int[]? group_sizes=None, Tensor? y_scale=None) -> Tensor",
}


def _npu_quantize(self, scales, zero_points, dtype, axis=1, div_mode=True):
    _check(SCALAR_TYPES.get(dtype) in (torch.qint8, torch.int8), f"npu_quantize: dtype {dtype} not emulated (qint8 only)")
    _check(scales.numel() == 1 or axis in (-1, self.dim() - 1), "npu_quantize: scales per tensor or along axis")
    y = self.float() / scales.float() if div_mode else self.float() * scales.float()
    if zero_points is not None:
        y = y + zero_points.float()
    return torch.round(y).clamp(-128, 127).to(torch.int8)


def _npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                      x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None,
                      y_scale=None):
    kernel = "npu_quant_matmul"
    _check(x1.dtype == torch.int8 and x2.dtype == torch.int8, f"{kernel}: x1 and x2 must be int8")
    _check(x1.dim() == 2 and x2.dim() == 2 and x1.shape[1] == x2.shape[0], f"{kernel}: shapes {x1.shape} @ {x2.shape}")
    n = x2.shape[1]
    _check(scale.dtype == torch.float32 and scale.numel() in (1, n), f"{kernel}: scale must be float32 (1,) or (n,)")
    _check(all(a is None for a in (offset, x1_dtype, x2_dtype, pertoken_scale_dtype, scale_dtype, group_sizes,
                                   y_scale)), f"{kernel}: offset, *_dtype, group_sizes, y_scale are not emulated")
    _check(bias is None or (bias.dtype == torch.int32 and tuple(bias.shape) == (n,)), f"{kernel}: bias int32 (n,)")
    out_dtype = SCALAR_TYPES.get(output_dtype)
    _check(out_dtype in OUT_DTYPES, f"{kernel}: output_dtype {output_dtype} not emulated")
    return _dequantized_matmul(x1, x2, bias, scale, pertoken_scale, out_dtype)


def _dequantized_matmul(x1, x2, bias, scale, pertoken_scale, out_dtype):
    """The quantized kernels' result: (x1 @ x2 in int32 + bias) * scale [* pertoken_scale], in out_dtype."""
    acc = torch._int_mm(x1, x2)  # the stand-in's CPU emulation; NPU has no _int_mm
    if bias is not None:
        acc = acc + bias
    out = acc.float() * scale.float().reshape(1, -1)
    if pertoken_scale is not None:
        out = out * pertoken_scale.reshape(-1, 1)
    return out.to(out_dtype)


def _npu_quant_matmul_fake(x1, x2, scale, *, output_dtype=None, **_):
    return x1.new_empty((x1.shape[0], x2.shape[1]), dtype=SCALAR_TYPES.get(output_dtype, torch.int8))


def _npu_quantize_fake(self, *args, **kwargs):
    return self.new_empty(self.shape, dtype=torch.int8)


def _register_quant_ops() -> None:
    """Each op where no library loaded in this process (a real torch_npu, a replay's captured schema) has it."""
    for name, kernel, fake in (("npu_quantize", _npu_quantize, _npu_quantize_fake),
                               ("npu_quant_matmul", _npu_quant_matmul, _npu_quant_matmul_fake)):
        if hasattr(torch.ops.npu, name):
            continue
        _npu_lib.define(SCHEMAS[name])
        _npu_lib.impl(name, kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(f"npu::{name}", fake, lib=_npu_lib)


_register_quant_ops()
