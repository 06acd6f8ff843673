"""Hand-built post-grad-style graphs, one per form, traced with make_fx under fake tensors."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

import vllm.distributed.parallel_state  # noqa: F401  (registers torch.ops.vllm.* collectives)
import vllm.model_executor.layers.utils  # noqa: F401  (registers torch.ops.vllm.rocm_unquantized_gemm)

WS = 2
M, K, N = 16, 32, 24
functional = torch.ops._c10d_functional


def _rs(form, t, group, reduce_op="sum"):
    if form == "vllm":
        return torch.ops.vllm.reduce_scatter(t, 0, WS, group)
    return functional.wait_tensor(functional.reduce_scatter_tensor(t, reduce_op, WS, group))


def _ag(form, t, group):
    if form == "vllm":
        return torch.ops.vllm.all_gather(t, 0, WS, group)
    return functional.wait_tensor(functional.all_gather_into_tensor(t, WS, group))


def mm_rs(form="vllm", bias=False, reduce_op="sum", extra_user=False, group="tp:0"):
    """x @ w.T (+ b) -> reduce_scatter -> relu; w stored (n, k) like a vLLM weight."""

    def f(x, w, b):
        y = torch.addmm(b, x, w.t()) if bias else torch.mm(x, w.t())
        out = torch.relu(_rs(form, y, group, reduce_op))
        return (out, y * 2) if extra_user else out

    return make_fx(f, tracing_mode="fake")(torch.randn(M, K), torch.randn(N, K), torch.randn(N))


def ag_mm(form="vllm", bias=False, num_matmuls=2, other_user=True, group="tp:0", unpad_to=None):
    """all_gather -> several matmuls (+ the gathered rows used elsewhere, like a residual).

    ``unpad_to``: the matmuls read ``g[:unpad_to]``, vLLM's unpad after a padded gather.
    """

    def f(x, ws, bs):
        g = _ag(form, x, group)
        rows = g if unpad_to is None else g[:unpad_to]
        outs = [torch.addmm(b, rows, w.t()) if bias else torch.mm(rows, w.t()) for w, b in zip(ws, bs)]
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
    """Stand-in for vllm-ascend's ``vllm.unquantized_gemm(x, weight, bias)`` (a linear), same qualified name."""
    if hasattr(torch.ops.vllm, "unquantized_gemm"):
        return

    @torch.library.custom_op("vllm::unquantized_gemm", mutates_args=())
    def unquantized_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.nn.functional.linear(x, weight, bias)

    @unquantized_gemm.register_fake
    def _(x, weight, bias):
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
