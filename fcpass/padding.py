"""Zero rows after the product, before the scatter: vLLM pads the token count to a multiple of world_size.

``reduce_scatter(pad(x @ w + bias))`` has zero padded rows. Padding x
instead gives zero products, but the bias would land on the padded rows
too; so the bias (this rank's contribution to the sum) is folded into the
matmul first (``fold_bias``: ``[x, 1] @ [w; bias]``), and the zero rows of
the widened x then carry no bias. Fused kernels get the padded call and
never see pad_rows.
"""

from __future__ import annotations

import dataclasses

import torch

from fcpass.backends.base import FusedCall
from fcpass.matmuls import SumOfProducts, fold_bias


def with_zero_rows(call: FusedCall) -> FusedCall:
    """The same reduction over x padded with ``call.pad_rows`` zero rows, exactly; a sum of products is joined
    into one x first (its inputs side by side), as the kernels take one x."""
    (mm,) = call.matmuls
    if not call.pad_rows and not isinstance(mm, SumOfProducts):
        return call
    if isinstance(mm, SumOfProducts):
        pairs = [_without_bias(rows, product, call.pad_rows) for rows, product in zip(mm.inputs(call.x), mm.products)]
        x = torch.cat([rows for rows, _ in pairs], dim=1)
        mm = SumOfProducts(tuple(product for _, product in pairs), widths=tuple(rows.shape[1] for rows, _ in pairs))
    else:
        x, mm = _without_bias(call.x, mm, call.pad_rows)
    x = append_zero_rows(x, call.pad_rows) if call.pad_rows else x
    row_scale = None if call.row_scale is None else append_zero_rows(call.row_scale, call.pad_rows)
    return call._replace(x=x, matmuls=(mm,), row_scale=row_scale, pad_rows=0)


def _without_bias(x: torch.Tensor, mm, pad_rows: int):
    """``(x, mm)`` with mm's bias folded into both where zero rows follow (validation (fp8) and the guard
    (oneDNN) keep unfoldable biases off this path)."""
    if not pad_rows or mm.bias is None:
        return x, mm
    x, w = fold_bias(x, mm.w, mm.bias)
    return x, dataclasses.replace(mm, w=w, bias=None)


def append_zero_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros((rows, *t.shape[1:]))])
