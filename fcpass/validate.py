"""Input checks shared by the real and the fake impls: shapes and dtypes only.

Each failure names the op and the problem, so a bad graph or a bad call
fails at trace time (fake impl) or at the first call, never in a collective.
"""

from __future__ import annotations

import torch

from fcpass.matmuls import FLOAT_DTYPES, FP8_DTYPES, QUANT_OUT_DTYPES, Matmul, OneDNNMatmul, SumOfProducts


class FusedOpInputError(ValueError):
    pass


def check_matmul(op: str, x: torch.Tensor, mm: Matmul | OneDNNMatmul, index: int = 0) -> None:
    where = f"fcpass::{op}" + (f" (weight {index})" if index else "")
    if isinstance(mm, SumOfProducts):
        _check_sum(op, x, mm)
        return
    if isinstance(mm, OneDNNMatmul):
        _check_onednn(where, x, mm)
        return
    if x.dim() != 2 or mm.w.dim() != 2:
        raise FusedOpInputError(f"{where}: x and w must be 2-D, got x {tuple(x.shape)}, w {tuple(mm.w.shape)}")
    if x.shape[1] != mm.w.shape[0]:
        raise FusedOpInputError(f"{where}: k mismatch, x has k={x.shape[1]} but w has k={mm.w.shape[0]}")
    if x.dtype != mm.w.dtype:
        raise FusedOpInputError(f"{where}: dtype mismatch, x is {x.dtype} but w is {mm.w.dtype}")
    n = mm.w.shape[1]
    if not mm.scaled:
        if x.dtype not in FLOAT_DTYPES:
            raise FusedOpInputError(
                f"{where}: dtype {x.dtype} not supported (use {sorted(map(str, FLOAT_DTYPES))}; "
                "int8/fp8 go through the *_scaled ops)"
            )
        _check_bias(where, mm.bias, n, x.dtype)
        return
    if x.dtype == torch.int8:
        bias_dtype = torch.int32  # vllm-ascend's quant_bias, added before dequant
    elif x.dtype in FP8_DTYPES:
        bias_dtype = mm.out_dtype
        if mm.x_scale is None:
            raise FusedOpInputError(f"{where}: fp8 needs an x_scale")
    else:
        raise FusedOpInputError(f"{where}: dtype {x.dtype} not supported by the scaled ops (int8 or fp8)")
    if mm.out_dtype not in QUANT_OUT_DTYPES:
        raise FusedOpInputError(f"{where}: out_dtype {mm.out_dtype} not supported (bf16, fp16, fp32)")
    if mm.w_scale.dtype != torch.float32 or mm.w_scale.numel() not in (1, n):
        raise FusedOpInputError(
            f"{where}: w_scale must be float32 with 1 or n={n} elements, "
            f"got {mm.w_scale.dtype} {tuple(mm.w_scale.shape)}"
        )
    if mm.x_scale is not None and (mm.x_scale.dtype != torch.float32 or mm.x_scale.dim() > 1):
        raise FusedOpInputError(f"{where}: x_scale must be a float32 per-tensor scale")
    _check_bias(where, mm.bias, n, bias_dtype)


def _check_sum(op: str, x: torch.Tensor, mm: SumOfProducts) -> None:
    """Every product a valid matmul of its own input, all of the same rows into the same (m, n) and dtype."""
    inputs = mm.inputs(x)
    if len(mm.products) < 2 or len(inputs) != len(mm.products):
        raise FusedOpInputError(f"fcpass::{op}: a sum needs two or more products, each with its x; got "
                                f"{len(inputs)} x for {len(mm.products)} weights")
    for i, (rows, product) in enumerate(zip(inputs, mm.products)):
        check_matmul(op, rows, product, i)
        if rows.shape[0] != x.shape[0] or product.n != mm.n or product.result_dtype != mm.result_dtype:
            raise FusedOpInputError(
                f"fcpass::{op}: product {i} is ({rows.shape[0]}, {product.n}) {product.result_dtype}, product 0 "
                f"({x.shape[0]}, {mm.n}) {mm.result_dtype}: a sum needs one shape and dtype")


def check_row_scale(op: str, x: torch.Tensor, row_scale: torch.Tensor) -> None:
    if row_scale.dtype != torch.float32 or row_scale.shape != (x.shape[0], 1):
        raise FusedOpInputError(
            f"fcpass::{op}: per-token x_scale must be float32 ({x.shape[0]}, 1), "
            f"got {row_scale.dtype} {tuple(row_scale.shape)}"
        )


def check_world_size(op: str, world_size: int) -> None:
    if world_size < 1:
        raise FusedOpInputError(f"fcpass::{op}: world_size must be >= 1, got {world_size}")


def _check_onednn(where: str, x: torch.Tensor, mm: OneDNNMatmul) -> None:
    """Only what the graph shows: the packed weight's k is inside the handler, the kernel checks it."""
    if x.dim() != 2:
        raise FusedOpInputError(f"{where}: x must be 2-D, got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES or x.dtype != mm.result_dtype:
        raise FusedOpInputError(f"{where}: oneDNN matmul of {x.dtype} x into {mm.result_dtype} not supported")
    if mm.handler.dtype != torch.int64 or mm.handler.numel() != 1:
        raise FusedOpInputError(f"{where}: oneDNN handler must be one int64, got {mm.handler.dtype} "
                                f"{tuple(mm.handler.shape)}")
    _check_bias(where, mm.bias, mm.n, x.dtype)


def check_pad_rows(op: str, mm: Matmul | OneDNNMatmul, pad_rows) -> None:
    if isinstance(pad_rows, int) and pad_rows < 0:
        raise FusedOpInputError(f"fcpass::{op}: pad_rows must be >= 0, got {pad_rows}")
    if mm.bias is not None and mm.scaled and mm.w.dtype in FP8_DTYPES and not _is_zero(pad_rows):
        raise FusedOpInputError(
            f"fcpass::{op}: pad_rows with an fp8 bias is not supported (the bias is added after the "
            "scaling, so it cannot be kept off the padded rows by folding)"
        )


def _is_zero(value) -> bool:
    return isinstance(value, int) and value == 0


def check_divisible(op: str, num_tokens, world_size: int) -> None:
    """reduce_scatter needs m % world_size == 0; checked only for concrete sizes (no guard on a SymInt)."""
    if isinstance(num_tokens, int) and num_tokens % world_size:
        raise FusedOpInputError(
            f"fcpass::{op}: token count {num_tokens} is not divisible by world_size {world_size}; "
            "pad the tokens before the reduce_scatter (as vLLM's maybe_pad_and_reduce does)"
        )


def _check_bias(where: str, bias: torch.Tensor | None, n: int, dtype: torch.dtype) -> None:
    if bias is None:
        return
    if bias.shape != (n,):
        raise FusedOpInputError(f"{where}: bias must have shape ({n},), got {tuple(bias.shape)}")
    if bias.dtype != dtype:
        raise FusedOpInputError(f"{where}: bias dtype must be {dtype}, got {bias.dtype}")
