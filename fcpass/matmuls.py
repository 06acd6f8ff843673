"""The per-rank matmul each fused op wraps, and exact bias folding.

``Matmul`` is the one definition of what "x @ w (+ bias)" means for the plain,
W8A8 and fp8 forms; every backend and both the fused and the unfused path
compute through it (or through a kernel documented to compute the same).
"""

from __future__ import annotations

import collections
import itertools
import weakref
from dataclasses import dataclass

import torch

FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
# c10::ScalarType numbers (c10/core/ScalarType.h): torch_npu's ops take and graphs carry dtypes as these ints.
SCALAR_TYPE_NUMBERS = {torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4,
                       torch.float16: 5, torch.float32: 6, torch.float64: 7, torch.bool: 11, torch.qint8: 12,
                       torch.bfloat16: 15}
FP8_DTYPES = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})
QUANT_OUT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})

# The matmul ops a site may have had (passes/matmuls.py matches them; their names are the report's forms).
# ``y = x @ weight.T + bias`` ops take the weight as stored, (n, k): called with the fused op's (k, n) weight
# transposed back, which is the stored weight's own view.
LINEAR_OPS = {
    "linear": lambda: torch.ops.aten.linear.default,
    "unquantized_gemm": lambda: torch.ops.vllm.unquantized_gemm.default,
    "rocm_unquantized_gemm": lambda: torch.ops.vllm.rocm_unquantized_gemm.default,
}
# A sum of products' term ``addmm(sum so far, x, w)`` (Inductor folds ``mm + t`` into one addmm): the unfused
# path accumulates with addmm as the graph did; on its own it is x @ w.
SUM_ADDMM = "sum_addmm"
MATMUL_FORMS = ("mm", "addmm", *LINEAR_OPS, "scaled_mm", "npu_quant_matmul", "onednn_mm", SUM_ADDMM)


