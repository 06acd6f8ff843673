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
from fcpass.matmuls import fold_bias


def with_zero_rows(call: FusedCall) -> FusedCall:
    """The same reduction over x padded with ``call.pad_rows`` zero rows, exactly."""
    if not call.pad_rows:
        return call
    (mm,) = call.matmuls
    x = call.x
    if mm.bias is not None:  # validation (fp8) and the guard (oneDNN) keep unfoldable biases off this path
        x, w = fold_bias(x, mm.w, mm.bias)
        mm = dataclasses.replace(mm, w=w, bias=None)
    x = append_zero_rows(x, call.pad_rows)
    row_scale = None if call.row_scale is None else append_zero_rows(call.row_scale, call.pad_rows)
    return call._replace(x=x, matmuls=(mm,), row_scale=row_scale, pad_rows=0)


def append_zero_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros((rows, *t.shape[1:]))])
