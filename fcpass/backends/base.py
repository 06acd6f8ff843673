"""What a backend provides: kernel limits, a default threshold, fused paths."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from fcpass.guard import GuardFacts, KernelLimits
from fcpass.matmuls import Matmul

MM_REDUCE_SCATTER = "mm_reduce_scatter"
ALL_GATHER_MM = "all_gather_mm"
MM_ALL_REDUCE = "mm_all_reduce"


class FusedCall(NamedTuple):
    """One validated call, as every backend's fused path receives it.

    A NamedTuple (immutable, and built on every op call, where a frozen dataclass costs ~1.5 us more).

    ``x`` is this rank's input (the full m rows for mm_reduce_scatter and
    mm_all_reduce, the local shard for all_gather_mm); ``row_scale`` is a
    per-token activation scale that travels with the rows (not for
    all_gather_mm); ``pad_rows``
    zero rows follow the product before the scatter (mm_reduce_scatter only;
    backends receive calls with the padding already applied, pad_rows 0).
    """

    x: torch.Tensor
    matmuls: tuple[Matmul, ...]
    group: dist.ProcessGroup
    group_name: str
    world_size: int
    row_scale: torch.Tensor | None = None
    pipeline_chunks: int = 0
    pad_rows: int = 0
    options: object = None  # the backend's own options for this call (Backend.options, Backend.reserve)


class Backend:
    name: str = ""
    default_threshold_tokens: int = 0

    def default_threshold(self, family: str, facts: GuardFacts) -> int:
        """The threshold where neither the op, the config nor a table gives one; reads rank-equal facts only."""
        return self.default_threshold_tokens

    def limits(self, family: str, call: FusedCall) -> KernelLimits | None:
        """Static limits of this backend's kernel for ``family``; None: cannot fuse it."""
        raise NotImplementedError

    def never_pays(self, family: str, device_type: str) -> str | None:
        """Why this backend's fused path for ``family`` on ``device_type`` tensors is never taken by default (its
        default threshold is above every token count), or None. Where neither a config's threshold nor a
        table gives one, the rewrite leaves such a site alone with this reason."""
        return None

    def unsupported(self, family: str, call: FusedCall) -> str | None:
        """Why this backend's kernel for ``family`` cannot take this call at any size (read from rank-equal facts:
        dtypes, the matmul's kind), or None."""
        return None

    def options(self, config) -> object:
        """What this backend reads of a ``PassConfig`` (its own fields; None: nothing), planned once per call
        signature and handed to ``limits``, ``reserve`` and the fused path as ``call.options``."""
        return None

    def reserve(self, family: str, call: FusedCall) -> object:
        """Reserve what this backend's fused kernel needs for the call, when it is planned (its first call of a
        signature: vLLM runs every size it captures eagerly first); returns the options the fused path runs with
        (other than ``call.options`` where what it needs cannot be had now, and the call takes this backend's
        other path). Reads rank-equal facts only (every rank plans the same calls in the same order)."""
        return call.options

    def mm_reduce_scatter(self, call: FusedCall) -> torch.Tensor:
        raise NotImplementedError

    def all_gather_mm(self, call: FusedCall) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    def mm_all_reduce(self, call: FusedCall) -> torch.Tensor:
        raise NotImplementedError
