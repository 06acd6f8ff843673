"""Rank bodies for the W8A8 (int8) and fp8 forms, with float64 references.

W8A8 as vllm-ascend's static W8A8 linear: int8 activations and weights, a
per-channel float32 dequant scale, an int32 quant bias added before dequant
(on rank 0 only for a row-parallel layer), bf16 output.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import fcpass
from support.cases import rel_error

QUANT_TOLERANCE = 2e-2  # bf16 output (float16: tighter, held to the same)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def quant_inputs(rank, m, k, n, dtype, seed, with_bias, per_token=False):
    """x (m, k), w (k, n), x_scale, w_scale (n,), bias for ``rank``."""
    g = _gen(seed * 100 + rank)
    if dtype == torch.int8:
        x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        w = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
        bias = torch.randint(-40000, 40000, (n,), generator=g, dtype=torch.int32) if with_bias else None
    else:
        x = torch.randn(m, k, generator=g).to(dtype)
        w = torch.randn(n, k, generator=g).to(dtype).t()  # _scaled_mm wants w column-major
        bias = torch.randn(n, generator=g).to(torch.bfloat16) if with_bias else None
    x_scale = (torch.rand(m, 1, generator=g) + 0.5) / 100 if per_token else torch.tensor(0.02)
    w_scale = (torch.rand(n, generator=g) + 0.5) / 100 if dtype == torch.int8 else torch.tensor(0.03)
    return x, w, x_scale, w_scale, bias


def reference_product(x, w, x_scale, w_scale, bias):
    acc = x.double() @ w.double()
    if x.dtype == torch.int8:
        if bias is not None:
            acc = acc + bias.double()
        return acc * x_scale.double().reshape(-1, 1) * w_scale.double().reshape(1, -1) \
            if x_scale.dim() == 2 else acc * x_scale.double() * w_scale.double()
    acc = acc * x_scale.double() * w_scale.double()
    return acc if bias is None else acc + bias.double()


ROW_PARALLEL_OPS = {"rs": "mm_reduce_scatter_scaled", "ar": "mm_all_reduce_scaled"}


def run_scaled_row_parallel(rank, world_size, kind, dtype, m, k, n, threshold, per_token, out_dtype=torch.bfloat16,
                            config=None):
    """A row-parallel scaled op (``kind`` "rs": mm_reduce_scatter_scaled, "ar": mm_all_reduce_scaled) with the
    quant bias on rank 0 only, against the float64 sum over every rank's product (this rank's shard for rs)."""
    if config is not None:
        fcpass.configure(config)
    name = dist.group.WORLD.group_name
    inputs = [quant_inputs(r, m, k, n, dtype, 1, with_bias=(r == 0), per_token=per_token) for r in range(world_size)]
    x, w, x_scale, w_scale, bias = inputs[rank]
    fcpass.reset_decision_counts()
    op = getattr(torch.ops.fcpass, ROW_PARALLEL_OPS[kind])
    group_args = (name, world_size) if kind == "rs" else (name,)  # an all_reduce reads its group's size itself
    out = op(x, w, x_scale, w_scale, bias, out_dtype, *group_args, threshold)
    (decision,) = fcpass.decision_counts()
    ref = sum(reference_product(*inp) for inp in inputs)
    if kind == "rs":
        shard = m // world_size
        ref = ref[rank * shard:(rank + 1) * shard]
    assert out.dtype == out_dtype and out.shape == ref.shape
    return {"error": rel_error(out, ref), "decision": decision}


def run_scaled_all_gather(rank, world_size, dtype, m, k, ns, threshold, config=None):
    if config is not None:
        fcpass.configure(config)
    name = dist.group.WORLD.group_name
    xs = [quant_inputs(r, m, k, ns[0], dtype, 2, with_bias=False)[0] for r in range(world_size)]
    weights = [quant_inputs(0, m, k, n, dtype, 3 + i, with_bias=True) for i, n in enumerate(ns)]
    x_scale = weights[0][2]
    fcpass.reset_decision_counts()
    gathered, outs = torch.ops.fcpass.all_gather_scaled_mm(
        xs[rank], x_scale, [wt[1] for wt in weights], [wt[3] for wt in weights], [wt[4] for wt in weights],
        torch.bfloat16, name, world_size, threshold,
    )
    (decision,) = fcpass.decision_counts()
    ref_gathered = torch.cat(xs)
    assert torch.equal(gathered.view(torch.uint8) if dtype != torch.int8 else gathered,
                       ref_gathered.view(torch.uint8) if dtype != torch.int8 else ref_gathered)
    errors = [
        rel_error(out, reference_product(ref_gathered, wt[1], x_scale, wt[3], wt[4]))
        for out, wt in zip(outs, weights)
    ]
    return {"error": max(errors), "decision": decision}
