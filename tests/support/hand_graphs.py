"""Hand-built post-grad-style graphs, one per form, traced with make_fx under fake tensors."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

import vllm.distributed.parallel_state  # noqa: F401  (registers torch.ops.vllm.* collectives)
import vllm.model_executor.layers.utils  # noqa: F401  (registers torch.ops.vllm.rocm_unquantized_gemm)

WS = 2
M, K, N = 16, 32, 24
functional = torch.ops._c10d_functional


def _rs(form, t, group, reduce_op="sum", world_size=WS):
    if form == "vllm":
        return torch.ops.vllm.reduce_scatter(t, 0, world_size, group)
    return functional.wait_tensor(functional.reduce_scatter_tensor(t, reduce_op, world_size, group))


def _ag(form, t, group):
    if form == "vllm":
        return torch.ops.vllm.all_gather(t, 0, WS, group)
    return functional.wait_tensor(functional.all_gather_into_tensor(t, WS, group))


def _ar(form, t, group):
    if form == "vllm":
        return torch.ops.vllm.all_reduce(t, group)
    return functional.wait_tensor(functional.all_reduce(t, "sum", group))


def mm_rs(form="vllm", bias=False, reduce_op="sum", extra_user=False, group="tp:0", world_size=WS,
          addmm_scalars=None, bias_shape=(N,)):
    """x @ w.T (+ b) -> reduce_scatter -> relu; w stored (n, k) like a vLLM weight.

    ``addmm_scalars``: addmm's beta/alpha (the bias form); ``bias_shape``: another bias than (n,).
    """

    def f(x, w, b):
        y = torch.addmm(b, x, w.t(), **(addmm_scalars or {})) if bias else torch.mm(x, w.t())
        out = torch.relu(_rs(form, y, group, reduce_op, world_size))
        return (out, y * 2) if extra_user else out

    return make_fx(f, tracing_mode="fake")(torch.randn(M, K), torch.randn(N, K), torch.randn(bias_shape))


def ag_mm(form="vllm", bias=False, num_matmuls=2, other_user=True, group="tp:0", unpad_to=None,
          addmm_scalars=None):
    """all_gather -> several matmuls (+ the gathered rows used elsewhere, like a residual).

    ``unpad_to``: the matmuls read ``g[:unpad_to]``, vLLM's unpad after a padded gather;
    ``addmm_scalars``: the last matmul's addmm beta/alpha.
    """

    def f(x, ws, bs):
        g = _ag(form, x, group)
        rows = g if unpad_to is None else g[:unpad_to]
        outs = [torch.addmm(b, rows, w.t(), **(addmm_scalars if i == len(ws) - 1 and addmm_scalars else {}))
                if bias else torch.mm(rows, w.t()) for i, (w, b) in enumerate(zip(ws, bs))]
        return (*outs, g + 1) if other_user else tuple(outs)

    ws = [torch.randn(N + i, K) for i in range(num_matmuls)]
    bs = [torch.randn(N + i) for i in range(num_matmuls)]
    return make_fx(f, tracing_mode="fake")(torch.randn(M // WS, K), ws, bs)


def count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


FP8 = torch.float8_e4m3fn


def _fp8_inputs(rows):
    return (torch.randn(rows, K).to(FP8), torch.randn(N, K).to(FP8), torch.tensor(0.5), torch.tensor(0.25),
            torch.randn(N).to(torch.bfloat16))


def scaled_mm_rs(form="vllm", bias=True, group="tp:0"):
    """fp8 ``_scaled_mm`` (bf16 out) -> reduce_scatter."""

    def f(x, w, x_scale, w_scale, b):
        y = torch._scaled_mm(x, w.t(), x_scale, w_scale, bias=b if bias else None, out_dtype=torch.bfloat16)
        return _rs(form, y, group)

    return make_fx(f, tracing_mode="fake")(*_fp8_inputs(M))


def ag_scaled_mm(form="vllm", group="tp:0", mixed=False):
    """all_gather of fp8 rows -> two ``_scaled_mm``; ``mixed``: the second one outputs fp16, not bf16."""

    def f(x, w, x_scale, w_scale, b):
        g = _ag(form, x, group)
        y1 = torch._scaled_mm(g, w.t(), x_scale, w_scale, bias=b, out_dtype=torch.bfloat16)
        y2 = torch._scaled_mm(g, w.t(), x_scale, w_scale, out_dtype=torch.float16 if mixed else torch.bfloat16)
        return y1, y2

    return make_fx(f, tracing_mode="fake")(*_fp8_inputs(M // WS))


def _register_vllm_ascend_gemm():
    """Stand-in for vllm-ascend's ``vllm.unquantized_gemm(x, weight, bias)`` (a linear), same qualified name
    and schema (test_passes_vllm_ascend checks it against vllm-ascend's own registration)."""
    if hasattr(torch.ops.vllm, "unquantized_gemm"):
        return

    @torch.library.custom_op("vllm::unquantized_gemm", mutates_args=())
    def unquantized_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.nn.functional.linear(x, weight, bias)

    @unquantized_gemm.register_fake
    def _(x, weight, bias=None):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


_register_vllm_ascend_gemm()
LINEAR_OPS = {
    "unquantized_gemm": lambda: torch.ops.vllm.unquantized_gemm,
    "rocm_unquantized_gemm": lambda: torch.ops.vllm.rocm_unquantized_gemm,
}


def linear_rs(op="unquantized_gemm", form="vllm", bias=True, group="tp:0"):
    """vLLM linear op (weight stored (n, k)) -> reduce_scatter."""

    def f(x, w, b):
        return _rs(form, LINEAR_OPS[op]()(x, w, b if bias else None), group)

    return make_fx(f, tracing_mode="fake")(torch.randn(M, K), torch.randn(N, K), torch.randn(N))


def ag_linear(op="unquantized_gemm", form="vllm", group="tp:0"):
    def f(x, w1, w2, b):
        g = _ag(form, x, group)
        return LINEAR_OPS[op]()(g, w1, b), LINEAR_OPS[op]()(g, w2, None)

    return make_fx(f, tracing_mode="fake")(torch.randn(M // WS, K), torch.randn(N, K), torch.randn(N, K),
                                           torch.randn(N))


# ---------------------------------------------------------------------------
# Forms traced with symbolic sizes (the token count is a symbol, as in vLLM's
# graphs), so padding and unpadding are graph arithmetic, not constants.

def _symbolic(f, *inputs):
    return make_fx(f, tracing_mode="symbolic")(*inputs)


def mm_pad_rs(form="vllm", bias=False, group="tp:0", rows=M - 1):
    """Model-level SP of vLLM's MoE models (DeepSeek-V2, Qwen3-Next): the attention output is padded to a
    multiple of world_size, then reduce-scattered: ``F.pad(y, (0, 0, 0, (-m) % ws))``."""

    def f(x, w, b):
        y = torch.addmm(b, x, w.t()) if bias else torch.mm(x, w.t())
        y = torch.nn.functional.pad(y, (0, 0, 0, (-y.shape[0]) % WS))
        return torch.relu(_rs(form, y, group))

    return _symbolic(f, torch.randn(rows, K), torch.randn(N, K), torch.randn(N))


def mm_sum_rs(form="vllm", bias=False, group="tp:0", pad=False, addmm_term=False):
    """Falcon's layer: attention's and MLP's row-parallel products of the same tokens summed, then one
    reduce_scatter (their k differ: K and 2K); ``pad``: one token short of a multiple of world_size, padded;
    ``addmm_term``: the sum as Inductor's post-grad pattern leaves it, ``addmm(first product, x1, w1)``."""

    def f(x1, x2, w1, w2, b):
        second = torch.addmm(b, x2, w2.t()) if bias else torch.mm(x2, w2.t())
        y = torch.addmm(second, x1, w1.t()) if addmm_term else torch.mm(x1, w1.t()) + second
        if pad:
            y = torch.nn.functional.pad(y, (0, 0, 0, (-y.shape[0]) % WS))
        return torch.relu(_rs(form, y, group))

    rows = M - 1 if pad else M
    inputs = (torch.randn(rows, K), torch.randn(rows, 2 * K), torch.randn(N, K), torch.randn(N, 2 * K), torch.randn(N))
    return _symbolic(f, *inputs) if pad else make_fx(f, tracing_mode="fake")(*inputs)


def ag_unpad_tokens_mm(form="vllm", group="tp:0"):
    """The other half: ``all_gather(h)[:num_tokens]`` before qkv_proj, num_tokens the unpadded count."""

    def f(x, positions, w1, w2):
        g = _ag(form, x, group)[: positions.shape[0]]
        return torch.mm(g, w1.t()), torch.mm(g, w2.t())

    return _symbolic(f, torch.randn(M // WS, K), torch.arange(M - 1), torch.randn(N, K), torch.randn(N + 1, K))


def mm_3d_rs(form="vllm", bias=False, group="tp:0"):
    """A linear on 3-D hidden states [1, s, k]: views to 2-D around the matmul, the scatter on 2-D rows."""

    def f(x, w, b):
        y = torch.nn.functional.linear(x.unsqueeze(0), w, b if bias else None).squeeze(0)
        return _rs(form, y, group)

    return _symbolic(f, torch.randn(M, K), torch.randn(N, K), torch.randn(N))


def ag_3d_mm(form="vllm", group="tp:0"):
    def f(x, w1, w2):
        g = _ag(form, x, group).unsqueeze(0)
        return (torch.nn.functional.linear(g, w1).squeeze(0), torch.nn.functional.linear(g, w2).squeeze(0))

    return _symbolic(f, torch.randn(M // WS, K), torch.randn(N, K), torch.randn(N + 1, K))


# Ascend static W8A8 (vllm-ascend's W8A8 linear): npu_quantize, then npu_quant_matmul with the int8
# weight stored (k, n), a float32 dequant scale and an int32 bias. Stand-ins: tests/standins/npu.

# torch-npu's int dtype arguments (c10 ScalarType numbers), as vllm-ascend's traced graphs hold them.
BF16_SCALAR_TYPE, QINT8_SCALAR_TYPE = 15, 12


def _npu_ops():
    import sys

    from support.npu_runs import STANDIN_DIR

    if STANDIN_DIR not in sys.path:
        sys.path.insert(0, STANDIN_DIR)
    import torch_npu  # noqa: F401  (the stand-in: registers torch.ops.npu.npu_quantize / npu_quant_matmul)

    return torch.ops.npu


def _quant_linear(x_int8, w, deq_scale, bias):
    return _npu_ops().npu_quant_matmul(x_int8, w, deq_scale, bias=bias, output_dtype=BF16_SCALAR_TYPE)


def _quantize(x, in_scale):
    return _npu_ops().npu_quantize(x, in_scale, None, QINT8_SCALAR_TYPE, -1, False)


def quant_inputs(rows, num_weights=1, seed=0):
    """(x float rows, input scale, [(w int8 (k, n), dequant scale, int32 bias)] * num_weights)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g)
    weights = [(torch.randint(-127, 128, (K, N + i), generator=g, dtype=torch.int8),
                torch.rand(N + i, generator=g) * 1e-3, torch.randint(-1000, 1000, (N + i,), generator=g,
                                                                     dtype=torch.int32))
               for i in range(num_weights)]
    return x, torch.tensor([20.0]), weights


def npu_quant_mm_rs(form="vllm", bias=True, group="tp:0", collective=_rs):
    """quantize -> npu_quant_matmul (row-parallel, bias on rank 0 only) -> reduce_scatter (``collective``)."""

    def f(x, in_scale, weights):
        (w, scale, b), = weights
        return collective(form, _quant_linear(_quantize(x, in_scale), w, scale, b if bias else None), group)

    _npu_ops()
    return make_fx(f, tracing_mode="fake")(*quant_inputs(M))


def _register_vllm_ascend_quantize():
    """Stand-in for vllm-ascend's ``vllm.quantize`` (its W8A8 linear's static quantization, registered in its
    ops/register_custom_ops.py with this signature, checked as the gemm's): ``npu_quantize(x,
    scale_reciprocal, offset, qint8, -1, False)`` inside."""
    if hasattr(torch.ops.vllm, "quantize"):
        return

    @torch.library.custom_op("vllm::quantize", mutates_args=())
    def quantize(in_tensor: torch.Tensor, input_scale: torch.Tensor, input_scale_reciprocal: torch.Tensor,
                 input_offset: torch.Tensor) -> torch.Tensor:
        return _npu_ops().npu_quantize(in_tensor, input_scale_reciprocal, input_offset, QINT8_SCALAR_TYPE, -1, False)

    @quantize.register_fake
    def _(in_tensor, input_scale, input_scale_reciprocal, input_offset):
        return in_tensor.new_empty(in_tensor.shape, dtype=torch.int8)


def register_vllm_ascend_standins() -> None:
    """The vllm-ascend ops the hand-built graphs call, where vllm-ascend's own are not loaded."""
    _register_vllm_ascend_gemm()
    _register_vllm_ascend_quantize()


def ag_npu_quant_mm(form="vllm", group="tp:0", quantize="npu"):
    """all_gather -> quantize -> two npu_quant_matmul (qkv-like), the float rows also used elsewhere.

    ``quantize``: "npu" (``npu.npu_quantize``) or "vllm" (vllm-ascend's ``vllm.quantize``, what its W8A8
    linear emits)."""

    def f(x, in_scale, weights):
        g = _ag(form, x, group)
        if quantize == "vllm":
            q = torch.ops.vllm.quantize(g, 1 / in_scale, in_scale, torch.zeros_like(in_scale))
        else:
            q = _quantize(g, in_scale)
        return (*(_quant_linear(q, w, scale, b) for w, scale, b in weights), g + 1)

    _npu_ops()
    _register_vllm_ascend_quantize()
    return make_fx(f, tracing_mode="fake")(*quant_inputs(M // WS, num_weights=2))


# matmul -> all_reduce: the row-parallel linear of every dense model on current vLLM.
_AR_MATMULS = {  # name: (matmul of (x, w stored (n, k), bias or None), its inputs)
    "mm": (lambda x, w, b: torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t()),
           lambda bias_shape: (torch.randn(M, K), torch.randn(N, K), torch.randn(bias_shape))),
    "linear_3d": (lambda x, w, b: torch.nn.functional.linear(x.unsqueeze(0), w, b).squeeze(0),
                  lambda bias_shape: (torch.randn(M, K), torch.randn(N, K), torch.randn(bias_shape))),
    "scaled_mm": (lambda x, w, b: torch._scaled_mm(x[0], w[0].t(), x[1], w[1], bias=b, out_dtype=torch.bfloat16),
                  lambda bias_shape: ((_fp8_inputs(M)[0], torch.tensor(0.5)), (_fp8_inputs(M)[1], torch.tensor(0.25)),
                                      torch.randn(bias_shape).to(torch.bfloat16))),
}


def mm_ar(form="vllm", bias=False, matmul="mm", extra_user=False, group="tp:0", bias_shape=(N,)):
    """A matmul (``_AR_MATMULS``; the bias on rank 0 only in vLLM) -> all_reduce -> relu."""
    product, inputs = _AR_MATMULS[matmul]

    def f(x, w, b):
        y = product(x, w, b if bias else None)
        out = torch.relu(_ar(form, y, group))
        return (out, y * 2) if extra_user else out

    return make_fx(f, tracing_mode="symbolic" if matmul == "linear_3d" else "fake")(*inputs(bias_shape))


def npu_quant_mm_ar(form="vllm", bias=True, group="tp:0"):
    """quantize -> npu_quant_matmul -> all_reduce: vllm-ascend's static W8A8 row-parallel linear."""
    return npu_quant_mm_rs(form, bias, group, collective=_ar)


def apply_pass(gm, **config):
    """Run FlashCommPass(PassConfig(**config)) on ``gm`` in place; returns the pass (for matched/report)."""
    import fcpass
    from passes import FlashCommPass

    flashcomm = FlashCommPass(fcpass.PassConfig(**config))
    flashcomm(gm.graph)
    gm.recompile()
    return flashcomm