# Not frozen: built on every op call, where a frozen dataclass's __init__ costs ~0.7 us more than a slotted one.
# Never assigned after construction (padding builds a new one with dataclasses.replace).
@dataclass(eq=False, slots=True)
class Matmul:
    """``x (m, k) @ w (k, n)`` with this rank's bias contribution.

    Plain: ``x @ w + bias``.
    W8A8 (int8 x, w; Ascend static quant): ``((x @ w in int32) + bias_int32)
    * x_scale * w_scale`` cast to ``out_dtype``; w_scale is per channel.
    fp8 (CUDA ``_scaled_mm``): ``(x @ w) * x_scale * w_scale + bias``.
    A per-token ``x_scale`` (m, 1) travels with the rows, so it is passed to
    ``__call__`` instead of stored.

    ``form``: the matmul op the site had (``fcpass.sites``), which ``__call__``
    runs, so the unfused path computes what the graph did with the graph's
    own op (a linear op, vLLM's or vllm-ascend's GEMM op, torch_npu's quant
    matmul); "" (an eager call) or "mm"/"addmm"/"scaled_mm": aten's.
    """

    w: torch.Tensor
    bias: torch.Tensor | None = None
    w_scale: torch.Tensor | None = None
    x_scale: torch.Tensor | None = None  # per-tensor only
    out_dtype: torch.dtype | None = None
    form: str = ""

    @property
    def scaled(self) -> bool:
        return self.w_scale is not None

    @property
    def n(self) -> int:
        return self.w.shape[1]

    @property
    def result_dtype(self) -> torch.dtype:
        return self.out_dtype if self.scaled else self.w.dtype

    def channel_scale(self) -> torch.Tensor:
        """The float32 per-channel dequant scale (n,) with a per-tensor x_scale folded in: what the NPU kernels
        take as one scale."""
        scale = self.w_scale.to(torch.float32).reshape(-1)
        return scale if self.x_scale is None else scale * self.x_scale.to(torch.float32).reshape(1)

    def signature(self) -> tuple:
        """What validation reads of this matmul: its tensors' shapes and dtypes, and its out dtype."""
        return (tensor_signature(self.w), tensor_signature(self.bias), tensor_signature(self.w_scale),
                tensor_signature(self.x_scale), self.out_dtype)

    def __call__(self, x: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        linear = LINEAR_OPS.get(self.form)
        if linear is not None:
            return linear()(x, self.w.t(), self.bias)
        if not self.scaled:
            return torch.mm(x, self.w) if self.bias is None else torch.addmm(self.bias, x, self.w)
        if self.form == "npu_quant_matmul":  # as the graph called it: the dequant scale, no per-token one
            return torch.ops.npu.npu_quant_matmul(x, self.w, self.w_scale, bias=self.bias,
                                                  output_dtype=SCALAR_TYPE_NUMBERS[self.out_dtype])
        x_scale = row_scale if row_scale is not None else self.x_scale
        if x.dtype == torch.int8 and x.device.type == "npu":
            return npu_w8a8(x, self, row_scale)
        if x.dtype == torch.int8:
            acc = torch._int_mm(x, self.w)
            if self.bias is not None:
                acc = acc + self.bias
            scale = self.w_scale.reshape(1, -1) if x_scale is None else x_scale * self.w_scale.reshape(1, -1)
            return (acc.to(torch.float32) * scale).to(self.out_dtype)
        return torch._scaled_mm(
            x, self.w, scale_a=x_scale, scale_b=_row_vector_or_scalar(self.w_scale),
            bias=self.bias, out_dtype=self.out_dtype,
        )


def npu_w8a8(x: torch.Tensor, mm: Matmul, row_scale: torch.Tensor | None) -> torch.Tensor:
    """The W8A8 Matmul on NPU tensors, where torch has no ``_int_mm``: torch_npu's ``npu_quant_matmul``, which
    computes the same ``(x @ w + bias) * scale [* pertoken_scale]``; a per-tensor x_scale folds into the float32
    channel scale, a per-token one (m, 1) is its ``pertoken_scale`` (m,)."""
    pertoken = None if row_scale is None else row_scale.to(torch.float32).reshape(-1)
    return torch.ops.npu.npu_quant_matmul(x, mm.w, mm.channel_scale(), pertoken_scale=pertoken, bias=mm.bias,
                                          output_dtype=SCALAR_TYPE_NUMBERS[mm.out_dtype])


@dataclass(eq=False, slots=True)  # as Matmul
class OneDNNMatmul:
    """``x @ W + bias`` through vLLM's CPU kernel ``_C.onednn_mm(out, x, bias, handler)``.

    vLLM packs W into a oneDNN handler when the weights load and drops the
    weight tensor, so the graph holds only the handler (an int64 tensor):
    this matmul is called on row chunks like the others, but never sees W.
    """

    handler: torch.Tensor
    n: int
    result_dtype: torch.dtype
    bias: torch.Tensor | None = None
    scaled = False
    w_scale = x_scale = out_dtype = None
    form = "onednn_mm"

    def signature(self) -> tuple:
        """What validation reads of this matmul (the packed weight's own shape is the kernel's to check)."""
        return tensor_signature(self.handler), self.n, self.result_dtype, tensor_signature(self.bias)

    def __call__(self, x: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        out = x.new_empty((x.shape[0], self.n))
        torch.ops._C.onednn_mm(out, x, self.bias, self.handler)
        return out


@dataclass(eq=False, slots=True)  # as Matmul
class SumOfProducts:
    """``x_1 @ w_1 + x_2 @ w_2 + ...`` on the same rows, summed before one collective (Falcon's attention and MLP
    outputs): each product a Matmul or OneDNNMatmul of its own input, added left to right as the graph did (a
    :data:`SUM_ADDMM` term by ``addmm(sum so far, x, w)``).

    The unfused path calls it with the first product's rows and ``others`` holds the rest: the site's own
    tensors, so it runs exactly the graph's matmuls and adds. A fused path gets it joined once per call
    (``fcpass.padding.with_zero_rows``) and calls it on row chunks of ``[x_1 | x_2 | ...]``, each product
    reading its ``widths`` columns: no weight is concatenated.
    """

    products: tuple
    others: tuple[torch.Tensor, ...] = ()  # inputs of products[1:] (unjoined)
    widths: tuple[int, ...] = ()  # columns of each product's input (joined)
    scaled = False
    bias = w_scale = x_scale = out_dtype = None  # each product keeps its own bias

    @property
    def n(self) -> int:
        return self.products[0].n

    @property
    def result_dtype(self) -> torch.dtype:
        return self.products[0].result_dtype

    def inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each product's rows: the call's x and ``others``, or the joined x's column blocks."""
        if not self.widths:
            return (x, *self.others)
        bounds = itertools.accumulate(self.widths, initial=0)
        return tuple(x[:, start:end] for start, end in itertools.pairwise(bounds))

    def signature(self) -> tuple:
        return (tuple(product.signature() for product in self.products),
                tuple(tensor_signature(t) for t in self.others), self.widths)

    def __call__(self, x: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        total = None
        for product, rows in zip(self.products, self.inputs(x)):
            if total is None:
                total = product(rows)
            elif product.form == SUM_ADDMM:
                total = torch.addmm(total, rows, product.w)
            else:
                total = total + product(rows)
        return total


def tensor_signature(t: torch.Tensor | None) -> tuple | None:
    """(shape, dtype) of ``t``; None for None. Built on every op call: kept to attribute reads."""
    return None if t is None else (t.shape, t.dtype)


def _row_vector_or_scalar(scale: torch.Tensor) -> torch.Tensor:
    return scale if scale.numel() == 1 else scale.reshape(1, -1)


# ---------------------------------------------------------------------------
# Exact bias folding, for kernels that take no bias.
#
# The bias of a row-parallel layer is one rank's contribution to a sum
# (vLLM adds it on rank 0 only). Adding it after the scatter would land it on
# that rank's shard alone; skipping the fused kernel on that rank would break
# the collective protocol. Instead the contributing rank widens its matmul:
#     [x, c] @ [w; d] = x @ w + c @ d,   with c @ d == bias per output column
# The exchanged data (the m x n products) is unchanged, so every rank still
# runs the same kernel with the same protocol.

# Columns a fold may add; kernels with a k limit reserve this many on every
# rank, so the fold is never a reason for one rank to decide differently.
MAX_FOLD_COLUMNS = 16
_INT8_MAX = 127

_fold_cache: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
_FOLD_CACHE_SIZE = 256


def fold_bias(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x', w')`` with ``x' @ w' == x @ w + bias`` (int8: in int32, exactly)."""
    coeffs, rows = _bias_rows(w, bias)
    x_cols = torch.tensor(coeffs, dtype=x.dtype, device=x.device).expand(x.shape[0], len(coeffs))
    return torch.cat([x, x_cols], dim=1), rows


def _bias_rows(w: torch.Tensor, bias: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """The widened weight, cached: weights and biases are constants at inference."""
    (w_base, w_key), (b_base, b_key) = _identity(w), _identity(bias)
    key = (w_key, b_key)
    cached = _fold_cache.get(key)
    if cached is not None and cached[0]() is w_base and cached[1]() is b_base:
        _fold_cache.move_to_end(key)
        widened = cached[2]
        return _fold_coefficients(widened.shape[0] - w.shape[0]), widened
    if w.dtype == torch.int8:
        digits = _int8_digits(bias)
    else:
        digits = bias.to(w.dtype).reshape(1, -1)
    widened = torch.cat([w, digits], dim=0)
    _fold_cache[key] = (weakref.ref(w_base), weakref.ref(b_base), widened)
    if len(_fold_cache) > _FOLD_CACHE_SIZE:
        _fold_cache.popitem(last=False)
    return _fold_coefficients(digits.shape[0]), widened


def _identity(t: torch.Tensor):
    """The tensor object owning t's memory, and a key for t's view of it at its current version.

    A freed tensor's memory is reused by the next allocation of that size, so
    an address alone could serve a stale fold for a new weight; the entry
    keeps a weak reference to the owner and is used only while it is alive
    and the same object. (A weight passed as a fresh transpose view each call
    still hits: the view's base is the parameter.)
    """
    base = t._base if t._base is not None else t
    return base, (id(base), t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, base._version)


def _fold_coefficients(num_rows: int) -> list[int]:
    """x-side values of the fold columns: 1 for a float bias; 127,...,127,1 for int8."""
    return [1] if num_rows == 1 else [_INT8_MAX] * (num_rows - 1) + [1]


def _int8_digits(bias: torch.Tensor) -> torch.Tensor:
    """int8 rows d_t with ``127 * sum(d_0..d_{T-1}) + d_T == bias`` (int32)."""
    bias = bias.to(torch.int64)
    high = torch.div(bias, _INT8_MAX, rounding_mode="trunc")
    low = bias - _INT8_MAX * high
    num_high = max(1, -(-int(high.abs().max()) // _INT8_MAX))
    if num_high + 1 > MAX_FOLD_COLUMNS:
        raise ValueError(
            f"quant bias magnitude {int(bias.abs().max())} needs {num_high + 1} int8 fold columns, "
            f"more than MAX_FOLD_COLUMNS={MAX_FOLD_COLUMNS}"
        )
    rows = []
    for _ in range(num_high):
        take = high.clamp(-_INT8_MAX, _INT8_MAX)
        rows.append(take)
        high = high - take
    rows.append(low)
    return torch.stack(rows).to(torch.int8)
