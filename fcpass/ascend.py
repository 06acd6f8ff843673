"""vllm-ascend's run-time token padding, for the fused replacement of its FlashComm all_gather.

``vllm.maybe_all_gather_and_maybe_unpad(x, True)`` gathers the token shards
and drops the last ``pad_size`` rows, a number vllm-ascend keeps in its
forward context (its fake impl does not drop them). The fused replacement
gathers inside ``fcpass.all_gather_mm`` and drops the same rows from each
result with :func:`drop_token_padding`, read from the same place.
"""

from __future__ import annotations

import torch

from fcpass import oplib
from fcpass.vllm import state


@oplib.define("drop_token_padding")
def drop_token_padding(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` without vllm-ascend's trailing padding rows (a copy: custom ops may not return views)."""
    pad = state.ascend_pad_size()
    return rows[: rows.shape[0] - pad].clone()


@oplib.fake("drop_token_padding")
def _(rows):
    return rows.new_empty(rows.shape)  # as vllm-ascend's gather fake: the padding is invisible when tracing
